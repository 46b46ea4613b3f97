"""Image decoding and augmentation as picklable, top-level grain transforms.

Records flowing through the pipeline are dicts. A source record holds at least
`image` (encoded bytes, or an (H, W, 3) uint8 array for in-memory sources such as the synthetic
one), `label` (int) and `index` (int, added by the pipeline). Transforms keep the keys they do
not touch.

Output images are **uint8 (H, W, 3)**, not float32: a quarter of the bytes through grain's
shared-memory queues and the host->device copy. Convert on device with `to_float` (a division by
255 in float32, bit-identical to torchvision's `ToTensor`, which the reference uses).

Semantics follow the reference (PyTorch/torchvision on PIL images):
  train: RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(3/4, 4/3)) + RandomHorizontalFlip
    (main_pretrain.py / main_full_finetuning.py). torchvision's default interpolation there is
    bilinear, so that is the default here; `interpolation="bicubic"` is available.
  eval: Resize(size, bicubic, antialias) of the shorter side, then CenterCrop(size)
    (evaluate_rfid.py for custom images). `resize=False` gives the reference's ImageNet
    validation transform (CenterCrop only, zero padding when the image is smaller).
All randomness comes from the `np.random.Generator` grain passes to `RandomMap` (derived from the
pipeline seed and the record position), never from a global RNG.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence

import grain
import numpy as np
from absl import logging
from PIL import Image

from alit_jax.images import to_rgb

_INTERPOLATIONS = {
  "nearest": Image.Resampling.NEAREST,
  "bilinear": Image.Resampling.BILINEAR,
  "bicubic": Image.Resampling.BICUBIC,
  "lanczos": Image.Resampling.LANCZOS,
}


def _resample(name: str) -> Image.Resampling:
  try:
    return _INTERPOLATIONS[name]
  except KeyError:
    raise ValueError(
      f"unknown interpolation {name!r}; expected one of {sorted(_INTERPOLATIONS)}"
    ) from None


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(size, int | np.integer):
    return int(size), int(size)
  h, w = size
  return int(h), int(w)


def to_float(images):
  """uint8 images -> float32 in [0, 1]; works on numpy and jax arrays.

  Division (not multiplication by 1/255) so results equal torchvision's ToTensor bit for bit.
  """
  return images.astype(np.float32) / np.float32(255.0)


# ------------------------------------------------------------------------------------------------
# Decoding


def decode_image(data) -> Image.Image:
  """Decodes encoded image bytes (or a uint8 array) to an RGB PIL image.

  Args:
    data: encoded bytes (JPEG, PNG, anything PIL reads), or an (H, W, 3) / (H, W) uint8 array.

  Returns:
    A loaded PIL image in mode RGB (grayscale/CMYK/palette/RGBA converted like torchvision's
    `ImageFolder` loader, i.e. `Image.convert("RGB")`; 16-bit and float images are scaled to 8
    bits rather than clipped, see `alit_jax.images.to_rgb`).

  Raises:
    ValueError: the data is not a decodable image (the message says why).
  """
  if isinstance(data, np.ndarray) and data.dtype != object:
    if data.dtype != np.uint8 or data.ndim not in (2, 3):
      raise ValueError(f"expected a uint8 (H, W[, 3]) image array, got {data.dtype} {data.shape}")
    return Image.fromarray(data).convert("RGB")
  if isinstance(data, np.ndarray):  # 0-d object array holding bytes
    data = data.item()
  if isinstance(data, memoryview | bytearray):
    data = bytes(data)
  if not isinstance(data, bytes):
    raise ValueError(f"expected encoded image bytes, got {type(data).__name__}")
  if not data:
    raise ValueError("empty image data")
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      return to_rgb(im)
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ...) for bad data.
    raise ValueError(f"cannot decode image: {type(e).__name__}: {stable_text(str(e))}") from e


def stable_text(text: str) -> str:
  """`text` with object addresses ("<_io.BytesIO object at 0x...>") replaced by `<data>`.

  PIL names the buffer it read in its errors; the address changes per run, so reports and
  manifests that quote an error would differ between reruns.
  """
  return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<data>", text)


def error_text(e: Exception) -> str:
  """One stable line for a bad image: a ValueError's message, else `Type: message`."""
  return stable_text(str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")


class DecodeImage(grain.transforms.Map):
  """record["image"] bytes/array -> (H, W, 3) uint8 array, plus `valid` (bool).

  Corrupt records do not crash the pipeline: they get `valid=False`, a (1, 1, 3) zero image and
  a logged warning (with the record index). Training filters them out (`IsValid`); evaluation
  keeps them with mask 0. Eval padding records (`mask` False) pass through undecoded.
  """

  def map(self, record: dict) -> dict:
    out = dict(record)
    if record.get("mask", True) is False:  # eval padding: nothing to decode
      out["image"] = np.zeros((1, 1, 3), np.uint8)
      out["valid"] = False
      return out
    try:
      out["image"] = np.asarray(decode_image(record["image"]), dtype=np.uint8)
      out["valid"] = True
    except ValueError as e:
      logging.warning(
        "skipping corrupt image (index %s, file %r): %s",
        record.get("index"),
        record.get("file_name"),
        e,
      )
      out["image"] = np.zeros((1, 1, 3), np.uint8)
      out["valid"] = False
    return out


class IsValid(grain.transforms.Filter):
  """Keeps records whose image decoded (see `DecodeImage`)."""

  def filter(self, record: dict) -> bool:
    return bool(record.get("valid", True))


# ------------------------------------------------------------------------------------------------
# Geometry (PIL, torchvision semantics)


def random_resized_crop_params(
  rng: np.random.Generator,
  height: int,
  width: int,
  scale: tuple[float, float] = (0.8, 1.0),
  ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
  attempts: int = 10,
) -> tuple[int, int, int, int]:
  """Crop box of torchvision's RandomResizedCrop.get_params, drawn from `rng`.

  Up to `attempts` times: area fraction ~ U(scale), log aspect ratio ~ U(log ratio); accept if
  the rounded box fits. Otherwise fall back to the largest centred crop whose aspect ratio is
  clamped to `ratio`.

  Returns:
    (top, left, crop_height, crop_width) in pixels.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(attempts):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(
  img: Image.Image,
  top: int,
  left: int,
  height: int,
  width: int,
  size: int | Sequence[int],
  interpolation: str = "bilinear",
) -> Image.Image:
  """Crops the box then resizes it to `size` ((h, w) or square), like torchvision on PIL."""
  oh, ow = _size_hw(size)
  return img.crop((left, top, left + width, top + height)).resize(
    (ow, oh), _resample(interpolation)
  )


def resize_shorter_side(img: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
  """torchvision `Resize(size)` with an int: shorter side -> size, longer side truncated."""
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  if short == size:
    return img
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  # PIL's resize filters scale their support with the reduction factor, i.e. they antialias.
  return img.resize((new_w, new_h), _resample(interpolation))


def center_crop(img: Image.Image, size: int | Sequence[int]) -> Image.Image:
  """torchvision `CenterCrop`: zero-pads images smaller than size, then crops the centre."""
  ch, cw = _size_hw(size)
  w, h = img.size
  if cw > w or ch > h:
    padded = Image.new("RGB", (max(w, cw), max(h, ch)), (0, 0, 0))
    padded.paste(img, ((cw - w) // 2 if cw > w else 0, (ch - h) // 2 if ch > h else 0))
    img = padded
    w, h = img.size
    if (w, h) == (cw, ch):
      return img
  top = int(round((h - ch) / 2.0))
  left = int(round((w - cw) / 2.0))
  return img.crop((left, top, left + cw, top + ch))


# ------------------------------------------------------------------------------------------------
# grain transforms


class TrainAugment(grain.transforms.RandomMap):
  """RandomResizedCrop + random horizontal flip on a decoded record (see module docstring).

  Attributes:
    size: output side (int) or (height, width).
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the crop aspect ratio (width / height).
    flip_prob: probability of a horizontal flip.
    interpolation: "bilinear" (torchvision's default, the reference) or "bicubic", ...
  """

  def __init__(
    self,
    size: int | Sequence[int],
    scale: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    flip_prob: float = 0.5,
    interpolation: str = "bilinear",
  ):
    _resample(interpolation)
    self.size = _size_hw(size)
    self.scale = tuple(scale)
    self.ratio = tuple(ratio)
    self.flip_prob = float(flip_prob)
    self.interpolation = interpolation

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    out = dict(record)
    img = Image.fromarray(record["image"])
    top, left, h, w = random_resized_crop_params(rng, img.height, img.width, self.scale, self.ratio)
    img = resized_crop(img, top, left, h, w, self.size, self.interpolation)
    arr = np.asarray(img, dtype=np.uint8)
    if rng.random() < self.flip_prob:
      arr = arr[:, ::-1]
    out["image"] = np.ascontiguousarray(arr)
    return out


class EvalPreprocess(grain.transforms.Map):
  """Deterministic eval view: shorter side -> size (bicubic, antialiased) + center crop.

  With `resize=False` only the center crop (zero padded if needed) is applied, which is the
  reference's ImageNet/COCO validation transform (`CenterCrop(input_size)`).
  Records with `valid=False` get a zero image of the output size.
  """

  def __init__(self, size: int, resize: bool = True, interpolation: str = "bicubic"):
    _resample(interpolation)
    self.size = int(size)
    self.resize = bool(resize)
    self.interpolation = interpolation

  def map(self, record: dict) -> dict:
    out = dict(record)
    if not record.get("valid", True):
      out["image"] = np.zeros((self.size, self.size, 3), np.uint8)
      return out
    img = Image.fromarray(record["image"])
    if self.resize:
      img = resize_shorter_side(img, self.size, self.interpolation)
    out["image"] = np.asarray(center_crop(img, self.size), dtype=np.uint8)
    return out


class SelectKeys(grain.transforms.Map):
  """Keeps `keys` and casts them to fixed dtypes so batches have a stable structure."""

  _DTYPES = {"image": np.uint8, "label": np.int32, "index": np.int64, "mask": np.bool_}

  def __init__(self, keys: Sequence[str] = ("image", "label", "index")):
    self.keys = tuple(keys)

  def map(self, record: dict) -> dict:
    return {k: np.asarray(record[k], dtype=self._DTYPES.get(k)) for k in self.keys}
