"""Token-count distributions of several datasets (in- vs out-of-distribution).

ALIT's claim: familiar (in-distribution) images need fewer tokens than unfamiliar ones at the
same reconstruction threshold. Compare the per-image token counts of datasets side by side.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def summarize(tokens: Any, token_counts: Sequence[int]) -> dict[str, Any]:
  """Mean, median, standard deviation and histogram over `token_counts` of (M,) token counts."""
  t = np.asarray(tokens)
  return {
    "num_images": int(t.size),
    "mean": float(t.mean()),
    "median": float(np.median(t)),
    "std": float(t.std()),
    "histogram": {str(c): int(np.sum(t == c)) for c in token_counts},
  }


def compare(tokens_by_dataset: Mapping[str, Any], token_counts: Sequence[int]) -> dict[str, Any]:
  """Per-dataset summaries and, for the first dataset against each other one, a two-sided
  Mann-Whitney U test and the difference in mean tokens (other - first).

  Args:
    tokens_by_dataset: dataset name -> (M,) token counts; the first is the reference
      (in-distribution) set.
    token_counts: the possible token counts.
  """
  from scipy import stats

  names = list(tokens_by_dataset)
  out: dict[str, Any] = {
    "datasets": {n: summarize(tokens_by_dataset[n], token_counts) for n in names},
    "tests": {},
  }
  ref = np.asarray(tokens_by_dataset[names[0]], np.float64)
  for n in names[1:]:
    other = np.asarray(tokens_by_dataset[n], np.float64)
    if np.ptp(np.concatenate([ref, other])) == 0:
      u, p = None, None  # identical constant samples: the test is undefined
    else:
      r = stats.mannwhitneyu(other, ref, alternative="two-sided")
      u, p = float(r.statistic), float(r.pvalue)
    out["tests"][f"{n} vs {names[0]}"] = {
      "mean_difference": float(other.mean() - ref.mean()),
      "mannwhitney_u": u,
      "p": p,
    }
  return out


def plot_histograms(
  tokens_by_dataset: Mapping[str, Any],
  token_counts: Sequence[int],
  path: str | os.PathLike,
  *,
  title: str = "",
) -> None:
  """Side-by-side bars of the fraction of images at each token count, one colour per dataset."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  names = list(tokens_by_dataset)
  counts = np.asarray(token_counts)
  step = counts[1] - counts[0] if len(counts) > 1 else 1
  width = 0.8 * step / len(names)
  fig, ax = plt.subplots(figsize=(7, 3.6))
  for j, n in enumerate(names):
    t = np.asarray(tokens_by_dataset[n])
    frac = [np.mean(t == c) for c in counts]
    off = (j - (len(names) - 1) / 2) * width
    ax.bar(counts + off, frac, width=width, label=f"{n} (mean {t.mean():.1f}, n={t.size})")
  ax.set_xticks(counts)
  ax.set_xlabel("tokens per image")
  ax.set_ylabel("fraction of images")
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
