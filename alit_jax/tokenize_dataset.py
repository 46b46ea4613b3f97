r"""Dataset-scale adaptive tokenization: images -> variable-length token shards, resumable.

  python -m alit_jax.tokenize_dataset --checkpoint DIR --data SRC --out OUT [--split train] \
      [--criterion l1 --threshold 0.07] [--batch 32] [--shard_size 1024] [--num_heads H] \
      [--coordinator_address HOST:PORT --num_processes P --process_id I]

`--checkpoint` is a pretrained directory (`python -m alit_jax.convert`, `save_pretrained`,
training) or an official PyTorch checkpoint file (`--num_heads` as for `Tokenizer.from_pytorch`).

Sources (`--data`):
  PATH            a folder of image files, read directly: every image below it (recursively,
                  sorted; `alit_jax.images.list_images`), id = path relative to PATH. No build
                  step; for millions of small files prefer building it once.
  folder:PATH     a dataset built by `python -m alit_jax.data.build_folder` (images packed in
                  array_record; id = its `file_name`). A PATH given without `folder:` that holds
                  such a dataset is recognised too.
  NAME            a TFDS dataset prepared as array_record under `--data_dir` (`imagenet2012`,
                  `--split validation`, ...); `synthetic:...` procedural images.

Work split. The source's N records are cut into S = ceil(N / K) shards of K consecutive records
(`--shard_size`). Process p of P handles shards p, p + P, ... Its records are read through grain
(threads, or `--worker_count` processes), decoded, resized (shorter side, bicubic) and center
cropped to the model's resolution (the evaluation transform), then encoded in batches of
`--batch` (per process) split over the process's local devices (`Tokenizer(mesh=local_mesh())`)
with early exit per batch: a batch stops iterating once all its images meet the criterion.
Batches never straddle shards, so a shard's batches are the same in every run.

Output (OUT must be on a filesystem all processes share):
  OUT/job.json                      the job's identity (checkpoint hash, config, data, criterion)
  OUT/shards/tokens-SSSSS-of-TTTTT.array_record   one file per shard, records in source order
  OUT/shards/tokens-SSSSS-of-TTTTT.json           the shard's counts, histogram, bad images
  OUT/manifest.json                 written once every shard is committed (see `build_manifest`)

Record format: each array_record record is a msgpack map
  {"index": int (position in the source), "id": str, "label": int (-1 if none),
   "length": int (token count L), "tokens": bytes, "scores": bytes}
`tokens` holds L (quantized) or L x D (continuous) little-endian values of the job's
`token_dtype` (int16 when the codebook has at most 32768 entries, else int32; float32 or float16
for continuous latents), `scores` the float32 criterion scores of iterations 1..L/T (the
iterations that chose L; later ones may not have run). `alit_jax.data.token_dataset(OUT)` reads
them back. Bad images (unreadable or undecodable) get no record; the shard JSON and the manifest
list them with their id and the reason.

One writer per OUT: each process holds an advisory lock (`fcntl.flock` on
OUT/.lock-process-<index>, one per process index) for the whole job, so a second run on the same
OUT with the same index refuses at once, naming the holder's pid and host, rather than
recomputing and rewriting the first one's shards. A killed run's lock is released by the kernel.

Commit protocol. A shard is written under a temporary name, renamed into place, then its JSON is
written the same way; a shard counts as done only when both exist. A rerun with the same OUT
checks job.json (a different checkpoint, model, criterion, threshold, data, shard size or token
dtype is refused with the differences listed), skips done shards and recomputes the rest, so
killing any process at any moment loses no committed shard and can never duplicate a record
(shards are keyed by their fixed record range, not by process). At most one shard per process
is recomputed; the process count may change between runs. With the same batch size and
devices per process, a resumed job's output is bit-identical to an uninterrupted one. Another
batch size or device layout can change scores in the last bit; tokens and lengths then only
change if such a difference flips a codebook argmin or a threshold decision (not seen in tests).

With `--coordinator_address`, processes join through `jax.distributed` (same flags as training)
and wait for each other at the end (if one dies, jax's heartbeat ends the others); process 0
logs progress and writes the manifest. Without it, `--num_processes/--process_id` run
independent workers, and the one that finds every shard done writes the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

FORMAT = "alit_jax.tokens/1"
JOB_FILE = "job.json"
MANIFEST_FILE = "manifest.json"
SHARD_DIR = "shards"
_TMP_PREFIX = ".tmp-"
# Test hook: "process=1,shards=2,stage=data" makes process 1 SIGKILL itself while writing its
# 2nd shard of this run, at "stage": "tmp" (data written under the temporary name), "data" (data
# renamed, JSON not yet written) or "commit" (default; both done).
DIE_ENV = "ALIT_TOKENIZE_TEST_SIGKILL"

Log = Callable[[str], None]


def _default_log(msg: str) -> None:
  from absl import logging

  logging.info("%s", msg)


# ------------------------------------------------------------------------------------------------
# Sources


class ImageFileSource:
  """A folder of image files as a random-access source (read on demand, never decoded here).

  Records: {"image": encoded bytes, "label": -1, "file_name": path relative to the folder}, or
  {"image": None, "error": reason, ...} when the file cannot be read. Picklable.
  """

  def __init__(self, root: str | os.PathLike):
    from alit_jax import images as images_lib

    self.root = pathlib.Path(root).expanduser().resolve()
    if not self.root.is_dir():
      raise FileNotFoundError(f"{self.root}: image folder does not exist or is not a directory")
    files = images_lib.list_images([self.root])
    self.files = [pathlib.Path(f).relative_to(self.root).as_posix() for f in files]
    if not self.files:
      raise ValueError(
        f"{self.root}: no image files found (extensions {images_lib.IMAGE_EXTENSIONS})"
      )

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


def _holds_built_dataset(path: pathlib.Path) -> bool:
  """dataset_info.json at PATH, PATH/*, or PATH/*/* (the layouts `find_dataset_dir` accepts)."""
  if (path / "dataset_info.json").is_file():
    return True
  for child in os.scandir(path):
    if not child.is_dir():
      continue
    if os.path.isfile(os.path.join(child.path, "dataset_info.json")):
      return True
    for grandchild in os.scandir(child.path):
      if grandchild.is_dir() and os.path.isfile(os.path.join(grandchild.path, "dataset_info.json")):
        return True
  return False


def open_source(data: str, split: str = "train", data_dir: str | None = None):
  """The random-access source for `--data` (see the module docstring)."""
  from alit_jax.data import sources

  path = pathlib.Path(os.path.expanduser(data))
  if path.is_dir():
    if _holds_built_dataset(path):
      return sources.get_source(f"folder:{path}", split, data_dir)
    return ImageFileSource(path)
  return sources.get_source(data, split, data_dir)


def source_fingerprint(source) -> str:
  """A location-independent identity of a source's record list."""
  fp = getattr(source, "fingerprint", None)
  if fp is not None:
    return fp()
  if hasattr(source, "dataset_dir") and hasattr(source, "split"):
    info = pathlib.Path(source.dataset_dir)
    return (
      f"tfds:{getattr(source, 'name', info.parent.name)}/{info.name}/{source.split}/{len(source)}"
    )
  return f"{type(source).__name__}:{source!r}:{len(source)}"


