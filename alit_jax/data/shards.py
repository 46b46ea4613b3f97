"""Committed shards: the output layout and commit protocol of resumable, sharded jobs.

`python -m alit_jax.tokenize_dataset` (token shards) and `python -m alit_jax.data.base_cache`
(stage-1 base codes) both cut their source's records into S shards of K consecutive records and
write one output folder:

  OUT/job.json                                   the job's identity (`check_or_write_job`)
  OUT/shards/tokens-SSSSS-of-TTTTT.array_record  one file per shard, records in source order
  OUT/shards/tokens-SSSSS-of-TTTTT.json          the shard's counts and bad images
  OUT/manifest.json                              written once every shard is committed

Commit protocol (`write_shard`): a shard's records are written under a temporary name, fsynced
and renamed into place, then its JSON is written the same way; a shard counts as done only when
both exist (`shard_done`). A rerun skips done shards and recomputes the rest, after deleting the
temporary files a killed run left (`own_shards`), so a kill at any moment loses no committed
shard and never duplicates a record: shards are keyed by their fixed record range.

Work (`shard_work`, `ShardRecords`, `shard_batches`): a process's pending shards are read
through grain, each padded to a whole number of batches (index -1), so batches never straddle
shards and a shard's batches are the same in every run. A job's grain map starts each prepared
record with `record_head`, batches them with `collate`, and gathers a shard's records in a
`ShardBuffer` until the shard is complete. `Progress` counts images and prints the job's lines.

Only the standard library and numpy are imported at module import (grain, jax and
array_record when used).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from alit_jax.data.files import TMP_PREFIX, atomic_write_text, fsync_file, temp_path

JOB_FILE = "job.json"
MANIFEST_FILE = "manifest.json"
SHARD_DIR = "shards"
# Keys of job.json that only record provenance and may differ on resume.
INFO_KEYS = (("checkpoint", "path"), ("data", "spec"), ("data", "data_dir"))

Log = Callable[[str], None]


def default_log(msg: str) -> None:
  """A job's default progress log: absl's INFO log."""
  from absl import logging

  logging.info("%s", msg)


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


def identity_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
  """The differences of two job descriptions ("key: old (in OUT) != new (this run)").

  The provenance keys (`INFO_KEYS`: checkpoint path, data spec and data_dir) are not compared.
  """
  out = []
  for k in sorted(set(old) | set(new)):
    key = f"{prefix}{k}"
    if tuple(key.split(".")) in INFO_KEYS:
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


def check_or_write_job(
  out: pathlib.Path, job: dict, *, write: bool = True, holds: str = "the outputs"
) -> None:
  """Refuses an OUT made by a different job; writes job.json if absent and `write`.

  Args:
    out: the output folder.
    job: this run's job.json dict.
    write: write job.json when OUT has none (False: only check an existing one).
    holds: what OUT holds, for the refusal ("tokens", "the base cache").

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
        f"{out} holds {holds} of a different job; refusing to resume into it. Differences:\n  "
        + "\n  ".join(diff)
        + "\nUse another --out (or delete this one to start over)."
      )
    return
  if write:
    atomic_write_text(path, json.dumps(job, indent=2, sort_keys=True))


def source_fingerprint(source) -> str:
  """A location-independent identity of a source's record list (recorded in job.json).

  The source's own `fingerprint()` when it has one (`image_folder.ImageFileSource`), else the
  TFDS name, version, split and size of a TFDS-layout source, else its type, repr and size.
  """
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
# Shard files


def shard_name(shard: int, num_shards: int) -> str:
  """The file stem of shard `shard` of `num_shards` ("tokens-00003-of-00010")."""
  w = max(5, len(str(num_shards)))
  return f"tokens-{shard:0{w}d}-of-{num_shards:0{w}d}"


