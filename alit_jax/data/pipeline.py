"""grain input pipelines: infinite, resumable training batches and padded, masked eval batches.

Built on grain's dataset API (`MapDataset` -> `IterDataset`), not `grain.DataLoader`:
  * random access end to end, so process sharding, per-epoch shuffling and per-record
    augmentation RNG are pure functions of (seed, position): the same seed gives the same batches
    with or without worker processes (for `worker_count` 0 or 1);
  * the iterator state is a small JSON dict (`{"next_index": k}` in-process; per-worker states
    with `mp_prefetch`) that the trainer can store in an Orbax checkpoint
    (`grain.checkpoint.CheckpointSave/Restore` or `ocp.args.JsonSave(it.get_state())`);
  * corrupt records are filtered lazily (`MapDataset.filter` -> skipped by `to_iter_dataset`),
    which `DataLoader` cannot express before batching without losing random access.

Sharding follows torch's DistributedSampler, which the reference uses: each epoch is one global
permutation of the whole source (reshuffled every epoch), and process p takes positions
p, p + P, p + 2P, ... of the concatenated epochs. Every process decodes only its own records.

Batches are dicts of numpy arrays:
  train: image (B, H, W, 3) uint8, label (B,) int32, index (B,) int64
  eval:  the same plus mask (B,) bool; padding rows have mask False, index -1, label -1 and a
         zero image.
B is the per-process batch (global batch // process_count). Images are uint8: use
`transforms.to_float` on device (see transforms.py for why).

Worker processes (`worker_count > 0`) use `spawn`: the entry point needs an
`if __name__ == "__main__":` guard and parsed absl flags (`absl.app.run`), and the iterator
should be `close()`d before exit to avoid noisy shutdown messages. Restoring a state requires the
same source, seed, batch size, process layout and `worker_count`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import grain
import numpy as np

from alit_jax.data import transforms as T


def process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(process index, process count), each defaulting to jax's; ValueError if out of range."""
  if process_index is None or process_count is None:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return int(process_index), int(process_count)


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
  """Each process's share of the global batch; ValueError unless it divides evenly."""
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f"global batch size {global_batch_size} must be a positive multiple of the process count "
      f"{process_count}"
    )
  return global_batch_size // process_count


class IndexedSource:
  """Wraps a source so each record carries its position in the source as `index`."""

  def __init__(self, source):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    rec = dict(self.source[index])
    rec["index"] = int(index)
    return rec

  def __repr__(self) -> str:
    return f"IndexedSource({self.source!r})"


def make_train_dataset(
  source,
  *,
  global_batch_size: int,
  image_size: int,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
  worker_count: int = 0,
  num_threads: int = 8,
  prefetch_buffer_size: int = 128,
  worker_buffer_size: int = 2,
  shuffle: bool = True,
  scale: tuple[float, float] = (0.8, 1.0),
  ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
  flip_prob: float = 0.5,
  interpolation: str = "bilinear",
) -> grain.IterDataset:
  """The training `grain.IterDataset` (see `make_train_iterator` for the arguments)."""
  process_index, process_count = process_layout(process_index, process_count)
  local_bs = per_process_batch_size(global_batch_size, process_count)
  if len(source) < process_count:
    raise ValueError(f"source has {len(source)} records, fewer than {process_count} processes")
  ds = grain.MapDataset.source(IndexedSource(source)).seed(seed)
  if shuffle:
    ds = ds.shuffle()
  ds = ds.repeat(None)  # infinite; reshuffled every epoch
  # Augment before sharding so the per-record RNG is keyed by the global position (no two
  # processes share crops); slicing is lazy, so each process still decodes only its records.
  ds = (
    ds.map(T.DecodeImage())
    .filter(T.IsValid())
    .random_map(T.TrainAugment(image_size, scale, ratio, flip_prob, interpolation))
    .map(T.SelectKeys(("image", "label", "index")))
  )
  ds = ds[process_index::process_count]
  it = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
  ).batch(local_bs, drop_remainder=True)
  if worker_count > 0:
    it = it.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
      )
    )
  return it


