"""Pure, jit-able training steps and their PRNG streams.

Every function here is a pure function of arrays plus static (hashable) settings passed as
trailing positional arguments (`static_argnums`): the trainer jits them with explicit shardings
and donates the train state.
Nothing reads host randomness, global state or blocks on device values.

Train state (a plain dict, so stage 2 can add entries such as `disc_params`/`disc_opt_state`
or a trainable base without changing this layout):

    {"step": int32 (), "params": ALIT variables' "params", "opt_state": optax state,
     "ema_params": same tree as params}

The frozen base tokenizer's variables are a separate argument (never differentiated, never in
the optimizer).

Randomness: one seed -> root key; each use has a named stream, and per-step keys are
`fold_in(fold_in(root, STREAMS[name]), step)`, so a resumed run draws exactly the numbers the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from alit_jax.models import init as init_lib
from alit_jax.models import rollout as rollout_lib
from alit_jax.models.alit import ALIT
from alit_jax.models.base_tokenizers import VAE, VQGAN
from alit_jax.train import losses, optim

STREAMS = {
  "params": 0,
  "halting": 1,
  "grad_iters": 2,
  "data": 3,
  "summary": 4,
  # Adversarial trainings (`gan_steps`):
  "dropout": 5,  # LPIPS heads' dropout
  "disc_params": 6,  # discriminator initialisation
  "posterior": 7,  # VAE posterior samples
  "codes": 8,  # VQGAN dead-code restarts
  "latent_noise": 9,  # ALITConfig.latent_noise_std (known-answer channel)
}
HPARAM_KEYS = ("lr", "min_lr", "warmup_steps", "total_steps", "ema_decay", "steps_per_epoch")


def stream_key(root: jax.Array, name: str, step: jax.Array | int | None = None) -> jax.Array:
  """`fold_in(root, STREAMS[name])`, folded again with `step` when given."""
  key = jax.random.fold_in(root, STREAMS[name])
  return key if step is None else jax.random.fold_in(key, step)


@dataclasses.dataclass(frozen=True)
class Stage1Spec:
  """Static settings of the stage-1 step (hashable: part of the jit cache key).

  Attributes:
    halting: dynamic halting during training (the reference samples it: mode "sample").
    loss_iters: > 0: the loss is taken at that many random iterations per step (the
      reference's `sample_grad_iters`); otherwise at every iteration.
    lam: per-iteration weights of the main loss term.
    impl: rollout implementation ("scan" or "unrolled").
    optimizer: clipping/AdamW settings.
    ema_reset_every_epoch: copy the params into the EMA at the first step of every epoch.
    rollout_iters: > 0: a curriculum stage (not in the reference): the rollout stops after that
      many iterations (the loss covers just those), so a step costs a fraction of the full one;
      the other iterations' parameters get no gradient. Otherwise all iterations run.
  """

  halting: rollout_lib.Halting = rollout_lib.Halting("sample", 0.55)
  loss_iters: int = -1
  lam: tuple[float, ...] = losses.LAMBDA
  impl: str = "scan"
  optimizer: optim.OptimizerSpec = optim.OptimizerSpec()
  ema_reset_every_epoch: bool = True
  rollout_iters: int = -1


def truncated_model(model: ALIT, num_iters: int) -> tuple[ALIT, Any]:
  """The same ALIT stopped after `num_iters` iterations, and its param shapes.

  Only the parameters sized by the iteration count differ (`timestep_embedding`, the decoder's
  `latent_token_positional_embedding`): the shorter model's are leading slices of the full ones.
  """
  short = ALIT(dataclasses.replace(model.config, max_rollout_iters=num_iters), dtype=model.dtype)
  shapes = jax.eval_shape(lambda: init_params(short, jax.random.key(0)))
  return short, shapes


def slice_params(params: Any, shapes: Any) -> Any:
  """Each leaf of `params` cut to the leading block of its `shapes` counterpart."""
  return jax.tree.map(lambda p, s: p[tuple(slice(0, d) for d in s.shape)], params, shapes)


def hparams(**values: float) -> dict[str, jax.Array]:
  """The traced hyper-parameters of `train_step` (changing them does not recompile)."""
  missing = set(HPARAM_KEYS) - set(values)
  extra = set(values) - set(HPARAM_KEYS)
  if missing or extra:
    raise ValueError(f"hparams: missing {sorted(missing)}, unknown {sorted(extra)}")
  return {k: jnp.float32(values[k]) for k in HPARAM_KEYS}


def init_params(model: ALIT, rng: jax.Array) -> Any:
  """Fresh ALIT params (reference initialisation scales), float32."""
  return model.init(rng, *init_lib.dummy_inputs(model.config))["params"]


def create_train_state(rng: jax.Array, model: ALIT, spec: Stage1Spec) -> dict[str, Any]:
  """A fresh train state; params from the `params` stream of the root key `rng`."""
  return init_train_state(init_params(model, stream_key(rng, "params")), spec)


def init_train_state(params: Any, spec: Stage1Spec) -> dict[str, Any]:
  """Step 0 state; the EMA starts as a copy of the params (the reference's deepcopy)."""
  # A schedule (not a constant) so the state has the same structure as in `train_step`.
  tx = optim.make_optimizer(spec.optimizer, lambda count: jnp.float32(0.0))
  return {
    "step": jnp.zeros((), jnp.int32),
    "params": params,
    "opt_state": tx.init(params),
    "ema_params": jax.tree.map(jnp.array, params),
  }


def to_float(images: jax.Array) -> jax.Array:
  """uint8 -> float32 in [0, 1] (division, bit-identical to torchvision's ToTensor)."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / jnp.float32(255.0)
  return images.astype(jnp.float32)


def train_step(
  state: dict[str, Any],
  base_vars: Any,
  images: jax.Array,
  hp: dict[str, jax.Array],
  seed: jax.Array,
  model: ALIT,
  base: VQGAN | VAE,
  spec: Stage1Spec,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One stage-1 update: frozen base encoder -> ALIT rollout loss -> clip -> AdamW -> EMA.

  Args:
    state: the train state (donated by the trainer).
    base_vars: frozen base-tokenizer variables.
    images: (B, H, W, 3) uint8 (or float in [0, 1]), the global batch.
    hp: `hparams(...)` scalars (peak lr, min lr, warm-up/total steps, EMA decay, steps/epoch).
    seed: uint32 scalar, the run's seed (root key = `jax.random.key(seed)`).
    model, base: the ALIT and base modules (static).
    spec: static settings.

  Returns:
    (new state, metrics): `loss`, `grad_norm` (before clipping), `lr`, `finite` (loss and
    gradient norm finite), and per-iteration (N,) `nll_loss`/`code_loss`/`quantization_loss`/
    `commitment_loss`/`codebook_loss`/`masked_fraction`/`loss_iters` (zeros where skipped).
  """
  x = to_float(images)
  base_out = jax.lax.stop_gradient(rollout_lib.base_encode(base, base_vars, x))
  return stage1_update(state, x, base_out, hp, seed, model, spec)


def train_step_cached(
  state: dict[str, Any],
  base_vars: Any,
  images: jax.Array,
  base_batch: dict[str, jax.Array],
  hp: dict[str, jax.Array],
  seed: jax.Array,
  model: ALIT,
  base: VQGAN | VAE,
  spec: Stage1Spec,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """`train_step` on base outputs computed beforehand (`alit_jax.data.base_cache`).

  The same update and loss as `train_step`, whose base encoder output is replaced by
  `base_batch`: a step is the ALIT transformer alone. Only the VQGAN codebook is read from
  `base_vars` (the targets' code vectors); the encoder is not run.

  Args:
    state: the train state (donated by the trainer).
    base_vars: frozen base-tokenizer variables (VQGAN: the codebook is used; VAE: unused).
    images: (B, H, W, 3) uint8 (or float in [0, 1]): the augmented images the base outputs were
      computed on (ALIT's `patch_embed` reads them).
    base_batch: `base_features` (B, g, g, E) float, and for a VQGAN `gt_indices` (B, g*g) int32.
    hp, seed, model, base, spec: as in `train_step`.

  Returns:
    (new state, metrics), as `train_step`.
  """
  x = to_float(images)
  base_out = jax.lax.stop_gradient(base_targets(base, base_vars, base_batch))
  return stage1_update(state, x, base_out, hp, seed, model, spec)


def base_targets(
  base: VQGAN | VAE, base_vars: Any, base_batch: dict[str, jax.Array]
) -> dict[str, jax.Array]:
  """`rollout.base_encode`'s output rebuilt from cached arrays (what `stage1_loss` reads).

  Args:
    base: the VQGAN or VAE module.
    base_vars: its variables (a VQGAN's codebook is taken from them).
    base_batch: `base_features` (B, g, g, E), and for a VQGAN `gt_indices` (B, g*g) int.

  Returns:
    VQGAN: `base_features`, `gt_indices` (int32), `codebook` (K, E); VAE: `base_features` and
    `gt_code` (B, g*g, E) (the VAE's target is its scaled posterior mode, i.e. the features).
  """
  feats = base_batch["base_features"]
  if isinstance(base, VQGAN):
    return {
      "base_features": feats,
      "gt_indices": base_batch["gt_indices"].astype(jnp.int32),
      "codebook": base.apply(base_vars, method=VQGAN.codebook),
    }
  b, g1, g2, e = feats.shape
  return {"base_features": feats, "gt_code": feats.reshape(b, g1 * g2, e)}


def stage1_update(
  state: dict[str, Any],
  x: jax.Array,
  base_out: dict[str, jax.Array],
  hp: dict[str, jax.Array],
  seed: jax.Array,
  model: ALIT,
  spec: Stage1Spec,
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """The update shared by `train_step` and `train_step_cached`: ALIT rollout loss -> clip ->
  AdamW -> EMA, given float images `x` (B, H, W, 3) in [0, 1] and the base outputs `base_out`
  (`rollout.base_encode`'s keys, outside the gradient)."""
  step = state["step"]
  root_key = jax.random.key(seed)
  n = model.config.max_rollout_iters
  run_model, run_shapes = model, None
  if 0 < spec.rollout_iters < n:
    if 0 < spec.loss_iters < n:
      raise ValueError("Stage1Spec: rollout_iters and loss_iters cannot both be set")
    run_model, run_shapes = truncated_model(model, spec.rollout_iters)
  loss_iters = None
  if 0 < spec.loss_iters < n:
    loss_iters = losses.sample_loss_iters(
      stream_key(root_key, "grad_iters", step), n, spec.loss_iters
    )
  halt_key = stream_key(root_key, "halting", step) if spec.halting.mode == "sample" else None
  noise_key = None
  if model.config.latent_noise_std > 0:
    noise_key = stream_key(root_key, "latent_noise", step)

  def loss_fn(params):
    if run_shapes is not None:
      params = slice_params(params, run_shapes)
    return losses.stage1_loss(
      run_model,
      {"params": params},
      x,
      base_out,
      halting=spec.halting,
      rng=halt_key,
      loss_iters=loss_iters,
      lam=spec.lam,
      impl=spec.impl,
      noise_rng=noise_key,
    )

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  if run_shapes is not None:
    metrics = pad_iteration_metrics(metrics, spec.rollout_iters, n)
  grad_norm = optax.tree.norm(grads)
  lr = optim.lr_schedule(step, hp)
  tx = optim.make_optimizer(spec.optimizer, lambda count: optim.lr_schedule(count, hp))
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  ema = optim.epoch_ema_update(state, params, hp, spec.ema_reset_every_epoch)
  new_state = dict(state)
  new_state.update(step=step + 1, params=params, opt_state=opt_state, ema_params=ema)
  metrics = dict(metrics)
  metrics.update(
    loss=loss,
    grad_norm=grad_norm,
    lr=lr,
    finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm),
  )
  return new_state, metrics


def pad_iteration_metrics(metrics: dict[str, jax.Array], k: int, n: int) -> dict[str, jax.Array]:
  """(k,) per-iteration metrics of a truncated rollout padded to (n,); `loss_iters` marks k."""
  out = {
    key: jnp.pad(v, (0, n - k)) if v.ndim == 1 and v.shape[0] == k else v
    for key, v in metrics.items()
  }
  out["loss_iters"] = (jnp.arange(n) < k).astype(jnp.float32)  # weights, as `stage1_loss`
  return out


def reconstruct(
  params: Any,
  base_vars: Any,
  images: jax.Array,
  seed: jax.Array,
  step: jax.Array,
  model: ALIT,
  base: VQGAN | VAE,
  halting: rollout_lib.Halting,
  impl: str,
  num_images: int,
) -> dict[str, jax.Array]:
  """Reconstructions at every rollout iteration of the first `num_images` images (summaries).

  Returns:
    `images` (n, H, W, 3) and `reconstructions` (N, n, H, W, 3), float32 clipped to [0, 1].
  """
  x = to_float(images[:num_images])
  key = stream_key(jax.random.key(seed), "summary", step) if halting.mode == "sample" else None
  out = rollout_lib.full_rollout(
    model,
    base,
    {"alit": {"params": params}, "base": base_vars},
    x,
    halting=halting,
    rng=key,
    impl=impl,
  )
  return {"images": x, "reconstructions": jnp.clip(out["reconstructions"], 0.0, 1.0)}
