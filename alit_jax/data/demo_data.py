"""Offline training data for the bundled demo model: crops of photos shipped by installed
packages, mixed with procedural images of controlled complexity.

Spec for `sources.get_source`: `demo[:num_examples=N,image_size=S,seed=K,photo_fraction=F]`.

* Photos: scikit-image's bundled photos (colour ones, and grey ones as RGB), scikit-learn's
  `china.jpg` / `flower.jpg` and matplotlib's `grace_hopper.jpg` when those packages are
  installed. Each record is a random square crop (side 15-100% of the photo's shorter side,
  random position, random horizontal flip), resized (bicubic, antialiased) to S x S.
* Procedural: `alit_jax.data.synthetic` (flat, gradient, few/many shapes, texture, noise).
* Split "train" uses the training photos; "validation" uses only HELD_OUT_PHOTOS (the photos
  also shipped in `alit_jax/assets/samples`) and a different synthetic seed, so the demo model's
  adaptivity can be measured on images it has not seen.

Every record is a deterministic function of (split, seed, index). Records:
`{"image": (S, S, 3) uint8, "label": 0 photo / 1 + synthetic complexity, "file_name": str}`.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np

from alit_jax.data import synthetic as synthetic_lib

# scikit-image loaders that work offline (RGB photos, then grey photos/textures).
SKIMAGE_RGB = (
  "astronaut",
  "chelsea",
  "coffee",
  "rocket",
  "hubble_deep_field",
  "immunohistochemistry",
  "retina",
)
SKIMAGE_GREY = ("camera", "brick", "grass", "gravel", "moon", "coins", "clock")
HELD_OUT_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
# Every photo the demo model was trained on (`all_photos=1` insists on these, so the recipe
# cannot silently train on fewer photos where a package is missing).
ALL_PHOTOS = SKIMAGE_RGB + SKIMAGE_GREY + ("china", "flower", "grace_hopper")
INSTALL_HINT = "pip install scikit-image scikit-learn matplotlib  (or: pip install -e '.[demo]')"
LABEL_NAMES = ("photo",) + tuple(synthetic_lib.KINDS)


def _package_file(package: str, *parts: str) -> str | None:
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
  return path if os.path.isfile(path) else None


@functools.cache
def photo_pool() -> dict[str, np.ndarray]:
  """name -> (H, W, 3) uint8 for every photo available offline (cached per process)."""
  from PIL import Image

  pool: dict[str, np.ndarray] = {}
  try:
    from skimage import data as skdata
  except ImportError:
    skdata = None
  if skdata is not None:
    for name in SKIMAGE_RGB + SKIMAGE_GREY:
      try:
        img = np.asarray(getattr(skdata, name)())
      except Exception:  # noqa: BLE001 - a loader needing the network just is not in the pool
        continue
      if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
      pool[name] = np.ascontiguousarray(img[..., :3]).astype(np.uint8)
  for package, parts in (
    ("sklearn", ("datasets", "images", "china.jpg")),
    ("sklearn", ("datasets", "images", "flower.jpg")),
    ("matplotlib", ("mpl-data", "sample_data", "grace_hopper.jpg")),
  ):
    path = _package_file(package, *parts)
    if path:
      with Image.open(path) as im:
        pool[os.path.splitext(parts[-1])[0]] = np.asarray(im.convert("RGB"))
  return pool


def photo_names(split: str) -> tuple[str, ...]:
  names = sorted(photo_pool())
  if split.startswith("train"):
    return tuple(n for n in names if n not in HELD_OUT_PHOTOS)
  return tuple(n for n in names if n in HELD_OUT_PHOTOS)


def random_crop(photo: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
  """A random square crop (15-100% of the shorter side), flipped half the time, at size x size."""
  from PIL import Image

  h, w = photo.shape[:2]
  side = max(8, int(round(min(h, w) * rng.uniform(0.15, 1.0))))
  y = int(rng.integers(0, h - side + 1))
  x = int(rng.integers(0, w - side + 1))
  crop = photo[y : y + side, x : x + side]
  if rng.random() < 0.5:
    crop = crop[:, ::-1]
  im = Image.fromarray(np.ascontiguousarray(crop)).resize(
    (size, size), Image.BICUBIC, reducing_gap=None
  )
  return np.asarray(im, dtype=np.uint8)


class DemoSource:
  """Random-access, picklable source of demo images (see the module docstring)."""

  label_names = LABEL_NAMES

  def __init__(
    self,
    num_examples: int,
    image_size: int = 64,
    seed: int = 0,
    split: str = "train",
    photo_fraction: float = 0.5,
    *,
    all_photos: bool = False,
  ):
    if num_examples <= 0:
      raise ValueError(f"demo num_examples must be > 0, got {num_examples}")
    self.num_examples = int(num_examples)
    self.image_size = int(image_size)
    self.seed = int(seed)
    self.split = split
    self.photo_fraction = float(photo_fraction)
    self._names = photo_names(split)
    missing = sorted(set(ALL_PHOTOS) - set(photo_pool()))
    if all_photos and missing:
      raise ValueError(
        f"demo source: photos {missing} are not available offline; install the packages that "
        f"ship them: {INSTALL_HINT}"
      )
    if not self._names and self.photo_fraction > 0:
      raise ValueError(
        f"demo source ({split}): no photos available offline; {INSTALL_HINT}, or use "
        "photo_fraction=0"
      )

  @property
  def num_classes(self) -> int:
    return len(LABEL_NAMES)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"demo index {index} out of range [0, {self.num_examples})")
    split_id = 0 if self.split.startswith("train") else 1
    rng = np.random.default_rng([self.seed, split_id, index])
    if rng.random() < self.photo_fraction:
      name = self._names[int(rng.integers(len(self._names)))]
      img = random_crop(photo_pool()[name], rng, self.image_size)
      return {"image": img, "label": 0, "file_name": f"demo_{self.split}_{index:08d}_{name}"}
    img, k = synthetic_lib.synthetic_image(index, self.image_size, self.seed * 7919 + 1 + split_id)
    return {"image": img, "label": 1 + k, "file_name": f"demo_{self.split}_{index:08d}_synthetic"}

  def __repr__(self) -> str:
    return (
      f"DemoSource(num_examples={self.num_examples}, image_size={self.image_size}, "
      f"seed={self.seed}, split={self.split!r}, photos={len(self._names)})"
    )
