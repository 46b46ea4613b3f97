"""Evaluation metrics: per-image reconstruction metrics, codebook statistics and FID."""

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
from alit_jax.metrics.inception import (
  InceptionV3,
  inception_features,
  inception_variables_from_state_dict,
  load_inception,
)

__all__ = [
  "FeatureStats",
  "InceptionV3",
  "code_histogram",
  "codebook_usage",
  "feature_stats",
  "fid_from_features",
  "frechet_distance",
  "inception_features",
  "inception_variables_from_state_dict",
  "l1",
  "load_inception",
  "load_stats",
  "mse",
  "psnr",
  "save_stats",
  "ssim",
  "usage_from_histogram",
]
