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

Security: every pickle goes through :class:`_RestrictedUnpickler`, whose ``find_class`` resolves
only an allowlist of names (tensor-rebuild functions, storage types, ``torch.Size``, torch dtypes,
``collections.OrderedDict``, numpy array/scalar/dtype reconstruction, ``_codecs.encode`` and
``argparse.Namespace``). Each allowlisted name maps to an implementation in this module that only
builds plain data; torch, argparse and the pickled modules are never imported. Any other global
(``posix.system``, ``builtins.eval``, a model class, ...) raises :class:`UnsafePickleError` before
anything is called, and so does a persistent id that is not a ``'storage'`` record. The objects
the allowlist hands to the pickle are immutable, so a crafted ``BUILD`` opcode cannot alter the
reader's own state.

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

import _compat_pickle
import collections
import io
import json
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

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


class UnsafePickleError(ValueError):
  """A pickle asked for a global (or persistent id) that is not allowlisted; nothing was run."""


class CheckpointReadError(ValueError):
  """A checkpoint is truncated, corrupt or in an unknown format; the message names the file."""


# ---------------------------------------------------------------------------------------------
# Immutable objects handed to the unpickler.


class _Frozen:
  """Base for objects a pickle can reach: no instance dict, no attribute assignment.

  A pickle's ``BUILD`` opcode sets attributes on whatever object is on its stack; refusing
  assignment means a crafted pickle cannot rewire the allowlisted functions or the lazy tensors.
  """

  __slots__ = ()

  def __setattr__(self, name, value):
    raise AttributeError(f"{type(self).__name__} is read-only")

  def __delattr__(self, name):
    raise AttributeError(f"{type(self).__name__} is read-only")

  def __reduce__(self):
    raise TypeError(f"{type(self).__name__} cannot be pickled")


class _AllowedCallable(_Frozen):
  """An allowlisted global: this module's own implementation behind the pickled name."""

  __slots__ = ("qualname", "_fn")

  def __init__(self, qualname: str, fn: Callable[..., Any]):
    object.__setattr__(self, "qualname", qualname)
    object.__setattr__(self, "_fn", fn)

  def __call__(self, *args):
    return self._fn(*args)

  def __repr__(self):
    return f"<allowlisted {self.qualname}>"


class TorchDtype(_Frozen):
  """A pickled ``torch.<dtype>`` object (e.g. in a config dict); ``np_dtype`` is its numpy twin."""

  __slots__ = ("name", "np_dtype")

  def __init__(self, name: str, np_dtype: np.dtype):
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "np_dtype", np.dtype(np_dtype))

  def __repr__(self):
    return f"torch.{self.name}"


class _StorageType(_Frozen):
  """A pickled storage class such as ``torch.FloatStorage``; ``np_dtype`` None when untyped."""

  __slots__ = ("name", "np_dtype")

  def __init__(self, name: str, np_dtype: Any):
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "np_dtype", None if np_dtype is None else np.dtype(np_dtype))

  def __repr__(self):
    return f"<storage type {self.name}>"


class _StorageRef(_Frozen):
  """A storage named by a persistent id: ``nbytes`` bytes at ``byte_offset`` of buffer ``key``.

  ``views`` is shared by every ref on the same buffer and collects the lazy tensors built on it.
  """

  __slots__ = ("key", "np_dtype", "byte_offset", "nbytes", "views")

  def __init__(self, key: str, np_dtype: np.dtype, byte_offset: int, nbytes: int, views: list):
    for name, value in (
      ("key", key),
      ("np_dtype", np_dtype),
      ("byte_offset", byte_offset),
      ("nbytes", nbytes),
      ("views", views),
    ):
      object.__setattr__(self, name, value)


class _LazyTensor(_Frozen):
  """A tensor whose data is read after unpickling (``array`` is filled in then)."""

  __slots__ = ("storage", "offset", "size", "stride", "np_dtype", "array")

  def __init__(self, storage: _StorageRef, offset: int, size, stride, np_dtype: np.dtype):
    for name, value in (
      ("storage", storage),
      ("offset", offset),
      ("size", size),
      ("stride", stride),
      ("np_dtype", np_dtype),
      ("array", None),
    ):
      object.__setattr__(self, name, value)


class _FrozenType(type):
  """Metaclass that forbids attribute assignment on the class itself (a pickle can reach it)."""

  def __setattr__(cls, name, value):
    raise AttributeError(f"{cls.__name__} is read-only")

  def __delattr__(cls, name):
    raise AttributeError(f"{cls.__name__} is read-only")


