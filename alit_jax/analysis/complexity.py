"""Image complexity measures and their rank correlation with the token count.

ALIT's claim: the number of tokens an image needs follows its complexity. Complexity proxies
here are computed on the exact (S, S, 3) uint8 image the tokenizer sees (after resize/crop):

* `png_bpp`: lossless PNG size (PIL, compress_level 9) in bits per pixel;
* `jpeg_bpp`: JPEG size at quality 95 (PIL, 4:4:4 chroma) in bits per pixel (the paper's
  compression-based complexity proxy);
* `gradient`: mean gradient magnitude of the luma (Rec. 601) in [0, 1] units per pixel
  (forward differences), a crude edge-density measure.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

MEASURES = ("png_bpp", "jpeg_bpp", "gradient")


def _check(image: Any) -> np.ndarray:
  a = np.asarray(image)
  if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
    raise ValueError(f"expected an (H, W, 3) uint8 image, got {a.dtype} {a.shape}")
  return a


def png_bits_per_pixel(image: Any) -> float:
  """Bits per pixel of the image saved as PNG (lossless, compress_level 9)."""
  a = _check(image)
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="PNG", compress_level=9)
  return 8.0 * buf.tell() / (a.shape[0] * a.shape[1])


def jpeg_bits_per_pixel(image: Any, quality: int = 95) -> float:
  """Bits per pixel of the image saved as JPEG at `quality` (no chroma subsampling)."""
  a = _check(image)
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="JPEG", quality=int(quality), subsampling=0)
  return 8.0 * buf.tell() / (a.shape[0] * a.shape[1])


def mean_gradient_magnitude(image: Any) -> float:
  """Mean |grad| of the luma in [0, 1] per pixel (forward differences, last row/col dropped)."""
  a = _check(image).astype(np.float64) / 255.0
  y = a @ np.array([0.299, 0.587, 0.114])
  dx = y[:-1, 1:] - y[:-1, :-1]
  dy = y[1:, :-1] - y[:-1, :-1]
  return float(np.mean(np.sqrt(dx * dx + dy * dy)))


def measures(image: Any) -> dict[str, float]:
  """All complexity measures of one (H, W, 3) uint8 image."""
  return {
    "png_bpp": png_bits_per_pixel(image),
    "jpeg_bpp": jpeg_bits_per_pixel(image),
    "gradient": mean_gradient_magnitude(image),
  }


def spearman(a: Any, b: Any) -> dict[str, float | None]:
  """Spearman rank correlation (scipy) with its two-sided p-value.

  Returns None values when either input is constant (the correlation is undefined, e.g. a
  selection that gives every image the same token count) or has fewer than 3 values.
  """
  from scipy import stats

  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"spearman: expected two 1-D arrays of equal length, got {a.shape}, {b.shape}")
  if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
    return {"rho": None, "p": None, "n": int(len(a))}
  r = stats.spearmanr(a, b)
  return {"rho": float(r.statistic), "p": float(r.pvalue), "n": int(len(a))}


def complexity_report(collected: Mapping[str, Any]) -> dict[str, Any]:
  """Spearman correlations of each selection's token counts (and of the L1 error at the
  largest and smallest token counts) with every complexity measure.

  Args:
    collected: from `alit_jax.analysis.tokens.collect_token_counts(..., measures=True)`.

  Returns:
    {"data", "num_images", "tokens": {selection: {"mean", "median", measure: spearman}},
     "l1_at_<T>": {measure: spearman}, "measures": {measure: {"mean", "min", "max"}}}.
  """
  meas = collected["measures"]
  out: dict[str, Any] = {
    "data": collected["data"],
    "num_images": int(len(collected["index"])),
    "tokens": {},
    "measures": {
      k: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}
      for k, v in meas.items()
    },
  }
  for key, tokens in collected["tokens"].items():
    row: dict[str, Any] = {"mean": float(np.mean(tokens)), "median": float(np.median(tokens))}
    for k, v in meas.items():
      row[k] = spearman(tokens, v)
    out["tokens"][key] = row
  counts = collected["token_counts"]
  for i in sorted({0, len(counts) - 1}):
    out[f"l1_at_{counts[i]}"] = {k: spearman(collected["l1"][:, i], v) for k, v in meas.items()}
  return out


def plot_scatter(
  collected: Mapping[str, Any],
  report: Mapping[str, Any],
  path: str | os.PathLike,
  *,
  selection: str | None = None,
  measures_to_plot: Sequence[str] = MEASURES,
) -> None:
  """Token count (jittered) against each complexity measure, coloured by label, with Spearman rho."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  key = selection or next(iter(collected["tokens"]))
  tokens = np.asarray(collected["tokens"][key], np.float64)
  labels = np.asarray(collected.get("label", np.zeros(len(tokens))))
  names = list(collected.get("label_names") or ())
  rng = np.random.default_rng(0)
  step = collected["token_counts"][0]
  jitter = rng.uniform(-0.25, 0.25, size=tokens.shape) * step
  fig, axes = plt.subplots(1, len(measures_to_plot), figsize=(4.2 * len(measures_to_plot), 3.6))
  axes = np.atleast_1d(axes)
  for ax, m in zip(axes, measures_to_plot):
    x = collected["measures"][m]
    for lab in np.unique(labels):
      sel = labels == lab
      name = names[lab] if 0 <= lab < len(names) else str(lab)
      ax.scatter(x[sel], tokens[sel] + jitter[sel], s=12, alpha=0.7, label=name)
    rho = report["tokens"][key][m]["rho"]
    ax.set_title(f"{m}: Spearman rho = {'n/a' if rho is None else f'{rho:.3f}'}", fontsize=9)
    ax.set_xlabel(m)
    ax.set_ylabel(f"tokens ({key})")
    ax.set_yticks(collected["token_counts"])
  if len(np.unique(labels)) > 1:
    axes[0].legend(fontsize=7)
  fig.suptitle(f"{collected['data']} ({len(tokens)} images)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
