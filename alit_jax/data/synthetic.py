"""Procedural RGB images of graded complexity, deterministic per (seed, index).

ALIT allocates more tokens to more complex images, so a synthetic dataset whose complexity is
known by construction is useful for smoke runs (runlocal configs), demos and tests. Six kinds,
ordered by increasing complexity (the `complexity` label is the position in `KINDS`):

  0 flat        one flat colour
  1 gradient    a linear colour ramp in a random direction
  2 few_shapes  2-4 flat shapes on a flat background
  3 many_shapes 25-60 overlapping shapes
  4 texture     a sum of oriented sinusoids and a checkerboard, per-channel
  5 noise       i.i.d. uniform pixel noise

Everything is drawn with numpy + PIL from `np.random.default_rng([seed, index])`, so any image can
be regenerated from its index alone (random access, no state, safe in grain worker processes).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("flat", "gradient", "few_shapes", "many_shapes", "texture", "noise")


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
  return tuple(int(c) for c in rng.integers(0, 256, size=3))


def flat(rng: np.random.Generator, size: int | tuple[int, int]) -> np.ndarray:
  """One flat colour. Returns (H, W, 3) uint8."""
  h, w = _size_hw(size)
  return np.broadcast_to(np.array(_colour(rng), np.uint8), (h, w, 3)).copy()


def gradient(rng: np.random.Generator, size: int | tuple[int, int]) -> np.ndarray:
  """Linear ramp between two colours along a random direction. Returns (H, W, 3) uint8."""
  h, w = _size_hw(size)
  angle = rng.uniform(0.0, 2.0 * np.pi)
  yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
  t = xx * np.cos(angle) + yy * np.sin(angle)
  t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
  c0 = np.array(_colour(rng), np.float64)
  c1 = np.array(_colour(rng), np.float64)
  img = c0 + t[..., None] * (c1 - c0)
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _draw_shapes(rng: np.random.Generator, size: int | tuple[int, int], n: int) -> np.ndarray:
  h, w = _size_hw(size)
  im = Image.new("RGB", (w, h), _colour(rng))
  draw = ImageDraw.Draw(im)
  for _ in range(n):
    kind = int(rng.integers(0, 3))
    # Shapes between ~1/8 and ~1/2 of the image side keep them visible at 16-256 px.
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    rx = rng.uniform(w / 16, w / 4) + 0.5
    ry = rng.uniform(h / 16, h / 4) + 0.5
    box = (cx - rx, cy - ry, cx + rx, cy + ry)
    colour = _colour(rng)
    if kind == 0:
      draw.ellipse(box, fill=colour)
    elif kind == 1:
      draw.rectangle(box, fill=colour)
    else:
      pts = [(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in np.sort(rng.uniform(0, 6.283, 3))]
      draw.polygon(pts, fill=colour)
  return np.asarray(im, dtype=np.uint8).copy()


def few_shapes(rng: np.random.Generator, size: int | tuple[int, int]) -> np.ndarray:
  """2-4 ellipses/rectangles/triangles on a flat background. Returns (H, W, 3) uint8."""
  return _draw_shapes(rng, size, int(rng.integers(2, 5)))


def many_shapes(rng: np.random.Generator, size: int | tuple[int, int]) -> np.ndarray:
  """25-60 overlapping shapes. Returns (H, W, 3) uint8."""
  return _draw_shapes(rng, size, int(rng.integers(25, 61)))


def texture(rng: np.random.Generator, size: int | tuple[int, int]) -> np.ndarray:
  """Per-channel sums of oriented sinusoids plus a checkerboard. Returns (H, W, 3) uint8."""
  h, w = _size_hw(size)
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  img = np.zeros((h, w, 3), np.float64)
  for c in range(3):
    for _ in range(3):
      # Periods of 2-8 pixels: fine detail that survives resizing by a small factor.
      freq = 2.0 * np.pi / rng.uniform(2.0, 8.0)
      angle = rng.uniform(0.0, np.pi)
      phase = rng.uniform(0.0, 2.0 * np.pi)
      img[..., c] += np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
  cell = int(rng.integers(2, 6))
  checker = ((yy // cell + xx // cell) % 2)[..., None] * 2.0 - 1.0
  img = img / 3.0 * 0.7 + checker * 0.3
  return np.clip(np.round((img + 1.0) * 127.5), 0, 255).astype(np.uint8)


def noise(rng: np.random.Generator, size: int | tuple[int, int]) -> np.ndarray:
  """I.i.d. uniform noise. Returns (H, W, 3) uint8."""
  h, w = _size_hw(size)
  return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


GENERATORS = {
  "flat": flat,
  "gradient": gradient,
  "few_shapes": few_shapes,
  "many_shapes": many_shapes,
  "texture": texture,
  "noise": noise,
}


def kind_of(index: int) -> int:
  """Kind (= complexity level) of the image at `index`: kinds cycle so every split is balanced."""
  return int(index) % len(KINDS)


def synthetic_image(
  index: int, size: int | tuple[int, int], seed: int = 0, kind: int | str | None = None
) -> tuple[np.ndarray, int]:
  """The synthetic image number `index`.

  Args:
    index: non-negative record index.
    size: output side (int) or (height, width).
    seed: dataset seed; (seed, index) fully determines the image.
    kind: force a kind (name or position in `KINDS`); default `kind_of(index)`.

  Returns:
    (image, complexity): image (H, W, 3) uint8, complexity = position of the kind in `KINDS`.
  """
  if index < 0:
    raise ValueError(f"synthetic index must be >= 0, got {index}")
  if kind is None:
    k = kind_of(index)
  elif isinstance(kind, str):
    if kind not in GENERATORS:
      raise ValueError(f"unknown synthetic kind {kind!r}; expected one of {KINDS}")
    k = KINDS.index(kind)
  else:
    k = int(kind)
  rng = np.random.default_rng([int(seed), int(index), k])
  return GENERATORS[KINDS[k]](rng, size), k


def encode_png(image: np.ndarray) -> bytes:
  """PNG bytes of an (H, W, 3) uint8 image (lossless; its size is a crude complexity measure)."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def write_image_folder(
  root, num_per_class: int, size: int | tuple[int, int], seed: int = 0, fmt: str = "PNG"
) -> list[str]:
  """Writes a class-per-subfolder image folder (one subfolder per kind) for demos and tests.

  Args:
    root: output folder (created).
    num_per_class: images per kind.
    size: image side or (height, width).
    seed: dataset seed.
    fmt: PIL format name, "PNG" or "JPEG".

  Returns:
    Relative paths of the written files.
  """
  import pathlib

  root = pathlib.Path(root)
  ext = {"PNG": ".png", "JPEG": ".jpg"}[fmt.upper()]
  written = []
  for k, name in enumerate(KINDS):
    (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(num_per_class):
      img, _ = synthetic_image(i * len(KINDS) + k, size, seed)
      rel = f"{name}/{i:05d}{ext}"
      Image.fromarray(img).save(root / rel, format=fmt.upper())
      written.append(rel)
  return written


class SyntheticSource:
  """Random-access source of synthetic images (a grain/`MapDataset.source` compatible sequence).

  Records: {"image": (H, W, 3) uint8, "label": int (= complexity), "complexity": int,
  "file_name": str}. Picklable (only holds numbers), so it can be sent to grain workers.
  """

  label_names = KINDS

  def __init__(self, num_examples: int, image_size: int | tuple[int, int], seed: int = 0):
    if num_examples <= 0:
      raise ValueError(f"synthetic num_examples must be > 0, got {num_examples}")
    self.num_examples = int(num_examples)
    self.image_size = _size_hw(image_size)
    self.seed = int(seed)

  @property
  def num_classes(self) -> int:
    return len(KINDS)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"synthetic index {index} out of range [0, {self.num_examples})")
    img, k = synthetic_image(index, self.image_size, self.seed)
    return {"image": img, "label": k, "complexity": k, "file_name": f"synthetic_{index:08d}"}

  def __repr__(self) -> str:
    return (
      f"SyntheticSource(num_examples={self.num_examples}, image_size={self.image_size}, "
      f"seed={self.seed})"
    )