def shard_done(out: pathlib.Path, shard: int, num_shards: int) -> bool:
  """The shard is committed: both its data file and its JSON exist."""
  base = out / SHARD_DIR / shard_name(shard, num_shards)
  return base.with_suffix(".json").is_file() and base.with_suffix(".array_record").is_file()


def all_committed(out: pathlib.Path, num_shards: int) -> bool:
  """Every shard of the job is committed."""
  return all(shard_done(out, s, num_shards) for s in range(num_shards))


def num_pending(out: pathlib.Path, num_shards: int) -> int:
  """The number of shards not committed yet."""
  return sum(not shard_done(out, s, num_shards) for s in range(num_shards))


def write_shard(
  out: pathlib.Path,
  shard: int,
  num_shards: int,
  records: Iterable[bytes],
  meta: dict,
  die: Callable[[str], None] | None = None,
) -> None:
  """Commits one shard: records under a temporary name, renamed, then its JSON.

  Args:
    out: the output folder.
    shard, num_shards: the shard and the job's shard count.
    records: the shard's serialised records, in order.
    meta: the shard's JSON.
    die: test hook, called with "tmp" (data written under the temporary name), "data" (data
      renamed, JSON not yet written) and "commit" (both done).
  """
  from array_record.python.array_record_module import ArrayRecordWriter

  d = out / SHARD_DIR
  base = shard_name(shard, num_shards)
  data, info = d / f"{base}.array_record", d / f"{base}.json"
  info.unlink(missing_ok=True)  # a stale JSON must never vouch for new data
  tmp = temp_path(data)
  writer = ArrayRecordWriter(str(tmp), "group_size:1")
  try:
    for r in records:
      writer.write(r)
  finally:
    writer.close()
  fsync_file(tmp)
  die = die or (lambda stage: None)
  die("tmp")
  os.replace(tmp, data)
  die("data")
  atomic_write_text(info, json.dumps(meta, indent=1, sort_keys=True))
  die("commit")


def clean_tmp(out: pathlib.Path, shards, num_shards: int) -> None:
  """Removes leftovers of killed runs for the shards this process now owns."""
  names = {shard_name(s, num_shards) for s in shards}
  for p in (out / SHARD_DIR).glob(f"{TMP_PREFIX}tokens-*"):
    if p.name[len(TMP_PREFIX) :].split(".")[0] in names:
      p.unlink(missing_ok=True)


def own_shards(
  out: pathlib.Path, num_shards: int, process_index: int, process_count: int
) -> tuple[list[int], list[int]]:
  """(this process's shards p, p + P, ..., those not committed yet); cleans their leftovers."""
  mine = list(range(process_index, num_shards, process_count))
  pending = [s for s in mine if not shard_done(out, s, num_shards)]
  clean_tmp(out, mine, num_shards)
  return mine, pending


def committed_shards(out: pathlib.Path) -> tuple[dict, list[tuple[str, dict]]]:
  """job.json and, per shard, (its data file relative to OUT, its JSON), for the manifest.

  Raises:
    FileNotFoundError: a shard is not committed yet.
  """
  job = json.loads((out / JOB_FILE).read_text())
  s_total = job["num_shards"]
  shards = []
  for s in range(s_total):
    if not shard_done(out, s, s_total):
      raise FileNotFoundError(f"{out}: shard {s} of {s_total} is not committed yet")
    base = shard_name(s, s_total)
    meta = json.loads((out / SHARD_DIR / f"{base}.json").read_text())
    shards.append((f"{SHARD_DIR}/{base}.array_record", meta))
  return job, shards


def write_manifest(out: pathlib.Path, manifest: dict) -> None:
  """Writes OUT/manifest.json (atomically: its presence means the job is complete)."""
  atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=1))


# ------------------------------------------------------------------------------------------------
# Reading the pending shards