# ------------------------------------------------------------------------------------------------
# grain stages


class _ShardRecords:
  """This process's work: records of its pending shards, each padded to a multiple of the batch.

  Entry k is (shard, source index) with index -1 for padding.
  """

  def __init__(self, source, shards: np.ndarray, indices: np.ndarray):
    self.source = source
    self.shards = np.asarray(shards, np.int64)
    self.indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, k: int) -> dict:
    idx = int(self.indices[int(k)])
    out = {"shard": int(self.shards[int(k)]), "index": idx}
    if idx < 0:
      return out
    out.update(self.source[idx])
    return out


class _Prepare(grain.transforms.Map):
  """Decode + resize/crop one record; failures become {"error": reason} (never raise)."""

  def __init__(self, image_size: int, resize: bool, interpolation: str):
    self.image_size = int(image_size)
    self.resize = bool(resize)
    self.interpolation = interpolation

  def map(self, record: dict) -> dict:
    from alit_jax.data import transforms as T

    s = self.image_size
    out = {
      "shard": record["shard"],
      "index": record["index"],
      "label": int(record.get("label", -1)),
      "id": "",
      "error": "",
      "image": np.zeros((s, s, 3), np.uint8),
    }
    if record["index"] < 0:
      return out
    name = record.get("file_name", "")
    out["id"] = name if name else str(record["index"])
    if record.get("error"):
      out["error"] = record["error"]
      return out
    try:
      img = T.decode_image(record["image"])
      if self.resize:
        img = T.resize_shorter_side(img, s, self.interpolation)
      img = T.center_crop(img, s)
      arr = np.asarray(img, np.uint8)
      if arr.shape != (s, s, 3):
        raise ValueError(f"preprocessing gave shape {arr.shape}")
      out["image"] = arr
    except Exception as e:  # any decoder failure is a bad image, not a crashed job
      out["error"] = T.error_text(e)
    return out


def _collate(rows) -> dict:
  return {
    "image": np.stack([r["image"] for r in rows]),
    "shard": np.array([r["shard"] for r in rows], np.int64),
    "index": np.array([r["index"] for r in rows], np.int64),
    "label": np.array([r["label"] for r in rows], np.int64),
    "id": [r["id"] for r in rows],
    "error": [r["error"] for r in rows],
  }


