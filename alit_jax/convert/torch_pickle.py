"""The allowlisted unpickler of torch checkpoints: pickles in, lazy tensors and plain data out.

Every pickle of a checkpoint goes through :class:`RestrictedUnpickler`, whose ``find_class``
resolves only an allowlist of names (tensor-rebuild functions, storage types, ``torch.Size``,
torch dtypes, ``collections.OrderedDict``, numpy array/scalar/dtype reconstruction,
``_codecs.encode`` and ``argparse.Namespace``). Each allowlisted name maps to an implementation in
this module that only builds plain data; torch, argparse and the pickled modules are never
imported. Any other global (``posix.system``, ``builtins.eval``, a model class, ...) raises
:class:`UnsafePickleError` before anything is called, and so does a persistent id that is not a
``'storage'`` record. The objects the allowlist hands to the pickle are immutable, so a crafted
``BUILD`` opcode cannot alter the reader's own state.

Tensors come out of the unpickler as lazy views on storage records (:class:`StorageTable`);
:func:`materialize_storage` fills them from a storage's bytes and :func:`resolve` swaps them for
their arrays in the object tree. Reading the bytes from a file (zip or legacy layout) is
`pth.py`'s.
"""

from __future__ import annotations

import _compat_pickle
import collections
import math
import pickle
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np


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


def int_tuple(value, what: str) -> tuple[int, ...]:
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
  size = int_tuple(size, "tensor size")
  stride = int_tuple(stride, "tensor stride")
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
  return int_tuple(dims, "torch.Size")


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
  if int_tuple(shape, "shape") != (0,):
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


class RestrictedUnpickler(pickle.Unpickler):
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


class BoundedReader:
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


class StorageTable:
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


def materialize_storage(table: StorageTable, key: str, buf: np.ndarray, big_endian: bool) -> None:
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


def resolve(obj, memo: dict[int, Any], name: str):
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
      new = resolve(v, memo, name)
      if new is not v:
        obj[k] = new
    return obj
  if isinstance(obj, list):
    memo[oid] = obj
    for i, v in enumerate(obj):
      obj[i] = resolve(v, memo, name)
    return obj
  if isinstance(obj, tuple):
    items = [resolve(v, memo, name) for v in obj]
    new = obj if all(a is b for a, b in zip(items, obj)) else tuple(items)
    memo[oid] = new
    return new
  return obj