class PickledNamespace(dict, metaclass=_FrozenType):
  """Stands in for a pickled ``argparse.Namespace``: a plain dict of its attributes."""

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
      for part in state:
        if part:
          self.update(part)
    elif state:
      self.update(state)

  def __repr__(self):
    return f"PickledNamespace({dict.__repr__(self)})"


# ---------------------------------------------------------------------------------------------
# Implementations of the allowlisted globals.

_TORCH_STORAGE_DTYPES = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
  "ComplexFloatStorage": np.complex64,
  "ComplexDoubleStorage": np.complex128,
}

# torch dtypes pickle as ``torch.<canonical name>``.
_TORCH_DTYPES = {
  "float64": np.float64,
  "float32": np.float32,
  "float16": np.float16,
  "bfloat16": ml_dtypes.bfloat16,
  "int64": np.int64,
  "int32": np.int32,
  "int16": np.int16,
  "int8": np.int8,
  "uint8": np.uint8,
  "uint16": np.uint16,
  "uint32": np.uint32,
  "uint64": np.uint64,
  "bool": np.bool_,
  "complex64": np.complex64,
  "complex128": np.complex128,
  "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
  "float8_e5m2": ml_dtypes.float8_e5m2,
}


def _int_tuple(value, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)) or not all(
    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
  ):
    raise ValueError(f"{what} must be a tuple of non-negative ints, got {value!r}")
  return tuple(value)


def _make_lazy(storage, storage_offset, size, stride, np_dtype) -> _LazyTensor:
  if not isinstance(storage, _StorageRef):
    raise ValueError(f"tensor rebuilt from {type(storage).__name__}, expected a storage record")
  if np_dtype is None:
    raise ValueError("tensor on an untyped storage without a dtype")
  size = _int_tuple(size, "tensor size")
  stride = _int_tuple(stride, "tensor stride")
  if len(size) != len(stride):
    raise ValueError(f"tensor size {size} and stride {stride} differ in length")
  if not isinstance(storage_offset, int) or storage_offset < 0:
    raise ValueError(f"bad storage offset {storage_offset!r}")
  lazy = _LazyTensor(storage, storage_offset, size, stride, np.dtype(np_dtype))
  storage.views.append(lazy)
  return lazy


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _make_lazy(storage, storage_offset, size, stride, getattr(storage, "np_dtype", None))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, metadata=None):
  del requires_grad, hooks, metadata  # autograd state and Python attributes are not data
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
  storage, storage_offset, size, stride, requires_grad, hooks, dtype, metadata=None
):
  del requires_grad, hooks, metadata
  if not isinstance(dtype, TorchDtype):
    raise ValueError(f"_rebuild_tensor_v3 dtype must be a torch dtype, got {dtype!r}")
  return _make_lazy(storage, storage_offset, size, stride, dtype.np_dtype)


def _rebuild_parameter(data, requires_grad, hooks):
  del requires_grad, hooks
  if not isinstance(data, _LazyTensor):
    raise ValueError(f"nn.Parameter around {type(data).__name__}, expected a tensor")
  return data


def _rebuild_parameter_with_state(data, requires_grad, hooks, state):
  del state  # Python attributes of a Parameter subclass
  return _rebuild_parameter(data, requires_grad, hooks)


def _torch_size(dims=()):
  return _int_tuple(dims, "torch.Size")


# Marker for ``numpy.ndarray``: only ever passed to ``_np_reconstruct``, never called.
_NDARRAY = _AllowedCallable("numpy.ndarray", lambda *a: _refuse_call("numpy.ndarray"))


def _refuse_call(name):
  raise ValueError(f"{name} may only appear as the subtype of numpy's _reconstruct")


def _np_dtype(spec, align=False, copy=True):
  del copy  # always a fresh dtype, so the BUILD that follows cannot touch numpy's singletons
  if isinstance(spec, bytes):
    spec = spec.decode("latin1")
  if not isinstance(spec, str):
    raise ValueError(f"numpy.dtype spec must be a string, got {type(spec).__name__}")
  return np.dtype(spec, align=bool(align), copy=True)


