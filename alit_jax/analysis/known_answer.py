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


def probe_set(
  problem: Problem, codebook: np.ndarray, patterns: int = 512, redraws: int = 4, seed: int = 777
) -> tuple[dict[str, Any], np.ndarray]:
  """Held-out images for `code_information`: `patterns` bit patterns, each drawn `redraws` times.

  Returns:
    (base_out of patterns * redraws images, each pattern's images adjacent; bits (n, bits) int).
  """
  rng = np.random.default_rng(seed)
  first = problem.batch(rng, codebook, patterns)
  gt = np.repeat(first["gt_indices"], redraws, axis=0)
  noise = problem.noise * rng.normal(size=gt.shape + (problem.embed_dim,))
  feats = (codebook[gt] + noise).astype(np.float32)
  g, side = problem.grid, math.isqrt(problem.bits)
  blk = g // side
  bits = gt.reshape(-1, side, blk, side, blk)[:, :, 0, :, 0].reshape(-1, problem.bits)
  base_out = {
    "base_features": feats.reshape(-1, g, g, problem.embed_dim),
    "gt_indices": gt.astype(np.int32),
    "codebook": codebook,
  }
  return base_out, bits


def _entropy_bits(rows: np.ndarray) -> float:
  """Plug-in entropy (bits) of the rows of an (n, k) int array."""
  _, counts = np.unique(rows, axis=0, return_counts=True)
  q = counts / counts.sum()
  return float(-(q * np.log2(q)).sum()) + 0.0  # no -0.0


def make_rollout(model: ALIT, impl: str = "unrolled"):
  """A jitted `(params, base_out) -> {"nll": (N,), "quant_indices": (N, B, L)}`, halting off.

  `nll` is the mean per-position NLL (nats) of every iteration; `quant_indices` only when the
  latent is quantized; `impl` is the rollout implementation. With `latent_noise_std` > 0 the
  latents go through the noisy channel (a fixed key), so the NLL is the one the capacity bound
  applies to.
  """
  c = model.config

  @jax.jit
  def run(params, base_out):
    n = base_out["gt_indices"].shape[0]
    x = jnp.zeros((n, c.image_size, c.image_size, 3), jnp.float32)
    v = {"params": params}
    img = model.apply(v, x, base_out["base_features"], method=ALIT.embed_images)
    targets = {k: base_out[k] for k in ("gt_indices", "codebook")}
    noise = jax.random.key(0) if c.latent_noise_std > 0 else None
    out = rollout_lib.alit_rollout(model, v, img, targets, impl=impl, noise_rng=noise)
    logp = jax.nn.log_softmax(out["logits"].astype(jnp.float32), axis=-1)
    gt = jnp.broadcast_to(targets["gt_indices"][None, ..., None], logp.shape[:-1] + (1,))
    res = {"nll": -jnp.take_along_axis(logp, gt, -1)[..., 0].mean(axis=(1, 2))}
    if c.quantize_latent:
      res["quant_indices"] = out["quant_indices"]
    return res

  return lambda params, base_out: jax.tree.map(np.asarray, run(params, base_out))


def code_information(
  quant_indices: np.ndarray, bits: np.ndarray, tokens: int, redraws: int
) -> list[dict[str, Any]]:
  """What each iteration's latent codes carry about the image's bits (plug-in estimates).

  Args:
    quant_indices: (N, n, L) from `make_rollout`'s function on a `probe_set`.
    bits: (n, b) the images' bits.
    tokens: latent tokens per iteration (iteration i has tokens * (i + 1) real slots).
    redraws: images per bit pattern (adjacent), to estimate the entropy the noise adds.

  Returns:
    Per iteration: `entropy` of the whole code tuple (bits; an upper bound on what reaches the
    decoder), `noise_entropy` (its mean entropy among images with the same bits: the part that is
    not about the bits) and `slot_mi` (each slot's largest mutual information with any one bit:
    ~1 when a slot holds a bit, small when it holds a mixture such as their sum).
  """
  res = []
  for i in range(quant_indices.shape[0]):
    q = quant_indices[i][:, : tokens * (i + 1)]
    groups = q.reshape(-1, redraws, q.shape[-1])
    slot_mi = []
    for s in range(q.shape[-1]):
      hs = _entropy_bits(q[:, s : s + 1])
      slot_mi.append(
        max(
          hs + _entropy_bits(bits[:, k : k + 1]) - _entropy_bits(np.stack([q[:, s], bits[:, k]], 1))
          for k in range(bits.shape[1])
        )
      )
    res.append(
      {
        "entropy": _entropy_bits(q),
        "noise_entropy": float(np.mean([_entropy_bits(gq) for gq in groups])),
        "slot_mi": [round(m, 3) for m in slot_mi],
      }
    )
  return res