def shard_work(
  pending: Iterable[int], n: int, shard_size: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray, int]:
  """The pending shards' work list, each shard padded to a multiple of the batch.

  Args:
    pending: the shards to compute.
    n: the number of source records the job covers.
    shard_size, batch_size: records per shard and per batch.

  Returns:
    (shards, indices, total): (M,) int64 shard of each entry, (M,) int64 source index of each
    entry (-1 for padding), and the number of real records.
  """
  shard_col, index_col, total = [], [], 0
  for s in pending:
    lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
    m = math.ceil((hi - lo) / batch_size) * batch_size
    idx = np.full((m,), -1, np.int64)
    idx[: hi - lo] = np.arange(lo, hi)
    shard_col.append(np.full((m,), s, np.int64))
    index_col.append(idx)
    total += hi - lo
  if not shard_col:
    return np.zeros((0,), np.int64), np.zeros((0,), np.int64), 0
  return np.concatenate(shard_col), np.concatenate(index_col), total


class ShardRecords:
  """The work list as a random-access source: entry k is {"shard", "index"} + the source record.

  Padding entries (index -1) hold only "shard" and "index". With `catch_errors`, a source read
  that raises gives {"error": reason} (a bad image) instead of failing the job.
  """

  def __init__(self, source, shards: np.ndarray, indices: np.ndarray, catch_errors: bool = False):
    self.source = source
    self.shards = np.asarray(shards, np.int64)
    self.indices = np.asarray(indices, np.int64)
    self.catch_errors = bool(catch_errors)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, k: int) -> dict:
    idx = int(self.indices[int(k)])
    out = {"shard": int(self.shards[int(k)]), "index": idx}
    if idx < 0:
      return out
    if not self.catch_errors:
      out.update(self.source[idx])
      return out
    try:
      out.update(self.source[idx])
    except Exception as e:  # an unreadable record is a bad image, not a crashed job
      out["error"] = f"cannot read record: {type(e).__name__}: {e}"
    return out


@contextlib.contextmanager
def shard_batches(
  records: ShardRecords,
  prepare,
  collate: Callable[[list], dict],
  batch_size: int,
  *,
  num_threads: int,
  prefetch_buffer_size: int,
  worker_count: int,
) -> Iterator[Iterator[dict]]:
  """The work list read through grain: `prepare` per record, `collate` per batch.

  Args:
    records: the work list (`ShardRecords`).
    prepare: a `grain.transforms.Map` (decoding, never raising).
    collate: grain's `batch_fn`.
    batch_size: records per batch (shards are padded to it, so batches never straddle them).
    num_threads, prefetch_buffer_size: grain reading threads and buffer.
    worker_count: grain worker processes (0: none).

  Yields:
    The batch iterator; it is closed (grain workers stopped) when the block exits.
  """
  import grain

  ds = grain.MapDataset.source(records).map(prepare).batch(batch_size, batch_fn=collate)
  it = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
  )
  if worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  iterator = iter(it)
  try:
    yield iterator
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()


def record_head(record: dict) -> dict:
  """The fields every prepared record starts with (before its arrays are added).

  Args:
    record: a `ShardRecords` entry ({"shard", "index"} + the source record).

  Returns:
    {"shard", "index", "label" (-1 if none), "id" (the file name, else the index; "" for
    padding), "error" (the read error of `ShardRecords`/the source, else "")}.
  """
  out = {
    "shard": record["shard"],
    "index": record["index"],
    "label": int(record.get("label", -1)),
    "id": "",
    "error": "",
  }
  if record["index"] >= 0:
    name = record.get("file_name", "")
    out["id"] = name if name else str(record["index"])
    out["error"] = record.get("error") or ""
  return out


def collate(rows: list[dict], key: str) -> dict:
  """grain's `batch_fn` for prepared records: `rows[i][key]` stacked, the head fields as columns.

  Returns:
    {key: (B, ...) stacked arrays, "shard", "index", "label": (B,) int64, "id", "error": lists}.
  """
  return {
    key: np.stack([r[key] for r in rows]),
    "shard": np.array([r["shard"] for r in rows], np.int64),
    "index": np.array([r["index"] for r in rows], np.int64),
    "label": np.array([r["label"] for r in rows], np.int64),
    "id": [r["id"] for r in rows],
    "error": [r["error"] for r in rows],
  }


