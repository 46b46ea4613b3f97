"""Per-image reconstruction metrics and codebook statistics (jit-able, float32).

Every image metric takes two batches ``x`` and ``y`` of shape (B, H, W, C) (C is 3 for RGB, any
C works) with values in ``[0, data_range]`` and returns one value per image, shape (B,). Inputs
are cast to float32 first, so bfloat16 reconstructions are scored at full precision. All
functions are wrapped in ``jax.jit`` (``codebook_size`` and ``sigma`` are static) and can be
used inside other jitted code.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# skimage's `gaussian_weights=True` defaults (Wang et al. 2004): K1, K2, sigma and the ndimage
# truncation that makes an 11-tap window.
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03
_SSIM_TRUNCATE = 3.5


def _check_pair(x: Any, y: Any, fn: str) -> tuple[Array, Array]:
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  if x.shape != y.shape:
    raise ValueError(f"{fn}: images must have the same shape, got {x.shape} and {y.shape}")
  if x.ndim != 4:
    raise ValueError(f"{fn}: expected images of shape (B, H, W, C), got shape {x.shape}")
  return x, y


@jax.jit
def l1(x: Any, y: Any) -> Array:
  """Mean absolute error per image.

  Args:
    x: (B, H, W, C) images.
    y: (B, H, W, C) images.

  Returns:
    (B,) float32, mean over H, W, C of ``|x - y|``.
  """
  x, y = _check_pair(x, y, "l1")
  return jnp.mean(jnp.abs(x - y), axis=(1, 2, 3))


@jax.jit
def mse(x: Any, y: Any) -> Array:
  """Mean squared error per image.

  Args:
    x: (B, H, W, C) images.
    y: (B, H, W, C) images.

  Returns:
    (B,) float32, mean over H, W, C of ``(x - y) ** 2``.
  """
  x, y = _check_pair(x, y, "mse")
  return jnp.mean(jnp.square(x - y), axis=(1, 2, 3))


@jax.jit
def psnr(x: Any, y: Any, data_range: float = 1.0) -> Array:
  """Peak signal-to-noise ratio per image, in dB: ``10 log10(data_range**2 / mse)``.

  Identical images (mse == 0) give ``+inf`` exactly (never NaN, no warning); a caller that
  averages over a dataset should decide how to treat them (e.g. report the count, or average
  finite values only). The value is computed from the float32 MSE of each image.

  Args:
    x: (B, H, W, C) images in ``[0, data_range]``.
    y: (B, H, W, C) images in ``[0, data_range]``.
    data_range: peak-to-peak range of the pixel values (1.0 for images in [0, 1]).

  Returns:
    (B,) float32 PSNR in dB.
  """
  err = mse(x, y)
  peak = jnp.square(jnp.asarray(data_range, jnp.float32))
  safe = jnp.where(err > 0, err, 1.0)
  return jnp.where(err > 0, 10.0 * jnp.log10(peak / safe), jnp.inf)


def _gaussian_taps(sigma: float, truncate: float) -> np.ndarray:
  """1-D Gaussian weights of scipy.ndimage.gaussian_filter (radius int(truncate*sigma+0.5))."""
  radius = int(truncate * sigma + 0.5)
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  w = np.exp(-0.5 * (t / sigma) ** 2)
  return (w / w.sum()).astype(np.float32)


def _filter_valid(a: Array, taps: np.ndarray) -> Array:
  """Separable Gaussian correlation over H and W keeping only windows fully inside the image.

  skimage filters with a reflected border and then crops a ``radius`` strip before averaging,
  so the cropped result equals this 'valid' filtering exactly and the border mode never
  matters. Every channel is filtered independently (depthwise convolution).

  Args:
    a: (B, H, W, C) float32.
    taps: (k,) 1-D window.

  Returns:
    (B, H - k + 1, W - k + 1, C).
  """
  c = a.shape[-1]
  k = len(taps)
  w = jnp.asarray(taps, jnp.float32)
  dn = ("NHWC", "HWIO", "NHWC")
  for kernel in (
    jnp.tile(w.reshape(k, 1, 1, 1), (1, 1, 1, c)),
    jnp.tile(w.reshape(1, k, 1, 1), (1, 1, 1, c)),
  ):
    a = jax.lax.conv_general_dilated(
      a,
      kernel,
      window_strides=(1, 1),
      padding="VALID",
      dimension_numbers=dn,
      feature_group_count=c,
      precision=jax.lax.Precision.HIGHEST,
    )
  return a


@functools.partial(jax.jit, static_argnames=("sigma",))
def ssim(x: Any, y: Any, data_range: float = 1.0, sigma: float = 1.5) -> Array:
  """Structural similarity per image, mean over channels.

  Matches ``skimage.metrics.structural_similarity(x[i], y[i], gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=data_range, channel_axis=-1)``:
  an 11-tap Gaussian window (sigma 1.5, truncate 3.5), K1 = 0.01, K2 = 0.03, population
  (co)variances, SSIM map averaged over the pixels at least 5 from the border, then over
  channels. Identical images give exactly 1.

  Args:
    x: (B, H, W, C) images in ``[0, data_range]``, H and W at least 11.
    y: (B, H, W, C) images in ``[0, data_range]``.
    data_range: peak-to-peak range of the pixel values.
    sigma: Gaussian window standard deviation.

  Returns:
    (B,) float32 SSIM.
  """
  x, y = _check_pair(x, y, "ssim")
  taps = _gaussian_taps(sigma, _SSIM_TRUNCATE)
  if min(x.shape[1], x.shape[2]) < len(taps):
    raise ValueError(
      f"ssim: images of shape {x.shape} are smaller than the {len(taps)}x{len(taps)} window"
    )
  # (Co)variances are shift invariant: subtracting a per-image constant before squaring avoids
  # float32 cancellation in E[x^2] - E[x]^2 on bright, flat regions.
  shift = jnp.mean(x, axis=(1, 2), keepdims=True)
  xs, ys = x - shift, y - shift
  # One depthwise filtering pass over all five moment images.
  moments = _filter_valid(jnp.concatenate([xs, ys, xs * xs, ys * ys, xs * ys], axis=-1), taps)
  uxs, uys, exx, eyy, exy = jnp.split(moments, 5, axis=-1)
  ux, uy = uxs + shift, uys + shift
  vx = exx - uxs * uxs
  vy = eyy - uys * uys
  vxy = exy - uxs * uys
  r = jnp.asarray(data_range, jnp.float32)
  c1 = jnp.square(_SSIM_K1 * r)
  c2 = jnp.square(_SSIM_K2 * r)
  num = (2.0 * ux * uy + c1) * (2.0 * vxy + c2)
  den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
  return jnp.mean(num / den, axis=(1, 2, 3))


@functools.partial(jax.jit, static_argnames=("codebook_size",))
def code_histogram(indices: Any, codebook_size: int, valid_mask: Any | None = None) -> Array:
  """Counts how often each code is used.

  Args:
    indices: integer code indices, any shape.
    codebook_size: number of codes K (static).
    valid_mask: optional bool array of the same shape; False entries (e.g. padding or tokens
      beyond the adaptive length) are not counted. Indices outside ``[0, K)`` are never counted.

  Returns:
    (K,) float32 counts.
  """
  indices = jnp.asarray(indices)
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f"code_histogram: indices must be integers, got dtype {indices.dtype}")
  weights = (indices >= 0) & (indices < codebook_size)
  if valid_mask is not None:
    valid_mask = jnp.asarray(valid_mask)
    if valid_mask.shape != indices.shape:
      raise ValueError(
        f"code_histogram: valid_mask shape {valid_mask.shape} != indices shape {indices.shape}"
      )
    weights = weights & valid_mask.astype(bool)
  flat = jnp.clip(indices.reshape(-1), 0, codebook_size - 1)
  return jnp.bincount(flat, weights=weights.reshape(-1).astype(jnp.float32), length=codebook_size)


@jax.jit
def usage_from_histogram(counts: Any) -> dict[str, Array]:
  """Codebook usage and perplexity of a (K,) code histogram (e.g. summed over batches).

  Returns:
    ``usage``: fraction of the K codes used at least once; ``perplexity``: ``exp(H(p))`` with
    ``p = counts / counts.sum()`` (natural-log entropy, ``0 log 0 = 0``), between 1 (one code)
    and K (uniform). With no counted token at all, usage is 0 and perplexity is NaN.
  """
  counts = jnp.asarray(counts, jnp.float32)
  total = jnp.sum(counts)
  p = counts / jnp.where(total > 0, total, 1.0)
  plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
  perplexity = jnp.where(total > 0, jnp.exp(-jnp.sum(plogp)), jnp.nan)
  usage = jnp.mean((counts > 0).astype(jnp.float32))
  return {"usage": usage, "perplexity": perplexity}


@functools.partial(jax.jit, static_argnames=("codebook_size",))
def codebook_usage(
  indices: Any, codebook_size: int, valid_mask: Any | None = None
) -> dict[str, Array]:
  """Codebook usage and perplexity of one batch of code indices.

  Args:
    indices: integer code indices, any shape (e.g. (B, L)).
    codebook_size: number of codes K (static under jit).
    valid_mask: optional bool mask of the same shape; only True entries are counted.

  Returns:
    dict with float32 scalars ``usage`` (fraction of codes used) and ``perplexity``
    (``exp`` of the entropy of the code histogram); see :func:`usage_from_histogram`. For
    statistics over a whole dataset, sum :func:`code_histogram` over batches instead.
  """
  return usage_from_histogram(code_histogram(indices, codebook_size, valid_mask))
