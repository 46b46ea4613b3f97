"""Output directories that the project writes, and the rules for replacing them.

Every directory written by `checkpoint.save_pretrained` / `save_base` (so by
`python -m alit_jax.convert`, `python -m alit_jax.train.export` and `Tokenizer.save_pretrained`)
holds a marker file, `MARKER`. `--overwrite` replaces only such a directory (or one holding
exactly the files of the pretrained layout, written before the marker existed); it refuses any
other non-empty directory, and any output that is or contains one of the command's inputs, before
anything is read or written. A replacement is atomic: the new directory is complete before it
swaps places with the old one (one `renameat2(RENAME_EXCHANGE)` on Linux), so the output path
never holds a mix of both or nothing. New directories get the permissions the umask allows.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import pathlib
import secrets
import shutil
from collections.abc import Callable, Iterable

MARKER = ".alit-jax-output.json"
# The pretrained / base layout of `alit_jax.checkpoint` (directories written before MARKER).
LEGACY_ENTRIES = frozenset({"config.json", "params", "gan_losses"})


class OutputDirError(FileExistsError):
  """An output directory that must not be written or replaced (the message says why)."""


def _contains(outer: pathlib.Path, inner: pathlib.Path) -> bool:
  return inner == outer or outer in inner.parents


def _written_by_us(directory: pathlib.Path) -> bool:
  if (directory / MARKER).is_file():
    return True
  entries = {p.name for p in directory.iterdir()}
  if not entries or not entries <= LEGACY_ENTRIES or "config.json" not in entries:
    return False
  try:
    body = json.loads((directory / "config.json").read_text())
  except (OSError, ValueError):
    return False
  return isinstance(body, dict) and ("model" in body or "base" in body)


def check_output_dir(
  directory: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()
) -> pathlib.Path:
  """Raises `OutputDirError` unless `directory` may be (re)written; touches nothing.

  Allowed: a path that does not exist, an empty directory, and with `overwrite` a directory this
  project wrote (it holds `MARKER`). Refused in every case: a `directory` that is, or contains,
  one of `inputs`.

  Args:
    directory: the output directory.
    overwrite: the caller's `--overwrite`.
    inputs: files or directories the command reads.

  Returns:
    The absolute output path (symlinks resolved).
  """
  directory = pathlib.Path(os.path.expanduser(os.fspath(directory))).resolve()
  for item in inputs:
    source = pathlib.Path(os.path.expanduser(os.fspath(item))).resolve()
    if _contains(directory, source):
      raise OutputDirError(
        f"{directory} contains the input {source}; choose an --out outside the inputs "
        "(nothing was written)"
      )
  if not directory.exists() and not directory.is_symlink():
    return directory
  if not directory.is_dir():
    raise OutputDirError(f"{directory} exists and is not a directory; choose another --out")
  if not any(directory.iterdir()):
    return directory
  if not overwrite:
    raise OutputDirError(f"{directory} exists; pass --overwrite to replace it")
  if not _written_by_us(directory):
    raise OutputDirError(
      f"{directory} is not empty and was not written by alit-jax (no {MARKER}); refusing to "
      "replace it, nothing was deleted: choose another --out or empty it yourself"
    )
  return directory


def write_marker(directory: str | os.PathLike, kind: str) -> None:
  """Marks `directory` as written by this project (what `--overwrite` may replace)."""
  body = {"written_by": "alit_jax", "kind": kind, "format": 1}
  (pathlib.Path(directory) / MARKER).write_text(json.dumps(body, sort_keys=True) + "\n")


def make_temp_dir(directory: pathlib.Path) -> pathlib.Path:
  """A fresh hidden sibling of `directory`, created with the umask's permissions.

  (`tempfile.mkdtemp` always creates mode 0700, which the renamed result would keep.)
  """
  directory.parent.mkdir(parents=True, exist_ok=True)
  while True:
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
      tmp.mkdir(mode=0o777)
      return tmp
    except FileExistsError:
      continue


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Atomically swaps two paths (Linux `renameat2(RENAME_EXCHANGE)`); False if unsupported."""
  try:
    fn = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return False
  fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  fn.restype = ctypes.c_int
  at_fdcwd, rename_exchange = -100, 2
  if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
    return False
  raise OSError(err, os.strerror(err), os.fspath(b))


def replace_dir(tmp: pathlib.Path, directory: pathlib.Path) -> None:
  """Moves the complete `tmp` to `directory`, replacing an existing one in one step.

  Where the filesystem cannot swap atomically, the old directory is renamed aside first (so a
  crash between the two renames leaves it as `.NAME.old-PID`, never deleted).
  """
  if not directory.exists():
    tmp.rename(directory)
    return
  if not any(directory.iterdir()):
    os.replace(tmp, directory)  # rename(2) replaces an empty directory atomically
    return
  if _exchange(tmp, directory):
    shutil.rmtree(tmp)  # now the old directory
    return
  old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
  directory.rename(old)
  tmp.rename(directory)
  shutil.rmtree(old)


def write_dir(
  directory: str | os.PathLike,
  write: Callable[[pathlib.Path], None],
  *,
  kind: str,
  overwrite: bool = False,
  inputs: Iterable[str | os.PathLike] = (),
) -> pathlib.Path:
  """Checks `directory` (`check_output_dir`), calls `write(tmp)` on a fresh sibling, marks it and
  moves it into place (`replace_dir`). On any error the sibling is removed and `directory` is
  untouched.

  Returns:
    The directory path.
  """
  directory = check_output_dir(directory, overwrite=overwrite, inputs=inputs)
  tmp = make_temp_dir(directory)
  try:
    write(tmp)
    write_marker(tmp, kind)
    replace_dir(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory
