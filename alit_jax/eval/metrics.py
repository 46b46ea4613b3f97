"""Dataset-level reconstruction metrics, streamed batch by batch.

`quantize_images` turns reconstructions into the evaluated 8-bit images; `Selection` /
`make_selections` name the adaptive token selections; `MetricAccumulator` keeps per-image
metrics and per-length (and per-selection) code histograms and Inception statistics, and gives
the `per_length` / `adaptive` rows of the results. See `alit_jax.evaluate` for the conventions.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from alit_jax import criteria as criteria_lib
from alit_jax.metrics import fid as fid_lib
from alit_jax.metrics import image as image_metrics

Quantize = Literal["floor", "round", "none"]
METRICS = ("l1", "mse", "psnr", "ssim", "lpips", "rfid")
USAGE = ("usage_1d", "perplexity_1d", "usage_2d", "perplexity_2d")


@dataclasses.dataclass(frozen=True)
class Selection:
  """One adaptive token selection: a criterion and its threshold."""

  criterion: criteria_lib.Criterion
  threshold: float | None

  @property
  def key(self) -> str:
    c = self.criterion
    if self.threshold is None:
      return c.name
    return f"{c.name}{'>' if c.higher_is_better else '<'}{self.threshold:g}"


def make_selections(
  criteria: str | Any | Sequence[Any] = ("l1",),
  thresholds: Sequence[float] | Mapping[str, Sequence[float]] | None = (0.05, 0.07, 0.1),
) -> list[Selection]:
  """Selections from criteria and thresholds.

  Args:
    criteria: one or several criteria (registry names, `Criterion`s or callables).
    thresholds: thresholds applied to every criterion, or a mapping criterion name -> thresholds;
      None (or a criterion missing from the mapping) uses the criterion's default threshold.
      Boolean (oracle) criteria ignore thresholds and give one selection.
  """
  if isinstance(criteria, str | criteria_lib.Criterion) or callable(criteria):
    criteria = [criteria]
  out = []
  for c in criteria:
    crit = criteria_lib.get(c)
    if isinstance(thresholds, Mapping):
      ts = thresholds.get(crit.name)
    else:
      ts = thresholds
    if ts is None:
      ts = [crit.default_threshold]
    for t in ts:
      out.append(Selection(crit, None if t is None else float(t)))
  keys = [s.key for s in out]
  if len(set(keys)) != len(keys):
    raise ValueError(f"duplicate selections: {keys}")
  return out


_LEVELS = np.arange(256, dtype=np.float32) / np.float32(255.0)


def quantize_images(x: jax.Array, mode: Quantize = "floor") -> jax.Array:
  """Reconstructions as the evaluated 8-bit images.

  Args:
    x: float images (unclipped).
    mode: "floor": `floor(clip(x*255, 0, 255)) / 255` (the reference's `astype(uint8)` when it
      saves PNGs); "round": nearest 8-bit value; "none": clip to [0, 1] only.
  """
  if mode not in ("floor", "round", "none"):
    raise ValueError(f"quantize must be 'floor', 'round' or 'none', got {mode!r}")
  x = jnp.asarray(x, jnp.float32)
  if mode == "none":
    return jnp.clip(x, 0.0, 1.0)
  y = jnp.clip(x * 255.0, 0.0, 255.0)
  levels = (jnp.floor(y) if mode == "floor" else jnp.round(y)).astype(jnp.int32)
  # A table of k / 255 made by numpy: XLA's float32 division is not correctly rounded on CPU
  # (1 ulp off for half of the levels), and these must equal ToTensor's values bit for bit.
  return jnp.take(jnp.asarray(_LEVELS), levels)


@functools.partial(jax.jit, static_argnames=("quantize",))
def _length_metrics(x, recon, quantize):
  """(B,H,W,3) inputs, (N,B,H,W,3) reconstructions -> quantized recon and (N,B) metrics."""
  q = quantize_images(recon, quantize)

  def one(r):
    return {
      "l1": image_metrics.l1(x, r),
      "mse": image_metrics.mse(x, r),
      "psnr": image_metrics.psnr(x, r),
      "ssim": image_metrics.ssim(x, r),
    }

  return q, jax.lax.map(one, q)


def _histogram(indices: np.ndarray, size: int) -> np.ndarray:
  flat = np.asarray(indices).reshape(-1)
  flat = flat[(flat >= 0) & (flat < size)]
  return np.bincount(flat, minlength=size).astype(np.float64)


def _usage(counts: np.ndarray | None) -> tuple[float | None, float | None]:
  if counts is None:
    return None, None
  u = image_metrics.usage_from_histogram(counts)
  return float(u["usage"]), float(u["perplexity"])


def _finite_mean(v: np.ndarray) -> float | None:
  v = np.asarray(v, np.float64)
  v = v[np.isfinite(v)]
  return float(v.mean()) if v.size else None


class MetricAccumulator:
  """Streams batches of inputs and per-length reconstructions into dataset-level metrics.

  Per image it keeps the per-length metrics and criterion scores; per length (and per
  selection) it accumulates code histograms and Inception feature statistics, so nothing of
  size (images x pixels) is kept.

  Args:
    token_counts: the N token counts, e.g. [32, ..., 256].
    selections: adaptive selections (their criteria's scores are passed to `add`).
    codebook_size_1d: ALIT quantizer codebook size (None: continuous latents, no 1D usage).
    codebook_size_2d: base VQGAN codebook size (None: no 2D codebook, e.g. the VAE).
    lpips_fn: `(images, reconstructions) -> (B,)` LPIPS on [0, 1] images, or None.
    feature_fn: `(images) -> (B, D)` Inception (or any) features for rFID, or None.
    quantize: see `quantize_images`.
  """

  def __init__(
    self,
    token_counts: Sequence[int],
    selections: Sequence[Selection] = (),
    *,
    codebook_size_1d: int | None = None,
    codebook_size_2d: int | None = None,
    lpips_fn: Callable[[Any, Any], Any] | None = None,
    feature_fn: Callable[[Any], Any] | None = None,
    quantize: Quantize = "floor",
  ):
    self.token_counts = [int(t) for t in token_counts]
    self.selections = list(selections)
    self.k1 = codebook_size_1d
    self.k2 = codebook_size_2d
    self.lpips_fn = lpips_fn
    self.feature_fn = feature_fn
    self.quantize = quantize
    n = len(self.token_counts)
    self._per_image: dict[str, list[np.ndarray]] = {}
    self.hist_1d = None if self.k1 is None else np.zeros((n, self.k1))
    self.hist_2d = None if self.k2 is None else np.zeros((n, self.k2))
    self.hist_2d_base = None if self.k2 is None else np.zeros((self.k2,))
    self.sel_hist_1d = {s.key: None if self.k1 is None else np.zeros(self.k1) for s in selections}
    self.sel_hist_2d = {s.key: None if self.k2 is None else np.zeros(self.k2) for s in selections}
    self.fid_real = fid_lib.FeatureStats()
    self.fid_length = [fid_lib.FeatureStats() for _ in range(n)]
    self.fid_sel = {s.key: fid_lib.FeatureStats() for s in selections}
    self.num_images = 0

  def _keep(self, name: str, value: np.ndarray) -> None:
    self._per_image.setdefault(name, []).append(np.asarray(value))

  def add(
    self,
    images: Any,
    reconstructions: Any,
    *,
    mask: Any = None,
    scores: Mapping[str, Any] | None = None,
    indices_1d: Any = None,
    codes_2d: Any = None,
    base_codes_2d: Any = None,
    index: Any = None,
    label: Any = None,
    return_reconstructions: bool = False,
  ) -> dict[str, np.ndarray]:
    """Adds one batch.

    Args:
      images: (B, H, W, 3) float inputs in [0, 1] (exact 8-bit values).
      reconstructions: (N, B, H, W, 3) float reconstructions at every token count (unclipped).
      mask: (B,) bool, False for padding rows (default all True).
      scores: criterion name -> (N, B) scores (or bool meets) of every selection's criterion.
      indices_1d: (N, B, L) int ALIT quantizer indices, -1 beyond each length.
      codes_2d: (N, B, P) int VQGAN codes predicted at every length.
      base_codes_2d: (B, P) int the base tokenizer's own codes.
      index, label: (B,) per-image bookkeeping kept in `per_image()`.
      return_reconstructions: also return the evaluated (quantized) reconstructions.

    Returns:
      The batch's per-image results (valid rows only): metrics (N, b), `selected_<key>` (b,)
      iteration indices, and, if asked, `reconstructions` (N, b, H, W, 3) as evaluated.
    """
    n = len(self.token_counts)
    x = jnp.asarray(images, jnp.float32)
    recon = jnp.asarray(reconstructions)
    if recon.ndim != 5 or recon.shape[0] != n or recon.shape[1:] != x.shape:
      raise ValueError(
        f"reconstructions must be ({n}, *images.shape) = ({n}, {x.shape}), got {recon.shape}"
      )
    b = x.shape[0]
    m = np.ones((b,), bool) if mask is None else np.asarray(mask, bool)
    q, metrics = _length_metrics(x, recon, self.quantize)
    metrics = {k: np.asarray(v)[:, m] for k, v in metrics.items()}
    if self.lpips_fn is not None:
      metrics["lpips"] = np.stack([np.asarray(self.lpips_fn(x, q[i])) for i in range(n)])[:, m]
    feats = None
    if self.feature_fn is not None:
      real = np.asarray(self.feature_fn(x))[m]
      feats = np.stack([np.asarray(self.feature_fn(q[i]))[m] for i in range(n)])
      self.fid_real.add(real)
      for i in range(n):
        self.fid_length[i].add(feats[i])
    rows = np.arange(int(m.sum()))
    out = dict(metrics)
    for k, v in metrics.items():
      self._keep(k, v.T)
    i1 = None if indices_1d is None else np.asarray(indices_1d)[:, m]
    c2 = None if codes_2d is None else np.asarray(codes_2d)[:, m]
    if i1 is not None and self.k1 is not None:
      for i in range(n):
        self.hist_1d[i] += _histogram(i1[i], self.k1)
    if c2 is not None and self.k2 is not None:
      for i in range(n):
        self.hist_2d[i] += _histogram(c2[i], self.k2)
    if base_codes_2d is not None and self.k2 is not None:
      self.hist_2d_base += _histogram(np.asarray(base_codes_2d)[m], self.k2)
    scores = dict(scores or {})
    for name, s in scores.items():
      s = np.asarray(s)[:, m]
      self._keep(f"score_{name}", s.T)
    for sel in self.selections:
      if sel.criterion.name not in scores:
        raise ValueError(f"add: scores of criterion {sel.criterion.name!r} are missing")
      s = np.asarray(scores[sel.criterion.name])[:, m]
      it = criteria_lib.select_iterations(
        s, sel.threshold, higher_is_better=sel.criterion.higher_is_better
      )
      self._keep(f"selected_{sel.key}", it)
      out[f"selected_{sel.key}"] = it
      if i1 is not None and self.k1 is not None:
        self.sel_hist_1d[sel.key] += _histogram(i1[it, rows], self.k1)
      if c2 is not None and self.k2 is not None:
        self.sel_hist_2d[sel.key] += _histogram(c2[it, rows], self.k2)
      if feats is not None:
        self.fid_sel[sel.key].add(feats[it, rows])
    if index is not None:
      self._keep("index", np.asarray(index)[m])
    if label is not None:
      self._keep("label", np.asarray(label)[m])
    self.num_images += int(m.sum())
    if return_reconstructions:
      out["reconstructions"] = np.asarray(q)[:, m]
    return out

  def per_image(self) -> dict[str, np.ndarray]:
    """Per-image arrays: metrics (M, N), `score_<criterion>` (M, N), `selected_<key>` (M,)
    iteration indices, `tokens_<key>` (M,) token counts, `index`/`label` (M,)."""
    out = {k: np.concatenate(v) for k, v in self._per_image.items()}
    counts = np.asarray(self.token_counts)
    for sel in self.selections:
      k = f"selected_{sel.key}"
      if k in out:
        out[f"tokens_{sel.key}"] = counts[out[k]]
    return out

  def _fid(self, stats: fid_lib.FeatureStats) -> float | None:
    if self.feature_fn is None or stats.n < 2:
      return None
    return fid_lib.frechet_distance(*self.fid_real.stats(), *stats.stats())

  def _row(self, per_image: dict, gather: Callable[[np.ndarray], np.ndarray]) -> dict:
    row: dict[str, Any] = {}
    for k in ("l1", "mse", "ssim", "lpips"):
      row[k] = float(np.mean(gather(per_image[k]))) if k in per_image else None
    psnr = gather(per_image["psnr"])
    row["psnr"] = _finite_mean(psnr)
    row["psnr_inf_images"] = int(np.sum(~np.isfinite(psnr)))
    return row

  def results(self) -> dict[str, Any]:
    """Dataset-level results (JSON-serializable): `per_length` and `adaptive` rows."""
    if self.num_images == 0:
      raise ValueError("no images were evaluated (empty source, or every image failed to decode)")
    per_image = self.per_image()
    per_length = []
    for i, t in enumerate(self.token_counts):
      row = {"tokens": t, **self._row(per_image, lambda v, i=i: v[:, i])}
      row["rfid"] = self._fid(self.fid_length[i])
      row["usage_1d"], row["perplexity_1d"] = _usage(
        None if self.hist_1d is None else self.hist_1d[i]
      )
      row["usage_2d"], row["perplexity_2d"] = _usage(
        None if self.hist_2d is None else self.hist_2d[i]
      )
      per_length.append(row)
    adaptive = []
    counts = np.asarray(self.token_counts)
    for sel in self.selections:
      it = per_image[f"selected_{sel.key}"]
      rows = np.arange(len(it))
      tokens = counts[it]
      row = {
        "selection": sel.key,
        "criterion": sel.criterion.name,
        "threshold": sel.threshold,
        "mean_tokens": float(tokens.mean()),
        "median_tokens": float(np.median(tokens)),
        "token_histogram": {str(t): int(np.sum(tokens == t)) for t in self.token_counts},
        **self._row(per_image, lambda v, it=it, rows=rows: v[rows, it]),
      }
      row["rfid"] = self._fid(self.fid_sel[sel.key])
      row["usage_1d"], row["perplexity_1d"] = _usage(self.sel_hist_1d[sel.key])
      row["usage_2d"], row["perplexity_2d"] = _usage(self.sel_hist_2d[sel.key])
      adaptive.append(row)
    base_usage, base_ppl = _usage(self.hist_2d_base)
    return {
      "num_images": self.num_images,
      "token_counts": self.token_counts,
      "quantize": self.quantize,
      "per_length": per_length,
      "adaptive": adaptive,
      "base_2d": {"usage": base_usage, "perplexity": base_ppl},
      "codebook_size_1d": self.k1,
      "codebook_size_2d": self.k2,
    }