def encode_record(
  *, index: int, id: str, label: int, tokens: np.ndarray, scores: np.ndarray, token_dtype: str
) -> bytes:
  """One record's bytes (the format in the module docstring).

  Args:
    index, id, label: the image's position in the source, id and label.
    tokens: (L,) quantizer indices or (L, D) continuous latents.
    scores: (L / T,) criterion scores of the iterations that chose L.
    token_dtype: the stored dtype (`token_dtype_for`).
  """
  import msgpack

  tokens = np.asarray(tokens)
  stored = np.dtype(token_dtype).newbyteorder("<")
  if np.issubdtype(stored, np.integer):
    info = np.iinfo(stored)
    if tokens.size and (tokens.min() < info.min or tokens.max() > info.max):
      raise ValueError(f"token values out of range for {token_dtype}")
  rec = {
    "index": int(index),
    "id": str(id),
    "label": int(label),
    "length": int(tokens.shape[0]),
    "tokens": np.ascontiguousarray(tokens, dtype=stored).tobytes(),
    "scores": np.ascontiguousarray(scores, dtype="<f4").tobytes(),
  }
  return msgpack.packb(rec, use_bin_type=True)


# ------------------------------------------------------------------------------------------------
# Job identity


def params_sha256(variables: Any) -> str:
  """sha256 over every parameter's path, dtype, shape and bytes (the checkpoint's identity)."""
  import jax

  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    a = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def token_dtype_for(tokenizer, token_dtype: str = "auto") -> str:
  """The stored token dtype: int16/int32 for quantized models, float32/float16 otherwise."""
  c = tokenizer.config.alit
  if c.quantize_latent:
    auto = "int16" if c.codebook_size <= 2**15 else "int32"
    if token_dtype == "auto":
      return auto
    if token_dtype not in ("int16", "int32"):
      raise ValueError(f"quantized tokens are stored as int16/int32, not {token_dtype!r}")
    if token_dtype == "int16" and auto == "int32":
      raise ValueError(f"codebook of {c.codebook_size} entries does not fit int16")
    return token_dtype
  if token_dtype == "auto":
    return "float32"
  if token_dtype not in ("float32", "float16"):
    raise ValueError(f"continuous tokens are stored as float32/float16, not {token_dtype!r}")
  return token_dtype


# Keys of job.json that only record provenance and may differ on resume.
_INFO_KEYS = (("checkpoint", "path"), ("data", "spec"), ("data", "data_dir"))


def job_identity(
  tokenizer,
  source,
  *,
  checkpoint: str | None,
  data: str,
  split: str,
  data_dir: str | None,
  criterion: str,
  threshold: float,
  shard_size: int,
  token_dtype: str,
  resize: bool,
  interpolation: str,
) -> dict:
  """The job.json dict: what determines the output (plus provenance)."""
  c = tokenizer.config.alit
  n = len(source)
  return {
    "format": FORMAT,
    "checkpoint": {
      "path": checkpoint or tokenizer.meta.get("source", "<in memory>"),
      "params_sha256": params_sha256(tokenizer.variables),
    },
    "model": json.loads(tokenizer.config.to_json()),
    "quantized": bool(c.quantize_latent),
    "codebook_size": int(c.codebook_size) if c.quantize_latent else 0,
    "latent_dim": int(c.latent_dim),
    "tokens_per_iteration": int(c.num_latent_tokens),
    "num_iterations": int(c.max_rollout_iters),
    "token_counts": [int(x) for x in tokenizer.token_counts],
    "token_dtype": token_dtype,
    "criterion": criterion,
    "threshold": float(threshold),
    "halting": "off",
    "image_size": int(tokenizer.image_size),
    "preprocess": {"resize": bool(resize), "interpolation": interpolation, "center_crop": True},
    "data": {
      "spec": data,
      "split": split,
      "data_dir": data_dir,
      "num_records": n,
      "fingerprint": source_fingerprint(source),
    },
    "shard_size": int(shard_size),
    "num_shards": max(1, math.ceil(n / shard_size)),
  }


def identity_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
  """The differences of two job descriptions ("key: old (in OUT) != new (this run)")."""
  out = []
  for k in sorted(set(old) | set(new)):
    key = f"{prefix}{k}"
    if tuple(key.split(".")) in _INFO_KEYS:
      continue
    a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += identity_diff(a, b, key + ".")
    elif a != b:
      out.append(f"{key}: {_short(a)} (in OUT) != {_short(b)} (this run)")
  return out


def _short(v: Any) -> str:
  s = json.dumps(v, sort_keys=True)
  return s if len(s) <= 80 else s[:77] + "..."


