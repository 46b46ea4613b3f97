"""Pure, jit-able steps of the adversarial trainings: ALIT stage 2 and base-VQGAN training.

Two tasks share one pair of steps (`generator_step`, `discriminator_step`): `gan_tasks.ALITTask`
(stage 2: base encoder -> ALIT rollout -> the code at one rollout iteration -> base decoder) and
`gan_tasks.VQGANTask` (a VQGAN from scratch); `gan_tasks.py` says what each reconstructs, and how.

Generator objective (the reference's `VQLPIPSWithDiscriminator`, optimizer_idx 0):

    nll  = mean |x - x_rec| + perceptual_weight * mean LPIPS(x, x_rec)     (LPIPS frozen)
    g    = -mean D_i(x_rec)                        (D_i in train mode: its BatchNorm stats move)
    w    = clamp(|d nll / d W| / (|d g / d W| + 1e-4), 0, 1e4) * disc_weight    (W: the base
           decoder's conv_out kernel; detached)
    loss = nll + w * disc_factor * g + aux          (aux: ALIT quantizer loss / VQ loss)

with `disc_weight` the scheduled GAN weight (0.2 while it is 0, as the reference, which only
affects the logged `d_weight`) and `disc_factor` 1 when the GAN weight is non-zero, else 0.

Gradients. The decoder is split before its last layer (`decode(..., features_only=True)` and
`base_tokenizers.decoder_conv_out`): one forward with `jax.vjp` up to the features h, the last
layer's vjp gives d nll / dW and d g / dW from the cotangents of the reconstruction, and one
backward of the generator with the combined cotangent `c_nll + w * disc_factor * c_g` gives the
full gradient. That is one LPIPS backward, one discriminator backward and one generator backward
(the reference backpropagates LPIPS and D twice).

Discriminator objective (optimizer_idx 1): `disc_factor * hinge(D_i(x), D_i(sg(x_rec)))` with two
train-mode calls (real, then fake). The discriminators are stacked on a leading axis (one per
rollout iteration; one for `VQGANTask`), and each has its own AdamW state with its own step count,
like PyTorch's per-parameter `step` (a discriminator's parameters only have gradients when its
iteration is trained).

Reference quirk kept (`GanSpec.generator_updates_discriminator`): the reference's generator
optimizer is built from all parameters that require grad, including the discriminators, and the
generator loss backpropagates into D_i; so every generator step also moves D_i by AdamW
(generator lr, weight decay 0.05 with timm's mask, no clipping) along
`w * disc_factor * d g / d theta_D` (towards the generator's interest), and while the GAN weight
is 0 it only weight-decays D_i.

Train state (a plain dict, sharded and checkpointed like stage 1's):

    {"step", "params": {"alit": ..., "base": ...} (VQGANTask: {"base": ...}), "opt_state",
     "ema_params", "disc_params" (N, ...), "disc_batch_stats" (N, ...), "disc_opt_state" (N, ...),
     "gen_disc_opt_state" (N, ...; only with the quirk)}

The frozen LPIPS variables are a separate argument (`frozen = {"lpips": ...}` or `{}`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from alit_jax.losses import gan as gan_lib
from alit_jax.losses.discriminator import NLayerDiscriminator
from alit_jax.losses.lpips import LPIPS
from alit_jax.models.base_tokenizers import decoder_conv_out
from alit_jax.train import optim
from alit_jax.train.gan_tasks import LAST_LAYER, ALITTask, VQGANTask, put, take, tree_get, tree_set
from alit_jax.train.steps import stream_key, to_float

DISC_LOSSES = {"hinge": gan_lib.hinge_d_loss, "vanilla": gan_lib.vanilla_d_loss}


# ----------------------------------------------------------------------------------------------
# Static settings and the train state.


@dataclasses.dataclass(frozen=True)
class GanSpec:
  """Static settings of the adversarial steps (hashable: part of the jit cache key).

  Attributes:
    disc: the discriminator module (one architecture for all N stacked discriminators).
    lpips: the LPIPS module, or None when the perceptual term is off.
    perceptual_weight: weight of the LPIPS term in nll (0 when `lpips` is None).
    lpips_dropout: LPIPS heads' dropout on (the reference trains with it on).
    disc_loss: "hinge" or "vanilla".
    disc_factor: the reference's `disc_factor` when the GAN weight is non-zero.
    weight_when_off: `discriminator_weight` while the GAN weight is 0 (only scales the logged
      `d_weight`: the reference sets 0.2).
    max_adaptive_weight: clamp of the adaptive weight.
    optimizer: the generator optimizer (clip + AdamW with timm's weight-decay mask).
    disc_optimizer: the discriminators' optimizer (clip + AdamW, weight decay on every
      parameter: the reference's `torch.optim.AdamW(gan_losses.parameters())`, decay 0.01).
    generator_updates_discriminator: the reference quirk (module doc).
    ema_reset_every_epoch: copy the params into the EMA at the first step of every epoch.
  """

  disc: NLayerDiscriminator = NLayerDiscriminator()
  lpips: LPIPS | None = None
  perceptual_weight: float = 1.0
  lpips_dropout: bool = True
  disc_loss: str = "hinge"
  disc_factor: float = 1.0
  weight_when_off: float = 0.2
  max_adaptive_weight: float = 1e4
  optimizer: optim.OptimizerSpec = optim.OptimizerSpec()
  disc_optimizer: optim.OptimizerSpec = optim.OptimizerSpec(weight_decay=0.01)
  generator_updates_discriminator: bool = True
  ema_reset_every_epoch: bool = True

  def __post_init__(self):
    if self.disc_loss not in DISC_LOSSES:
      raise ValueError(f"disc_loss must be one of {sorted(DISC_LOSSES)}, got {self.disc_loss!r}")

  @property
  def use_lpips(self) -> bool:
    return self.lpips is not None and self.perceptual_weight > 0


def _const_lr(lr: jax.Array):
  # A schedule (ignoring optax's count), so the state has one structure whatever the lr.
  return lambda count: lr


def generator_optimizer(spec: GanSpec, lr: Any, frozen: Any) -> optax.GradientTransformation:
  """Clip -> AdamW (timm mask) -> zero updates of frozen parameters."""
  return optax.chain(
    optim.make_optimizer(spec.optimizer, _const_lr(lr)),
    optax.masked(optax.set_to_zero(), frozen),
  )


def disc_optimizer(spec: GanSpec, lr: Any) -> optax.GradientTransformation:
  """Clip -> AdamW with weight decay on every discriminator parameter."""
  o = spec.disc_optimizer
  return optax.chain(
    optax.clip_by_global_norm(o.grad_clip_norm),
    optax.adamw(_const_lr(lr), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay),
  )


def generator_disc_optimizer(spec: GanSpec, lr: Any) -> optax.GradientTransformation:
  """The generator optimizer's view of a discriminator (quirk): AdamW, timm mask, no clip."""
  o = spec.optimizer
  return optax.adamw(
    _const_lr(lr), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=optim.decay_mask
  )


def init_discriminators(rng: jax.Array, disc: NLayerDiscriminator, n: int, size: int) -> Any:
  """N freshly initialised discriminators (weights_init), stacked on axis 0."""
  x = jnp.zeros((2, size, size, disc.input_nc), jnp.float32)
  keys = jax.random.split(rng, n)
  return jax.vmap(lambda k: disc.init(k, x, train=False))(keys)


def init_state(
  rng: jax.Array,
  params: Any,
  discs: Any,
  task: ALITTask | VQGANTask,
  spec: GanSpec,
  image_size: int,
) -> dict[str, Any]:
  """Step-0 state; `params` / `discs` (stacked variables) given, or None for fresh ones.

  `rng` is the run's root key (fresh parts use its `params` / `disc_params` streams).
  """
  if params is None:
    params = task.init_params(stream_key(rng, "params"))
  if discs is None:
    discs = init_discriminators(
      stream_key(rng, "disc_params"), spec.disc, task.num_iters, image_size
    )
  zero = jnp.float32(0.0)
  state = {
    "step": jnp.zeros((), jnp.int32),
    "params": params,
    "opt_state": generator_optimizer(spec, zero, task.frozen(params)).init(params),
    "ema_params": jax.tree.map(jnp.array, params),
    "disc_params": discs["params"],
    "disc_batch_stats": discs["batch_stats"],
    "disc_opt_state": jax.vmap(disc_optimizer(spec, zero).init)(discs["params"]),
  }
  if spec.generator_updates_discriminator:
    tx = generator_disc_optimizer(spec, zero)
    state["gen_disc_opt_state"] = jax.vmap(tx.init)(discs["params"])
  return state


def plan_inputs(iteration: int, gan_weight: float) -> dict[str, Any]:
  """The per-step traced inputs of both steps (host values)."""
  import numpy as np

  return {"iteration": np.int32(iteration), "gan_weight": np.float32(gan_weight)}


# ----------------------------------------------------------------------------------------------
# The two steps.


def _per_iter(n: int, i: jax.Array, **values: jax.Array) -> dict[str, jax.Array]:
  onehot = (jnp.arange(n) == i).astype(jnp.float32)
  return {k: onehot * jnp.asarray(v, jnp.float32) for k, v in values.items()}


def generator_step(
  state: dict[str, Any],
  frozen: dict[str, Any],
  images: jax.Array,
  hp: dict[str, jax.Array],
  seed: jax.Array,
  plan: dict[str, jax.Array],
  task: ALITTask | VQGANTask,
  spec: GanSpec,
  with_disc: bool,
  finishes_step: bool,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One generator update (the reference's optimizer_idx 0) and the EMA.

  Args:
    state: the train state (donated by the trainer).
    frozen: `{"lpips": variables}` (or `{}` without the perceptual term).
    images: (B, H, W, 3) uint8 (or float in [0, 1]), the global batch.
    hp: `steps.hparams(...)` scalars.
    seed: uint32 scalar, the run's seed.
    plan: `plan_inputs(...)`: `iteration` (int32, the rollout iteration trained) and
      `gan_weight` (float32, the scheduled GAN weight).
    task, spec: static settings.
    with_disc: evaluate D_i (the GAN term, adaptive weight and D_i's batch statistics). The ALIT
      reference always does; taming-style training skips it while the GAN weight is 0.
    finishes_step: increment `state["step"]` (False when a discriminator step follows on the
      same batch).

  Returns:
    (new state, metrics): scalars `loss`, `grad_norm` (before clipping), `lr`, `gan_weight`,
    `finite`; per-iteration (N,) values at the trained iteration (0 elsewhere) `nll_loss`,
    `rec_loss` (L1), `p_loss` (LPIPS; with LPIPS), `g_loss`, `d_weight`, `logits_fake_gen`
    (mean D_i logit of the reconstruction; with `with_disc`), the task's metrics
    (`quantization_loss`, `masked_fraction` / `codebook_loss`, `perplexity`, `codes_used`), and
    `gen_iters` (the one-hot of the iteration).
  """
  step = state["step"]
  root = jax.random.key(seed)
  x = to_float(images)
  it = plan["iteration"]
  gw = plan["gan_weight"]
  n = task.num_iters
  params = state["params"]

  def feat_fn(p):
    h, aux, m = task.features(p, x, it, root, step)
    return (h, aux), m

  (h, aux), feat_vjp, task_metrics = jax.vjp(feat_fn, params, has_aux=True)
  last = tree_get(params, LAST_LAYER)
  recon, head_vjp = jax.vjp(lambda h_, w_: decoder_conv_out(w_, h_, task.dtype), h, last)

  def nll_fn(r):
    p = jnp.zeros((x.shape[0],), jnp.float32)
    if spec.use_lpips:
      p = spec.lpips.apply(
        frozen["lpips"],
        x,
        r,
        deterministic=not spec.lpips_dropout,
        rngs={"dropout": stream_key(root, "dropout", step)},
      )
    l1 = jnp.mean(jnp.abs(x - r.astype(jnp.float32)))
    pw = spec.perceptual_weight if spec.use_lpips else 0.0
    return gan_lib.nll_loss(x, r, p, pw), (l1, jnp.mean(p))

  (nll, (l1, p_mean)), c_nll = jax.value_and_grad(nll_fn, has_aux=True)(recon)
  factor = gan_lib.disc_factor(gw, spec.disc_factor)
  g = d_weight = coef = logits_fake = jnp.float32(0.0)
  c_total = c_nll
  if with_disc:
    d_params = take(state["disc_params"], it)
    d_stats = take(state["disc_batch_stats"], it)

    def g_fn(r, dp):
      logits, upd = spec.disc.apply(
        {"params": dp, "batch_stats": d_stats}, r, train=True, mutable=["batch_stats"]
      )
      return gan_lib.generator_loss(logits), (upd["batch_stats"], jnp.mean(logits))

    (g, (new_stats, logits_fake)), (c_g, g_disc) = jax.value_and_grad(
      g_fn, argnums=(0, 1), has_aux=True
    )(recon, d_params)
    w_nll = head_vjp(c_nll)[1]["kernel"]
    w_g = head_vjp(c_g)[1]["kernel"]
    disc_weight = jnp.where(gw == 0, spec.weight_when_off, gw)
    d_weight = gan_lib.adaptive_weight(w_nll, w_g, disc_weight, spec.max_adaptive_weight)
    coef = d_weight * factor
    c_total = c_nll + coef * c_g
  dh, dlast = head_vjp(c_total)
  (grads,) = feat_vjp((dh, jnp.ones_like(aux)))
  grads = tree_set(grads, LAST_LAYER, jax.tree.map(jnp.add, tree_get(grads, LAST_LAYER), dlast))
  loss = nll + coef * g + aux

  grad_norm = optax.tree.norm(grads)
  lr = optim.lr_schedule(step, hp)
  tx = generator_optimizer(spec, lr, task.frozen(params))
  updates, opt_state = tx.update(grads, state["opt_state"], params)
  new_params = optax.apply_updates(params, updates)
  new_state = dict(state)
  new_state.update(
    params=new_params,
    opt_state=opt_state,
    ema_params=optim.epoch_ema_update(state, new_params, hp, spec.ema_reset_every_epoch),
  )
  if isinstance(task, VQGANTask):
    new_state = task.restart_dead_codes(new_state, x, root, step)
  if with_disc:
    new_state["disc_batch_stats"] = put(state["disc_batch_stats"], it, new_stats)
    if spec.generator_updates_discriminator:
      tx_d = generator_disc_optimizer(spec, lr)
      g_disc = jax.tree.map(lambda v: coef * v, g_disc)
      d_opt = take(state["gen_disc_opt_state"], it)
      d_upd, d_opt = tx_d.update(g_disc, d_opt, d_params)
      new_state["disc_params"] = put(state["disc_params"], it, optax.apply_updates(d_params, d_upd))
      new_state["gen_disc_opt_state"] = put(state["gen_disc_opt_state"], it, d_opt)
  if finishes_step:
    new_state["step"] = step + 1
  metrics = {
    "loss": loss,
    "grad_norm": grad_norm,
    "lr": lr,
    "gan_weight": gw,
    "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
  }
  per = dict(nll_loss=nll, rec_loss=l1, gen_iters=1.0, **task_metrics)
  if spec.use_lpips:
    per["p_loss"] = p_mean
  if with_disc:
    per.update(g_loss=g, d_weight=d_weight, logits_fake_gen=logits_fake)
  metrics.update(_per_iter(n, it, **per))
  return new_state, metrics


def discriminator_step(
  state: dict[str, Any],
  frozen: dict[str, Any],
  images: jax.Array,
  hp: dict[str, jax.Array],
  seed: jax.Array,
  plan: dict[str, jax.Array],
  task: ALITTask | VQGANTask,
  spec: GanSpec,
  updates_ema: bool,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One update of discriminator D_i (the reference's optimizer_idx 1); finishes the step.

  The generator's reconstruction of the batch (no gradient) is the fake batch.

  Args:
    state, frozen, images, hp, seed, plan, task, spec: as `generator_step`.
    updates_ema: also advance the EMA of the (unchanged) generator params, as the reference does
      after every data step (False when this step follows a generator step on the same batch).

  Returns:
    (new state, metrics): scalars `disc_grad_norm`, `gan_weight`, `finite`; per-iteration (N,)
    `disc_loss`, `logits_real`, `logits_fake`, task metrics of the reconstruction, and
    `disc_iters` (one-hot of the iteration).
  """
  del frozen  # the reference computes LPIPS here too, but does not use it
  step = state["step"]
  root = jax.random.key(seed)
  x = to_float(images)
  it = plan["iteration"]
  gw = plan["gan_weight"]
  params = state["params"]
  recon, _, _ = task.reconstruct(params, x, it, root, step)
  recon = jax.lax.stop_gradient(recon)
  factor = gan_lib.disc_factor(gw, spec.disc_factor)
  d_params = take(state["disc_params"], it)
  d_stats = take(state["disc_batch_stats"], it)
  d_loss_fn = DISC_LOSSES[spec.disc_loss]

  def loss_fn(dp):
    real, upd = spec.disc.apply(
      {"params": dp, "batch_stats": d_stats}, x, train=True, mutable=["batch_stats"]
    )
    fake, upd = spec.disc.apply(
      {"params": dp, "batch_stats": upd["batch_stats"]}, recon, train=True, mutable=["batch_stats"]
    )
    return factor * d_loss_fn(real, fake), (upd["batch_stats"], jnp.mean(real), jnp.mean(fake))

  (d_loss, (new_stats, real_mean, fake_mean)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    d_params
  )
  grad_norm = optax.tree.norm(grads)
  lr = optim.lr_schedule(step, hp)
  tx = disc_optimizer(spec, lr)
  d_opt = take(state["disc_opt_state"], it)
  updates, d_opt = tx.update(grads, d_opt, d_params)
  new_state = dict(state)
  new_state.update(
    step=step + 1,
    disc_params=put(state["disc_params"], it, optax.apply_updates(d_params, updates)),
    disc_batch_stats=put(state["disc_batch_stats"], it, new_stats),
    disc_opt_state=put(state["disc_opt_state"], it, d_opt),
  )
  if updates_ema:
    new_state["ema_params"] = optim.epoch_ema_update(state, params, hp, spec.ema_reset_every_epoch)
  metrics = {
    "disc_grad_norm": grad_norm,
    "gan_weight": gw,
    "finite": jnp.isfinite(d_loss) & jnp.isfinite(grad_norm),
  }
  metrics.update(
    _per_iter(
      task.num_iters,
      it,
      disc_loss=d_loss,
      logits_real=real_mean,
      logits_fake=fake_mean,
      disc_iters=1.0,
    )
  )
  return new_state, metrics


def reconstruct(
  params: Any,
  images: jax.Array,
  seed: jax.Array,
  step: jax.Array,
  task: ALITTask | VQGANTask,
  num_images: int,
) -> dict[str, jax.Array]:
  """Reconstructions of the first `num_images` images at every iteration (image summaries).

  Returns:
    `images` (n, H, W, 3) and `reconstructions` (N, n, H, W, 3), clipped to [0, 1].
  """
  x = to_float(images[:num_images])
  key = stream_key(jax.random.key(seed), "summary", step)
  recon = task.reconstruct_all(params, x, key)
  return {"images": x, "reconstructions": jnp.clip(recon, 0.0, 1.0)}


# ----------------------------------------------------------------------------------------------
# Which update at which step (host side).


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """What the trainer runs at one data step."""

  kinds: tuple[str, ...]  # ("gen",), ("disc",) or ("gen", "disc")
  iteration: int
  gan_weight: float
  with_disc: bool  # the generator step evaluates D_i


class Schedule:
  """The GAN weight and the step kinds by global step (pure in the step; resume-safe).

  Patterns:
    * "alit" (the reference's `engines/full_finetuning.py`): at within-epoch step d, with GAN
      weight 0 every step is a generator step; otherwise a generator step iff
      `(d + 1) % (disc_steps + 1) == 0` (8 discriminator steps, then 1 generator step). The
      rollout iteration is `counter % N`, where the counter counts the generator steps taken
      since the start of the epoch (the reference's `current_repeatition_iter`, reset every
      epoch). The generator step always evaluates D_i.
    * "both" (taming): a generator step, then a discriminator step, on every batch; while the
      GAN weight is 0, only the generator step, without D.

  Attributes:
    weights: GAN weight before the first start, then after each start.
    starts: global steps where the next weight begins (ascending).
    steps_per_epoch: data steps per epoch.
    num_iters: N (rollout iterations; 1 for a VQGAN).
    pattern: "alit" or "both".
    disc_steps: discriminator steps per generator step ("alit"; the reference's 8).
  """

  def __init__(
    self,
    weights: tuple[float, ...],
    starts: tuple[int, ...],
    steps_per_epoch: int,
    num_iters: int,
    pattern: str = "alit",
    disc_steps: int = 8,
  ):
    if pattern not in ("alit", "both"):
      raise ValueError(f"gan.pattern must be 'alit' or 'both', got {pattern!r}")
    if len(weights) != len(starts) + 1:
      raise ValueError(
        f"gan.weights needs one more entry than the starts: {weights} vs starts {starts}"
      )
    if list(starts) != sorted(starts):
      raise ValueError(f"GAN weight starts must be ascending, got {starts}")
    if disc_steps < 0 or steps_per_epoch < 1 or num_iters < 1:
      raise ValueError("disc_steps >= 0, steps_per_epoch >= 1 and num_iters >= 1 are required")
    self.weights = tuple(float(w) for w in weights)
    self.starts = tuple(int(s) for s in starts)
    self.spe = int(steps_per_epoch)
    self.n = int(num_iters)
    self.pattern = pattern
    self.period = int(disc_steps) + 1
    self._cache: tuple[int, int, int] | None = None  # (epoch, d, generator steps before d)

  def gan_weight(self, step: int) -> float:
    return self.weights[sum(step >= s for s in self.starts)]

  def _is_gen(self, step: int) -> bool:
    if self.gan_weight(step) == 0:
      return True
    return (step % self.spe + 1) % self.period == 0

  def _counter(self, step: int) -> int:
    """Generator steps taken in this epoch before `step` (incremental; recomputed on a jump)."""
    epoch, d = divmod(step, self.spe)
    if self._cache is not None and self._cache[0] == epoch and self._cache[1] <= d:
      _, d0, count = self._cache
    else:
      d0, count = 0, 0
    start = epoch * self.spe
    for dd in range(d0, d):
      count += self._is_gen(start + dd)
    self._cache = (epoch, d, count)
    return count

  def plan(self, step: int) -> StepPlan:
    """The plan of the data step that takes the state from `step` to `step + 1`."""
    w = self.gan_weight(step)
    if self.pattern == "both":
      kinds = ("gen", "disc") if w != 0 else ("gen",)
      return StepPlan(kinds, 0, w, with_disc=w != 0)
    it = self._counter(step) % self.n
    return StepPlan(("gen",) if self._is_gen(step) else ("disc",), it, w, with_disc=True)
