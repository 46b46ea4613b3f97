"""Building a base cache: `build_cache` (and `build_from_config` for a stage-1 config)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Any

import grain
import numpy as np

from alit_jax.data import shards
from alit_jax.data.base_cache.records import (
  FORMAT,
  Augment,
  cache_identity,
  encode_record,
  view_rng,
)
from alit_jax.data.shards import MANIFEST_FILE, SHARD_DIR, Log

# ------------------------------------------------------------------------------------------------
# grain stages of the build


class _Views(grain.transforms.Map):
  """Decodes one image and draws its K views; failures become {"error": reason}.

  Gives `shards.record_head`'s fields and "views": (K, S, S, 3) uint8 (zeros for padding and
  bad images).
  """

  def __init__(self, image_size: int, views: int, seed: int, augment: Augment):
    self.image_size = int(image_size)
    self.views = int(views)
    self.seed = int(seed)
    self.augment = augment

  def map(self, record: dict) -> dict:
    from alit_jax.data import transforms as T

    s, k = self.image_size, self.views
    out = shards.record_head(record)
    out["views"] = np.zeros((k, s, s, 3), np.uint8)
    if record["index"] < 0:
      return out
    if out["error"] or record.get("image") is None:
      out["error"] = out["error"] or "no image data"
      return out
    try:
      img = np.asarray(T.decode_image(record["image"]), np.uint8)
      a = self.augment
      aug = T.TrainAugment(s, a.scale, a.ratio, a.flip_prob, a.interpolation)
      for v in range(k):
        out["views"][v] = aug.random_map({"image": img}, view_rng(self.seed, record["index"], v))[
          "image"
        ]
    except Exception as e:  # any decoder failure is a bad image, not a crashed build
      out["error"] = T.error_text(e)
    return out


def _collate_views(rows: list[dict]) -> dict:
  """grain's `batch_fn`: `shards.collate` of the prepared "views"."""
  return shards.collate(rows, "views")


# ------------------------------------------------------------------------------------------------
# Build