def check_or_write_job(out: pathlib.Path, job: dict, *, write: bool) -> None:
  """Refuses an OUT made by a different job; writes job.json if absent and `write`.

  Raises:
    ValueError: OUT/job.json describes a different job (the message lists the differences).
  """
  path = out / JOB_FILE
  if path.is_file():
    try:
      old = json.loads(path.read_text())
    except ValueError as e:
      raise ValueError(f"{path}: unreadable job file ({e}); use a new --out") from e
    diff = identity_diff(old, job)
    if diff:
      raise ValueError(
        f"{out} holds tokens of a different job; refusing to resume into it. Differences:\n  "
        + "\n  ".join(diff)
        + "\nUse another --out (or delete this one to start over)."
      )
    return
  if write:
    atomic_write_text(path, json.dumps(job, indent=2, sort_keys=True))


# ------------------------------------------------------------------------------------------------
# Files


def _fsync_file(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def atomic_write_text(path: pathlib.Path, text: str) -> None:
  """Writes `path` through a temporary file, fsync and rename (never half-written)."""
  tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
  tmp.write_text(text)
  _fsync_file(tmp)
  os.replace(tmp, path)


LOCK_PREFIX = ".lock-process-"


class OutputLockedError(RuntimeError):
  """OUT is being written by another run with the same process index (the message names it)."""


def _read_holder(fd: int, attempts: int = 20) -> str:
  """The holder's record, waiting briefly for a holder that locked but has not written yet."""
  for _ in range(attempts):
    raw = os.pread(fd, 4096, 0)
    try:
      h = json.loads(raw)
      return f"pid {h['pid']} on host {h['host']}, since {h['since']}"
    except (ValueError, KeyError, TypeError):
      time.sleep(0.05)
  return "a process that has not recorded its pid and host yet"


class OutputLock:
  """An advisory `fcntl.flock` on OUT/.lock-process-<index>, held while this process writes OUT.

  The file records the holder's pid, host and start time. A second run with the same process
  index refuses at once (`OutputLockedError`, naming the holder) instead of recomputing and
  rewriting the first one's shards. The kernel drops a flock when its holder dies, so a lock
  left by a killed run never blocks a rerun. Use as a context manager.
  """

  def __init__(self, out: pathlib.Path, process_index: int):
    import fcntl
    import socket

    self.path = pathlib.Path(out) / f"{LOCK_PREFIX}{process_index}"
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise OutputLockedError(
        f"{out} is being written by another run ({holder}; process index {process_index}); "
        "wait for it to finish, or use another --out"
      ) from None
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    self._fd: int | None = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the only descriptor drops the flock
      self._fd = None

  def __enter__(self) -> OutputLock:
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def shard_name(shard: int, num_shards: int) -> str:
  w = max(5, len(str(num_shards)))
  return f"tokens-{shard:0{w}d}-of-{num_shards:0{w}d}"


def shard_done(out: pathlib.Path, shard: int, num_shards: int) -> bool:
  base = out / SHARD_DIR / shard_name(shard, num_shards)
  return base.with_suffix(".json").is_file() and base.with_suffix(".array_record").is_file()


def _die_point(state: dict) -> Callable[[str], None]:
  """The SIGKILL test hook (`DIE_ENV`)."""
  spec = os.environ.get(DIE_ENV, "")
  if not spec:
    return lambda stage: None
  opts = dict(p.split("=", 1) for p in spec.split(","))
  proc = int(opts.get("process", -1))
  after = int(opts.get("shards", 1))
  when = opts.get("stage", "commit")

  def die(stage: str) -> None:
    if stage == "commit":
      state["committed"] = state.get("committed", 0) + 1
    done = state.get("committed", 0) + (stage != "commit")
    if stage == when and done >= after and proc in (-1, state["process_index"]):
      os.kill(os.getpid(), signal.SIGKILL)

  return die


def write_shard(
  out: pathlib.Path, shard: int, num_shards: int, records: list[bytes], meta: dict, die
) -> None:
  """Commits one shard: records under a temporary name, renamed, then its JSON (`die`: test hook)."""
  from array_record.python.array_record_module import ArrayRecordWriter

  d = out / SHARD_DIR
  base = shard_name(shard, num_shards)
  data, info = d / f"{base}.array_record", d / f"{base}.json"
  info.unlink(missing_ok=True)  # a stale JSON must never vouch for new data
  tmp = d / f"{_TMP_PREFIX}{base}.array_record.{os.getpid()}"
  writer = ArrayRecordWriter(str(tmp), "group_size:1")
  try:
    for r in records:
      writer.write(r)
  finally:
    writer.close()
  _fsync_file(tmp)
  die("tmp")
  os.replace(tmp, data)
  die("data")
  atomic_write_text(info, json.dumps(meta, indent=1, sort_keys=True))
  die("commit")


def clean_tmp(out: pathlib.Path, shards, num_shards: int) -> None:
  """Removes leftovers of killed runs for the shards this process now owns."""
  names = {shard_name(s, num_shards) for s in shards}
  for p in (out / SHARD_DIR).glob(f"{_TMP_PREFIX}tokens-*"):
    if p.name[len(_TMP_PREFIX) :].split(".")[0] in names:
      p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# Manifest


def build_manifest(out: str | os.PathLike) -> dict:
  """Aggregates job.json and every shard's JSON (all must be committed).

  Returns:
    {"format", "complete": True, "job": job.json, "num_shards", "shards": [{file, start, stop,
    num_records, num_bad}], "num_records" (tokenized images), "num_bad", "bad_images": [{index,
    id, reason}], "token_length_histogram" {count: images}, "total_tokens",
    "mean_tokens_per_image", "record_format"}.

  Raises:
    FileNotFoundError: a shard is not committed yet.
  """
  out = pathlib.Path(out)
  job = json.loads((out / JOB_FILE).read_text())
  s_total = job["num_shards"]
  shards, bad, hist, total = [], [], {}, 0
  for s in range(s_total):
    if not shard_done(out, s, s_total):
      raise FileNotFoundError(f"{out}: shard {s} of {s_total} is not committed yet")
    base = shard_name(s, s_total)
    meta = json.loads((out / SHARD_DIR / f"{base}.json").read_text())
    shards.append(
      {
        "file": f"{SHARD_DIR}/{base}.array_record",
        "start": meta["start"],
        "stop": meta["stop"],
        "num_records": meta["num_records"],
        "num_bad": len(meta["bad"]),
      }
    )
    bad += meta["bad"]
    for k, v in meta["length_histogram"].items():
      hist[k] = hist.get(k, 0) + v
    total += meta["total_tokens"]
  n = sum(s["num_records"] for s in shards)
  return {
    "format": FORMAT,
    "complete": True,
    "job": job,
    "num_shards": s_total,
    "shards": shards,
    "num_records": n,
    "num_bad": len(bad),
    "bad_images": bad,
    "token_length_histogram": {k: hist[k] for k in sorted(hist, key=int)},
    "total_tokens": total,
    "mean_tokens_per_image": total / n if n else 0.0,
    "record_format": {
      "container": "array_record (group_size 1), one record per tokenized image, source order",
      "encoding": "msgpack map",
      "fields": {
        "index": "int: position of the image in the source",
        "id": "str: file path / file_name, or the index when the source has none",
        "label": "int: class label, -1 if none",
        "length": "int: token count L",
        "tokens": f"bytes: L{' x latent_dim' if not job['quantized'] else ''} little-endian "
        f"{job['token_dtype']}",
        "scores": f"bytes: float32 {job['criterion']} score of iterations 1..L/T",
      },
    },
  }


# ------------------------------------------------------------------------------------------------
# Progress


class _Progress:
  def __init__(self, log: Log | None, total: int, every_s: float, devices: int, tag: str):
    self.log, self.total, self.every_s, self.devices, self.tag = log, total, every_s, devices, tag
    self.start = self.last = time.monotonic()
    self.images = self.tokens = self.bad = self.seen = 0
    self.shards = 0

  def update(self, images: int, tokens: int, bad: int, seen: int) -> None:
    self.images += images
    self.tokens += tokens
    self.bad += bad
    self.seen += seen
    now = time.monotonic()
    if self.log is not None and now - self.last >= self.every_s:
      self.last = now
      self.log(self.line())

  def line(self) -> str:
    dt = max(time.monotonic() - self.start, 1e-9)
    rate = self.seen / dt
    eta = (self.total - self.seen) / rate if rate > 0 else float("inf")
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
    mean = self.tokens / self.images if self.images else 0.0
    return (
      f"{self.tag}{self.seen}/{self.total} images, {self.shards} shards | {rate:.1f} img/s "
      f"({rate / self.devices:.1f}/device) | ETA {eta_s} | mean tokens/image {mean:.1f} | "
      f"bad {self.bad}"
    )


# ------------------------------------------------------------------------------------------------
# The job


@dataclasses.dataclass
class Result:
  """What one call of `tokenize_dataset` did.

  Attributes:
    out: the output folder.
    complete: every shard is committed (the manifest exists).
    manifest: the manifest when this call wrote it, else None.
    shards_done: shards this process committed in this call.
    shards_skipped: shards of this process found already committed.
    images: images this process tokenized in this call; bad: bad images it met.
    seconds: wall time of the encode loop; images_per_s: images / seconds.
    mean_tokens: mean tokens per tokenized image in this call.
  """

  out: pathlib.Path
  complete: bool
  manifest: dict | None
  shards_done: int
  shards_skipped: int
  images: int
  bad: int
  seconds: float
  images_per_s: float
  mean_tokens: float


def tokenize_dataset(
  tokenizer,
  out: str | os.PathLike,
  data: Any,
  *,
  split: str = "train",
  data_dir: str | None = None,
  checkpoint: str | None = None,
  criterion: str = "l1",
  threshold: float | None = 0.07,
  batch_size: int = 32,
  shard_size: int = 1024,
  token_dtype: str = "auto",
  resize: bool = True,
  interpolation: str = "bicubic",
  process_index: int | None = None,
  process_count: int | None = None,
  wait_for_others: bool | None = None,
  worker_count: int = 0,
  num_threads: int = 8,
  prefetch_buffer_size: int = 64,
  log: Log | None = _default_log,
  log_every_s: float = 30.0,
  poll_s: float = 1.0,
  early_exit: bool = True,
) -> Result:
  """Tokenizes every image of a source into OUT (see the module docstring), resuming OUT.

  Args:
    tokenizer: a `Tokenizer` (give it `mesh=local_mesh()` to split batches over local devices).
    out: output folder (created; shared by all processes).
    data, split, data_dir: the source (`open_source`); `data` may also be a random-access source
      object (`len`, `[i]` -> {"image": bytes or uint8 array, "file_name", "label"}) with a
      deterministic `fingerprint()` or repr.
    checkpoint: where the weights came from (recorded; the identity is their hash).
    criterion, threshold: `Tokenizer.encode`'s criterion (a registered name) and threshold
      (None: the criterion's default).
    batch_size: images per encode call in this process (split over the tokenizer's mesh).
    shard_size: records per output shard (the unit of work and of resumption).
    token_dtype: "auto", "int16"/"int32" (quantized) or "float32"/"float16" (continuous).
    resize, interpolation: preprocessing (shorter side -> image size, then center crop).
    process_index, process_count: this process and the number of processes (default: jax's).
    wait_for_others: after its own shards, wait until all shards are committed (default: when
      `jax.distributed` runs more than one process); the manifest is then written by process 0.
      Otherwise the manifest is written by any process that finds every shard committed.
    worker_count, num_threads, prefetch_buffer_size: grain reading/decoding parallelism.
    log: progress and status lines (process 0 only); None silences them.
    log_every_s: seconds between progress lines.
    poll_s: seconds between checks while waiting for other processes.
    early_exit: stop a batch's rollout once all its images meet the criterion. False runs every
      iteration (for benchmarks); the output is the same either way.

  Returns:
    A `Result`.

  Raises:
    ValueError: OUT belongs to a different job, or bad arguments.
    OutputLockedError: another run holds OUT's lock for this process index.
  """
  import jax

  from alit_jax import criteria

  if batch_size <= 0 or shard_size <= 0:
    raise ValueError(f"batch_size ({batch_size}) and shard_size ({shard_size}) must be positive")
  if process_index is None or process_count is None:
    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if wait_for_others is None:
    wait_for_others = jax.process_count() > 1
  log0 = log if process_index == 0 else None

  crit = criteria.get(criterion)
  if not isinstance(criterion, str) or crit.name not in criteria.REGISTRY:
    raise ValueError("criterion must be a registered name (it is recorded in the job identity)")
  if threshold is None:
    threshold = tokenizer.default_threshold(crit)
  tdtype = token_dtype_for(tokenizer, token_dtype)
  if isinstance(data, str | os.PathLike):
    data = os.fspath(data)
    source = open_source(data, split, data_dir)
  else:
    source, data = data, repr(data)
  n = len(source)
  if n == 0:
    raise ValueError(f"{data}: the source has no records")
  job = job_identity(
    tokenizer,
    source,
    checkpoint=checkpoint,
    data=data,
    split=split,
    data_dir=data_dir,
    criterion=crit.name,
    threshold=float(threshold),
    shard_size=shard_size,
    token_dtype=tdtype,
    resize=resize,
    interpolation=interpolation,
  )
  out = pathlib.Path(out).expanduser().absolute()
  (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
  # One writer per process index for the whole job (flock: released on exit, even by SIGKILL).
  with OutputLock(out, process_index):
    # Every process checks; process 0 (or, for independent workers, the first) writes.
    check_or_write_job(out, job, write=process_index == 0 or not wait_for_others)
    if wait_for_others and process_index != 0:
      _wait(
        lambda: (out / JOB_FILE).is_file(),
        poll_s,
        timeout_s=600.0,
        what=f"process 0 to write {out / JOB_FILE} (did it fail?)",
      )
      check_or_write_job(out, job, write=False)

    s_total = job["num_shards"]
    mine = list(range(process_index, s_total, process_count))
    pending = [s for s in mine if not shard_done(out, s, s_total)]
    clean_tmp(out, mine, s_total)
    devices = tokenizer.mesh.size if tokenizer.mesh is not None else 1
    if shard_size % batch_size and log0:
      log0(
        f"note: shard_size {shard_size} is not a multiple of batch {batch_size}; the last batch "
        "of every shard is padded"
      )
    tag = f"tokenize[{process_index}/{process_count}] "
    if log0:
      op = ">" if crit.higher_is_better else "<"
      log0(
        f"{tag}{n} images in {s_total} shards of {shard_size} -> {out}; this process: "
        f"{len(mine)} shards, {len(mine) - len(pending)} already done; batch {batch_size} on "
        f"{devices} device(s); criterion {crit.name} {op} {threshold}"
      )

    # Work list: pending shards' indices, each shard padded to a multiple of the batch.
    shard_col, index_col = [], []
    for s in pending:
      lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
      m = math.ceil((hi - lo) / batch_size) * batch_size
      idx = np.full((m,), -1, np.int64)
      idx[: hi - lo] = np.arange(lo, hi)
      shard_col.append(np.full((m,), s, np.int64))
      index_col.append(idx)
    total = sum(min(n, (s + 1) * shard_size) - s * shard_size for s in pending)
    progress = _Progress(log0, total, log_every_s, devices, tag)
    die = _die_point({"process_index": process_index})
    t_start = time.monotonic()
    if pending:
      ds = (
        grain.MapDataset.source(
          _ShardRecords(source, np.concatenate(shard_col), np.concatenate(index_col))
        )
        .map(_Prepare(tokenizer.image_size, resize, interpolation))
        .batch(batch_size, batch_fn=_collate)
      )
      it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
      )
      if worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
      iterator = iter(it)
      try:
        cur, records, bad, hist, tokens_sum = None, [], [], {}, 0
        t = tokenizer.tokens_per_iteration
        for batch in iterator:
          shard = int(batch["shard"][0])
          if cur is not None and shard != cur:
            raise AssertionError("internal error: a batch straddles shards")  # pragma: no cover
          cur = shard
          index, errors = batch["index"], batch["error"]
          real = index >= 0
          good = real & np.array([not e for e in errors])
          rows = np.flatnonzero(good)
          if rows.size:
            imgs = batch["image"]
            # Padding and bad rows repeat a real image: they cannot delay the early exit.
            imgs[~good] = imgs[rows[0]]
            enc = tokenizer.encode(imgs, crit.name, float(threshold), early_exit=early_exit)
            toks, lens, scores = jax.device_get((enc.tokens, enc.lengths, enc.scores))
          n_tok = 0
          for r in np.flatnonzero(real):
            if not good[r]:
              bad.append({"index": int(index[r]), "id": batch["id"][r], "reason": errors[r]})
              continue
            length = int(lens[r])
            records.append(
              encode_record(
                index=int(index[r]),
                id=batch["id"][r],
                label=int(batch["label"][r]),
                tokens=toks[r, :length],
                scores=scores[: length // t, r],
                token_dtype=tdtype,
              )
            )
            hist[str(length)] = hist.get(str(length), 0) + 1
            n_tok += length
          tokens_sum += n_tok
          progress.update(int(rows.size), n_tok, int(real.sum() - rows.size), int(real.sum()))
          lo, hi = shard * shard_size, min(n, (shard + 1) * shard_size)
          if len(records) + len(bad) == hi - lo:
            meta = {
              "format": FORMAT,
              "shard": shard,
              "start": lo,
              "stop": hi,
              "num_records": len(records),
              "bad": bad,
              "length_histogram": {k: hist[k] for k in sorted(hist, key=int)},
              "total_tokens": tokens_sum,
              "written_by": {"process_index": process_index, "process_count": process_count},
            }
            write_shard(out, shard, s_total, records, meta, die)
            progress.shards += 1
            cur, records, bad, hist, tokens_sum = None, [], [], {}, 0
      finally:
        close = getattr(iterator, "close", None)
        if close is not None:
          close()
    seconds = time.monotonic() - t_start
    if log0 and pending:
      log0(progress.line())

    if wait_for_others:

      def all_done() -> bool:
        return all(shard_done(out, s, s_total) for s in range(s_total))

      if not all_done() and log0:
        log0(f"{tag}own shards done; waiting for the other processes")
      # No timeout: if another process dies, jax.distributed's heartbeat ends this one.
      _wait(all_done, poll_s, what=f"{tag}the other processes' shards", log=log0)
    complete = all(shard_done(out, s, s_total) for s in range(s_total))
    manifest = None
    if complete and (process_index == 0 or not wait_for_others):
      manifest = build_manifest(out)
      atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=1))
      if log0:
        log0(
          f"{tag}complete: {manifest['num_records']} images tokenized, {manifest['num_bad']} bad, "
          f"mean {manifest['mean_tokens_per_image']:.2f} tokens/image, histogram "
          f"{manifest['token_length_histogram']} -> {out / MANIFEST_FILE}"
        )
    elif not complete and log0:
      left = sum(not shard_done(out, s, s_total) for s in range(s_total))
      log0(f"{tag}{left} of {s_total} shards still pending (other processes)")
    return Result(
      out=out,
      complete=complete,
      manifest=manifest,
      shards_done=progress.shards,
      shards_skipped=len(mine) - len(pending),
      images=progress.images,
      bad=progress.bad,
      seconds=seconds,
      images_per_s=progress.seen / seconds if seconds > 0 else 0.0,
      mean_tokens=progress.tokens / progress.images if progress.images else 0.0,
    )


