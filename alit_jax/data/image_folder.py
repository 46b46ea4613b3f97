"""Random-access sources over a plain folder of image files or over in-memory arrays.

These let `alit_jax.evaluate` and the experiments read images without building an array_record
dataset first (`python -m alit_jax.data.build_folder` does that for training). Records have the
shape the grain pipeline expects (`sources.py`): {"image": encoded bytes or (H, W, 3) uint8,
"label": int, "file_name": str}; decoding happens in `transforms.DecodeImage`, so an unreadable
file becomes one masked example with a warning naming it, not a crash.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from alit_jax.images import IMAGE_EXTENSIONS


class ImageFolderSource:
  """Every image file below a folder, in sorted order, labelled like torchvision's ImageFolder.

  Files directly in `root` get label 0 when there are no subfolders; with subfolders, each
  first-level subfolder is a class (sorted names -> labels 0..C-1) and loose files in `root` are
  ignored, as ImageFolder does. Hidden files and folders are skipped.

  Attributes:
    root: the folder.
    paths: absolute image paths, sorted.
    labels: (N,) int64 labels.
    label_names: class names.
    file_names: paths relative to root ('/'-separated).
  """

  def __init__(self, root: str | os.PathLike):
    self.root = pathlib.Path(root).expanduser()
    if not self.root.is_dir():
      raise FileNotFoundError(f"{self.root}: no such folder of images")
    classes = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
    groups = [(c.name, c) for c in classes] if classes else [(self.root.name, self.root)]
    paths, labels = [], []
    for label, (_, folder) in enumerate(groups):
      for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
          if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
            paths.append(pathlib.Path(dirpath) / f)
            labels.append(label)
    if not paths:
      raise ValueError(
        f"{self.root}: no image files found (extensions {', '.join(IMAGE_EXTENSIONS)})"
      )
    self.paths = paths
    self.labels = np.asarray(labels, np.int64)
    self.label_names = tuple(name for name, _ in groups)
    self.file_names = [p.relative_to(self.root).as_posix() for p in paths]

  @property
  def num_classes(self) -> int:
    return len(self.label_names)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    path = self.paths[index]
    try:
      data = path.read_bytes()
    except OSError as e:
      # An empty payload is reported by DecodeImage as a corrupt record (masked, logged).
      data = b""
      from absl import logging

      logging.warning("cannot read %s: %s", path, e)
    return {"image": data, "label": int(self.labels[index]), "file_name": self.file_names[index]}

  def __repr__(self) -> str:
    return f"ImageFolderSource({str(self.root)!r}, n={len(self)}, classes={self.num_classes})"


class ArraySource:
  """In-memory images as a source.

  Args:
    images: (N, H, W, 3) uint8, or float in [0, 1] (rounded to uint8: the evaluation pipeline
      works on 8-bit images like the reference's saved PNGs).
    labels: optional (N,) int labels (default -1).
  """

  label_names: tuple[str, ...] = ()

  def __init__(self, images: Any, labels: Any = None):
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be (N, H, W, 3), got shape {images.shape}")
    if images.dtype != np.uint8:
      if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
      if images.size and (np.nanmin(images) < 0 or np.nanmax(images) > 1 or np.isnan(images).any()):
        raise ValueError("float images must lie in [0, 1] (without NaN)")
      images = np.round(images * 255.0).astype(np.uint8)
    self.images = images
    n = images.shape[0]
    self.labels = np.full((n,), -1, np.int64) if labels is None else np.asarray(labels, np.int64)
    if self.labels.shape != (n,):
      raise ValueError(f"labels must have shape ({n},), got {self.labels.shape}")
    self.file_names = [f"array_{i:06d}" for i in range(n)]

  @property
  def num_classes(self) -> int:
    return int(self.labels.max()) + 1 if len(self.labels) and self.labels.max() >= 0 else 0

  def __len__(self) -> int:
    return self.images.shape[0]

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    return {
      "image": self.images[index],
      "label": int(self.labels[index]),
      "file_name": self.file_names[index],
    }


class PrefixSource:
  """The first `n` records of another source (keeps `label_names`, `file_names`)."""

  def __init__(self, base, n: int):
    self.base = base
    self.n = min(int(n), len(base))
    self.label_names = getattr(base, "label_names", ())
    names = getattr(base, "file_names", None)
    self.file_names = list(names[: self.n]) if names is not None else None

  @property
  def num_classes(self) -> int:
    return len(self.label_names)

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.n:
      raise IndexError(f"index {index} out of range [0, {self.n})")
    return self.base[index]

  def __repr__(self) -> str:
    return f"PrefixSource({self.base!r}, n={self.n})"
