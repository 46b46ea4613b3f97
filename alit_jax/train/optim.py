"""Optimizer, learning-rate schedule, EMA and the conversion of config durations to steps.

Follows the reference (`main_pretrain.py`, `utils/lr_sched.py`, `engines/utils.py`):

* AdamW(b1=0.9, b2=0.95, eps=1e-8, weight decay 0.05) after global-norm gradient clipping at
  3.0. Weight decay follows timm's `add_weight_decay`: every parameter with ndim <= 1 or a name
  ending in `bias` is exempt; everything else decays, including the 2-D/3-D embeddings
  (`latent_tokens`, `timestep_embedding`, `encoder_mask_token`, positional embeddings, the
  quantizer codebook).
* lr = blr * global_batch / 256 unless an absolute lr is given; linear warm-up from 0, then a
  half-cycle cosine to min_lr, evaluated per iteration at fractional epochs (here: steps, since
  `step / steps_per_epoch` epochs is the same curve).
* EMA: `ema = decay * ema + (1 - decay) * params` after every update; the reference also copies
  the model into the EMA at the start of every epoch (`update_ema(ema, model, decay=0)`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from alit_jax.train.sharding import path_name


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """Static (hashable) optimizer settings; the lr schedule's numbers are traced hparams."""

  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.05
  grad_clip_norm: float = 3.0


def lr_schedule(step: jax.Array, hp: Mapping[str, jax.Array]) -> jax.Array:
  """Linear warm-up to `hp["lr"]` over `hp["warmup_steps"]`, then half-cycle cosine to `min_lr`.

  Args:
    step: number of updates done so far (the reference's `data_iter_step / len(loader) + epoch`
      times steps_per_epoch); the first update uses step 0, i.e. lr 0 with a warm-up.
    hp: float scalars `lr`, `min_lr`, `warmup_steps`, `total_steps`.

  Returns:
    The learning rate, float32.
  """
  step = jnp.asarray(step, jnp.float32)
  lr, min_lr = hp["lr"], hp["min_lr"]
  warm, total = hp["warmup_steps"], hp["total_steps"]
  warmup = lr * step / jnp.maximum(warm, 1.0)
  progress = (step - warm) / jnp.maximum(total - warm, 1.0)
  cosine = min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  return jnp.where(step < warm, warmup, cosine).astype(jnp.float32)


def decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay (timm `add_weight_decay`: ndim >= 2, not bias)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, p: bool(jnp.ndim(p) > 1 and not path_name(path).endswith("bias")), params
  )


def make_optimizer(spec: OptimizerSpec, learning_rate: Any) -> optax.GradientTransformation:
  """Global-norm clipping followed by AdamW with the timm weight-decay mask."""
  return optax.chain(
    optax.clip_by_global_norm(spec.grad_clip_norm),
    optax.adamw(
      learning_rate,
      b1=spec.b1,
      b2=spec.b2,
      eps=spec.eps,
      weight_decay=spec.weight_decay,
      mask=decay_mask,
    ),
  )


def ema_update(
  ema: Any, old_params: Any, new_params: Any, decay: jax.Array, reset: jax.Array
) -> Any:
  """`decay * base + (1 - decay) * new_params` with base = old_params where `reset`, else ema."""

  def upd(e, p_old, p_new):
    e = jnp.where(reset, p_old, e)
    return (decay * e + (1.0 - decay) * p_new).astype(e.dtype)

  return jax.tree.map(upd, ema, old_params, new_params)


def epoch_ema_update(
  state: Mapping[str, Any], new_params: Any, hp: Mapping[str, jax.Array], reset_every_epoch: bool
) -> Any:
  """The EMA after a step from `state` (its step, params, ema_params) to `new_params`.

  `ema_update` with `hp["ema_decay"]`; with `reset_every_epoch` the EMA restarts from the
  pre-step params at the first step of every epoch (`hp["steps_per_epoch"]`).
  """
  spe = jnp.maximum(hp["steps_per_epoch"].astype(jnp.int32), 1)
  reset = jnp.logical_and(reset_every_epoch, state["step"] % spe == 0)
  return ema_update(state["ema_params"], state["params"], new_params, hp["ema_decay"], reset)


def peak_lr(config, global_batch_size: int) -> float:
  """`config.lr` if set, else `config.blr * global_batch_size / 256` (the reference's rule)."""
  lr = config.get("lr")
  if lr is not None:
    return float(lr)
  return float(config.blr) * global_batch_size / 256.0


def steps_from_config(
  prefix: str, config, steps_per_epoch: int, *, default: int | None = None
) -> int | None:
  """The one conversion of config durations to steps.

  Reads `{prefix}_steps` or `{prefix}_epochs` (exactly one may be set; a missing or None key
  counts as unset). Epochs are converted with `steps_per_epoch` and rounded to the nearest step
  (at least 1 for a positive number of epochs).

  Args:
    prefix: e.g. "total", "warmup", "checkpoint_every".
    config: the ConfigDict (or a dict).
    steps_per_epoch: full global batches per pass over the training data.
    default: returned when neither key is set.

  Raises:
    ValueError: both keys are set, or a negative duration.
  """
  st = config.get(f"{prefix}_steps")
  ep = config.get(f"{prefix}_epochs")
  if st is not None and ep is not None:
    raise ValueError(f"set only one of {prefix}_steps ({st}) and {prefix}_epochs ({ep})")
  if st is None and ep is None:
    return default
  if st is not None:
    value = int(st)
  else:
    value = int(round(float(ep) * steps_per_epoch))
    if float(ep) > 0:
      value = max(value, 1)
  if value < 0:
    raise ValueError(f"{prefix} duration must be >= 0, got {value}")
  return value


@dataclasses.dataclass(frozen=True)
class Durations:
  """Every duration of a run in steps (`durations`); 0 / None where a config leaves one unset."""

  steps_per_epoch: int
  total: int
  warmup: int
  log_every: int
  checkpoint_every: int
  keep_every: int | None
  summary_every: int
  lr: float


def durations(config, num_examples: int, global_batch_size: int) -> Durations:
  """The run's durations in steps, from `config`'s `<name>_steps` / `<name>_epochs` fields.

  Raises:
    ValueError: fewer examples than one batch, or neither total_steps nor total_epochs set.
  """
  spe = num_examples // global_batch_size
  if spe < 1:
    raise ValueError(
      f"the training data has {num_examples} examples, fewer than one batch of {global_batch_size}"
    )
  total = steps_from_config("total", config, spe)
  if total is None:
    raise ValueError("set config.total_steps or config.total_epochs")
  return Durations(
    steps_per_epoch=spe,
    total=total,
    warmup=steps_from_config("warmup", config, spe, default=0),
    log_every=steps_from_config("log_every", config, spe, default=50),
    checkpoint_every=steps_from_config("checkpoint_every", config, spe, default=total),
    keep_every=steps_from_config("keep_every", config, spe),
    summary_every=steps_from_config("image_summary_every", config, spe, default=0),
    lr=peak_lr(config, global_batch_size),
  )
