"""Image input checks and file loading shared by the API and the command-line tools."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def to_rgb(im: Any) -> Any:
  """A PIL image -> 8-bit RGB, scaling high-bit-depth modes instead of clipping them.

  `Image.convert("RGB")` (what torchvision's loader does) clips 16-bit ("I;16*", "I") and float
  ("F") grayscale images at 255, which turns most 16-bit photos white. Here 16-bit data is scaled
  by 255/65535; "I" images whose values exceed 255 are taken as 16-bit (values are clipped to
  [0, 65535]), others as 8-bit; "F" images in [0, 1] are scaled by 255, others clipped to
  [0, 255]. Every other mode (L, P, LA, RGBA, CMYK, YCbCr, 1, ...) goes through `convert("RGB")`
  (alpha is dropped, as in the reference's loader).
  """
  from PIL import Image

  mode = im.mode
  if mode.startswith("I;16") or mode in ("I", "F"):
    a = np.asarray(im)
    if mode == "F":
      a = a.astype(np.float64)
      a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a
    else:
      a = a.astype(np.float64)
      if mode.startswith("I;16") or np.max(a, initial=0) > 255:
        a = np.clip(a, 0, 65535) * (255.0 / 65535.0)
    a = np.nan_to_num(np.clip(np.round(a), 0, 255)).astype(np.uint8)
    return Image.fromarray(a, "L").convert("RGB")
  if mode == "RGB":
    return im
  return im.convert("RGB")


_UINT8_TO_UNIT = np.arange(256, dtype=np.float32) / np.float32(255.0)


def as_batch(images: Any, image_size: int) -> np.ndarray | Any:
  """Validates images and returns a float32 (B, S, S, 3) batch in [0, 1].

  Accepts float arrays in [0, 1] and uint8 arrays (divided by 255), batched (B, S, S, 3) or a
  single (S, S, 3) image. numpy inputs stay numpy; jax arrays stay on device.

  Raises:
    ValueError: wrong rank, channel count, size or dtype, NaN/Inf, or floats outside [0, 1].
  """
  import jax
  import jax.numpy as jnp

  is_jax = isinstance(images, jax.Array)
  xp = jnp if is_jax else np
  if not is_jax:
    images = np.asarray(images)
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4:
    raise ValueError(
      f"images must be (B, H, W, 3) or (H, W, 3) (NHWC), got shape {tuple(images.shape)}"
    )
  b, h, w, c = images.shape
  if c != 3:
    hint = " (NCHW? transpose to NHWC)" if h == 3 else ""
    raise ValueError(
      f"images must have 3 channels in the last axis, got shape {tuple(images.shape)}{hint}"
    )
  if (h, w) != (image_size, image_size):
    raise ValueError(
      f"images must be {image_size}x{image_size}, got {h}x{w}; resize/crop first "
      "(alit_jax.images.load_image does the reference's resize + center crop)"
    )
  if b == 0:
    raise ValueError("images is an empty batch")
  dtype = np.dtype(images.dtype)
  if dtype == np.uint8:
    if is_jax:
      # XLA's CPU division by a constant is not correctly rounded (126 of the 256 values differ
      # from numpy's x / 255 in the last bit); a table lookup gives identical values anywhere.
      return jnp.asarray(_UINT8_TO_UNIT)[images.astype(jnp.int32)]
    return images.astype(np.float32) / 255.0
  if not np.issubdtype(dtype, np.floating):
    raise ValueError(f"images must be float in [0, 1] or uint8, got dtype {dtype}")
  images = images.astype(xp.float32)
  if not bool(xp.all(xp.isfinite(images))):
    raise ValueError("images contain NaN or Inf")
  lo, hi = float(xp.min(images)), float(xp.max(images))
  if lo < -1e-6 or hi > 1 + 1e-6:
    raise ValueError(
      f"float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
      "(uint8 0..255 data should be passed as uint8 or divided by 255)"
    )
  return images


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
  """Reads an image as the reference's evaluation does: RGB, bicubic resize of the shorter side
  to `size` (antialiased), center crop to `size` x `size`.

  Returns:
    (size, size, 3) uint8.

  Raises:
    ValueError: naming the file when it cannot be read as an image.
  """
  from PIL import Image, UnidentifiedImageError

  try:
    with Image.open(path) as im:
      im = to_rgb(im)
      w, h = im.size
      scale = size / min(w, h)
      nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
      im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
      left, top = (nw - size) // 2, (nh - size) // 2
      im = im.crop((left, top, left + size, top + size))
      return np.asarray(im, dtype=np.uint8)
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"{path}: cannot read image ({e.__class__.__name__}: {e})") from e


def list_images(paths: list[str | os.PathLike]) -> list[str]:
  """Expands files and folders (recursively, sorted) into image file paths."""
  out: list[str] = []
  for p in paths:
    p = os.fspath(p)
    if os.path.isdir(p):
      for root, _, files in sorted(os.walk(p)):
        out += [
          os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    else:
      out.append(p)
  return out