def batch_rows(batch: dict) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
  """(shard, real, good, rows) of a collated batch.

  `real` (B,) bool marks non-padding rows, `good` the real rows without an error, `rows` the
  indices of the good rows.
  """
  real = batch["index"] >= 0
  good = real & np.array([not e for e in batch["error"]])
  return int(batch["shard"][0]), real, good, np.flatnonzero(good)


class ShardBuffer:
  """The shard being computed: its records and bad images until its whole range is seen.

  Batches come in work-list order (`shard_work`), so one shard's batches are consecutive and the
  shard is complete when its good and bad images add up to its record range.

  Attributes:
    shard: the current shard (None before its first batch).
    records: its serialised records; bad: its bad images ({"index", "id", "reason"}).
    images: its good images (a job may write several records per image).
  """

  def __init__(self, n: int, shard_size: int):
    self.n, self.shard_size = int(n), int(shard_size)
    self.clear()

  def clear(self) -> None:
    """Starts afresh (after a commit)."""
    self.shard: int | None = None
    self.records: list[bytes] = []
    self.bad: list[dict] = []
    self.images = 0

  def begin(self, batch: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Takes a collated batch of the current shard; returns (real, good, rows) (`batch_rows`)."""
    shard, real, good, rows = batch_rows(batch)
    if self.shard is not None and shard != self.shard:
      raise AssertionError("internal error: a batch straddles shards")  # pragma: no cover
    self.shard = shard
    return real, good, rows

  def add_bad(self, batch: dict, r: int) -> None:
    """Records row r of the batch as a bad image (its index, id and error)."""
    self.bad.append(
      {"index": int(batch["index"][r]), "id": batch["id"][r], "reason": batch["error"][r]}
    )

  def bounds(self) -> tuple[int, int]:
    """The current shard's source records [start, stop)."""
    lo = self.shard * self.shard_size
    return lo, min(self.n, lo + self.shard_size)

  def full(self) -> bool:
    """Every record of the current shard is a good or a bad image."""
    lo, hi = self.bounds()
    return self.images + len(self.bad) == hi - lo

  def meta(self, fmt: str, process_index: int, process_count: int, **extra) -> dict:
    """The shard's JSON: format, shard, start, stop, num_records, bad, written_by + `extra`."""
    lo, hi = self.bounds()
    return {
      "format": fmt,
      "shard": self.shard,
      "start": lo,
      "stop": hi,
      "num_records": len(self.records),
      "bad": self.bad,
      "written_by": {"process_index": process_index, "process_count": process_count},
      **extra,
    }


# ------------------------------------------------------------------------------------------------
# Progress


class Progress:
  """A job's counters and periodic progress lines (the line itself is the subclass's `line`).

  Attributes:
    images, bad, seen: good images done, bad images met, and both (the rate counts `seen`).
    shards: shards committed.
  """

  def __init__(self, log: Log | None, total: int, every_s: float):
    self.log, self.total, self.every_s = log, total, every_s
    self.start = self.last = time.monotonic()
    self.images = self.bad = self.seen = self.shards = 0

  def update(self, images: int, bad: int, seen: int) -> None:
    self.images += images
    self.bad += bad
    self.seen += seen
    now = time.monotonic()
    if self.log is not None and now - self.last >= self.every_s:
      self.last = now
      self.log(self.line())

  def rate_and_eta(self) -> tuple[float, str]:
    """(images seen per second, the remaining time as H:M:S or "?")."""
    dt = max(time.monotonic() - self.start, 1e-9)
    rate = self.seen / dt
    eta = (self.total - self.seen) / rate if rate > 0 else float("inf")
    return rate, time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"

  def line(self) -> str:
    raise NotImplementedError
