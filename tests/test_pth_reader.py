"""Tests of the torch-free checkpoint reader (alit_jax/convert/pth.py).

torch is used only to *write* files (and as the ground truth); every malicious file is built by
hand without torch.
"""

import argparse
import collections
import io
import json
import os
import pickle
import re
import struct
import subprocess
import zipfile

import ml_dtypes
import numpy as np
import pytest

from alit_jax.convert import pth, torch_pickle
from alit_jax.convert.pth import (
  CheckpointReadError,
  UnsafePickleError,
  load_state_dict,
  read_checkpoint,
  select_state_dict,
)

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
FORMATS = ["zip", "legacy"]


# ---------------------------------------------------------------------------------------------
# Helpers.


def _save(torch, obj, path, fmt):
  torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
  return path


def _torch_numpy(t):
  import torch

  t = t.detach()
  if t.dtype == torch.bfloat16:  # numpy has no bfloat16; compare the bit patterns
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _assert_same(arr, t):
  """Same dtype, shape and bytes (so NaN, -0.0 and bfloat16 bit patterns count)."""
  expected = _torch_numpy(t)
  assert isinstance(arr, np.ndarray)
  assert arr.dtype == expected.dtype, (arr.dtype, expected.dtype)
  assert arr.shape == expected.shape, (arr.shape, expected.shape)
  assert arr.tobytes() == np.ascontiguousarray(expected).tobytes()


def _all_dtypes_sd(torch):
  g = torch.Generator().manual_seed(0)
  special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-30, 65504.0])
  sd = collections.OrderedDict()
  for name, dt in [
    ("f32", torch.float32),
    ("f16", torch.float16),
    ("bf16", torch.bfloat16),
    ("f64", torch.float64),
  ]:
    sd[name] = torch.cat([torch.randn(3, 5, generator=g).flatten(), special]).to(dt)
  for name, dt in [("i64", torch.int64), ("i32", torch.int32), ("i16", torch.int16)]:
    info = torch.iinfo(dt)
    sd[name] = torch.tensor([info.min, -1, 0, 1, info.max], dtype=dt)
  sd["i8"] = torch.tensor([[-128, -1], [0, 127]], dtype=torch.int8)
  sd["u8"] = torch.tensor([0, 1, 200, 255], dtype=torch.uint8)
  sd["bool"] = torch.tensor([[True, False, True]])
  return sd


def _write_zip(path, records, prefix="archive/"):
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    for name, data in records.items():
      zf.writestr(prefix + name, data)
  return path


def _legacy_file(path, main_pickle: bytes, storage_keys=(), tail=b""):
  header = b"".join(
    pickle.dumps(x, protocol=2)
    for x in (
      LEGACY_MAGIC,
      1001,
      {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2}},
    )
  )
  path.write_bytes(header + main_pickle + pickle.dumps(list(storage_keys), protocol=2) + tail)
  return path


def _write_safetensors(path, arrays, metadata=None):
  """A minimal safetensors writer (8-byte LE header length, JSON header, packed data)."""
  names = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int64): "I64",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
  }
  header, blobs, offset = {}, [], 0
  if metadata:
    header["__metadata__"] = metadata
  for k, a in arrays.items():
    b = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
    header[k] = {
      "dtype": names[a.dtype],
      "shape": list(a.shape),
      "data_offsets": [offset, offset + len(b)],
    }
    blobs.append(b)
    offset += len(b)
  h = json.dumps(header).encode()
  h += b" " * (-len(h) % 8)
  path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))
  return path


