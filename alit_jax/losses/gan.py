"""Adversarial-loss pieces of ALIT's stage-2 fine-tuning (pure functions, float32).

How the reference combines them (``VQLPIPSWithDiscriminator`` with ``disc_start=0``,
``disc_weight=0.2``, ``perceptual_weight=1``, hinge loss; one instance per rollout iteration and
only the sampled iteration's instance is used in a step):

* generator step (``optimizer_idx == 0``)::

    nll = nll_loss(x, x_rec, lpips(x, x_rec))            # mean |x - x_rec| + mean LPIPS
    g = generator_loss(discriminator(x_rec, train=True))  # BatchNorm in train mode here too
    w = adaptive_weight(grad(nll, last_layer), grad(g, last_layer), disc_weight=gan_weight)
    loss = nll + w * disc_factor(gan_weight) * g

  where ``last_layer`` is the base tokenizer decoder's ``conv_out`` kernel;
* discriminator step (``optimizer_idx == 1``)::

    loss = disc_factor(gan_weight) * hinge_d_loss(D(stop_grad(x)), D(stop_grad(x_rec)))

  with two separate discriminator calls (so real and fake are batch-normalised separately and the
  running statistics are updated twice).

``gan_weight`` comes from :func:`gan_weight_schedule` (by epoch) and the step kind from
:func:`gan_optimizer_idx` (by step).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alit_jax.convert import mapping
from alit_jax.losses.discriminator import NLayerDiscriminator
from alit_jax.losses.lpips import lpips_from_state_dict

NUM_ROLLOUT_ITERS = 8


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (mean relu(1 - real) + mean relu(1 + fake)); logits of any shape -> scalar float32."""
  real = jnp.asarray(logits_real, jnp.float32)
  fake = jnp.asarray(logits_fake, jnp.float32)
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (mean softplus(-real) + mean softplus(fake)) -> scalar float32."""
  real = jnp.asarray(logits_real, jnp.float32)
  fake = jnp.asarray(logits_fake, jnp.float32)
  return 0.5 * (jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake)))


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  """-mean(logits_fake) -> scalar float32."""
  return -jnp.mean(jnp.asarray(logits_fake, jnp.float32))


def nll_loss(
  inputs: jax.Array, reconstructions: jax.Array, p_loss: jax.Array, perceptual_weight: float = 1.0
) -> jax.Array:
  """The reference's ``nll_loss``: mean |x - x_rec| + perceptual_weight * mean(p_loss).

  Args:
    inputs: (B, H, W, 3) images.
    reconstructions: (B, H, W, 3).
    p_loss: (B,) LPIPS distances (the reference broadcasts its (B, 1, 1, 1) over the pixels
      before the mean, which equals adding the mean).
    perceptual_weight: weight of the LPIPS term.

  Returns:
    Scalar float32.
  """
  l1 = jnp.mean(jnp.abs(inputs.astype(jnp.float32) - reconstructions.astype(jnp.float32)))
  return l1 + perceptual_weight * jnp.mean(jnp.asarray(p_loss, jnp.float32))


def _global_norm(tree: Any) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError("adaptive_weight: empty gradient")
  return jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(g, jnp.float32))) for g in leaves))


def adaptive_weight(
  nll_grad: Any, g_grad: Any, disc_weight: float | jax.Array, max_weight: float = 1e4
) -> jax.Array:
  """VQGAN's adaptive generator weight, as the reference's ``calculate_adaptive_weight``.

  ``clamp(||nll_grad|| / (||g_grad|| + 1e-4), 0, max_weight)``, detached, times ``disc_weight``.
  The two gradients are those of the nll loss and of the generator loss w.r.t. the base
  decoder's last layer (``conv_out`` kernel), e.g. from ``jax.grad``; the L2 norm is taken over
  all elements (any layout gives the same norm). A precomputed non-negative norm (scalar) is also
  accepted, as its own norm equals itself. Pytrees are reduced to one global norm.

  Args:
    nll_grad: gradient (array or pytree) of the nll loss, or its norm.
    g_grad: gradient (array or pytree) of the generator loss, or its norm.
    disc_weight: the reference's ``discriminator_weight`` (set to the scheduled GAN weight).
    max_weight: upper clamp.

  Returns:
    Scalar float32 with zero gradient.
  """
  ratio = _global_norm(nll_grad) / (_global_norm(g_grad) + 1e-4)
  ratio = jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight))
  return ratio * jnp.asarray(disc_weight, jnp.float32)


def gan_weight_schedule(
  epoch: Any,
  *,
  off_until: int = 20,
  mid_until: int = 100,
  mid_weight: float = 0.2,
  final_weight: float = 0.8,
) -> Any:
  """The reference's GAN weight by (integer) epoch, bounds inclusive as in the engine.

  ``0`` for ``epoch <= off_until`` (epochs 0..20: 21 epochs), ``mid_weight`` for
  ``epoch <= mid_until`` (21..100), ``final_weight`` after.

  Args:
    epoch: python number (returns a python float) or array (returns float32, jit-friendly).

  Returns:
    The weight.
  """
  if isinstance(epoch, (int, float, np.integer, np.floating)):
    if epoch <= off_until:
      return 0.0
    return float(mid_weight) if epoch <= mid_until else float(final_weight)
  epoch = jnp.asarray(epoch)
  return jnp.where(
    epoch <= off_until, 0.0, jnp.where(epoch <= mid_until, mid_weight, final_weight)
  ).astype(jnp.float32)


def disc_factor(gan_weight: Any, factor: float = 1.0) -> Any:
  """The reference's ``disc_factor``: ``factor`` when the GAN weight is non-zero, else 0.

  (The reference gets this from ``adopt_weight`` with ``global_step = +inf / -inf``.)
  """
  if isinstance(gan_weight, (int, float, np.integer, np.floating)):
    return float(factor) if gan_weight != 0 else 0.0
  return jnp.where(jnp.asarray(gan_weight) != 0, factor, 0.0).astype(jnp.float32)


def gan_optimizer_idx(step: int, gan_weight: float, max_iters: int = NUM_ROLLOUT_ITERS) -> int:
  """Which update the reference makes at a data step: 0 generator, 1 discriminator.

  With GAN weight 0 every step is a generator step. Otherwise the reference's expression
  ``1 - ((step + 1) % (max_iters + 1) == 0)`` makes 8 of every 9 steps discriminator steps and
  only steps 8, 17, 26, ... generator steps. The rollout iteration trained (and whose
  discriminator is used) advances only after a generator step.
  """
  if gan_weight == 0:
    return 0
  return 0 if (step + 1) % (max_iters + 1) == 0 else 1


# ----------------------------------------------------------------------------------------------
# Conversion of `gan_losses.*`.

_ITER_RE = re.compile(r"^gan_losses\.(\d+)\.(perceptual_loss|discriminator)\.")
_TARGET_CACHE: dict[str, Any] = {}


def discriminator_target() -> dict[str, Any]:
  """Shapes of the default ``NLayerDiscriminator`` variables (``jax.eval_shape``, cached)."""
  if "disc" not in _TARGET_CACHE:
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    _TARGET_CACHE["disc"] = jax.eval_shape(
      lambda a: NLayerDiscriminator().init(jax.random.key(0), a, train=False), x
    )
  return _TARGET_CACHE["disc"]


def convert_gan_losses(
  state_dict: Mapping[str, Any],
  *,
  num_iters: int | None = NUM_ROLLOUT_ITERS,
  name: str = "checkpoint",
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """Converts ALIT's ``gan_losses.<i>.*`` keys (one loss module per rollout iteration).

  Args:
    state_dict: flat state dict of numpy arrays; keys outside ``gan_losses.`` are ignored.
    num_iters: expected number of loss modules (rollout iterations); None infers it from the keys.
    name: source name for error messages.

  Returns:
    (discriminators, lpips): two lists of ``num_iters`` variable dicts, for
    :class:`NLayerDiscriminator` (``params`` + ``batch_stats``) and
    :class:`alit_jax.losses.lpips.LPIPS` (``params``).

  Raises:
    mapping.ConversionError: listing, for every iteration, missing / unexpected / mis-shaped
      keys; keys under ``gan_losses.`` that belong to no iteration or submodule.
  """
  keys = [k for k in state_dict if k.startswith("gan_losses.")]
  problems: list[str] = []
  seen: set[int] = set()
  for k in keys:
    m = _ITER_RE.match(k)
    if m is None:
      problems.append(f"unexpected {k} (not gan_losses.<i>.perceptual_loss/discriminator)")
      continue
    seen.add(int(m.group(1)))
  if num_iters is None:
    num_iters = max(seen) + 1 if seen else 0
    if num_iters == 0:
      raise mapping.ConversionError(f"{name}: no gan_losses.* keys")
  for i in sorted(seen):
    if i >= num_iters:
      problems.append(f"unexpected gan_losses.{i}.* (expected iterations 0..{num_iters - 1})")
  discs: list[dict[str, Any]] = []
  lpipss: list[dict[str, Any]] = []
  for i in range(num_iters):
    try:
      discs.append(
        mapping.state_dict_to_tree(
          state_dict, discriminator_target(), prefix=f"gan_losses.{i}.discriminator.", name=name
        )
      )
    except mapping.ConversionError as e:
      problems.append(str(e))
    try:
      lpipss.append(
        lpips_from_state_dict(state_dict, f"gan_losses.{i}.perceptual_loss.", name=name)
      )
    except mapping.ConversionError as e:
      problems.append(str(e))
  if problems:
    raise mapping.ConversionError(
      f"{name}: gan_losses do not match {num_iters} NLayerDiscriminator + LPIPS:\n"
      + "\n".join(problems)
    )
  return discs, lpipss
