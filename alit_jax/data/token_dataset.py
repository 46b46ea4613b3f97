"""Reading token shards written by `python -m alit_jax.tokenize_dataset`, for downstream training.

```python
from alit_jax.data import token_dataset
ds = token_dataset(OUT)                 # random access; grain.MapDataset.source(ds) works
rec = ds[0]                             # {"tokens": (L,) int or (L, D) float, "length": L, "id",
                                        #  "index", "label", "scores": (L / T,) float32}
for batch in ds.batches(64, shuffle=True, seed=0):
  batch["tokens"]                       # (B, bucket), padded with -1 (0.0 for continuous)
  batch["lengths"], batch["ids"]        # (B,) int32, list of B ids
images = tokenizer.decode(batch["tokens"], batch["lengths"])
```

Buckets default to the job's token counts (T, 2T, ..., N*T). `batches` groups records by bucket
(no padding at all with the default buckets, since every length is a token count); with
`group_by_length=False` consecutive records are padded to the bucket of the longest one. The
record format is described in `alit_jax.tokenize_dataset`.

Only numpy and msgpack are imported at module import; grain and array_record when reading.
"""

from __future__ import annotations

import bisect
import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

MANIFEST_FILE = "manifest.json"
JOB_FILE = "job.json"
SHARD_DIR = "shards"


def decode_record(raw: bytes, token_dtype: str, latent_dim: int | None = None) -> dict:
  """One serialised record -> {"tokens", "length", "id", "index", "label", "scores"}.

  Args:
    raw: msgpack bytes of a record.
    token_dtype: the job's `token_dtype`.
    latent_dim: D for continuous tokens (None: quantized, tokens are (L,)).
  """
  import msgpack

  r = msgpack.unpackb(raw, raw=False)
  length = int(r["length"])
  tokens = np.frombuffer(r["tokens"], dtype=np.dtype(token_dtype).newbyteorder("<"))
  tokens = tokens.reshape((length,) if latent_dim is None else (length, latent_dim))
  return {
    "tokens": tokens.astype(np.dtype(token_dtype)),
    "length": length,
    "id": r["id"],
    "index": int(r["index"]),
    "label": int(r["label"]),
    "scores": np.frombuffer(r["scores"], dtype="<f4").astype(np.float32),
  }


def _shard_files(out: pathlib.Path, job: dict) -> list[pathlib.Path]:
  """Committed shards (data file + JSON) of a possibly unfinished job, in shard order."""
  from alit_jax.data.shards import shard_done, shard_name

  s_total = job["num_shards"]
  return [
    out / SHARD_DIR / f"{shard_name(s, s_total)}.array_record"
    for s in range(s_total)
    if shard_done(out, s, s_total)
  ]


class TokenDataset:
  """Random-access source of tokenized images (grain `MapDataset.source` compatible, picklable).

  Attributes:
    out: the tokenization folder.
    manifest: manifest.json (None when opened with `allow_incomplete` before completion).
    job: job.json (checkpoint, config, criterion, token dtype, ...).
    files: the array_record shard files read, in source order.
    quantized, token_dtype, latent_dim, token_counts: token format.
  """

  def __init__(self, out: str | os.PathLike, *, allow_incomplete: bool = False):
    self.out = pathlib.Path(out).expanduser().absolute()
    mpath = self.out / MANIFEST_FILE
    if mpath.is_file():
      self.manifest = json.loads(mpath.read_text())
      self.job = self.manifest["job"]
      self.files = [self.out / s["file"] for s in self.manifest["shards"]]
      self.num_records_per_file = [int(s["num_records"]) for s in self.manifest["shards"]]
    elif (self.out / JOB_FILE).is_file():
      self.job = json.loads((self.out / JOB_FILE).read_text())
      self.files = _shard_files(self.out, self.job)
      if not allow_incomplete:
        raise FileNotFoundError(
          f"{self.out}: no {MANIFEST_FILE}, the tokenization is incomplete "
          f"({len(self.files)} of {self.job['num_shards']} shards committed). Rerun "
          "`python -m alit_jax.tokenize_dataset` with the same --out to finish it, or pass "
          "allow_incomplete=True to read the committed shards."
        )
      self.manifest = None
      self.num_records_per_file = None
    else:
      raise FileNotFoundError(
        f"{self.out}: not a tokenized dataset (no {MANIFEST_FILE} or {JOB_FILE}); write one with "
        "`python -m alit_jax.tokenize_dataset --checkpoint DIR --data SRC --out OUT`"
      )
    self.quantized = bool(self.job["quantized"])
    self.token_dtype = str(self.job["token_dtype"])
    self.latent_dim = None if self.quantized else int(self.job["latent_dim"])
    self.token_counts = [int(x) for x in self.job["token_counts"]]
    self._source = None

  def _reader(self):
    if self._source is None:
      import grain

      self._source = grain.sources.ArrayRecordDataSource([str(f) for f in self.files])
    return self._source

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state["_source"] = None  # reopened lazily in the receiving process
    return state

  def __len__(self) -> int:
    if self.num_records_per_file is not None:
      return sum(self.num_records_per_file)
    return len(self._reader())

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    n = len(self)
    if not -n <= i < n:
      raise IndexError(f"record {i} out of range for {n} records")
    return decode_record(self._reader()[i % n], self.token_dtype, self.latent_dim)

  @property
  def pad_value(self) -> int | float:
    """-1 for quantized tokens (the `Encoding` convention), 0.0 for continuous ones."""
    return -1 if self.quantized else 0.0

  def batches(
    self,
    batch_size: int,
    *,
    buckets: Sequence[int] | None = None,
    group_by_length: bool = True,
    shuffle: bool = False,
    seed: int = 0,
    num_epochs: int | None = 1,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = False,
    pad_value: int | float | None = None,
    num_threads: int = 8,
  ) -> Iterator[dict]:
    """Padded batches for training (see `bucket_batches` / `pad_to_bucket`).

    Args:
      batch_size: records per batch.
      buckets: padded lengths (default: the job's token counts).
      group_by_length: batch records of the same bucket together (minimal padding); False pads
        consecutive records to the bucket of the longest.
      shuffle, seed: shuffle the records (reshuffled every epoch).
      num_epochs: passes over the data (None: forever).
      process_index, process_count: take every process_count-th record from process_index.
      drop_remainder: drop incomplete batches (per bucket when grouping).
      pad_value: token padding (default `self.pad_value`).
      num_threads: grain reading threads.

    Yields:
      Dicts from `pad_to_bucket`.
    """
    import grain

    ds = grain.MapDataset.source(self)
    if shuffle:
      ds = ds.seed(seed).shuffle()
    ds = ds.repeat(num_epochs)
    ds = ds[process_index::process_count]
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads))
    yield from bucket_batches(
      it,
      batch_size,
      buckets=buckets or self.token_counts,
      group_by_length=group_by_length,
      drop_remainder=drop_remainder,
      pad_value=self.pad_value if pad_value is None else pad_value,
    )

  def __repr__(self) -> str:
    state = "complete" if self.manifest is not None else "incomplete"
    return f"TokenDataset({str(self.out)!r}, {len(self)} records, {state})"


