"""Where evaluation reads from: the tokenizer of a checkpoint and the image source of `--data`.

`resolve_source` decides the transform (resize + center crop for folders, arrays and synthetic
images; center crop only for TFDS datasets, as the reference evaluates ImageNet);
`skipped_file` says why the pipeline skipped a record. See `alit_jax.evaluate` for the whole
evaluation.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

import jax
import numpy as np


def load_tokenizer(checkpoint: str | os.PathLike, num_heads: int | None = None, **kwargs):
  """A `Tokenizer` from any checkpoint form the command lines accept (see `Tokenizer.load`)."""
  from alit_jax.tokenizer import Tokenizer

  return Tokenizer.load(checkpoint, num_heads=num_heads, **kwargs)


def resolve_source(
  data: Any, *, split: str = "validation", data_dir: str | None = None
) -> tuple[Any, str, bool]:
  """A random-access source, a description and the default `resize` for `data`.

  Args:
    data: a folder of images, a build_folder dataset folder, a spec understood by
      `alit_jax.data.sources.get_source` (`folder:PATH`, `synthetic:...`, a TFDS name), a TFDS
      `NAME/SPLIT`, an (N, H, W, 3) array of images, or a source object (`len` + `[i]` records).
    split: split for TFDS names and synthetic specs.
    data_dir: TFDS data_dir.

  Returns:
    (source, description, resize): `resize` is True for folders, arrays and synthetic images
    (resize the shorter side, then center crop) and False for TFDS datasets (center crop only,
    as the reference evaluates ImageNet).
  """
  from alit_jax.data import image_folder, sources

  if isinstance(data, np.ndarray) or isinstance(data, jax.Array):
    return image_folder.ArraySource(np.asarray(data)), f"array{tuple(data.shape)}", True
  if not isinstance(data, str | os.PathLike):
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
      return data, repr(data), True
    raise TypeError(f"data must be a path, a spec, an array or a source, got {type(data).__name__}")
  text = os.fspath(data)
  path = pathlib.Path(text).expanduser()
  if path.is_dir():
    if sources.find_dataset_dir(path) is not None:
      return sources.get_source(f"folder:{path}", split, data_dir), f"folder:{path}/{split}", True
    return image_folder.ImageFolderSource(path), str(path), True
  name = text.partition(":")[0].strip().lower()
  if name in ("folder", "synthetic"):
    return sources.get_source(text, split, data_dir), f"{text}/{split}", True
  m = re.fullmatch(r"([A-Za-z0-9_.-]+)/([A-Za-z0-9_\[\]:%+-]+)", text)
  if m:
    name, split = m.group(1), m.group(2)
    return sources.get_source(name, split, data_dir), f"{name}/{split}", False
  if os.sep in text or text.startswith("."):
    raise FileNotFoundError(f"{text}: no such folder of images")
  return sources.get_source(text, split, data_dir), f"{text}/{split}", False


def skipped_file(source: Any, index: int) -> dict[str, Any]:
  """{"index", "file", "reason"} of a record the pipeline skipped (it could not be decoded).

  The reason is found again by decoding the record once more (the pipeline only keeps a mask);
  its text is stable across runs (no object addresses).
  """
  from alit_jax.data import transforms

  record = source[index]
  name = record.get("file_name") or str(index)
  if isinstance(name, bytes):
    name = name.decode("utf-8", "replace")
  try:
    transforms.decode_image(record["image"])
    reason = "could not be preprocessed"
  except ValueError as e:
    reason = str(e)
  path = getattr(source, "root", None)
  if reason == "empty image data" and path is not None:
    try:  # ImageFolderSource turns a read error into empty data: say what the error was
      (pathlib.Path(path) / name).read_bytes()
    except OSError as e:
      reason = f"cannot read: {type(e).__name__}: {e.strerror or e}"
  return {"index": int(index), "file": str(name), "reason": reason}
