"""Stage-1 (latent distillation) objective, as the reference's `forward` in training mode.

VQGAN base (`adaptive_vqgan.py`, `train_stage="latent_distillation_pretrain"`):

    total = sum_i w_i [ lambda_i * nll_i + code_i + quant_i ]
    nll_i   = mean_{B*256} -log_softmax(logits_i)[gt_index]     (no label smoothing: the reference's
              LabelSmoothingCrossEntropy returns the plain NLL that forward_loss keeps)
    code_i  = mean_{B*256*E} (codebook[gt] - softmax(logits_i) @ codebook)^2  (frozen codebook)
    quant_i = commitment + codebook terms of the ALIT quantizer over the 32(i+1) real tokens

VAE base (`adaptive_vae.py`): `total = sum_i w_i [ lambda_i * mse(gt_code, code_i) (+ quant_i) ]`.

`w_i` is 1 at the iterations that take a loss (all of them by default; the reference's
`sample_grad_iters` draws a random subset per step) and 0 elsewhere. lambda defaults to the
reference's [2.5, 2.0, 1.5, 1.25, 1, 1, 1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from alit_jax.models import rollout as rollout_lib
from alit_jax.models.alit import ALIT

LAMBDA = (2.5, 2.0, 1.5, 1.25, 1.0, 1.0, 1.0, 1.0)


def loss_weights(num_iters: int, lam: Sequence[float] | None = None) -> jax.Array:
  """The per-iteration lambda, extended with 1.0 for rollouts longer than the reference's 8."""
  lam = tuple(lam if lam is not None else LAMBDA)
  lam = lam[:num_iters] + (1.0,) * max(0, num_iters - len(lam))
  return jnp.asarray(lam, jnp.float32)


def sample_loss_iters(rng: jax.Array, num_iters: int, k: int) -> jax.Array:
  """bool (N,) with k randomly chosen True entries (k <= 0 or k >= N: all True)."""
  if k <= 0 or k >= num_iters:
    return jnp.ones((num_iters,), bool)
  perm = jax.random.permutation(rng, num_iters)
  return jnp.zeros((num_iters,), bool).at[perm[:k]].set(True)


def stage1_loss(
  model: ALIT,
  alit_vars: Any,
  images: jax.Array,
  base_out: dict[str, jax.Array],
  *,
  halting: rollout_lib.Halting = rollout_lib.NO_HALTING,
  rng: jax.Array | None = None,
  loss_iters: jax.Array | None = None,
  lam: Sequence[float] | None = None,
  impl: str = "scan",
  noise_rng: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Stage-1 loss for one batch.

  Args:
    model: the ALIT module.
    alit_vars: its variables (differentiated).
    images: (B, H, W, 3) float32 in [0, 1].
    base_out: `rollout.base_encode` output of the frozen base tokenizer (computed outside the
      gradient: base parameters are a separate, non-trained argument).
    halting: dynamic halting during the rollout ("sample" in training, as the reference).
    rng: key for sampled halting.
    loss_iters: optional bool (N,) of iterations that take a loss (others are neither decoded nor
      halted, like the reference's `sample_grad_iters`); None = all.
    lam: per-iteration weights of the main term (nll for VQGAN, code MSE for the VAE).
    impl: rollout implementation.
    noise_rng: key of the latent channel noise (`ALITConfig.latent_noise_std` > 0).

  Returns:
    (total loss, metrics) where metrics holds per-iteration `nll_loss`, `code_loss`,
    `quantization_loss`, `commitment_loss`, `codebook_loss` (N,) (zeros where skipped),
    `masked_fraction` (N,) and `loss_iters` (N,).
  """
  c = model.config
  n = c.max_rollout_iters
  base_out = jax.lax.stop_gradient(base_out)
  targets = {k: v for k, v in base_out.items() if k in ("gt_indices", "codebook", "gt_code")}
  img_tokens = model.apply(alit_vars, images, base_out["base_features"], method=ALIT.embed_images)
  out = rollout_lib.alit_rollout(
    model,
    alit_vars,
    img_tokens,
    targets,
    halting=halting,
    rng=rng,
    impl=impl,
    decode_mask=loss_iters,
    noise_rng=noise_rng,
  )
  w = jnp.ones((n,), jnp.float32) if loss_iters is None else loss_iters.astype(jnp.float32)
  lam_arr = loss_weights(n, lam)
  metrics: dict[str, jax.Array] = {}
  if c.base == "vqgan":
    logits = out["logits"].astype(jnp.float32)  # (N, B, 256, K)
    logp = jax.nn.log_softmax(logits, axis=-1)
    gt = targets["gt_indices"]
    nll = -jnp.take_along_axis(
      logp, jnp.broadcast_to(gt[None, ..., None], logp.shape[:-1] + (1,)), -1
    )
    nll = nll[..., 0].mean(axis=(1, 2))
    gt_code = targets["codebook"][gt]  # (B, 256, E)
    code = jnp.mean((gt_code[None] - out["decoded_code"]) ** 2, axis=(1, 2, 3))
    main = lam_arr * nll + code
    metrics["nll_loss"] = nll * w
  else:
    code = jnp.mean((targets["gt_code"][None] - out["decoded_code"]) ** 2, axis=(1, 2, 3))
    main = lam_arr * code
  metrics["code_loss"] = code * w
  if c.quantize_latent:
    quant = out["quantizer_loss"]
    main = main + quant
    metrics["quantization_loss"] = quant * w
    metrics["commitment_loss"] = out["commitment_loss"] * w
    metrics["codebook_loss"] = out["codebook_loss"] * w
  # Summed in iteration order, as the reference accumulates its Python loop.
  total = jnp.float32(0.0)
  for i in range(n):
    total = total + w[i] * main[i]
  metrics["masked_fraction"] = out["drop_mask"].astype(jnp.float32).mean(axis=(1, 2)) * w
  metrics["loss_iters"] = w
  metrics["loss"] = total
  return total, metrics