class _Reduce:
  """An object whose unpickling calls ``fn(*args)``; pickling it runs nothing."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def _payloads(marker):
  """(description, pickle bytes) of attacks that would create ``marker`` if executed."""
  m = str(marker)
  return [
    ("os.system", pickle.dumps(_Reduce(os.system, f"touch {m}"), protocol=2)),
    ("builtins.exec", pickle.dumps(_Reduce(exec, f"open({m!r}, 'w').close()"), protocol=2)),
    ("subprocess.Popen", pickle.dumps(_Reduce(subprocess.Popen, ["touch", m]), protocol=2)),
    # Hand-written protocol-0 opcodes: GLOBAL posix.system, MARK, STRING, TUPLE, REDUCE, STOP.
    ("posix.system opcodes", f"cposix\nsystem\n(S'touch {m}'\ntR.".encode()),
    # An attack hidden after legitimate data, inside a dict that looks like a state dict.
    (
      "nested os.system",
      pickle.dumps(
        {"w": np.zeros(3, np.float32), "evil": _Reduce(os.system, f"touch {m}")}, protocol=2
      ),
    ),
  ]


# ---------------------------------------------------------------------------------------------
# torch-written files.


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_dtype_matches_torch(tmp_path, fmt):
  """Each supported dtype (incl. bfloat16, NaN/inf/-0.0, integer extremes) is read bit-exactly.

  Fails if a storage type maps to the wrong numpy dtype or element size, or the storage bytes
  are read from the wrong place, in the zip or the legacy format.
  """
  torch = pytest.importorskip("torch")
  sd = _all_dtypes_sd(torch)
  out = read_checkpoint(_save(torch, sd, tmp_path / "m.pth", fmt))
  assert isinstance(out, collections.OrderedDict)
  assert list(out) == list(sd)
  for k, t in sd.items():
    _assert_same(out[k], t)
  assert out["bf16"].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("fmt", FORMATS)
def test_views_offsets_shared_storage(tmp_path, fmt):
  """Transposed, sliced (storage offset), strided, expanded, 0-d, empty views and Parameters.

  Fails if sizes/strides/offsets are applied wrongly, if a Parameter is not unwrapped, or if
  tensors sharing one storage come back aliased (writing one must not change another).
  """
  torch = pytest.importorskip("torch")
  base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
  obj = {
    "base": base,
    "t": base.t(),  # non-contiguous view of the same storage
    "rows": base[2:4],  # storage offset 20
    "cols": base[1:5, 3:9:2],  # offset and strides (10, 2)
    "expand": torch.tensor([1.5, 2.5]).reshape(2, 1).expand(2, 4),  # stride 0
    "scalar": torch.tensor(7, dtype=torch.int64),
    "elem": base[5, 9],  # 0-d view at offset 59
    "empty": torch.zeros(0, 3),
    "empty_view": base[3:3],
    "param": torch.nn.Parameter(torch.randn(2, 3)),
    "frozen": torch.nn.Parameter(torch.randn(4), requires_grad=False),
    "list": [base[0], (base[1], base[2, :3])],
  }
  out = read_checkpoint(_save(torch, obj, tmp_path / "v.pth", fmt))
  for k in ("base", "t", "rows", "cols", "expand", "scalar", "elem", "empty", "empty_view"):
    _assert_same(out[k], obj[k])
    assert out[k].flags.c_contiguous and out[k].flags.writeable
  _assert_same(out["param"], obj["param"])
  _assert_same(out["frozen"], obj["frozen"])
  _assert_same(out["list"][0], base[0])
  _assert_same(out["list"][1][0], base[1])
  _assert_same(out["list"][1][1], base[2, :3])
  assert out["scalar"].shape == () and out["elem"].shape == ()
  out["base"][0, 0] = -1.0
  out["rows"][0, 0] = -2.0
  assert out["t"][0, 0] == 0.0 and out["cols"][1, 0] == 23.0 and out["list"][0][0] == 0.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_tensor_twice_is_one_array(tmp_path, fmt):
  """A tensor pickled twice (pickle memo) is one array; two tensors on one storage are two.

  Fails if memoised tensors are duplicated (double memory for {'model': sd, 'ema': sd}) or if
  distinct tensors that share a storage are returned as aliases of each other.
  """
  torch = pytest.importorskip("torch")
  w = torch.randn(4, 4)
  sd = {"w": w}
  clone_view = {"w": w.view(4, 4)}  # a distinct tensor object on the same storage
  out = read_checkpoint(
    _save(torch, {"model": sd, "ema": sd, "other": clone_view}, tmp_path / "s.pth", fmt)
  )
  assert out["model"] is out["ema"]
  assert out["other"]["w"] is not out["model"]["w"]
  _assert_same(out["model"]["w"], w)
  _assert_same(out["other"]["w"], w)
  assert not np.shares_memory(out["other"]["w"], out["model"]["w"])
  out["model"]["w"][0, 0] = 99.0
  assert out["other"]["w"][0, 0] == w[0, 0].item()


def test_each_storage_read_once(tmp_path, monkeypatch):
  """Three views of one storage cause exactly one read of that storage record.

  Fails if the reader re-reads a storage per tensor (slow, and memory-hungry for big files).
  """
  torch = pytest.importorskip("torch")
  base = torch.randn(8, 8)
  path = _save(
    torch, {"a": base, "b": base[2:], "c": base.t(), "d": torch.ones(3)}, tmp_path / "r.pth", "zip"
  )
  calls = []
  real = pth.read_exact
  monkeypatch.setattr(
    pth, "read_exact", lambda f, o, n, name, what: calls.append(what) or real(f, o, n, name, what)
  )
  out = read_checkpoint(path)
  assert len(calls) == 2, calls
  _assert_same(out["c"], base.t())


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoint_layouts_pick_ema_model_state_dict(tmp_path, fmt):
  """load_state_dict picks ['ema'] over ['model'] over ['state_dict'] over a plain dict.

  Fails if the non-EMA weights are loaded from a released {'model', 'ema'} checkpoint, or a
  Lightning-style {'state_dict': ...} or plain state dict is not recognised.
  """
  torch = pytest.importorskip("torch")
  model = {"layer.weight": torch.zeros(2, 3), "layer.bias": torch.zeros(2)}
  ema = {"layer.weight": torch.ones(2, 3), "layer.bias": torch.ones(2)}
  other = {"layer.weight": torch.full((2, 3), 2.0), "layer.bias": torch.full((2,), 2.0)}
  cases = [
    (model, "", 0.0),
    ({"model": model, "ema": ema, "state_dict": other, "epoch": 3}, "['ema']", 1.0),
    ({"model": model, "state_dict": other}, "['model']", 0.0),
    ({"state_dict": other, "optimizer_states": [{"lr": 0.1}]}, "['state_dict']", 2.0),
  ]
  for i, (obj, where_expected, value) in enumerate(cases):
    sd, where = load_state_dict(_save(torch, obj, tmp_path / f"c{i}.pth", fmt))
    assert where == where_expected
    assert list(sd) == ["layer.weight", "layer.bias"]
    assert type(sd) is dict
    assert sd["layer.weight"].shape == (2, 3) and np.all(sd["layer.weight"] == value)


def test_plain_data_in_checkpoints(tmp_path):
  """argparse.Namespace, numpy arrays/scalars, torch dtypes and torch.Size load as plain data.

  Fails if these common non-tensor entries of training checkpoints are refused or mangled.
  """
  torch = pytest.importorskip("torch")
  obj = {
    "args": argparse.Namespace(lr=0.5, name="alit", dims=[1, 2]),
    "np": np.arange(6, dtype=np.int32).reshape(2, 3),
    "np_scalar": np.float64(2.5),
    "dtype": torch.bfloat16,
    "size": torch.Size([3, 4]),
    "model": {"w": torch.ones(1)},
  }
  out = read_checkpoint(_save(torch, obj, tmp_path / "p.pth", "zip"))
  assert isinstance(out["args"], pth.PickledNamespace)
  assert dict(out["args"]) == {"lr": 0.5, "name": "alit", "dims": [1, 2]}
  np.testing.assert_array_equal(out["np"], obj["np"])
  assert out["np"].dtype == np.int32
  assert out["np_scalar"] == 2.5 and out["np_scalar"].dtype == np.float64
  assert isinstance(out["dtype"], pth.TorchDtype)
  assert out["dtype"].np_dtype == ml_dtypes.bfloat16 and repr(out["dtype"]) == "torch.bfloat16"
  assert out["size"] == (3, 4)
  assert load_state_dict(tmp_path / "p.pth")[1] == "['model']"


def test_big_endian_zip(tmp_path):
  """A zip checkpoint whose byteorder record says 'big' is byte-swapped to native.

  Fails if the byteorder record is ignored (values would come back as garbage).
  """
  torch = pytest.importorskip("torch")
  sd = {
    "f": torch.randn(3, 2),
    "c": torch.randn(2, dtype=torch.complex64),
    "i": torch.arange(4),
    "b": torch.arange(3, dtype=torch.bfloat16),
    "u": torch.tensor([1, 2], dtype=torch.uint8),
  }
  src = _save(torch, sd, tmp_path / "le.pth", "zip")
  dtypes = {}
  with zipfile.ZipFile(src) as zf:
    pkl = zf.read("le/data.pkl")
    records = {n.split("/", 1)[1]: zf.read(n) for n in zf.namelist()}
  # Storage keys follow the dict order of first appearance.
  for key, t in zip(["0", "1", "2", "3", "4"], sd.values()):
    a = _torch_numpy(t)
    comp = a.dtype.itemsize // (2 if a.dtype.kind == "c" else 1)
    dtypes[key] = comp
    records[f"data/{key}"] = (
      np.frombuffer(records[f"data/{key}"], f"<u{comp}" if comp > 1 else "u1").byteswap().tobytes()
    )
  records["byteorder"] = b"big"
  records["data.pkl"] = pkl
  out = read_checkpoint(_write_zip(tmp_path / "be.pth", records, prefix="le/"))
  for k, t in sd.items():
    _assert_same(out[k], t)


def test_whole_module_is_refused(tmp_path):
  """torch.save(model) (a pickled nn.Module class) is refused with a hint to save a state_dict.

  Fails if the reader tries to import or construct arbitrary torch classes.
  """
  torch = pytest.importorskip("torch")
  path = _save(torch, torch.nn.Linear(2, 2), tmp_path / "module.pth", "zip")
  with pytest.raises(UnsafePickleError, match=r"torch\.nn\.modules\.linear\.Linear.*state_dict"):
    read_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# Reference checkpoints of the PyTorch ALIT.


def _tsv(path):
  rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
  return {r[0]: (tuple(json.loads(r[1])), r[2]) for r in rows}


def test_reference_checkpoints(reference_dir):
  """The reference vqgan_tiny_quantized .pth files: 245 keys whose shapes/dtypes match the listing.

  Fails if the real torch 2.x files of the PyTorch ALIT cannot be read, keys are lost or
  reordered, the plain file is not taken at top level or the EMA file not from ['ema'], or the
  two files (same weights, shared storages) disagree.
  """
  case = reference_dir / "vqgan_tiny_quantized"
  plain, ckpt = case / "vqgan_tiny_quantized.pth", case / "vqgan_tiny_quantized_ckpt_ema.pth"
  if not plain.exists() or not ckpt.exists():
    pytest.skip(f"reference checkpoints not found in {case}")
  listing = _tsv(case / "vqgan_tiny_quantized_keys.tsv")
  sd, where = load_state_dict(plain)
  sd_ema, where_ema = load_state_dict(ckpt)
  assert (where, where_ema) == ("", "['ema']")
  assert len(sd) == len(listing) == 245
  assert list(sd) == list(listing) == list(sd_ema)
  for k, (shape, dtype) in listing.items():
    assert sd[k].shape == shape, k
    assert str(sd[k].dtype) == dtype, k
    assert sd_ema[k].dtype == sd[k].dtype and sd_ema[k].tobytes() == sd[k].tobytes(), k
  raw = read_checkpoint(ckpt)
  assert set(raw) == {"model", "ema"}
  assert all(raw["model"][k].tobytes() == sd[k].tobytes() for k in sd)
  assert np.isfinite(sd["encoder_positional_embedding"]).all()
  assert float(np.abs(sd["encoder_positional_embedding"]).sum()) > 0


def test_reference_checkpoint_matches_torch_load(reference_dir):
  """Every array of the reference .pth equals torch.load's tensor bit for bit.

  Fails on any byte-level difference from torch's own reader (offsets, dtype, layout).
  """
  torch = pytest.importorskip("torch")
  path = reference_dir / "vqgan_tiny_quantized" / "vqgan_tiny_quantized.pth"
  if not path.exists():
    pytest.skip(f"{path} not found")
  ref = torch.load(path, map_location="cpu", weights_only=True)
  sd, _ = load_state_dict(path)
  for k, t in ref.items():
    _assert_same(sd[k], t)


# ---------------------------------------------------------------------------------------------
# Malicious pickles (built without torch).


def _assert_refused(path, marker, global_name=None):
  with pytest.raises(UnsafePickleError) as info:
    read_checkpoint(path)
  msg = str(info.value)
  assert str(path) in msg
  if global_name:
    assert re.search(global_name, msg), msg
  assert not marker.exists(), "the payload ran"


_GLOBAL = {
  "os.system": r"'posix\.system'",
  "builtins.exec": r"builtins\.exec",  # protocol 2 writes Python 2 names ('__builtin__')
  "subprocess.Popen": r"subprocess\.Popen",  # written as 'commands.Popen'
  "posix.system opcodes": r"'posix\.system'",
  "nested os.system": r"'posix\.system'",
}


@pytest.mark.parametrize("where", ["zip", "legacy", "bare"])
def test_malicious_pickles_are_refused(tmp_path, where):
  """os.system / exec / subprocess.Popen payloads raise UnsafePickleError and never run.

  Fails if the reader resolves a non-allowlisted global, i.e. if loading a checkpoint from the
  internet could execute code (the marker file would appear). Covers the payload as the zip
  data.pkl, as the main pickle of a legacy file, and as a bare pickle.
  """
  marker = tmp_path / "MARKER"
  for i, (desc, payload) in enumerate(_payloads(marker)):
    if where == "zip":
      path = _write_zip(
        tmp_path / f"evil{i}.pth", {"data.pkl": payload, "version": b"3\n", "data/0": b"\0" * 4}
      )
    elif where == "legacy":
      path = _legacy_file(tmp_path / f"evil{i}.pth", payload)
    else:
      path = tmp_path / f"evil{i}.pkl"
      path.write_bytes(payload)
    _assert_refused(path, marker, _GLOBAL[desc])


def test_malicious_legacy_header_and_storage_type(tmp_path):
  """Payloads in the legacy magic-number slot, the key list, or a storage record are refused.

  Fails if any of the five pickles of a legacy file is loaded without the allowlist, or if the
  storage type named in a persistent id is resolved freely.
  """
  marker = tmp_path / "MARKER"
  evil = pickle.dumps(_Reduce(os.system, f"touch {marker}"), protocol=2)
  magic = pickle.dumps(LEGACY_MAGIC, protocol=2)
  (tmp_path / "m.pth").write_bytes(evil + magic)
  _assert_refused(tmp_path / "m.pth", marker, "posix.system")

  good_main = pickle.dumps({"a": 1}, protocol=2)
  path = _legacy_file(tmp_path / "k.pth", good_main)
  data = path.read_bytes()
  keys = pickle.dumps([], protocol=2)
  path.write_bytes(data[: -len(keys)] + evil)
  _assert_refused(path, marker, "posix.system")

  # A persistent id ('storage', <os.system>, ...): BINPERSID on a tuple whose type is a global.
  pid_payload = (
    b"\x80\x02(X\x07\x00\x00\x00storagecposix\nsystem\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu"
    b"K\x01NtQ."
  )
  _assert_refused(_legacy_file(tmp_path / "p.pth", pid_payload), marker, "posix.system")


def test_foreign_persistent_ids_are_refused(tmp_path):
  """Persistent ids other than 'storage' (e.g. legacy 'module' records) are refused.

  Fails if an attacker can smuggle objects through persistent ids, in a legacy file or a bare
  pickle (where no persistent id is legitimate at all).
  """
  marker = tmp_path / "MARKER"
  module_pid = b"\x80\x02(X\x06\x00\x00\x00moduleNNNtQ."
  path = _legacy_file(tmp_path / "mod.pth", module_pid)
  with pytest.raises(UnsafePickleError, match="'module'"):
    read_checkpoint(path)
  storage_pid = b"\x80\x02(X\x07\x00\x00\x00storageNX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ."
  (tmp_path / "bare.pkl").write_bytes(storage_pid)
  _assert_refused(tmp_path / "bare.pkl", marker)


def test_build_cannot_rewire_allowlisted_objects(tmp_path):
  """A BUILD opcode aimed at an allowlisted global fails instead of altering the reader.

  Fails if a crafted pickle can set attributes on the reader's own functions or classes
  (e.g. swap the implementation behind torch._utils._rebuild_tensor_v2 for later loads).
  """
  target = torch_pickle.ALLOWED_GLOBALS[("torch._utils", "_rebuild_tensor_v2")]
  fn_before = target._fn
  attacks = [
    # GLOBAL rebuild_tensor_v2; (None, {'_fn': 1}) ; BUILD
    b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x03\x00\x00\x00_fnK\x01s\x86b.",
    # GLOBAL argparse.Namespace (the placeholder class); slot state {'__setstate__': 1}; BUILD
    b"\x80\x02cargparse\nNamespace\nN}X\x0c\x00\x00\x00__setstate__K\x01s\x86b.",
    # GLOBAL torch.float32 (a dtype object); dict state; BUILD
    b"\x80\x02ctorch\nfloat32\n}X\x08\x00\x00\x00np_dtypeK\x01sb.",
  ]
  for i, attack in enumerate(attacks):
    (tmp_path / f"b{i}.pkl").write_bytes(attack)
    with pytest.raises(CheckpointReadError, match=f"b{i}.pkl"):
      read_checkpoint(tmp_path / f"b{i}.pkl")
  assert target._fn is fn_before
  assert "__setstate__" in vars(pth.PickledNamespace)
  assert torch_pickle.ALLOWED_GLOBALS[("torch", "float32")].np_dtype == np.float32
  (tmp_path / "ok.pkl").write_bytes(pickle.dumps(argparse.Namespace(a=1), protocol=2))
  assert read_checkpoint(tmp_path / "ok.pkl") == {"a": 1}


# ---------------------------------------------------------------------------------------------
# safetensors, npz, npy.


def test_safetensors_round_trip(tmp_path):
  """A safetensors file (header parsed by hand) gives back every array, bfloat16 included.

  Fails if the 8-byte header length, the JSON header, the dtype names or the data offsets are
  interpreted wrongly.
  """
  rng = np.random.default_rng(0)
  arrays = {
    "w": rng.standard_normal((3, 4)).astype(np.float32),
    "h": rng.standard_normal(5).astype(np.float16),
    "bf": rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16),
    "idx": np.arange(4, dtype=np.int64),
    "mask": np.array([True, False]),
    "scalar": np.array(3, np.uint8),
    "empty": np.zeros((0, 2), np.float32),
  }
  path = _write_safetensors(tmp_path / "m.safetensors", arrays, metadata={"format": "np"})
  out = read_checkpoint(path)
  assert list(out) == list(arrays)
  for k, a in arrays.items():
    assert out[k].dtype == a.dtype and out[k].shape == a.shape and out[k].tobytes() == a.tobytes()
  assert load_state_dict(path)[1] == ""
  # Content, not the extension, decides the format.
  renamed = tmp_path / "m.bin"
  renamed.write_bytes(path.read_bytes())
  assert read_checkpoint(renamed)["w"].tobytes() == arrays["w"].tobytes()


def test_safetensors_matches_reference_writer(tmp_path):
  """Files written by the `safetensors` package itself read back exactly.

  Fails if the hand-written parser disagrees with the real format (skipped without the package).
  """
  st = pytest.importorskip("safetensors.numpy")
  arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([1, 2], np.int64)}
  st.save_file(arrays, str(tmp_path / "x.safetensors"))
  out = read_checkpoint(tmp_path / "x.safetensors")
  assert all(out[k].tobytes() == a.tobytes() and out[k].shape == a.shape for k, a in arrays.items())


def test_safetensors_corrupt(tmp_path):
  """Bad safetensors offsets, sizes or headers raise CheckpointReadError naming the file.

  Fails if a corrupt header is trusted (reading past the file or mis-sized arrays).
  """
  good = _write_safetensors(tmp_path / "g.safetensors", {"w": np.ones(4, np.float32)}).read_bytes()
  (n,) = struct.unpack("<Q", good[:8])
  header = json.loads(good[8 : 8 + n])
  for i, change in enumerate([{"data_offsets": [0, 32]}, {"shape": [5]}, {"dtype": "X9"}]):
    h = dict(header)
    h["w"] = {**header["w"], **change}
    hb = json.dumps(h).encode()
    path = tmp_path / f"bad{i}.safetensors"
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + good[8 + n :])
    with pytest.raises(CheckpointReadError, match=f"bad{i}.safetensors"):
      read_checkpoint(path)
  (tmp_path / "cut.safetensors").write_bytes(good[:20])
  with pytest.raises(CheckpointReadError, match="cut.safetensors"):
    read_checkpoint(tmp_path / "cut.safetensors")


def test_npz_and_npy_round_trip(tmp_path):
  """.npz gives a dict of arrays usable as a state dict; .npy gives the array; no pickles.

  Fails if numpy files are not recognised or object arrays (pickles) are loaded.
  """
  arrays = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "a.bias": np.zeros(2)}
  np.savez(tmp_path / "m.npz", **arrays)
  sd, where = load_state_dict(tmp_path / "m.npz")
  assert where == "" and list(sd) == list(arrays)
  assert all(np.array_equal(sd[k], a) and sd[k].dtype == a.dtype for k, a in arrays.items())
  np.save(tmp_path / "x.npy", arrays["a.weight"])
  np.testing.assert_array_equal(read_checkpoint(tmp_path / "x.npy"), arrays["a.weight"])
  np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
  with pytest.raises(CheckpointReadError, match="obj.npy"):
    read_checkpoint(tmp_path / "obj.npy")


# ---------------------------------------------------------------------------------------------
# Corrupt files and state-dict selection errors.


def test_truncated_garbage_and_missing_records(tmp_path):
  """Truncated, garbage, empty and incomplete files raise CheckpointReadError naming the file.

  Fails if corrupt input crashes with an unrelated exception, is silently accepted, or the
  message does not say which file is broken.
  """
  torch = pytest.importorskip("torch")
  sd = {"a": torch.randn(64, 64), "b": torch.randn(8)}
  zpath = _save(torch, sd, tmp_path / "z.pth", "zip")
  lpath = _save(torch, sd, tmp_path / "l.pth", "legacy")
  zdata, ldata = zpath.read_bytes(), lpath.read_bytes()
  bad = {
    "cut_zip.pth": zdata[: len(zdata) // 2],
    "cut_legacy.pth": ldata[: len(ldata) - 100],
    "cut_legacy_pickle.pth": ldata[:60],
    "garbage.pth": b"\x00\x01\x02 this is not a checkpoint " * 10,
    "empty.pth": b"",
    "text.ckpt": b"hello world\n",
  }
  with zipfile.ZipFile(zpath) as zf:
    records = {n.split("/", 1)[1]: zf.read(n) for n in zf.namelist() if not n.endswith("data/1")}
  _write_zip(tmp_path / "missing.pth", records, prefix="z/")
  records["data/1"] = b"\0" * 8  # shorter than 8 float32
  _write_zip(tmp_path / "short.pth", records, prefix="z/")
  _write_zip(tmp_path / "other.zip", {"readme.txt": b"hi"})
  for name, data in bad.items():
    (tmp_path / name).write_bytes(data)
  for name, pattern in [
    *((n, "") for n in bad),
    ("missing.pth", "'z/data/1' is missing"),
    ("short.pth", "data/1"),
    ("other.zip", "neither a torch checkpoint"),
  ]:
    with pytest.raises(CheckpointReadError, match=name) as info:
      read_checkpoint(tmp_path / name)
    assert pattern in str(info.value)
  with pytest.raises(FileNotFoundError):
    read_checkpoint(tmp_path / "does_not_exist.pth")


def test_fuzzed_files_fail_cleanly(tmp_path):
  """Randomly truncated or byte-flipped torch files load or raise only the reader's own errors.

  Fails if some corruption escapes as an unrelated exception (KeyError, struct.error, ...),
  hangs, or produces an error message that does not name the file.
  """
  torch = pytest.importorskip("torch")
  obj = {"a": torch.randn(4, 5), "b": torch.arange(6).reshape(2, 3).t(), "n": {"x": [1.5, "z"]}}
  rng = np.random.default_rng(0)
  outcomes = collections.Counter()
  for fmt in FORMATS:
    data = _save(torch, obj, tmp_path / f"src_{fmt}.pth", fmt).read_bytes()
    for i in range(150):
      b = bytearray(data)
      if i % 3 == 0:
        b = b[: rng.integers(len(b))]
      else:
        for pos in rng.integers(len(b), size=rng.integers(1, 5)):
          b[pos] = rng.integers(256)
      path = tmp_path / f"fuzz_{fmt}_{i}.pth"
      path.write_bytes(bytes(b))
      try:
        read_checkpoint(path)
        outcomes["ok"] += 1
      except (CheckpointReadError, UnsafePickleError) as e:
        assert str(path) in str(e)
        outcomes["error"] += 1
  assert outcomes["error"] > 100


def _op_str(s):
  b = s.encode()
  return b"X" + struct.pack("<I", len(b)) + b


def _op_int(i):
  return b"J" + struct.pack("<i", i)


def _op_tuple(items):
  return b"(" + b"".join(items) + b"t"


def _op_global(module, name):
  return f"c{module}\n{name}\n".encode()


def _op_tensor(pid, offset, size, stride):
  """Opcodes of _rebuild_tensor_v2(persistent_load(pid), offset, size, stride, False, {})."""
  return (
    _op_global("torch._utils", "_rebuild_tensor_v2")
    + b"("
    + _op_tuple(pid)
    + b"Q"
    + _op_int(offset)
    + _op_tuple([_op_int(n) for n in size])
    + _op_tuple([_op_int(n) for n in stride])
    + b"\x89"
    + _op_global("collections", "OrderedDict")
    + b")RtR"
  )


def _op_pid(key, numel, view=False):
  """A storage persistent id; ``view`` False: zip format (5 entries); None or (view key, element
  offset, element count): the 6th entry of the legacy format."""
  items = [_op_str("storage"), _op_global("torch", "FloatStorage"), _op_str(key), _op_str("cpu")]
  items.append(_op_int(numel))
  if view is None:
    items.append(b"N")
  elif view:
    items.append(_op_tuple([_op_str(view[0]), _op_int(view[1]), _op_int(view[2])]))
  return items


def test_out_of_bounds_view_and_tar(tmp_path):
  """A tensor reaching past its storage, and the pre-0.4 tar format, give clear errors.

  Fails if a crafted size/stride reads beyond the storage buffer, or a tar file is misread.
  """
  data = {"data/0": np.arange(4, dtype="<f4").tobytes()}
  pkl = b"\x80\x02" + _op_tensor(_op_pid("0", 4), 2, (3,), (1,)) + b"."
  bad = _write_zip(tmp_path / "oob.pth", {"data.pkl": pkl, **data})
  with pytest.raises(CheckpointReadError, match="oob.pth.*reaches byte 20"):
    read_checkpoint(bad)
  pkl = b"\x80\x02" + _op_tensor(_op_pid("0", 4), 1, (3,), (1,)) + b"."
  ok = _write_zip(tmp_path / "ok.pth", {"data.pkl": pkl, **data})
  np.testing.assert_array_equal(read_checkpoint(ok), [1.0, 2.0, 3.0])
  import tarfile

  with tarfile.open(tmp_path / "old.pth", "w") as tf:
    info = tarfile.TarInfo("sys_info")
    info.size = 3
    tf.addfile(info, io.BytesIO(b"abc"))
  with pytest.raises(CheckpointReadError, match="old.pth.*tar"):
    read_checkpoint(tmp_path / "old.pth")


def test_legacy_storage_views(tmp_path):
  """Legacy-format storage views (persistent id with (view key, offset, size)) are honoured.

  Fails if the view's element offset is ignored or a tensor may read past the end of its view
  into the rest of the root storage.
  """
  storage = struct.pack("<q", 6) + np.arange(6, dtype="<f4").tobytes()
  root = _op_tensor(_op_pid("0", 6, None), 0, (6,), (1,))
  view = _op_tensor(_op_pid("0", 6, ("v", 2, 3)), 1, (2,), (1,))  # elements 3, 4
  main = b"\x80\x02}(" + _op_str("root") + root + _op_str("view") + view + b"u."
  out = read_checkpoint(_legacy_file(tmp_path / "v.pth", main, ["0"], storage))
  np.testing.assert_array_equal(out["root"], np.arange(6))
  np.testing.assert_array_equal(out["view"], [3.0, 4.0])
  past = _op_tensor(_op_pid("0", 6, ("v", 2, 3)), 1, (3,), (1,))  # would read element 5
  with pytest.raises(CheckpointReadError, match="p.pth.*reaches byte"):
    read_checkpoint(_legacy_file(tmp_path / "p.pth", b"\x80\x02" + past + b".", ["0"], storage))


def test_select_state_dict_errors():
  """Trees without a flat {str: array} dict give an error listing what was found.

  Fails if a non-state-dict is returned (so conversion would fail later with a confusing
  message) or an unusable ['ema'] silently falls back to ['model'].
  """
  with pytest.raises(CheckpointReadError, match=r"f\.pth: no state dict.*'epoch': int"):
    select_state_dict({"epoch": 3, "opt": {}}, name="f.pth")
  with pytest.raises(CheckpointReadError, match=r"f\.pth\['ema'\] is not a flat dict.*'decay'"):
    select_state_dict({"ema": {"decay": 0.99}, "model": {"w": np.ones(1)}}, name="f.pth")
  with pytest.raises(CheckpointReadError, match=r"\['model'\] is not a flat dict.*empty"):
    select_state_dict({"model": {}}, name="f.pth")
  with pytest.raises(CheckpointReadError, match="holds a list"):
    select_state_dict([np.ones(1)], name="f.pth")
  # A state dict with a tensor literally named 'model' is still taken as a whole.
  sd, where = select_state_dict({"model": np.ones(2), "x": np.zeros(1)})
  assert where == "" and list(sd) == ["model", "x"]
