"""What an evaluation writes: results.json, the CSVs, per_image.npz, plots, the grid and the
printed table (`write_outputs`, `format_table`)."""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from alit_jax.eval.metrics import USAGE

ROW_COLUMNS = ("l1", "mse", "psnr", "psnr_inf_images", "ssim", "lpips", "rfid") + USAGE


def _json_default(o):
  if isinstance(o, np.integer):
    return int(o)
  if isinstance(o, np.floating):
    return float(o)
  raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _clean(v):
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


def write_outputs(
  results: Mapping[str, Any], out_dir: str | os.PathLike, *, grid: tuple | None = None
) -> pathlib.Path:
  """Writes results.json, per_length.csv, adaptive.csv, per_image.csv/.npz, plots and grid."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  serial = {k: v for k, v in results.items() if k != "per_image"}
  (out / "results.json").write_text(
    json.dumps(_nan_to_none(serial), indent=2, default=_json_default, allow_nan=False)
  )
  with open(out / "per_length.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(("tokens",) + ROW_COLUMNS)
    for row in results["per_length"]:
      w.writerow([row["tokens"]] + [_clean(row.get(c)) for c in ROW_COLUMNS])
  with open(out / "adaptive.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(("criterion", "threshold", "mean_tokens", "median_tokens") + ROW_COLUMNS)
    for row in results["adaptive"]:
      w.writerow(
        [row["criterion"], row["threshold"], row["mean_tokens"], row["median_tokens"]]
        + [_clean(row.get(c)) for c in ROW_COLUMNS]
      )
  per_image = results.get("per_image")
  if per_image:
    np.savez(out / "per_image.npz", **per_image)
    _write_per_image_csv(out / "per_image.csv", per_image, results["token_counts"])
  plot_metrics(results, out / "metrics_vs_tokens.png")
  if results["adaptive"]:
    plot_token_histograms(results, out / "token_histogram.png")
  if grid is not None:
    save_grid(*grid, results["token_counts"], out / "grid.png")
  return out


def _nan_to_none(tree):
  if isinstance(tree, float):
    return tree if math.isfinite(tree) else None
  if isinstance(tree, Mapping):
    return {k: _nan_to_none(v) for k, v in tree.items()}
  if isinstance(tree, list | tuple):
    return [_nan_to_none(v) for v in tree]
  return tree


def _write_per_image_csv(path: pathlib.Path, per_image: Mapping[str, np.ndarray], counts) -> None:
  m = len(next(iter(per_image.values())))
  cols: list[tuple[str, Callable[[int], Any]]] = []
  for k in ("index", "file_name", "label"):
    if k in per_image:
      cols.append((k, lambda r, k=k: per_image[k][r]))
  for k, v in per_image.items():
    if k in ("index", "file_name", "label") or k.startswith("selected_"):
      continue
    if v.ndim == 2:
      for i, t in enumerate(counts):
        cols.append((f"{k}@{t}", lambda r, v=v, i=i: v[r, i]))
    else:
      cols.append((k, lambda r, v=v: v[r]))
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow([c for c, _ in cols])
    for r in range(m):
      w.writerow([fn(r) for _, fn in cols])


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


PLOT_LABELS = {
  "l1": "L1",
  "mse": "MSE",
  "psnr": "PSNR (dB)",
  "ssim": "SSIM",
  "lpips": "LPIPS",
  "rfid": "rFID",
  "usage_1d": "1D codebook usage",
  "perplexity_1d": "1D perplexity",
  "usage_2d": "2D codebook usage",
  "perplexity_2d": "2D perplexity",
}


def plot_metrics(results: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Every available metric against the token count; adaptive selections as labelled points."""
  plt = _pyplot()
  rows = results["per_length"]
  keys = [k for k in PLOT_LABELS if any(r.get(k) is not None for r in rows)]
  cols = min(4, len(keys))
  nrows = math.ceil(len(keys) / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False)
  tokens = [r["tokens"] for r in rows]
  for ax, k in zip(axes.flat, keys):
    ys = [np.nan if r.get(k) is None else r[k] for r in rows]
    ax.plot(tokens, ys, "o-", color="C0", label="fixed length")
    for j, a in enumerate(results.get("adaptive", [])):
      if a.get(k) is not None:
        ax.plot(a["mean_tokens"], a[k], "s", color=f"C{j + 1}", label=a["selection"])
    ax.set_xlabel("tokens")
    ax.set_title(PLOT_LABELS[k])
    ax.set_xticks(tokens)
    ax.tick_params(axis="x", labelsize=7)
  for ax in list(axes.flat)[len(keys) :]:
    ax.axis("off")
  handles, labels = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
  fig.suptitle(
    f"{results.get('model', '')} on {results.get('data', '')} ({results['num_images']} images)",
    fontsize=9,
  )
  fig.tight_layout(rect=(0, 0.06, 1, 0.96))
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_token_histograms(results: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Histogram of chosen token counts for every adaptive selection."""
  plt = _pyplot()
  sel = results["adaptive"]
  counts = results["token_counts"]
  fig, ax = plt.subplots(figsize=(7, 3.5))
  width = 0.8 * (counts[1] - counts[0] if len(counts) > 1 else 1) / max(1, len(sel))
  for j, a in enumerate(sel):
    h = [a["token_histogram"][str(t)] for t in counts]
    off = (j - (len(sel) - 1) / 2) * width
    ax.bar(
      np.asarray(counts) + off,
      h,
      width=width,
      label=f"{a['selection']} (mean {a['mean_tokens']:.1f})",
    )
  ax.set_xticks(counts)
  ax.set_xlabel("tokens per image")
  ax.set_ylabel("images")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def save_grid(
  inputs: np.ndarray,
  reconstructions: np.ndarray,
  selected: Mapping[str, np.ndarray],
  token_counts: Sequence[int],
  path: str | os.PathLike,
) -> None:
  """Rows: images; columns: input, reconstruction at each token count (the first selection's
  choice framed in red).

  Args:
    inputs: (M, H, W, 3) uint8; reconstructions: (N, M, H, W, 3) float in [0, 1].
    selected: selection key -> (M,) chosen iteration.
  """
  plt = _pyplot()
  m, n = inputs.shape[0], reconstructions.shape[0]
  first = next(iter(selected.items()), None)
  fig, axes = plt.subplots(m, n + 1, figsize=(1.3 * (n + 1), 1.3 * m + 0.4), squeeze=False)
  for r in range(m):
    axes[r, 0].imshow(inputs[r])
    for i in range(n):
      ax = axes[r, i + 1]
      ax.imshow(np.clip(reconstructions[i, r], 0, 1))
      if first is not None and int(first[1][r]) == i:
        for s in ax.spines.values():
          s.set_edgecolor("red")
          s.set_linewidth(2.5)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  axes[0, 0].set_title("input", fontsize=8)
  for i, t in enumerate(token_counts):
    axes[0, i + 1].set_title(str(t), fontsize=8)
  if first is not None:
    fig.suptitle(f"red frame: tokens chosen by {first[0]}", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def format_table(results: Mapping[str, Any]) -> str:
  """A plain-text summary of the per-length and adaptive rows."""
  cols = [
    c
    for c in ("l1", "mse", "psnr", "ssim", "lpips", "rfid") + USAGE
    if any(r.get(c) is not None for r in results["per_length"])
  ]
  head = f"{'tokens':>14} " + " ".join(f"{c:>13}" for c in cols)
  title = f"{results['num_images']} images from {results.get('data', '')}"
  if results.get("num_skipped"):
    title += f", {results['num_skipped']} files skipped (unreadable; listed in results.json)"
  lines = [title, head]

  def fmt(v):
    return f"{'-':>13}" if v is None else f"{v:13.5g}"

  for r in results["per_length"]:
    lines.append(f"{r['tokens']:>14} " + " ".join(fmt(r.get(c)) for c in cols))
  for a in results["adaptive"]:
    lines.append(
      f"{a['selection']:>14} "
      + " ".join(fmt(a.get(c)) for c in cols)
      + f"   mean tokens {a['mean_tokens']:.1f}, median {a['median_tokens']:.0f}"
    )
  return "\n".join(lines)
