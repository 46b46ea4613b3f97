"""Frechet Inception Distance from feature statistics (numpy / scipy, float64).

The statistics and the distance follow pytorch-fid: the mean and the *sample* covariance
(``np.cov(..., rowvar=False)``, divisor n - 1) of the 2048-d pool3 features, and

  FID = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})

with ``scipy.linalg.sqrtm``; when the product is singular enough that the square root is not
finite, ``eps * I`` is added to both covariances, and a complex square root is accepted only
if the imaginary part of its diagonal is below 1e-3.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np


def feature_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
  """Mean and sample covariance of a feature matrix.

  Args:
    features: (N, D) features, N >= 2.

  Returns:
    ``mu`` (D,) and ``sigma`` (D, D), float64.
  """
  f = np.asarray(features, dtype=np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"feature_stats: expected (N, D) features with N >= 2, got shape {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
  """Frechet distance between two Gaussians N(mu1, sigma1) and N(mu2, sigma2).

  Args:
    mu1: (D,) mean of the first set.
    sigma1: (D, D) covariance of the first set.
    mu2: (D,) mean of the second set.
    sigma2: (D, D) covariance of the second set.
    eps: diagonal offset added to both covariances when ``sqrtm(sigma1 @ sigma2)`` is not
      finite (pytorch-fid's fallback for singular products).

  Returns:
    The distance as a Python float.

  Raises:
    ValueError: on shape mismatch, or when the square root has a significant imaginary part.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != mu2.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(
      "frechet_distance: inconsistent shapes "
      f"mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}"
    )
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    offset = np.eye(d) * eps
    covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      m = np.max(np.abs(covmean.imag))
      raise ValueError(f"frechet_distance: sqrtm has an imaginary component of {m}")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> np.ndarray:
  # Imported here so that the rest of alit_jax.metrics works without scipy (an extra).
  import scipy.linalg

  # Singular products are expected (N < D); like pytorch-fid (disp=False) we stay quiet and let
  # the finiteness check decide on the eps fallback.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    return scipy.linalg.sqrtm(a)


def fid_from_features(features1: Any, features2: Any) -> float:
  """FID between two (N, D) feature matrices (see :func:`frechet_distance`)."""
  return frechet_distance(*feature_stats(features1), *feature_stats(features2))


class FeatureStats:
  """Streaming mean / sample covariance of features, accumulated in float64.

  Batches are added one at a time so a dataset's features never need to be held in memory.
  Sums are taken of ``features - shift`` where ``shift`` is the mean of the first batch, which
  keeps the one-pass covariance formula accurate when the mean is large relative to the spread.

  Example::

    acc = FeatureStats()
    for batch in batches:
      acc.add(inception_features(variables, batch))
    mu, sigma = acc.stats()
  """

  def __init__(self) -> None:
    self.n = 0
    self._shift: np.ndarray | None = None
    self._sum: np.ndarray | None = None
    self._outer: np.ndarray | None = None

  def add(self, features: Any) -> FeatureStats:
    """Adds a (B, D) batch of features; returns self."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
      raise ValueError(f"FeatureStats.add: expected (B, D) features, got shape {f.shape}")
    if f.shape[0] == 0:
      return self
    if self._shift is None:
      self._shift = f.mean(axis=0)
      d = f.shape[1]
      self._sum = np.zeros(d)
      self._outer = np.zeros((d, d))
    elif f.shape[1] != self._shift.shape[0]:
      raise ValueError(
        f"FeatureStats.add: feature size {f.shape[1]} != {self._shift.shape[0]} of earlier batches"
      )
    c = f - self._shift
    self._sum += c.sum(axis=0)
    self._outer += c.T @ c
    self.n += f.shape[0]
    return self

  def stats(self) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``mu`` (D,) and the sample covariance ``sigma`` (D, D), float64."""
    if self.n < 2:
      raise ValueError(f"FeatureStats.stats: need at least 2 features, have {self.n}")
    mean_c = self._sum / self.n
    sigma = (self._outer - self.n * np.outer(mean_c, mean_c)) / (self.n - 1)
    sigma = 0.5 * (sigma + sigma.T)  # exact symmetry, whatever order BLAS summed in
    return self._shift + mean_c, sigma


def save_stats(path: str | os.PathLike, mu: Any, sigma: Any) -> None:
  """Writes ``mu``/``sigma`` to an .npz file (the key names pytorch-fid uses)."""
  np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads ``mu``/``sigma`` from an .npz file such as pytorch-fid's precomputed statistics."""
  with np.load(path) as f:
    missing = [k for k in ("mu", "sigma") if k not in f.files]
    if missing:
      raise ValueError(f"{path}: FID statistics file lacks {missing} (has {f.files})")
    return f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
