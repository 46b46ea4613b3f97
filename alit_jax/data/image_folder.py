"""Random-access sources over a plain folder of image files or over in-memory arrays.

These let `alit_jax.evaluate`, `alit_jax.tokenize_dataset` and the experiments read images
without building an array_record dataset first (`python -m alit_jax.data.build_folder` does that
for training). Records have the shape the grain pipeline expects (`sources.py`): {"image":
encoded bytes or (H, W, 3) uint8, "label": int, "file_name": str}; decoding happens later
(`transforms.DecodeImage`, or `tokenize_dataset`'s preprocessing), so an unreadable file becomes
one bad example naming it, not a crash.

  ImageFolderSource  class folders labelled like torchvision's ImageFolder (evaluation)
  ImageFileSource    every image below a folder, unlabelled (`python -m alit_jax.tokenize_dataset`)

Both list their files with `files.walk_files`.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Any

import numpy as np

from alit_jax.data.files import subdirs, walk_files
from alit_jax.images import IMAGE_EXTENSIONS


def is_image_file(path: str | os.PathLike) -> bool:
  """The file name has one of `images.IMAGE_EXTENSIONS` (any case)."""
  return os.fspath(path).lower().endswith(IMAGE_EXTENSIONS)


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
    classes = subdirs(self.root)
    groups = [(c.name, c) for c in classes] if classes else [(self.root.name, self.root)]
    paths, labels = [], []
    for label, (_, folder) in enumerate(groups):
      for f in walk_files(folder):
        if is_image_file(f.name):
          paths.append(f)
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


class ImageFileSource:
  """A folder of image files as a random-access source (read on demand, never decoded here).

  Every image file below the folder (recursively), unlabelled: the input of
  `python -m alit_jax.tokenize_dataset PATH`, whose job identity hashes this file list
  (`fingerprint`). The list is `images.list_images`'s: hidden files included, links to folders
  not followed, and each folder's files in the order of the folder's full path (not depth
  first), so a job started before this class moved here resumes with the same fingerprint.

  Records: {"image": encoded bytes, "label": -1, "file_name": path relative to the folder}, or
  {"image": None, "error": reason, ...} when the file cannot be read. Picklable.

  Attributes:
    root: the folder (absolute, symbolic links resolved).
    files: the image paths relative to root ('/'-separated), in index order.
  """

  def __init__(self, root: str | os.PathLike):
    self.root = pathlib.Path(root).expanduser().resolve()
    if not self.root.is_dir():
      raise FileNotFoundError(f"{self.root}: image folder does not exist or is not a directory")
    found = [
      f for f in walk_files(self.root, hidden=True, follow_links=False) if is_image_file(f.name)
    ]
    found.sort(key=lambda f: (str(f.parent), f.name))  # list_images' order: by folder path
    self.files = [f.relative_to(self.root).as_posix() for f in found]
    if not self.files:
      raise ValueError(f"{self.root}: no image files found (extensions {IMAGE_EXTENSIONS})")

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    rel = self.files[int(index)]
    try:
      data = (self.root / rel).read_bytes()
    except OSError as e:
      return {"image": None, "label": -1, "file_name": rel, "error": f"{type(e).__name__}: {e}"}
    return {"image": data, "label": -1, "file_name": rel}

  def fingerprint(self) -> str:
    """Hash of the sorted relative file list (indices are positions in it)."""
    return hashlib.sha256("\n".join(self.files).encode()).hexdigest()

  def __repr__(self) -> str:
    return f"ImageFileSource({str(self.root)!r}, n={len(self)})"


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
