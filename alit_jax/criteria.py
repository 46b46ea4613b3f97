"""Token-selection criteria: when is a reconstruction good enough?

A criterion maps `(images, reconstructions)`, both (B, H, W, 3) float32, to a per-image score
(B,) or directly to a bool "meets" array (B,) (for oracle criteria such as "the latents classify
correctly", close over the labels). `Tokenizer.encode` picks, per image, the fewest tokens whose
score meets the threshold.

Like the reference (`encode(..., token_selection_criteria="reconstruction_loss")`), scores compare
the *unclipped* reconstruction with the input.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Criterion:
  """A named score with a direction and a default threshold.

  Attributes:
    name: registry name.
    fn: `(images, reconstructions) -> (B,)` scores (or bool meets).
    higher_is_better: a score meets the threshold when `score > threshold` (else `<`).
    default_threshold: used when `encode` gets `threshold=None`.
  """

  name: str
  fn: ScoreFn
  higher_is_better: bool = False
  default_threshold: float | None = None

  def __call__(self, images: jax.Array, reconstructions: jax.Array) -> jax.Array:
    return self.fn(images, reconstructions)


def _l1(x, y):
  return jnp.mean(jnp.abs(y.astype(jnp.float32) - x.astype(jnp.float32)), axis=(1, 2, 3))


def _mse(x, y):
  return jnp.mean((y.astype(jnp.float32) - x.astype(jnp.float32)) ** 2, axis=(1, 2, 3))


def _psnr(x, y):
  # Data range 1 ([0, 1] images); the reconstruction is clipped first, as saved images would be.
  mse = jnp.mean((jnp.clip(y, 0.0, 1.0) - x) ** 2, axis=(1, 2, 3))
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


REGISTRY: dict[str, Criterion] = {}


def register(criterion: Criterion) -> Criterion:
  """Adds a criterion to the registry (e.g. `lpips` once its weights are loaded)."""
  REGISTRY[criterion.name] = criterion
  return criterion


register(Criterion("l1", _l1, default_threshold=0.07))
register(Criterion("mse", _mse, default_threshold=0.01))
register(Criterion("psnr", _psnr, higher_is_better=True, default_threshold=25.0))


def get(criterion: str | Criterion | ScoreFn, *, higher_is_better: bool | None = None) -> Criterion:
  """Resolves a name, a `Criterion` or a plain callable (lower scores are better by default)."""
  if isinstance(criterion, Criterion):
    return criterion
  if isinstance(criterion, str):
    if criterion not in REGISTRY:
      raise ValueError(f"unknown criterion {criterion!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[criterion]
  if callable(criterion):
    return Criterion(getattr(criterion, "__name__", "custom"), criterion, bool(higher_is_better))
  raise TypeError(
    f"criterion must be a name, a Criterion or a callable, got {type(criterion).__name__}"
  )


def first_meeting(scores, threshold: float | None, higher_is_better: bool = False):
  """Index of the first iteration whose score meets the threshold, per image (numpy).

  Args:
    scores: (N, B) per-iteration scores, or bool "meets" values.
    threshold: ignored for bool scores.
    higher_is_better: direction.

  Returns:
    (B,) int iteration indices; images that never meet it get N - 1 (all tokens), as `encode`.
  """
  import numpy as np

  scores = np.asarray(scores)
  if scores.dtype == bool:
    meets = scores
  else:
    meets = scores > threshold if higher_is_better else scores < threshold
  return np.where(meets.any(axis=0), meets.argmax(axis=0), scores.shape[0] - 1)
