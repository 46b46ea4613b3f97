"""Reading a complete base cache: `BaseCache`, `check_for_training`, `make_train_iterator`."""

from __future__ import annotations

import bisect
import json
import os
import pathlib
from typing import Any

import grain
import numpy as np

from alit_jax.data import shards
from alit_jax.data.base_cache.records import FORMAT, Augment, base_json, decode_record
from alit_jax.data.shards import JOB_FILE, MANIFEST_FILE

# ------------------------------------------------------------------------------------------------
# Reading


class BaseCache:
  """Random-access reader of a complete cache (picklable; the reader reopens lazily).

  Attributes:
    out: the cache folder.
    manifest, job: manifest.json and its job (job.json).
    views: K; num_images: cached (good) images; len(cache) = num_images.
    files: the shard files, in record order.
  """

  def __init__(self, out: str | os.PathLike):
    self.out = pathlib.Path(out).expanduser().absolute()
    mpath = self.out / MANIFEST_FILE
    if not mpath.is_file():
      if (self.out / JOB_FILE).is_file():
        raise FileNotFoundError(
          f"{self.out}: no {MANIFEST_FILE}, the base cache is incomplete; rerun "
          "`python -m alit_jax.data.base_cache` with the same --config and --out to finish it"
        )
      raise FileNotFoundError(
        f"{self.out}: not a base cache (no {MANIFEST_FILE}); build one with `python -m "
        "alit_jax.data.base_cache --config=CONFIG.py --out DIR`"
      )
    try:
      self.manifest = json.loads(mpath.read_text())
    except ValueError as e:
      raise ValueError(f"{mpath}: unreadable manifest ({e})") from e
    if self.manifest.get("format") != FORMAT:
      raise ValueError(f"{mpath}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
    self.job = self.manifest["job"]
    self.views = int(self.job["views"])
    self.layout = self.job["record"]
    self.files = [self.out / s["file"] for s in self.manifest["shards"]]
    for f in self.files:
      if not f.is_file():
        raise FileNotFoundError(f"{f}: shard listed in {mpath} is missing")
    counts = [int(s["num_records"]) for s in self.manifest["shards"]]
    self._ends = np.cumsum(counts).tolist()
    self.num_records = int(sum(counts))
    self.num_images = int(self.manifest["num_images"])
    if self.num_records != self.num_images * self.views:
      raise ValueError(
        f"{mpath}: {self.num_records} records for {self.num_images} images x {self.views} views"
      )
    self._source = None

  def _reader(self):
    if self._source is None:
      self._source = grain.sources.ArrayRecordDataSource([str(f) for f in self.files])
    return self._source

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __len__(self) -> int:
    return self.num_images

  def record(self, r: int) -> dict:
    """Record r (image r // K, view r % K) decoded; errors name the shard file."""
    r = int(r)
    if not 0 <= r < self.num_records:
      raise IndexError(f"record {r} out of range for {self.num_records} records of {self.out}")
    try:
      return decode_record(self._reader()[r], self.layout)
    except Exception as e:
      f = self.files[bisect.bisect_right(self._ends, r)]
      raise ValueError(f"{f}: cannot read record {r} of the base cache: {e}") from e

  def view(self, image: int, view: int) -> dict:
    """View `view` of cached image `image` (0 <= image < len(self))."""
    return self.record(int(image) * self.views + int(view) % self.views)

  def __repr__(self) -> str:
    return f"BaseCache({str(self.out)!r}, {self.num_images} images x {self.views} views)"


def check_for_training(cache: BaseCache, config, model_config, base_vars: Any, where: str) -> None:
  """Refuses a cache that was not made for this stage-1 run (every difference is named).

  Compared: the base tokenizer (config and parameter hash), the image size, the compute dtype
  and matmul precision, the data (spec and split) and the augmentation settings.

  Raises:
    ValueError: the cache does not match; the message lists the differences.
  """
  job = cache.job
  inp = config.input
  want = {
    "base tokenizer": (job["base"], base_json(model_config.base)),
    "base tokenizer parameters (sha256)": (
      job["checkpoint"]["params_sha256"],
      shards.params_sha256(base_vars),
    ),
    "image size (config.model)": (job["image_size"], int(model_config.alit.image_size)),
    "config.compute_dtype": (job["compute_dtype"], str(config.compute_dtype)),
    "config.matmul_precision": (job["matmul_precision"], str(config.matmul_precision)),
    "config.input.data": (job["data"]["spec"], inp.data),
    "config.input.split": (job["data"]["split"], inp.split),
  }
  for k, v in Augment.from_config(inp).to_json().items():
    want[f"config.input.{k}"] = (job["augment"][k], v)
  diff = [
    f"{name}: {json.dumps(a, sort_keys=True)} (cache) != {json.dumps(b, sort_keys=True)} (this run)"
    for name, (a, b) in want.items()
    if a != b
  ]
  if diff:
    raise ValueError(
      f"config.input.base_cache={cache.out} was built for another setup (base from "
      f"{job['checkpoint']['path']}; this run's base from {where}):\n  "
      + "\n  ".join(diff)
      + "\nRebuild it with `python -m alit_jax.data.base_cache` and this run's --config and "
      "overrides, or train without config.input.base_cache."
    )


class _ReadView(grain.transforms.MapWithIndex):
  """Position p of the repeated image stream -> that image's view (p // num_images) % K."""

  def __init__(self, cache: BaseCache):
    self.cache = cache

  def map_with_index(self, p: int, image: int) -> dict:
    c = self.cache
    rec = c.view(image, (int(p) // c.num_images) % c.views)
    out = {
      "image": np.ascontiguousarray(rec["image"]),
      "base_features": rec["base_features"],
      "label": np.int32(rec["label"]),
      "index": np.int64(rec["index"]),
    }
    if "gt_indices" in rec:
      out["gt_indices"] = rec["gt_indices"]
    return out


def make_train_iterator(
  cache: BaseCache,
  *,
  global_batch_size: int,
  seed: int,
  image_size: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  worker_count: int = 0,
  num_threads: int = 8,
  prefetch_buffer_size: int = 128,
  worker_buffer_size: int = 2,
  shuffle: bool = True,
  scale: tuple[float, float] | None = None,
  ratio: tuple[float, float] | None = None,
  flip_prob: float | None = None,
  interpolation: str | None = None,
) -> grain.DatasetIterator:
  """Infinite iterator of cached training batches for this process (`pipeline`'s counterpart).

  Every epoch is one permutation of the cached images (reshuffled per epoch, sharded over
  processes like `pipeline.make_train_iterator`); epoch e reads view e % K of each image.

  Args:
    cache: the `BaseCache`.
    global_batch_size, seed, process_index, process_count, worker_count, num_threads,
      prefetch_buffer_size, worker_buffer_size, shuffle: as `pipeline.make_train_iterator`.
    image_size, scale, ratio, flip_prob, interpolation: `pipeline.make_train_iterator`'s
      augmentation arguments, so the trainer calls both alike: the views were drawn when the
      cache was built, so these are only checked against its settings (None: not checked).

  Returns:
    A `grain.DatasetIterator` of {"image": (B, H, W, 3) uint8, "base_features": (B, g, g, E)
    float32, "gt_indices": (B, g*g) int32 (VQGAN), "label": (B,) int32, "index": (B,) int64}
    (B = global_batch_size // process_count); `get_state`/`set_state` resume it exactly.

  Raises:
    ValueError: an augmentation argument differs from the cache's.
  """
  from alit_jax.data import pipeline

  given = {"image_size": image_size, "scale": scale, "ratio": ratio, "flip_prob": flip_prob}
  given["interpolation"] = interpolation
  built = dict(cache.job["augment"], image_size=cache.job["image_size"])
  bad = [
    f"{k}={v!r} (the cache's: {built[k]!r})"
    for k, v in given.items()
    if v is not None and json.loads(json.dumps(v)) != built[k]
  ]
  if bad:
    raise ValueError(f"{cache!r} was built with other augmentation settings: {', '.join(bad)}")
  process_index, process_count = pipeline.process_layout(process_index, process_count)
  local_bs = pipeline.per_process_batch_size(global_batch_size, process_count)
  if len(cache) < process_count:
    raise ValueError(f"{cache!r} has fewer images than the {process_count} processes")
  ds = grain.MapDataset.range(len(cache)).seed(seed)
  if shuffle:
    ds = ds.shuffle()
  ds = ds.repeat(None).map_with_index(_ReadView(cache))
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
  return iter(it)