@dataclasses.dataclass
class Result:
  """What one `build_cache` call did.

  Attributes:
    out: the cache folder.
    complete: every shard is committed (the manifest exists).
    manifest: the manifest when this call wrote it, else None.
    shards_done, shards_skipped: shards committed in this call / found already committed.
    images, bad: images cached / bad images skipped in this call.
    seconds, images_per_s: wall time of the build loop and source images (each with its K
      views) per second.
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


def build_manifest(out: str | os.PathLike) -> dict:
  """Aggregates job.json and every shard's JSON (all must be committed).

  Raises:
    FileNotFoundError: a shard is not committed yet.
  """
  job, committed = shards.committed_shards(pathlib.Path(out))
  listed, bad = [], []
  for file, meta in committed:
    listed.append(
      {
        "file": file,
        "start": meta["start"],
        "stop": meta["stop"],
        "num_images": meta["num_images"],
        "num_records": meta["num_records"],
        "num_bad": len(meta["bad"]),
      }
    )
    bad += meta["bad"]
  fields = {
    "index": "int: position of the image in the source",
    "view": f"int: view number 0..{job['views'] - 1}",
    "id": "str: file name, or the index when the source has none",
    "label": "int: class label, -1 if none",
    "image": f"bytes: {job['record']['image']} uint8, the augmented view",
    "base_features": f"bytes: {job['record']['base_features']} little-endian float32",
  }
  if "gt_indices" in job["record"]:
    fields["gt_indices"] = (
      f"bytes: {job['record']['gt_indices']} little-endian {job['record']['gt_indices_dtype']}"
    )
  return {
    "format": FORMAT,
    "complete": True,
    "job": job,
    "num_shards": job["num_shards"],
    "shards": listed,
    "num_images": sum(s["num_images"] for s in listed),
    "num_records": sum(s["num_records"] for s in listed),
    "num_bad": len(bad),
    "bad_images": bad,
    "record_format": {
      "container": "array_record (group_size 1), records in source order, views consecutive",
      "encoding": "msgpack map",
      "fields": fields,
    },
  }


class _Progress(shards.Progress):
  """`shards.Progress` whose lines name the views per image."""

  def __init__(self, log: Log | None, total: int, every_s: float, views: int):
    super().__init__(log, total, every_s)
    self.views = views

  def line(self) -> str:
    rate, eta_s = self.rate_and_eta()
    return (
      f"base_cache: {self.seen}/{self.total} images ({self.views} views each), {self.shards} "
      f"shards | {rate:.1f} img/s | ETA {eta_s} | bad {self.bad}"
    )


def build_cache(
  out: str | os.PathLike,
  source,
  *,
  base: Any,
  base_vars: Any,
  base_path: str,
  image_size: int,
  augment: Augment,
  views: int = 1,
  seed: int = 0,
  data: str | None = None,
  split: str = "train",
  data_dir: str | None = None,
  num_images: int | None = None,
  compute_dtype: str = "float32",
  matmul_precision: str = "default",
  batch_size: int = 32,
  shard_size: int = 1024,
  process_index: int = 0,
  process_count: int = 1,
  worker_count: int = 0,
  num_threads: int = 8,
  prefetch_buffer_size: int = 64,
  log: Log | None = shards.default_log,
  log_every_s: float = 30.0,
) -> Result:
  """Runs the frozen base encoder over K views of the first `num_images` images into OUT.

  Args:
    out: output folder (created; a rerun resumes it).
    source: random-access image source (`sources.get_source(...)`).
    base, base_vars: the frozen base module (built with the run's compute dtype) and variables.
    base_path: where the base came from (recorded; its identity is the parameter hash).
    image_size: the view side (ALIT's image size).
    augment: the view augmentation (`Augment.from_config(config.input)`).
    views: K, views per image.
    seed: view seed (`view_rng`).
    data, split, data_dir: the source's spec (recorded; `repr(source)` when None).
    num_images: cache the first this many source images (None: all).
    compute_dtype, matmul_precision: the run's (recorded and checked at training time;
      `matmul_precision` is applied here).
    batch_size: source images per encoder call (batch_size * views views).
    shard_size: source images per shard (the unit of resumption).
    process_index, process_count: independent workers: process p builds shards p, p + P, ...;
      whichever finds every shard committed writes the manifest.
    worker_count, num_threads, prefetch_buffer_size: grain decoding parallelism.
    log: progress and status lines (None: silent); log_every_s: seconds between them.

  Returns:
    A `Result`.

  Raises:
    ValueError: bad arguments, or OUT holds a different cache.
  """
  if views <= 0 or batch_size <= 0 or shard_size <= 0:
    raise ValueError(
      f"views ({views}), batch_size ({batch_size}) and shard_size ({shard_size}) must be positive"
    )
  n_source = len(source)
  n = n_source if num_images is None or num_images < 0 else min(int(num_images), n_source)
  if n == 0:
    raise ValueError(f"{data or source!r}: nothing to cache (the source has {n_source} records)")
  base_cfg = base.config
  if image_size % base_cfg.downsample:
    raise ValueError(
      f"image size {image_size} is not a multiple of the base's {base_cfg.downsample}x downsampling"
    )
  job = cache_identity(
    base_cfg=base_cfg,
    base_sha256=shards.params_sha256(base_vars),
    base_path=base_path,
    image_size=image_size,
    compute_dtype=compute_dtype,
    matmul_precision=matmul_precision,
    augment=augment,
    views=views,
    seed=seed,
    data=data if data is not None else repr(source),
    split=split,
    data_dir=data_dir,
    source=source,
    num_images=n,
    shard_size=shard_size,
  )
  out = pathlib.Path(out).expanduser().absolute()
  (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
  shards.check_or_write_job(out, job, holds="the base cache")
  s_total = job["num_shards"]
  mine, pending = shards.own_shards(out, s_total, process_index, process_count)
  if log:
    log(
      f"base_cache: {n} of {n_source} images x {views} views in {s_total} shards of "
      f"{shard_size} -> {out}; {len(mine) - len(pending)} of this process's {len(mine)} shards "
      f"already done; base {base_cfg.kind} from {base_path}, batch {batch_size} x {views}"
    )
  shard_col, index_col, total = shards.shard_work(pending, n, shard_size, batch_size)
  progress = _Progress(log, total, log_every_s, views)
  t_start = time.monotonic()
  if pending:
    work = shards.ShardRecords(source, shard_col, index_col, catch_errors=True)
    with shards.shard_batches(
      work,
      _Views(image_size, views, seed, augment),
      _collate_views,
      batch_size,
      num_threads=num_threads,
      prefetch_buffer_size=prefetch_buffer_size,
      worker_count=worker_count,
    ) as batches:
      writer = _ShardWriter(out, job, process_index, process_count, log)
      _encode_batches(batches, writer, progress, base, base_vars, matmul_precision)
  seconds = time.monotonic() - t_start
  if log and pending:
    log(progress.line())
  complete, manifest = _finish(out, s_total, log)
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
  )


class _ShardWriter:
  """The shard being built (`shards.ShardBuffer`) and how its records and JSON are written."""

  def __init__(self, out: pathlib.Path, job: dict, process_index: int, process_count: int, log):
    self.out, self.job, self.log = out, job, log
    self.process_index, self.process_count = process_index, process_count
    self.views = int(job["views"])
    self.gt_dtype = job["record"].get("gt_indices_dtype", "int32")
    self.buf = shards.ShardBuffer(job["num_images"], job["shard_size"])

  def add(self, batch: dict, r: int, good: bool, feats: np.ndarray, gt: np.ndarray | None):
    """Row r of the batch: its K records, or a bad image (feats, gt: (B, K, ...) outputs)."""
    buf = self.buf
    if not good:
      buf.add_bad(batch, r)
      if self.log:
        index, errors = batch["index"], batch["error"]
        self.log(
          f"base_cache: skipping bad image {batch['id'][r]!r} (index {index[r]}): {errors[r]}"
        )
      return
    buf.images += 1
    for k in range(self.views):
      buf.records.append(
        encode_record(
          index=int(batch["index"][r]),
          view=k,
          id=batch["id"][r],
          label=int(batch["label"][r]),
          image=batch["views"][r, k],
          base_features=feats[r, k],
          gt_indices=None if gt is None else gt[r, k],
          gt_dtype=self.gt_dtype,
        )
      )

  def commit_if_full(self) -> bool:
    """Writes the shard once all its images are done (then starts the next one)."""
    buf = self.buf
    if not buf.full():
      return False
    meta = buf.meta(FORMAT, self.process_index, self.process_count, num_images=buf.images)
    try:
      shards.write_shard(self.out, buf.shard, self.job["num_shards"], buf.records, meta)
    except OSError as e:
      raise OSError(f"{self.out / SHARD_DIR}: cannot write shard {buf.shard}: {e}") from e
    buf.clear()
    return True


def _encode_batches(
  batches, writer: _ShardWriter, progress: _Progress, base, base_vars, matmul_precision: str
) -> None:
  """Runs the base encoder on every batch's views and commits each shard once it is complete."""
  import jax

  from alit_jax.models import rollout as rollout_lib
  from alit_jax.train import steps

  encode = jax.jit(lambda bv, x: rollout_lib.base_encode(base, bv, steps.to_float(x)))
  precision = (
    jax.default_matmul_precision(matmul_precision) if matmul_precision != "default" else None
  )
  for batch in batches:
    real, good, rows = writer.buf.begin(batch)
    if rows.size:
      v = batch["views"]
      v[~good] = v[rows[0]]  # padding and bad rows repeat a real image (static shapes)
      flat = v.reshape((-1,) + v.shape[2:])
      if precision is None:
        enc = encode(base_vars, flat)
      else:
        with precision:
          enc = encode(base_vars, flat)
      feats = np.asarray(jax.device_get(enc["base_features"]), np.float32)
      feats = feats.reshape(v.shape[:2] + feats.shape[1:])
      gt = None
      if "gt_indices" in enc:
        gt = np.asarray(jax.device_get(enc["gt_indices"]))
        gt = gt.reshape(v.shape[:2] + gt.shape[1:])
    for r in np.flatnonzero(real):
      writer.add(batch, r, bool(good[r]), feats if rows.size else None, gt if rows.size else None)
    progress.update(int(rows.size), int(real.sum() - rows.size), int(real.sum()))
    if writer.commit_if_full():
      progress.shards += 1


def _finish(out: pathlib.Path, s_total: int, log: Log | None) -> tuple[bool, dict | None]:
  """Writes the manifest when every shard is committed; returns (complete, manifest or None)."""
  complete = shards.all_committed(out, s_total)
  manifest = None
  if complete:
    manifest = build_manifest(out)
    shards.write_manifest(out, manifest)
    if log:
      log(
        f"base_cache: complete: {manifest['num_images']} images ({manifest['num_records']} "
        f"records), {manifest['num_bad']} bad images skipped -> {out / MANIFEST_FILE}"
      )
  elif log:
    left = shards.num_pending(out, s_total)
    log(f"base_cache: {left} of {s_total} shards still pending (other processes)")
  return complete, manifest


def resolve_base(config) -> tuple[Any, Any, Any, str]:
  """The stage-1 config's frozen base, as the trainer resolves it (without writing anything).

  Returns:
    (model config adapted to the base, base config, base variables, where it came from).
  """
  from alit_jax.train import common

  model_config = common.build_model_config(config.model)
  base_cfg, base_vars, where = common.load_config_base(config, model_config)
  if config.base_checkpoint:
    where = str(pathlib.Path(where).absolute())
  model_config = common.adapt_to_base(model_config, base_cfg, where)
  return model_config, base_cfg, base_vars, where


def build_from_config(
  config, out: str | os.PathLike, *, views: int = 1, seed: int | None = None, **kw
) -> Result:
  """`build_cache` for a stage-1 training config (its data, augmentation, base, image size,
  dtype); `seed` defaults to `config.seed`; `kw` as `build_cache` (num_images, batch_size, ...)."""
  import jax.numpy as jnp

  from alit_jax.data import sources
  from alit_jax.models.base_tokenizers import build_base

  if config.stage != "latent_distillation":
    raise ValueError(f"a base cache is for stage 1 (latent_distillation), not {config.stage!r}")
  model_config, base_cfg, base_vars, where = resolve_base(config)
  inp = config.input
  source = sources.get_source(inp.data, inp.split, inp.data_dir or None)
  return build_cache(
    out,
    source,
    base=build_base(base_cfg, dtype=jnp.dtype(config.compute_dtype)),
    base_vars=base_vars,
    base_path=where,
    image_size=model_config.alit.image_size,
    augment=Augment.from_config(inp),
    views=views,
    seed=int(config.seed if seed is None else seed),
    data=inp.data,
    split=inp.split,
    data_dir=inp.data_dir or None,
    compute_dtype=str(config.compute_dtype),
    matmul_precision=str(config.matmul_precision),
    **kw,
  )
