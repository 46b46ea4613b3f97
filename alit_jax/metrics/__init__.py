"""Evaluation metrics: per-image reconstruction metrics, codebook statistics and FID statistics."""

from alit_jax.metrics.fid import (
  FeatureStats,
  feature_stats,
  fid_from_features,
  frechet_distance,
  load_stats,
  save_stats,
)
from alit_jax.metrics.image import (
  code_histogram,
  codebook_usage,
  l1,
  mse,
  psnr,
  ssim,
  usage_from_histogram,
)

__all__ = [
  "FeatureStats",
  "code_histogram",
  "codebook_usage",
  "feature_stats",
  "fid_from_features",
  "frechet_distance",
  "l1",
  "load_stats",
  "mse",
  "psnr",
  "save_stats",
  "ssim",
  "usage_from_histogram",
]