def token_dataset(out: str | os.PathLike, *, allow_incomplete: bool = False) -> TokenDataset:
  """Opens a folder written by `python -m alit_jax.tokenize_dataset` (see `TokenDataset`)."""
  return TokenDataset(out, allow_incomplete=allow_incomplete)


def bucket_of(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= length (buckets sorted ascending)."""
  k = bisect.bisect_left(buckets, length)
  if k == len(buckets):
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")
  return int(buckets[k])


def pad_to_bucket(
  records: Sequence[dict], buckets: Sequence[int], pad_value: int | float = -1
) -> dict:
  """Stacks records, padding tokens to the smallest bucket that holds the longest one.

  Usable as grain's `batch_fn` via `functools.partial(pad_to_bucket, buckets=..., pad_value=...)`.

  Returns:
    {"tokens": (B, bucket) or (B, bucket, D), "lengths": (B,) int32, "ids": list of B str,
    "index": (B,) int64, "label": (B,) int32}.
  """
  buckets = sorted(int(b) for b in buckets)
  width = bucket_of(max(int(r["length"]) for r in records), buckets)
  first = records[0]["tokens"]
  tokens = np.full((len(records), width, *first.shape[1:]), pad_value, dtype=first.dtype)
  for k, r in enumerate(records):
    tokens[k, : r["length"]] = r["tokens"]
  return {
    "tokens": tokens,
    "lengths": np.array([r["length"] for r in records], np.int32),
    "ids": [r["id"] for r in records],
    "index": np.array([r["index"] for r in records], np.int64),
    "label": np.array([r["label"] for r in records], np.int32),
  }


def bucket_batches(
  records: Iterable[dict],
  batch_size: int,
  *,
  buckets: Sequence[int],
  group_by_length: bool = True,
  drop_remainder: bool = False,
  pad_value: int | float = -1,
) -> Iterator[dict]:
  """Batches a record stream with padding to buckets.

  With `group_by_length`, each bucket fills its own batch (a batch is emitted when full), and
  partial batches are flushed at the end in bucket order unless `drop_remainder`. Otherwise
  consecutive records form a batch padded to the bucket of its longest record.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  buckets = sorted(int(b) for b in buckets)
  if not group_by_length:
    buf: list[dict] = []
    for r in records:
      buf.append(r)
      if len(buf) == batch_size:
        yield pad_to_bucket(buf, buckets, pad_value)
        buf = []
    if buf and not drop_remainder:
      yield pad_to_bucket(buf, buckets, pad_value)
    return
  pending: dict[int, list[dict]] = {}
  for r in records:
    b = bucket_of(int(r["length"]), buckets)
    group = pending.setdefault(b, [])
    group.append(r)
    if len(group) == batch_size:
      yield pad_to_bucket(group, buckets, pad_value)
      pending[b] = []
  if not drop_remainder:
    for b in sorted(pending):
      if pending[b]:
        yield pad_to_bucket(pending[b], buckets, pad_value)


def records_equal(a: dict, b: dict) -> bool:
  """Two decoded records are identical (tokens, scores bit for bit, and metadata)."""
  keys = ("length", "id", "index", "label")
  return (
    all(a[k] == b[k] for k in keys)
    and a["tokens"].dtype == b["tokens"].dtype
    and np.array_equal(a["tokens"], b["tokens"])
    and np.array_equal(a["scores"], b["scores"], equal_nan=True)
  )


__all__ = [
  "TokenDataset",
  "bucket_batches",
  "bucket_of",
  "decode_record",
  "pad_to_bucket",
  "records_equal",
  "token_dataset",
]