def _np_reconstruct(subtype, shape, dtype):
  # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') followed by BUILD with the data.
  if subtype is not _NDARRAY:
    raise ValueError("numpy _reconstruct subtype must be numpy.ndarray")
  if _int_tuple(shape, "shape") != (0,):
    raise ValueError(f"numpy _reconstruct shape must be (0,), got {shape!r}")
  if isinstance(dtype, bytes):
    dtype = dtype.decode("latin1")
  if not isinstance(dtype, (str, np.dtype)):
    raise ValueError(f"bad numpy _reconstruct dtype {dtype!r}")
  return np.empty((0,), np.dtype(dtype))


def _np_scalar(dtype, data=None):
  if not isinstance(dtype, np.dtype):
    raise ValueError("numpy scalar dtype must be a numpy dtype")
  if dtype.hasobject:
    return data
  if isinstance(data, str):  # Python 2 pickles
    data = data.encode("latin1")
  if not isinstance(data, bytes) or len(data) != dtype.itemsize:
    raise ValueError(f"numpy scalar of {dtype} needs {dtype.itemsize} bytes")
  return np.frombuffer(data, dtype=dtype, count=1)[0].copy()


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
  # Protocol-2 pickles store bytes as _codecs.encode(str, 'latin1').
  if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
    raise ValueError(f"_codecs.encode({type(obj).__name__}, {encoding!r}) is not allowed")
  del errors  # always strict
  return obj.encode(encoding)


def _build_allowlist() -> dict[tuple[str, str], Any]:
  allowed: dict[tuple[str, str], Any] = {("collections", "OrderedDict"): collections.OrderedDict}
  for name, fn in (
    ("_rebuild_tensor", _rebuild_tensor),
    ("_rebuild_tensor_v2", _rebuild_tensor_v2),
    ("_rebuild_tensor_v3", _rebuild_tensor_v3),
    ("_rebuild_parameter", _rebuild_parameter),
    ("_rebuild_parameter_with_state", _rebuild_parameter_with_state),
  ):
    allowed[("torch._utils", name)] = _AllowedCallable(f"torch._utils.{name}", fn)
  for name, dt in _TORCH_STORAGE_DTYPES.items():
    allowed[("torch", name)] = _StorageType(name, dt)
    allowed[("torch.cuda", name)] = _StorageType(name, dt)  # very old GPU-saved files
  for module in ("torch", "torch.storage"):
    allowed[(module, "UntypedStorage")] = _StorageType("UntypedStorage", np.uint8)
  allowed[("torch.storage", "TypedStorage")] = _StorageType("TypedStorage", None)
  allowed[("torch", "Size")] = _AllowedCallable("torch.Size", _torch_size)
  for name, dt in _TORCH_DTYPES.items():
    allowed[("torch", name)] = TorchDtype(name, dt)
  for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    allowed[(module, "_reconstruct")] = _AllowedCallable(f"{module}._reconstruct", _np_reconstruct)
    allowed[(module, "scalar")] = _AllowedCallable(f"{module}.scalar", _np_scalar)
  allowed[("numpy", "ndarray")] = _NDARRAY
  allowed[("numpy", "dtype")] = _AllowedCallable("numpy.dtype", _np_dtype)
  allowed[("_codecs", "encode")] = _AllowedCallable("_codecs.encode", _codecs_encode)
  allowed[("argparse", "Namespace")] = PickledNamespace
  return allowed


# (module, name) -> what the restricted unpickler may build for that global.
ALLOWED_GLOBALS = _build_allowlist()


