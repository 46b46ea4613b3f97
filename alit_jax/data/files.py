"""File helpers of the data package: atomic writes and the folder walk.

`atomic_write_bytes` / `atomic_write_text` write through a temporary file in the target's
folder (`temp_path`: `.tmp-NAME.PID`), fsync it and rename it into place, so a reader (or a
rerun after a kill) sees either the old file or the whole new one, never a half-written one.
Concurrent writers of one path (several processes computing the same file) each use their own
temporary file and the last rename wins.

`walk_files` is the one recursive folder walk of the data package (`image_folder`'s sources):
sorted, depth first, by default hidden files and folders skipped and symbolic links followed.
`subdirs` lists a folder's class folders.
"""

from __future__ import annotations

import os
import pathlib

TMP_PREFIX = ".tmp-"


def temp_path(path: str | os.PathLike) -> pathlib.Path:
  """The temporary name `path` is written under before its rename: `.tmp-NAME.PID` beside it.

  `TMP_PREFIX` + NAME lets a resuming job find (and delete) a killed writer's leftovers by name.
  """
  path = pathlib.Path(path)
  return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")


def fsync_file(path: str | os.PathLike) -> None:
  """Flushes a written file's data to disk (before it is renamed into place)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `path` through a temporary file, fsync and rename (never half-written)."""
  path = pathlib.Path(path)
  tmp = temp_path(path)
  tmp.write_bytes(data)
  fsync_file(tmp)
  os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """`atomic_write_bytes` of `text` encoded as UTF-8."""
  atomic_write_bytes(path, text.encode("utf-8"))


def subdirs(root: str | os.PathLike) -> list[pathlib.Path]:
  """The folders directly in `root`, sorted by name, hidden ones (".name") skipped."""
  root = pathlib.Path(root)
  return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def walk_files(
  root: str | os.PathLike, *, hidden: bool = False, follow_links: bool = True
) -> list[pathlib.Path]:
  """Every file below `root` (recursively), in sorted depth-first order.

  Args:
    root: the folder.
    hidden: include hidden files and folders (".name"); by default they are skipped.
    follow_links: descend into symbolic links to folders (default); links to files are always
      listed.

  Returns:
    The file paths, `root` joined with their relative path.
  """
  files = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_links):
    dirnames[:] = sorted(d for d in dirnames if hidden or not d.startswith("."))
    files.extend(
      pathlib.Path(dirpath) / f for f in sorted(filenames) if hidden or not f.startswith(".")
    )
  return files