def make_train_iterator(
  source,
  *,
  global_batch_size: int,
  image_size: int,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
  worker_count: int = 0,
  num_threads: int = 8,
  prefetch_buffer_size: int = 128,
  worker_buffer_size: int = 2,
  shuffle: bool = True,
  scale: tuple[float, float] = (0.8, 1.0),
  ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
  flip_prob: float = 0.5,
  interpolation: str = "bilinear",
) -> grain.DatasetIterator:
  """Infinite iterator of augmented training batches for this process.

  Args:
    source: random-access source (`sources.get_source(...)`).
    global_batch_size: batch over all processes; each yields global_batch_size // process_count.
    image_size: output side of the random resized crop.
    seed: shuffle + augmentation seed (same seed -> same batches).
    process_index, process_count: this process and the number of processes (default: jax's).
    worker_count: grain worker processes (0: decode in threads of this process).
    num_threads: decoding threads (per worker process when worker_count > 0).
    prefetch_buffer_size: records prefetched by those threads.
    worker_buffer_size: batches buffered per worker process.
    shuffle: shuffle each epoch (off only for debugging).
    scale, ratio, flip_prob, interpolation: augmentation (`transforms.TrainAugment`).

  Returns:
    A `grain.DatasetIterator` yielding {"image": (B, H, W, 3) uint8, "label": (B,) int32,
    "index": (B,) int64}; `get_state()` is a JSON-serialisable dict, `set_state(state)` on a
    freshly built iterator with the same arguments resumes exactly. Call `close()` when done.
  """
  return iter(
    make_train_dataset(
      source,
      global_batch_size=global_batch_size,
      image_size=image_size,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
      worker_count=worker_count,
      num_threads=num_threads,
      prefetch_buffer_size=prefetch_buffer_size,
      worker_buffer_size=worker_buffer_size,
      shuffle=shuffle,
      scale=scale,
      ratio=ratio,
      flip_prob=flip_prob,
      interpolation=interpolation,
    )
  )


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full global batches per pass over `num_examples` records (epoch bookkeeping for logs)."""
  return num_examples // global_batch_size


# ------------------------------------------------------------------------------------------------
# Evaluation


class EvalShardSource:
  """This process's eval records, padded to `num_batches * batch_size` with masked dummies."""

  def __init__(self, source, indices: np.ndarray):
    self.source = source
    self.indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, k: int) -> dict:
    idx = int(self.indices[int(k)])
    if idx < 0:
      return {"image": None, "label": -1, "index": -1, "mask": False, "valid": False}
    rec = dict(self.source[idx])
    rec.update(index=idx, mask=True)
    return rec


class _EvalFinalize(grain.transforms.Map):
  """mask &= decoded; corrupt rows look like padding except for their index."""

  def map(self, record: dict) -> dict:
    out = dict(record)
    out["mask"] = bool(record["mask"]) and bool(record.get("valid", True))
    if not out["mask"]:
      out["label"] = -1
    return out


def eval_shard_indices(
  num_examples: int, local_batch_size: int, process_index: int, process_count: int
) -> np.ndarray:
  """Source indices read by one process, -1 for padding.

  Process p reads p, p + P, ...; every process gets the same number of batches
  (ceil(ceil(N / P) / B)), so SPMD eval steps line up across hosts.
  """
  per_process = math.ceil(num_examples / process_count)
  num_batches = max(1, math.ceil(per_process / local_batch_size))
  own = np.arange(process_index, num_examples, process_count, dtype=np.int64)
  out = np.full((num_batches * local_batch_size,), -1, np.int64)
  out[: len(own)] = own
  return out


class EvalBatches:
  """Re-iterable eval batches with static shapes; `len()` is the number of batches.

  Each `iter()` starts a fresh pass (and fresh worker processes when worker_count > 0), closed
  when the pass ends or the generator is closed.
  """

  def __init__(self, dataset: grain.MapDataset, num_examples: int, indices: np.ndarray, opts):
    self._dataset = dataset
    self._opts = opts
    self.num_examples = int(num_examples)
    self.local_indices = indices
    self.local_num_examples = int((indices >= 0).sum())
    self.num_batches = len(dataset)

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict]:
    num_threads, prefetch, worker_count, buffer = self._opts
    it = self._dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    )
    if worker_count > 0:
      it = it.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=buffer)
      )
    iterator = iter(it)
    try:
      yield from iterator
    finally:
      iterator.close()


def make_eval_iterator(
  source,
  *,
  batch_size: int,
  image_size: int,
  process_index: int | None = None,
  process_count: int | None = None,
  worker_count: int = 0,
  num_threads: int = 8,
  prefetch_buffer_size: int = 64,
  worker_buffer_size: int = 2,
  resize: bool = True,
  interpolation: str = "bicubic",
) -> EvalBatches:
  """Every example exactly once across processes, in padded, masked batches.

  Args:
    source: random-access source.
    batch_size: global eval batch; each process yields batch_size // process_count rows.
    image_size: output side.
    process_index, process_count: this process and the number of processes (default: jax's).
    worker_count: grain worker processes (0: threads only).
    num_threads, prefetch_buffer_size, worker_buffer_size: as in `make_train_iterator`.
    resize: resize the shorter side to image_size (bicubic, antialiased) before the center crop;
      False = center crop only (the reference's ImageNet validation transform).
    interpolation: resize filter.

  Returns:
    `EvalBatches`; iterating yields {"image": (B, S, S, 3) uint8, "label": (B,) int32,
    "index": (B,) int64, "mask": (B,) bool}. Sum of mask over all processes and batches = number
    of decodable examples; corrupt examples appear once with mask False and their index.
  """
  process_index, process_count = process_layout(process_index, process_count)
  local_bs = per_process_batch_size(batch_size, process_count)
  indices = eval_shard_indices(len(source), local_bs, process_index, process_count)
  ds = (
    grain.MapDataset.source(EvalShardSource(source, indices))
    .map(T.DecodeImage())
    .map(T.EvalPreprocess(image_size, resize=resize, interpolation=interpolation))
    .map(_EvalFinalize())
    .map(T.SelectKeys(("image", "label", "index", "mask")))
    .batch(local_bs)
  )
  opts = (num_threads, prefetch_buffer_size, worker_count, worker_buffer_size)
  return EvalBatches(ds, len(source), indices, opts)
