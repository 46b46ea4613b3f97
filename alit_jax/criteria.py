"""Token-selection criteria: when is a reconstruction good enough?

A criterion maps `(images, reconstructions)`, both (B, H, W, 3) float32, to a per-image score
(B,) or directly to a bool "meets" array (B,). `Tokenizer.encode` and `alit_jax.evaluate` pick,
per image, the fewest tokens whose score meets the threshold (`select_iterations`).

Registered: `l1`, `mse`, `psnr`; `lpips` once its weights are loaded (`register_lpips`). Any
callable `(images, reconstructions) -> (B,)` works too (lower is better unless told otherwise).

Oracle criteria need more than the two images: a criterion may declare extra keyword inputs in
`requires` ("labels": (B,) int; "latents": (B, L, W) latent tokens of the iteration, with
"latent_valid": (B, L) bool). `alit_jax.evaluate` supplies them per batch; elsewhere bind them
first with `Criterion.bind(labels=...)`. `classification_oracle` builds the paper's "smallest
length whose reconstruction / latents classify correctly" criterion from a classifier.

Like the reference (`encode(..., token_selection_criteria="reconstruction_loss")`), the built-in
scores compare the *unclipped* reconstruction with the input (`psnr` clips it first).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

ScoreFn = Callable[..., jax.Array]
EXTRA_INPUTS = ("labels", "latents", "latent_valid")


@dataclasses.dataclass(frozen=True)
class Criterion:
  """A named score with a direction and a default threshold.

  Attributes:
    name: registry name.
    fn: `(images, reconstructions) -> (B,)` scores (or bool meets).
    higher_is_better: a score meets the threshold when `score > threshold` (else `<`).
    default_threshold: used when `encode` gets `threshold=None`.
    requires: extra keyword inputs of `fn` beyond the two images (a subset of `EXTRA_INPUTS`),
      supplied per batch by `alit_jax.evaluate` or fixed with `bind`.
  """

  name: str
  fn: ScoreFn
  higher_is_better: bool = False
  default_threshold: float | None = None
  requires: tuple[str, ...] = ()

  def __post_init__(self):
    unknown = set(self.requires) - set(EXTRA_INPUTS)
    if unknown:
      raise ValueError(
        f"criterion {self.name!r}: unknown required inputs {sorted(unknown)}; known: {EXTRA_INPUTS}"
      )

  def __call__(self, images: jax.Array, reconstructions: jax.Array, **extra: Any) -> jax.Array:
    missing = [k for k in self.requires if k not in extra]
    if missing:
      raise ValueError(
        f"criterion {self.name!r} needs {missing} as well as the images: bind them with "
        f"`criterion.bind({missing[0]}=...)` or use it through alit_jax.evaluate"
      )
    return self.fn(images, reconstructions, **{k: extra[k] for k in self.requires})

  def bind(self, **values: Any) -> Criterion:
    """A criterion with some `requires` inputs fixed (e.g. the labels of one batch)."""
    extra = set(values) - set(self.requires)
    if extra:
      raise ValueError(f"criterion {self.name!r} does not take {sorted(extra)}")
    rest = tuple(k for k in self.requires if k not in values)
    fn = self.fn

    def bound(images, reconstructions, **more):
      return fn(images, reconstructions, **values, **more)

    return dataclasses.replace(self, fn=bound, requires=rest)


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


def lpips_criterion(
  variables: Mapping[str, Any],
  *,
  name: str = "lpips",
  default_threshold: float | None = None,
  input_range: Literal["[-1,1]", "[0,1]"] = "[-1,1]",
) -> Criterion:
  """LPIPS (VGG16, v0.1 heads) between the image and its clipped reconstruction; lower is better.

  Args:
    variables: from `alit_jax.losses.lpips.load_lpips` (or random ones in tests).
    name: registry name.
    default_threshold: threshold used when none is given.
    input_range: "[-1,1]" (default): images are mapped to [-1, 1] first, the standard LPIPS
      metric; "[0,1]": fed as they are, like the reference's training loss.
  """
  return Criterion(
    name, functools.partial(_lpips_score, variables, input_range), False, default_threshold
  )


@functools.partial(jax.jit, static_argnums=(1,))
def _lpips_score(variables, input_range, images, reconstructions):
  from alit_jax.losses.lpips import LPIPS

  x = jnp.asarray(images, jnp.float32)
  y = jnp.clip(jnp.asarray(reconstructions, jnp.float32), 0.0, 1.0)
  if input_range == "[-1,1]":
    x, y = 2.0 * x - 1.0, 2.0 * y - 1.0
  return LPIPS(use_dropout=False).apply(variables, x, y)


def register_lpips(
  vgg16_path: str | os.PathLike, heads_path: str | os.PathLike, **kwargs: Any
) -> Criterion:
  """Loads the LPIPS weights from files and registers the `lpips` criterion (see
  `lpips_criterion` for the options)."""
  from alit_jax.losses.lpips import load_lpips

  return register(lpips_criterion(load_lpips(vgg16_path, heads_path), **kwargs))


def classification_oracle(
  classifier_fn: Callable[..., Any],
  labels: Any = None,
  *,
  on: Literal["reconstructions", "latents"] = "reconstructions",
  name: str = "classification_oracle",
) -> Criterion:
  """An oracle criterion: a length is enough once the classifier gets the label right.

  Args:
    classifier_fn: `on="reconstructions"`: `(reconstructions (B, H, W, 3)) -> (B, C)` logits;
      `on="latents"`: `(latents (B, L, W), latent_valid (B, L) bool) -> (B, C)` logits, where the
      latents are the iteration's latent tokens (slots beyond its token count are padding,
      `latent_valid` False).
    labels: (B,) int labels to bind now (one fixed batch, e.g. for `Tokenizer.encode` with
      `on="reconstructions"`), or None to receive them per batch from `alit_jax.evaluate`.
    on: what the classifier sees.
    name: criterion name.

  Returns:
    A boolean criterion ("meets" = correctly classified); thresholds are ignored for it.
  """
  if on == "reconstructions":

    def fn(images, reconstructions, *, labels):
      del images
      logits = classifier_fn(jnp.clip(reconstructions, 0.0, 1.0))
      return jnp.argmax(logits, axis=-1) == jnp.asarray(labels)

    crit = Criterion(name, fn, requires=("labels",))
  elif on == "latents":

    def fn(images, reconstructions, *, labels, latents, latent_valid):
      del images, reconstructions
      return jnp.argmax(classifier_fn(latents, latent_valid), axis=-1) == jnp.asarray(labels)

    crit = Criterion(name, fn, requires=("labels", "latents", "latent_valid"))
  else:
    raise ValueError(
      f"classification_oracle: on must be 'reconstructions' or 'latents', got {on!r}"
    )
  return crit if labels is None else crit.bind(labels=labels)


def meets_threshold(scores: Any, threshold: float | None, higher_is_better: bool = False):
  """Which scores meet the threshold (numpy).

  Args:
    scores: (...) float scores, or bool "meets" values (returned as they are).
    threshold: the threshold (ignored for bool scores); a score meets it when `score < threshold`
      (`>` if `higher_is_better`). NaN never meets it.
    higher_is_better: direction.

  Returns:
    bool array of the same shape.
  """
  s = np.asarray(scores)
  if s.dtype == np.bool_:
    return s
  if threshold is None:
    raise ValueError("a threshold is needed for score (non-boolean) criteria")
  with np.errstate(invalid="ignore"):
    return s > threshold if higher_is_better else s < threshold


def select_iterations(
  scores: Any, threshold: float | None = None, higher_is_better: bool = False
) -> np.ndarray:
  """Per image, the first iteration whose score meets the threshold (else the last one).

  This is the selection rule of `Tokenizer.encode` (per image; the reference's `encode` picks one
  length for the whole batch), applied to scores of every iteration.

  Args:
    scores: (N, B) per-iteration scores or bool "meets" values.
    threshold, higher_is_better: see `meets_threshold`.

  Returns:
    (B,) int iteration indices in [0, N); the token count is `tokens_per_iteration * (i + 1)`.
  """
  meets = meets_threshold(scores, threshold, higher_is_better)
  if meets.ndim != 2:
    raise ValueError(f"scores must be (N iterations, B images), got shape {meets.shape}")
  n = meets.shape[0]
  first = np.argmax(meets, axis=0)
  return np.where(meets.any(axis=0), first, n - 1).astype(np.int64)


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