class _RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that resolves only allowlisted globals and (optionally) storage records."""

  def __init__(self, file, *, name: str, persistent_load: Callable[[Any], Any] | None = None):
    super().__init__(file, encoding="utf-8")
    self._name = name
    self._persistent_load = persistent_load

  def find_class(self, module, name):
    obj = ALLOWED_GLOBALS.get((module, name))
    if obj is None:
      hint = ""
      if module.split(".")[0] in ("torch", "__torch__"):
        hint = (
          " (a whole nn.Module, tensor subclass, sparse/quantized tensor or TorchScript object;"
          " save model.state_dict() instead)"
        )
      py3 = _compat_pickle.NAME_MAPPING.get((module, name))
      if py3 is None and module in _compat_pickle.IMPORT_MAPPING:
        py3 = (_compat_pickle.IMPORT_MAPPING[module], name)
      if py3 is not None:  # protocol-2 pickles spell some names the Python 2 way
        hint = f" (= {py3[0]}.{py3[1]}){hint}"
      raise UnsafePickleError(
        f"{self._name}: refusing to load global '{module}.{name}'{hint}; only tensors and plain"
        " data are allowed, and nothing from this file was executed"
      )
    return obj

  def persistent_load(self, pid):
    kind = pid[0] if isinstance(pid, tuple) and pid else pid
    if isinstance(kind, bytes):
      kind = kind.decode("ascii", "replace")
    if self._persistent_load is None or kind != "storage":
      raise UnsafePickleError(
        f"{self._name}: refusing persistent id {kind!r}"
        + ("" if self._persistent_load else " (this file is not a torch checkpoint)")
        + "; only 'storage' records of a torch checkpoint are allowed"
      )
    return self._persistent_load(pid)


class _BoundedReader:
  """File view for the unpickler that never asks the OS for more than the file holds.

  A corrupt length field in a legacy file would otherwise make ``read(n)`` allocate ``n`` bytes.
  """

  def __init__(self, f, size: int):
    self._f = f
    self._size = size

  def _clip(self, n):
    remaining = max(self._size - self._f.tell(), 0)
    return remaining if n is None or n < 0 else min(n, remaining)

  def read(self, n=-1):
    return self._f.read(self._clip(n))

  def readline(self, limit=-1):
    return self._f.readline(self._clip(limit))


# ---------------------------------------------------------------------------------------------
# Storage records and materialisation.


class _StorageTable:
  """Storage records met while unpickling, grouped by the buffer they live in."""

  def __init__(self, name: str, legacy: bool):
    self.name = name
    self.legacy = legacy
    self.views: dict[str, list[_LazyTensor]] = {}
    self.declared_nbytes: dict[str, int] = {}
    self.itemsize: dict[str, int] = {}
    self._refs: dict[tuple, _StorageRef] = {}

  def persistent_load(self, pid):
    if not isinstance(pid, tuple):
      raise ValueError(f"storage record {pid!r} is not a tuple")
    if self.legacy and len(pid) == 6:
      _, storage_type, key, _location, numel, view = pid
    elif not self.legacy and len(pid) == 5:
      _, storage_type, key, _location, numel = pid
      view = None
    else:
      raise ValueError(f"malformed storage record {pid!r}")
    if not isinstance(storage_type, _StorageType):
      raise ValueError(f"storage record names {storage_type!r}, not a storage type")
    if isinstance(key, bytes):
      key = key.decode("ascii")
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
      raise ValueError(f"malformed storage record {pid!r}")
    itemsize = storage_type.np_dtype.itemsize if storage_type.np_dtype is not None else 1
    # The first record of a key fixes its size in bytes, as torch.load does.
    self.declared_nbytes.setdefault(key, numel * itemsize)
    self.itemsize.setdefault(key, itemsize)
    views = self.views.setdefault(key, [])
    byte_offset, nbytes = 0, self.declared_nbytes[key]
    if view is not None:  # legacy storage view: (view key, element offset, element count)
      if not (isinstance(view, tuple) and len(view) == 3):
        raise ValueError(f"malformed storage view {view!r}")
      _, offset, view_numel = view
      byte_offset, nbytes = offset * itemsize, view_numel * itemsize
    ref_key = (key, storage_type.name, byte_offset, nbytes)
    if ref_key not in self._refs:
      self._refs[ref_key] = _StorageRef(key, storage_type.np_dtype, byte_offset, nbytes, views)
    return self._refs[ref_key]


def _byteswap_inplace(arr: np.ndarray) -> None:
  if arr.dtype.itemsize == 1 or arr.size == 0:
    return
  component = arr.dtype.itemsize // (2 if arr.dtype.kind == "c" else 1)
  arr.reshape(-1).view(f"u{component}").byteswap(inplace=True)


def _materialize_storage(table: _StorageTable, key: str, buf: np.ndarray, big_endian: bool) -> None:
  """Fills ``array`` of every lazy tensor on storage ``key`` from its bytes ``buf`` (uint8).

  The first tensor that covers the whole buffer contiguously takes the buffer itself; every other
  tensor gets its own copy, made before the buffer is handed over, so all arrays are independent.
  """
  owner, placed = None, []
  for lazy in table.views[key]:
    ref, dt = lazy.storage, lazy.np_dtype
    lo, hi = ref.byte_offset, ref.byte_offset + ref.nbytes
    if hi > buf.nbytes:
      raise CheckpointReadError(
        f"{table.name}: storage {key!r} holds {buf.nbytes} bytes but {hi} are declared"
      )
    numel = math.prod(lazy.size)
    if numel == 0:
      object.__setattr__(lazy, "array", np.zeros(lazy.size, dt))
      continue
    start = lo + lazy.offset * dt.itemsize
    end = start + (sum((n - 1) * s for n, s in zip(lazy.size, lazy.stride)) + 1) * dt.itemsize
    if end > hi:
      raise CheckpointReadError(
        f"{table.name}: tensor of size {lazy.size}, stride {lazy.stride} at offset {lazy.offset}"
        f" reaches byte {end} of storage {key!r}, which ends at byte {hi}"
      )
    whole = start == 0 and numel * dt.itemsize == buf.nbytes
    if owner is None and whole and _is_contiguous(lazy.size, lazy.stride):
      owner = lazy
      continue
    strides = tuple(s * dt.itemsize for s in lazy.stride)
    arr = np.ndarray(lazy.size, dt, buffer=buf, offset=start, strides=strides).copy()
    object.__setattr__(lazy, "array", arr)
    placed.append(arr)
  if owner is not None:
    arr = buf.view(owner.np_dtype).reshape(owner.size)
    object.__setattr__(owner, "array", arr)
    placed.append(arr)
  if big_endian:
    for arr in placed:
      _byteswap_inplace(arr)


def _is_contiguous(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
  # Row-major; the stride of a dimension of size 1 does not matter (as in torch).
  expected = 1
  for n, s in zip(reversed(size), reversed(stride)):
    if n != 1 and s != expected:
      return False
    expected *= n
  return True


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


def _resolve(obj, memo: dict[int, Any], name: str):
  """Replaces lazy tensors by their arrays, in place where containers are mutable."""
  oid = id(obj)
  if oid in memo:
    return memo[oid]
  if isinstance(obj, _LazyTensor):
    memo[oid] = obj.array
    return obj.array
  if isinstance(obj, _StorageRef):
    raise CheckpointReadError(f"{name}: bare torch storages are not supported, only tensors")
  if isinstance(obj, dict):
    memo[oid] = obj
    for k, v in obj.items():
      new = _resolve(v, memo, name)
      if new is not v:
        obj[k] = new
    return obj
  if isinstance(obj, list):
    memo[oid] = obj
    for i, v in enumerate(obj):
      obj[i] = _resolve(v, memo, name)
    return obj
  if isinstance(obj, tuple):
    items = [_resolve(v, memo, name) for v in obj]
    new = obj if all(a is b for a, b in zip(items, obj)) else tuple(items)
    memo[oid] = new
    return new
  return obj


# ---------------------------------------------------------------------------------------------
# Formats.


def _read_torch_zip(f, zf: zipfile.ZipFile, prefix: str, name: str):
  table = _StorageTable(name, legacy=False)
  pkl = zf.read(prefix + "data.pkl")
  obj = _RestrictedUnpickler(io.BytesIO(pkl), name=name, persistent_load=table.persistent_load)
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
    _materialize_storage(table, key, buf, big_endian)
    del buf
  return _resolve(obj, {}, name)


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
  reader = _BoundedReader(f, size)
  first = _RestrictedUnpickler(reader, name=name).load()
  if not (type(first) is int and first == _LEGACY_MAGIC):
    # A bare pickle of plain data (no storages can be referenced outside a torch checkpoint).
    if f.tell() != size:
      raise CheckpointReadError(
        f"{name}: not a torch checkpoint: a pickle followed by {size - f.tell()} unexpected bytes"
      )
    return _resolve(first, {}, name)
  version = _RestrictedUnpickler(reader, name=name).load()
  if version != _LEGACY_PROTOCOL:
    raise CheckpointReadError(f"{name}: unsupported legacy torch protocol version {version!r}")
  sys_info = _RestrictedUnpickler(reader, name=name).load()
  if not isinstance(sys_info, dict):
    raise CheckpointReadError(f"{name}: corrupt legacy header (system info is not a dict)")
  table = _StorageTable(name, legacy=True)
  obj = _RestrictedUnpickler(reader, name=name, persistent_load=table.persistent_load).load()
  keys = _RestrictedUnpickler(reader, name=name).load()
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
    _materialize_storage(table, key, buf, big_endian=False)
    del buf
  return _resolve(obj, {}, name)


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
      shape = _int_tuple(spec["shape"], "shape")
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
