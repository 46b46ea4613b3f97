"""Reads PyTorch checkpoints without torch and without running untrusted code.

Supported files, recognised by their content (the extension is only a hint):

* torch zip format (``torch.save`` since torch 1.6; ``.pth`` / ``.pt`` / ``.ckpt``): a zip archive
  with ``<archive>/data.pkl`` (the pickled object tree) and one record ``<archive>/data/<key>`` per
  storage, plus an optional ``<archive>/byteorder`` record;
* torch legacy format (torch < 1.6, or ``_use_new_zipfile_serialization=False``): five pickles in a
  row (magic number, protocol version, system info, the object tree, the list of storage keys),
  then for every storage an int64 element count and its raw little-endian bytes;
* ``.safetensors`` (8-byte little-endian header length, a JSON header, raw bytes);
* ``.npz`` / ``.npy`` (``np.load`` with ``allow_pickle=False``);
* a bare pickle of plain data (numpy arrays, dicts, lists, numbers, strings).

Security: every pickle goes through `torch_pickle.RestrictedUnpickler`, which resolves only an
allowlist of names, each to an implementation that builds plain data (torch, argparse and the
pickled modules are never imported); any other global, or a persistent id that is not a
``'storage'`` record, raises :class:`UnsafePickleError` before anything is called
(`torch_pickle.py` lists the allowlist).

Memory: tensors are first unpickled as lazy views; afterwards every storage is read once with a
single ``readinto`` straight from the file (no full-file copy), all tensors that view it are copied
out as independent C-contiguous arrays, and the storage buffer is dropped before the next one is
read. The first tensor that covers a storage whole and contiguously takes the buffer itself
(no copy), so the peak is about the size of the returned arrays plus one storage.

Unpickling uses CPython's C unpickler; on some corrupt inputs (a huge protocol-5 bytearray
length) CPython itself prints "SystemError: deallocated bytearray object has exported buffers"
to stderr before the reader raises :class:`CheckpointReadError`. It is harmless.

Typical use::

  state_dict, where = load_state_dict("alit_small_vqgan.pth")  # where == "['ema']"
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from alit_jax.convert.torch_pickle import (
  BoundedReader,
  CheckpointReadError,
  PickledNamespace,
  RestrictedUnpickler,
  StorageTable,
  TorchDtype,
  UnsafePickleError,
  int_tuple,
  materialize_storage,
  resolve,
)

__all__ = [
  "CheckpointReadError",
  "PickledNamespace",
  "TorchDtype",
  "UnsafePickleError",
  "load_state_dict",
  "read_checkpoint",
  "select_state_dict",
]

# First pickle of a legacy torch file, and the protocol version that follows it.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# A safetensors header larger than this is treated as corruption rather than read into memory.
_MAX_SAFETENSORS_HEADER = 100 * 2**20
# Candidate state dicts inside a checkpoint dict, most preferred first (released ALIT checkpoints
# are loaded with checkpoint['ema']).
_STATE_DICT_KEYS = ("ema", "model", "state_dict")


def read_exact(f, offset: int, nbytes: int, name: str, what: str) -> np.ndarray:
  """`nbytes` bytes of open file `f` from `offset`; CheckpointReadError (naming `what`) if short."""
  buf = np.empty(nbytes, np.uint8)
  f.seek(offset)
  got = 0
  with memoryview(buf) as view:
    while got < nbytes:
      with view[got:] as rest:
        n = f.readinto(rest)
      if not n:
        raise CheckpointReadError(f"{name}: {what} is truncated ({got} of {nbytes} bytes)")
      got += n
  return buf


# ---------------------------------------------------------------------------------------------
# Formats.


def _read_torch_zip(f, zf: zipfile.ZipFile, prefix: str, name: str):
  table = StorageTable(name, legacy=False)
  pkl = zf.read(prefix + "data.pkl")
  obj = RestrictedUnpickler(io.BytesIO(pkl), name=name, persistent_load=table.persistent_load)
  obj = obj.load()
  big_endian = False
  if prefix + "byteorder" in zf.NameToInfo:
    order = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
    if order not in ("little", "big"):
      raise CheckpointReadError(f"{name}: unknown byteorder record {order!r}")
    big_endian = order == "big"
  records = []
  for key in table.views:
    info = zf.NameToInfo.get(f"{prefix}data/{key}")
    if info is None:
      raise CheckpointReadError(f"{name}: storage record '{prefix}data/{key}' is missing")
    records.append((info.header_offset, key, info))
  for _, key, info in sorted(records):  # file order: sequential reads
    if info.file_size < table.declared_nbytes[key]:
      raise CheckpointReadError(
        f"{name}: storage record '{info.filename}' has {info.file_size} bytes, "
        f"{table.declared_nbytes[key]} expected"
      )
    buf = _read_zip_member(f, zf, info, name)
    materialize_storage(table, key, buf, big_endian)
    del buf
  return resolve(obj, {}, name)


def _read_zip_member(f, zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> np.ndarray:
  what = f"storage record '{info.filename}'"
  if info.compress_type == zipfile.ZIP_STORED:
    # Read straight from the file into the buffer (torch writes records uncompressed).
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
      raise CheckpointReadError(f"{name}: bad local zip header for {what}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > os.fstat(f.fileno()).st_size:  # before allocating the buffer
      raise CheckpointReadError(f"{name}: {what} runs past the end of the file")
    return read_exact(f, start, info.file_size, name, what)
  buf = np.empty(info.file_size, np.uint8)
  got = 0
  with zf.open(info) as member, memoryview(buf) as view:
    while got < info.file_size:
      with view[got:] as rest:
        n = member.readinto(rest)
      if not n:
        raise CheckpointReadError(f"{name}: {what} is truncated")
      got += n
  return buf


def _read_zip(f, name: str):
  try:
    zf = zipfile.ZipFile(f)
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise CheckpointReadError(f"{name}: corrupt or truncated zip archive ({e})") from e
  with zf:
    names = zf.namelist()
    pkls = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
    if pkls:
      prefix = pkls[0][: -len("data.pkl")]
      if any(n.startswith(prefix + "code/") or n == prefix + "constants.pkl" for n in names):
        raise CheckpointReadError(
          f"{name}: TorchScript archive (torch.jit.save) is not supported; save a state_dict"
        )
      return _read_torch_zip(f, zf, prefix, name)
    if names and all(n.endswith(".npy") for n in names):
      return _read_npz(name)
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise CheckpointReadError(
      f"{name}: zip archive is neither a torch checkpoint (no <archive>/data.pkl) nor an .npz"
      f" (members: {shown or 'none'})"
    )


def _read_npz(name: str):
  with np.load(name, allow_pickle=False) as npz:
    return {k: npz[k] for k in npz.files}


def _read_legacy_or_pickle(f, size: int, name: str):
  reader = BoundedReader(f, size)
  first = RestrictedUnpickler(reader, name=name).load()
  if not (type(first) is int and first == _LEGACY_MAGIC):
    # A bare pickle of plain data (no storages can be referenced outside a torch checkpoint).
    if f.tell() != size:
      raise CheckpointReadError(
        f"{name}: not a torch checkpoint: a pickle followed by {size - f.tell()} unexpected bytes"
      )
    return resolve(first, {}, name)
  version = RestrictedUnpickler(reader, name=name).load()
  if version != _LEGACY_PROTOCOL:
    raise CheckpointReadError(f"{name}: unsupported legacy torch protocol version {version!r}")
  sys_info = RestrictedUnpickler(reader, name=name).load()
  if not isinstance(sys_info, dict):
    raise CheckpointReadError(f"{name}: corrupt legacy header (system info is not a dict)")
  table = StorageTable(name, legacy=True)
  obj = RestrictedUnpickler(reader, name=name, persistent_load=table.persistent_load).load()
  keys = RestrictedUnpickler(reader, name=name).load()
  if not isinstance(keys, list) or not all(isinstance(k, (str, bytes)) for k in keys):
    raise CheckpointReadError(f"{name}: corrupt legacy storage key list")
  # Storages follow in key order: int64 element count (little-endian), then the raw bytes, which
  # torch always writes little-endian whatever the machine.
  pos = f.tell()
  locations = {}
  for key in keys:
    key = key.decode("ascii") if isinstance(key, bytes) else key
    if key not in table.views:
      raise CheckpointReadError(f"{name}: storage {key!r} is listed but never referenced")
    f.seek(pos)
    head = f.read(8)
    if len(head) != 8:
      raise CheckpointReadError(f"{name}: storage {key!r} is missing (file truncated)")
    (count,) = struct.unpack("<q", head)
    # The count is in elements of the dtype of the key's first storage record.
    nbytes = count * table.itemsize[key]
    if count < 0 or pos + 8 + nbytes > size:
      raise CheckpointReadError(f"{name}: storage {key!r} is truncated or corrupt")
    locations[key] = (pos + 8, nbytes)
    pos += 8 + nbytes
  missing = [k for k in table.views if k not in locations]
  if missing:
    raise CheckpointReadError(f"{name}: storages {missing} are referenced but not stored")
  for key, (offset, nbytes) in locations.items():
    buf = read_exact(f, offset, nbytes, name, f"storage {key!r}")
    materialize_storage(table, key, buf, big_endian=False)
    del buf
  return resolve(obj, {}, name)


_SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U64": np.uint64,
  "U32": np.uint32,
  "U16": np.uint16,
  "U8": np.uint8,
  "BOOL": np.bool_,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
}


def _looks_like_safetensors(head: bytes, size: int) -> bool:
  if len(head) < 9:
    return False
  (n,) = struct.unpack("<Q", head[:8])
  return 2 <= n <= size - 8 and head[8:9] == b"{"


def _read_safetensors(f, size: int, name: str) -> dict[str, np.ndarray]:
  f.seek(0)
  head = f.read(8)
  if len(head) != 8:
    raise CheckpointReadError(f"{name}: safetensors file is truncated")
  (n,) = struct.unpack("<Q", head)
  if n > min(size - 8, _MAX_SAFETENSORS_HEADER):
    raise CheckpointReadError(f"{name}: safetensors header length {n} is invalid")
  try:
    header = json.loads(f.read(n))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointReadError(f"{name}: safetensors header is not JSON ({e})") from e
  if not isinstance(header, dict):
    raise CheckpointReadError(f"{name}: safetensors header is not a JSON object")
  data_start, data_size = 8 + n, size - 8 - n
  out = {}
  for key, spec in header.items():
    if key == "__metadata__":
      continue
    try:
      dt = np.dtype(_SAFETENSORS_DTYPES[spec["dtype"]])
      shape = int_tuple(spec["shape"], "shape")
      begin, end = spec["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointReadError(f"{name}: bad safetensors entry {key!r}: {spec!r}") from e
    nbytes = math.prod(shape) * dt.itemsize
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
      raise CheckpointReadError(f"{name}: safetensors entry {key!r} lies outside the file")
    if end - begin != nbytes:
      raise CheckpointReadError(
        f"{name}: safetensors entry {key!r} has {end - begin} bytes, {nbytes} expected"
      )
    buf = read_exact(f, data_start + begin, nbytes, name, f"tensor {key!r}")
    out[key] = buf.view(dt).reshape(shape)
  return out


# ---------------------------------------------------------------------------------------------
# Public API.


def read_checkpoint(path) -> Any:
  """Reads a checkpoint into its whole object tree, tensors as numpy arrays.

  Args:
    path: a torch ``.pth``/``.pt``/``.ckpt`` (zip or legacy format), ``.safetensors``, ``.npz``
      or ``.npy`` file, or a bare pickle of plain data; the format is taken from the content.

  Returns:
    The unpickled tree (dicts, ``OrderedDict``, lists, tuples, numbers, strings,
    :class:`PickledNamespace` for ``argparse.Namespace``, :class:`TorchDtype` for torch dtypes);
    every tensor is an independent C-contiguous ``np.ndarray`` of the same dtype (bfloat16 as
    ``ml_dtypes.bfloat16``) and shape. ``.safetensors`` and ``.npz`` give a dict of arrays,
    ``.npy`` one array.

  Raises:
    UnsafePickleError: a pickle asked for a global that is not allowlisted (nothing was run).
    CheckpointReadError: the file is truncated, corrupt or in an unknown format.
    FileNotFoundError: the file does not exist.
  """
  name = os.fspath(path)
  with open(name, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    head = f.read(512)
    f.seek(0)
    if size == 0:
      raise CheckpointReadError(f"{name}: file is empty")
    try:
      if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _read_zip(f, name)
      if head[:6] == b"\x93NUMPY":
        return np.load(f, allow_pickle=False)
      if name.endswith(".safetensors") or _looks_like_safetensors(head, size):
        return _read_safetensors(f, size, name)
      if head[257:262] == b"ustar":
        raise CheckpointReadError(
          f"{name}: legacy tar-format torch checkpoint (torch < 0.4) is not supported;"
          " re-save it with a recent torch"
        )
      return _read_legacy_or_pickle(f, size, name)
    except (UnsafePickleError, CheckpointReadError):
      raise
    except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file
      raise CheckpointReadError(
        f"{name}: cannot read checkpoint ({type(e).__name__}: {e}); the file is truncated,"
        " corrupt or not a supported format (torch .pth/.pt/.ckpt, .safetensors, .npz, .npy)"
      ) from e


def _state_dict_problems(obj: Mapping) -> list[str]:
  problems = []
  for k, v in obj.items():
    if not isinstance(k, str):
      problems.append(f"key {k!r} is not a string")
    elif not isinstance(v, (np.ndarray, np.generic)):
      problems.append(f"{k!r} is a {type(v).__name__}")
    if len(problems) >= 5:
      problems.append("...")
      break
  return problems


def select_state_dict(obj, *, name: str = "checkpoint") -> tuple[dict[str, np.ndarray], str]:
  """Picks the state dict out of a checkpoint tree.

  Preference: ``obj['ema']`` (the weights released ALIT checkpoints are evaluated with), then
  ``obj['model']``, then ``obj['state_dict']``, then ``obj`` itself when it is a flat dict of
  arrays. Only keys whose value is a dict are candidates, so a state dict that happens to hold a
  tensor named ``model`` is still taken as a whole. A candidate that is not a flat
  ``{str: array}`` dict is an error, not a silent fallback to the next one.

  Args:
    obj: a tree from :func:`read_checkpoint`.
    name: the file name, for error messages.

  Returns:
    ``(state_dict, where)``: a plain ``{key: np.ndarray}`` dict in the stored order, and a Python
    subscript saying where it came from (``"['ema']"``, ``"['model']"``, ``"['state_dict']"``, or
    ``""`` for the top level), so ``f"{name}{where}"`` reads as an access path.

  Raises:
    CheckpointReadError: nothing in ``obj`` is a state dict.
  """
  if isinstance(obj, Mapping):
    for key in _STATE_DICT_KEYS:
      candidate = obj.get(key)
      if isinstance(candidate, Mapping):
        problems = _state_dict_problems(candidate) or ([] if candidate else ["it is empty"])
        if problems:
          raise CheckpointReadError(
            f"{name}['{key}'] is not a flat dict of arrays: " + "; ".join(problems)
          )
        return {k: np.asarray(v) for k, v in candidate.items()}, f"['{key}']"
    if obj and not _state_dict_problems(obj):
      return {k: np.asarray(v) for k, v in obj.items()}, ""
    shown = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(obj.items())[:10])
    raise CheckpointReadError(
      f"{name}: no state dict found: expected a flat dict of arrays or one under"
      f" {', '.join(repr(k) for k in _STATE_DICT_KEYS)}; top-level entries are {{{shown}}}"
      + (", ..." if len(obj) > 10 else "")
    )
  raise CheckpointReadError(
    f"{name}: no state dict found: the checkpoint holds a {type(obj).__name__}, not a dict"
  )


def load_state_dict(path) -> tuple[dict[str, np.ndarray], str]:
  """:func:`read_checkpoint` then :func:`select_state_dict`; returns ``(state_dict, where)``."""
  return select_state_dict(read_checkpoint(path), name=os.fspath(path))


def _main(argv: list[str]) -> None:
  """Lists the state dict of each file given: ``python -m alit_jax.convert.pth FILE...``."""
  for path in argv:
    sd, where = load_state_dict(path)
    total = sum(v.size for v in sd.values())
    print(f"{path}{where}: {len(sd)} tensors, {total} elements")
    for k, v in sd.items():
      print(f"  {k}\t{list(v.shape)}\t{v.dtype}")


if __name__ == "__main__":
  import sys

  try:
    _main(sys.argv[1:])
  except BrokenPipeError:  # output piped into `head`
    sys.stderr.close()
