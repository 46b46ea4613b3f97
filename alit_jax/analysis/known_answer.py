"""A base tokenizer with a known information content, to test ALIT's recurrence in isolation.

Each image carries `bits` i.i.d. fair bits. Bit k fills one square block of the 16x16 code map
(16 bits -> 4x4 blocks), over a 2-code base codebook; the base features at a position are its
code's vector plus Gaussian noise. Stage 1 must predict the code map. With T latent tokens of a
K-code latent per iteration, iteration i can carry at most T(i+1) log2 K bits, so the information
bound on the per-position NLL is known: with b bits in the image and c <= b carried,
`NLL >= (b - c) / b * ln 2` (0.347 nats for 16 bits and 8 carried, 0 when all are carried).

No VQGAN and no pixels are involved: the ALIT's images are zeros, so `patch_embed` adds a
constant, and a step costs the transformer alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alit_jax.models import rollout as rollout_lib
from alit_jax.models.alit import ALIT
from alit_jax.models.configs import ALITConfig
from alit_jax.train import steps


@dataclasses.dataclass(frozen=True)
class Problem:
  """The synthetic base.

  Attributes:
    bits: bits per image; a square number dividing the grid (4, 16, 64).
    embed_dim: E, the base feature width.
    noise: std of the Gaussian noise on the features (the code vectors are standard normal).
    grid: side of the code map.
  """

  bits: int = 16
  embed_dim: int = 16
  noise: float = 0.1
  grid: int = 16

  def codebook(self, seed: int) -> np.ndarray:
    """(2, E) float32 code vectors."""
    return np.random.default_rng(seed).normal(size=(2, self.embed_dim)).astype(np.float32)

  def batch(self, rng: np.random.Generator, codebook: np.ndarray, n: int) -> dict[str, Any]:
    """`base_out` of `n` images: features (n, g, g, E), gt_indices (n, g*g), codebook."""
    side = math.isqrt(self.bits)
    if side * side != self.bits or self.grid % side:
      raise ValueError(f"bits={self.bits} must be a square whose root divides {self.grid}")
    blk = self.grid // side
    b = rng.integers(0, 2, size=(n, side, side))
    gt = np.repeat(np.repeat(b, blk, 1), blk, 2).reshape(n, self.grid**2)
    noise = self.noise * rng.normal(size=(n, self.grid**2, self.embed_dim))
    feats = (codebook[gt] + noise).astype(np.float32)
    return {
      "base_features": feats.reshape(n, self.grid, self.grid, self.embed_dim),
      "gt_indices": gt.astype(np.int32),
      "codebook": codebook,
    }


def nll_bound(bits: int, carried_bits: float) -> float:
  """Lowest per-position NLL (nats) when `carried_bits` of the image's `bits` reach the decoder."""
  return max(bits - carried_bits, 0.0) / bits * math.log(2.0)


def model_config(problem: Problem, **overrides: Any) -> ALITConfig:
  """A small ALIT over the problem's grid (patch 1 on a grid-sized zero image)."""
  kw = dict(
    base_embed_dim=problem.embed_dim,
    base_codebook_size=2,
    encoder_width=64,
    encoder_layers=2,
    encoder_heads=4,
    decoder_width=64,
    decoder_layers=2,
    decoder_heads=4,
    codebook_size=2,
    token_dim=12,
    num_latent_tokens=8,
    image_size=problem.grid,
    patch_size=1,
    max_rollout_iters=2,
  )
  kw.update(overrides)
  return ALITConfig(**kw)


SPEC = steps.Stage1Spec(halting=rollout_lib.NO_HALTING)


def make_train_step(model: ALIT, hp: dict[str, float]):
  """A jitted `(state, base_out) -> (state, metrics)` running the trainer's own update.

  `steps.stage1_update` (the project's `stage1_loss`, clipping, AdamW with the warm-up + cosine
  `lr_schedule`, EMA) with halting off and the reference's lambda. `state` comes from
  `steps.init_train_state(params, SPEC)`.
  """
  hpa = steps.hparams(ema_decay=0.999, steps_per_epoch=1e9, **hp)
  c = model.config
  seed = jnp.uint32(0)  # unused: nothing is sampled with halting off and every loss iteration

  @jax.jit
  def step(state, base_out):
    n = base_out["gt_indices"].shape[0]
    x = jnp.zeros((n, c.image_size, c.image_size, 3), jnp.float32)
    return steps.stage1_update(state, x, base_out, hpa, seed, model, SPEC)

  return step


def code_usage(model: ALIT, params: Any, base_out: dict[str, Any]) -> dict[str, float]:
  """Latent code usage on a batch: mean distinct codes per slot and the spread of unit z.

  `spread` is the mean distance of each image's l2-normalised pre-quantizer vector from the
  batch mean of its slot: ~0 means the slot says the same thing for every image.
  """
  c = model.config
  x = jnp.zeros((base_out["gt_indices"].shape[0], c.image_size, c.image_size, 3), jnp.float32)
  v = {"params": params}
  img = model.apply(v, x, jnp.asarray(base_out["base_features"]), method=ALIT.embed_images)
  targets = {k: jnp.asarray(base_out[k]) for k in ("gt_indices", "codebook")}
  out = rollout_lib.alit_rollout(model, v, img, targets, impl="unrolled")
  n_slots = c.num_latent_tokens * c.max_rollout_iters
  z = np.asarray(out["factorized_latent"][-1])[:, :n_slots]
  zn = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  res = {"spread": float(np.linalg.norm(zn - zn.mean(0), axis=-1).mean())}
  if c.quantize_latent:
    q = np.asarray(out["quant_indices"][-1])[:, :n_slots]
    res["distinct_per_slot"] = float(np.mean([len(np.unique(q[:, j])) for j in range(n_slots)]))
  return res