def _wait(
  cond: Callable[[], bool],
  poll_s: float,
  *,
  timeout_s: float | None = None,
  what: str = "",
  log: Log | None = None,
  every_s: float = 300.0,
) -> None:
  """Polls `cond` until true; raises TimeoutError after `timeout_s` (None: wait forever)."""
  start = last = time.monotonic()
  while not cond():
    now = time.monotonic()
    if timeout_s is not None and now - start > timeout_s:
      raise TimeoutError(f"gave up after {timeout_s:.0f} s waiting for {what}")
    if log and now - last >= every_s:
      last = now
      log(f"still waiting for {what}")
    time.sleep(poll_s)


# ------------------------------------------------------------------------------------------------
# Command line


def _flag(parser, name: str, **kw):
  names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
  parser.add_argument(*names, dest=name, **kw)


def parse_args(argv: list[str] | None = None):
  import argparse

  p = argparse.ArgumentParser(
    prog="python -m alit_jax.tokenize_dataset",
    description="Tokenize a dataset into variable-length token shards (resumable).",
  )
  _flag(p, "checkpoint", required=True, help="pretrained dir or official .pth checkpoint")
  _flag(p, "data", required=True, help="image folder, folder:PATH, TFDS name or synthetic:...")
  _flag(p, "out", required=True, help="output folder (rerun with the same OUT to resume)")
  _flag(p, "split", default="train", help="split of a TFDS/built source (default train)")
  _flag(p, "data_dir", default=None, help="TFDS data_dir")
  _flag(p, "criterion", default="l1", help="l1, mse or psnr (default l1)")
  _flag(p, "threshold", type=float, default=0.07, help="criterion threshold (default 0.07)")
  _flag(p, "batch", type=int, default=32, help="images per encode call per process")
  _flag(p, "shard_size", type=int, default=1024, help="records per shard (resume unit)")
  _flag(p, "token_dtype", default="auto", help="auto, int16, int32, float32, float16")
  _flag(p, "num_heads", type=int, default=None, help="attention heads (.pth checkpoints)")
  _flag(p, "no_resize", action="store_true", help="center crop only (no shorter-side resize)")
  _flag(p, "worker_count", type=int, default=0, help="grain decoding worker processes")
  _flag(p, "num_threads", type=int, default=8, help="grain reading threads")
  _flag(p, "log_every", type=float, default=30.0, help="seconds between progress lines")
  _flag(p, "coordinator_address", default=None, help="jax.distributed coordinator HOST:PORT")
  _flag(p, "num_processes", type=int, default=None, help="number of processes")
  _flag(p, "process_id", type=int, default=None, help="this process's index")
  _flag(p, "heartbeat_timeout", type=int, default=100, help="jax.distributed heartbeat (s)")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  from absl import flags
  from absl import logging as absl_logging

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
  absl_logging.use_absl_handler()

  def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)

  import jax

  from alit_jax.tokenizer import Tokenizer, local_mesh

  if args.coordinator_address:
    jax.distributed.initialize(
      coordinator_address=args.coordinator_address,
      num_processes=args.num_processes,
      process_id=args.process_id,
      heartbeat_timeout_seconds=args.heartbeat_timeout,
    )
    process_index, process_count = jax.process_index(), jax.process_count()
  elif args.num_processes is not None or args.process_id is not None:
    if args.num_processes is None or args.process_id is None:
      print("error: give both --num_processes and --process_id", file=sys.stderr)
      return 2
    process_index, process_count = args.process_id, args.num_processes
  else:
    process_index, process_count = 0, 1

  ckpt = args.checkpoint
  mesh = local_mesh()
  try:
    tok = Tokenizer.load(ckpt, num_heads=args.num_heads, mesh=mesh)
    result = tokenize_dataset(
      tok,
      args.out,
      args.data,
      split=args.split,
      data_dir=args.data_dir,
      checkpoint=os.path.abspath(ckpt),
      criterion=args.criterion,
      threshold=args.threshold,
      batch_size=args.batch,
      shard_size=args.shard_size,
      token_dtype=args.token_dtype,
      resize=not args.no_resize,
      process_index=process_index,
      process_count=process_count,
      wait_for_others=bool(args.coordinator_address) and process_count > 1,
      worker_count=args.worker_count,
      num_threads=args.num_threads,
      log=log,
      log_every_s=args.log_every,
    )
  except (FileNotFoundError, ValueError, OutputLockedError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  finally:
    if args.coordinator_address:
      jax.distributed.shutdown()
  if process_index == 0:
    status = "complete" if result.complete else "incomplete (other processes pending)"
    print(
      f"{result.out}: {status}; this process: {result.shards_done} shards written, "
      f"{result.shards_skipped} already done, {result.images} images, {result.bad} bad, "
      f"{result.images_per_s:.1f} img/s, mean {result.mean_tokens:.2f} tokens/image"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
