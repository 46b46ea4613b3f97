r"""Stage 1 on cached base codes: the frozen base tokenizer's outputs, computed once per view.

Stage 1 (`steps.train_step`) runs the frozen base encoder on every batch before the ALIT
transformer. Its output depends only on the augmented image, so it can be computed once:

  python -m alit_jax.data.base_cache --config=configs/demo_alit.py \
    --config.base_checkpoint=runs/demo_vqgan_export --out=runs/demo_base_cache \
    --views=2 --num_images=24000
  python -m alit_jax.train --config=configs/demo_alit.py:phase=warmup \
    --config.base_checkpoint=runs/demo_vqgan_export \
    --config.input.base_cache=runs/demo_base_cache --workdir=runs/demo_alit_warmup

The cache is built from the training config itself (the same `--config` and overrides as the
training run): its data (`config.input.data`, `split`, `data_dir`), its augmentation
(`input.scale`, `ratio`, `flip_prob`, `interpolation`), its image size, its base tokenizer
(`base_checkpoint` or `random_base`, resolved as the trainer does) and its `compute_dtype` and
`matmul_precision`. A training run with `config.input.base_cache=DIR` checks all of these against
the cache before it starts and refuses a mismatch, naming each difference.

Views. Augmentation is random per draw in the image pipeline (`pipeline.make_train_iterator`);
the cache instead stores K fixed views per image (`--views`): view k of source image i is
`transforms.TrainAugment` (RandomResizedCrop + horizontal flip, the trainer's) drawn from
`np.random.default_rng([seed, i, k])` (`view_rng`; `--seed`, default `config.seed`). Training
from the cache visits every image once per epoch, in an order reshuffled every epoch (as the
image pipeline), and uses view `epoch % K` in epoch `epoch`: with K >= the number of epochs no
view is seen twice. Only the first `--num_images` images of the source are cached (default all;
e.g. the demo's 200000-image procedural source is never trained for a whole epoch).

Output (the shard machinery of `alit_jax.tokenize_dataset`: committed shards, resumable):
  OUT/job.json                                  the cache's identity (see `cache_identity`)
  OUT/shards/tokens-SSSSS-of-TTTTT.array_record one shard per `--shard_size` source images
  OUT/shards/tokens-SSSSS-of-TTTTT.json         its counts and bad images
  OUT/manifest.json                             written once every shard is committed
A rerun with the same OUT skips committed shards (and refuses a different job, listing the
differences). Undecodable images get no record: they are skipped, counted in the progress lines
and listed with their id and reason in the shard JSON and the manifest.

Record format: each array_record record is a msgpack map
  {"index": int (position of the image in the source), "view": int k, "id": str,
   "label": int, "image": bytes, "base_features": bytes, "gt_indices": bytes (VQGAN only)}
with `image` the (H, W, 3) uint8 augmented view (ALIT's `patch_embed` reads it), `base_features`
the base encoder's (g, g, E) little-endian float32 output and `gt_indices` its (g*g,) nearest-code
indices (int16 when the codebook has at most 32768 codes, else int32). Records are in source
order, the K views of an image consecutive, so cached image j (counting only good images) has
records j*K ... j*K + K - 1. A VQGAN's codebook is not stored: the train step reads it from the
frozen base (whose parameter hash the cache records).
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

FORMAT = "alit_jax.base_cache/1"
JOB_FILE = "job.json"
MANIFEST_FILE = "manifest.json"
SHARD_DIR = "shards"
# Batch keys (besides "image") that `steps.train_step_cached` takes from the cache.
BASE_KEYS = ("base_features", "gt_indices")

Log = Callable[[str], None]


def _default_log(msg: str) -> None:
  from absl import logging

  logging.info("%s", msg)


def view_rng(seed: int, index: int, view: int) -> np.random.Generator:
  """The generator of view `view` of source image `index` (crop box, then flip)."""
  return np.random.default_rng([int(seed), int(index), int(view)])


# ------------------------------------------------------------------------------------------------
# Records


def indices_dtype(codebook_size: int) -> str:
  """The stored dtype of `gt_indices`: int16 up to 32768 codes, else int32."""
  return "int16" if codebook_size <= 2**15 else "int32"


def encode_record(
  *,
  index: int,
  view: int,
  id: str,
  label: int,
  image: np.ndarray,
  base_features: np.ndarray,
  gt_indices: np.ndarray | None,
  gt_dtype: str = "int16",
) -> bytes:
  """One record's bytes (the format in the module docstring).

  Args:
    index, view, id, label: the image's position in the source, the view number, id, label.
    image: (H, W, 3) uint8 augmented view.
    base_features: (g, g, E) float32 base encoder output of that view.
    gt_indices: (g*g,) nearest-code indices (VQGAN), or None (VAE).
    gt_dtype: stored dtype of the indices (`indices_dtype`).
  """
  import msgpack

  rec = {
    "index": int(index),
    "view": int(view),
    "id": str(id),
    "label": int(label),
    "image": np.ascontiguousarray(image, dtype=np.uint8).tobytes(),
    "base_features": np.ascontiguousarray(base_features, dtype="<f4").tobytes(),
  }
  if gt_indices is not None:
    rec["gt_indices"] = np.ascontiguousarray(gt_indices, dtype=np.dtype(gt_dtype).newbyteorder("<"))
    rec["gt_indices"] = rec["gt_indices"].tobytes()
  return msgpack.packb(rec, use_bin_type=True)


def decode_record(raw: bytes, layout: dict) -> dict:
  """One serialised record -> {"image", "base_features", "gt_indices" (VQGAN), "index", "view",
  "id", "label"}; `layout` is job.json's "record" entry (shapes and dtypes)."""
  import msgpack

  r = msgpack.unpackb(raw, raw=False)
  out = {
    "image": np.frombuffer(r["image"], np.uint8).reshape(layout["image"]),
    "base_features": np.frombuffer(r["base_features"], "<f4")
    .reshape(layout["base_features"])
    .astype(np.float32),
    "index": int(r["index"]),
    "view": int(r["view"]),
    "id": r["id"],
    "label": int(r["label"]),
  }
  if "gt_indices" in layout:
    dt = np.dtype(layout["gt_indices_dtype"]).newbyteorder("<")
    out["gt_indices"] = np.frombuffer(r["gt_indices"], dt).astype(np.int32)
  return out


# ------------------------------------------------------------------------------------------------
# Identity


@dataclasses.dataclass(frozen=True)
class Augment:
  """The view augmentation (`transforms.TrainAugment`'s settings) and the view seed."""

  scale: tuple[float, float]
  ratio: tuple[float, float]
  flip_prob: float
  interpolation: str

  @classmethod
  def from_config(cls, inp) -> Augment:
    return cls(
      tuple(float(x) for x in inp.scale),
      tuple(float(x) for x in inp.ratio),
      float(inp.flip_prob),
      str(inp.interpolation),
    )

  def to_json(self) -> dict:
    return {
      "scale": list(self.scale),
      "ratio": list(self.ratio),
      "flip_prob": self.flip_prob,
      "interpolation": self.interpolation,
    }


def base_json(base_cfg: Any) -> dict:
  """The base tokenizer's config as stored (JSON types: tuples become lists)."""
  return json.loads(json.dumps({"kind": base_cfg.kind, **dataclasses.asdict(base_cfg)}))


def cache_identity(
  *,
  base_cfg: Any,
  base_sha256: str,
  base_path: str,
  image_size: int,
  compute_dtype: str,
  matmul_precision: str,
  augment: Augment,
  views: int,
  seed: int,
  data: str,
  split: str,
  data_dir: str | None,
  source,
  num_images: int,
  shard_size: int,
) -> dict:
  """The job.json dict: everything the cached arrays depend on (plus provenance).

  `checkpoint.path`, `data.spec` and `data.data_dir` are provenance (a moved checkpoint or
  dataset is the same job; `data.fingerprint` and the parameter hash identify them).
  """
  from alit_jax.tokenize_dataset import source_fingerprint

  g = image_size // base_cfg.downsample
  record = {
    "image": [image_size, image_size, 3],
    "base_features": [g, g, int(base_cfg.embed_dim)],
  }
  if base_cfg.kind == "vqgan":
    record["gt_indices"] = [g * g]
    record["gt_indices_dtype"] = indices_dtype(int(base_cfg.n_embed))
  return {
    "format": FORMAT,
    "checkpoint": {"path": base_path, "params_sha256": base_sha256},
    "base": base_json(base_cfg),
    "image_size": int(image_size),
    "compute_dtype": str(compute_dtype),
    "matmul_precision": str(matmul_precision),
    "augment": augment.to_json(),
    "views": int(views),
    "seed": int(seed),
    "data": {
      "spec": data,
      "split": split,
      "data_dir": data_dir,
      "source_records": len(source),
      "fingerprint": source_fingerprint(source),
    },
    "num_images": int(num_images),
    "shard_size": int(shard_size),
    "num_shards": max(1, math.ceil(num_images / shard_size)),
    "record": record,
  }


def _check_or_write_job(out: pathlib.Path, job: dict) -> None:
  """Refuses an OUT made by a different job (listing the differences); writes job.json."""
  from alit_jax.tokenize_dataset import atomic_write_text, identity_diff

  path = out / JOB_FILE
  if not path.is_file():
    atomic_write_text(path, json.dumps(job, indent=2, sort_keys=True))
    return
  try:
    old = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{path}: unreadable job file ({e}); use a new --out") from e
  diff = identity_diff(old, job)
  if diff:
    raise ValueError(
      f"{out} holds the base cache of a different job; refusing to resume into it. "
      "Differences:\n  " + "\n  ".join(diff) + "\nUse another --out (or delete this one)."
    )


# ------------------------------------------------------------------------------------------------
# grain stages of the build


class _ShardImages:
  """The pending shards' source indices, each shard padded to a multiple of the batch (-1)."""

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
    try:
      out.update(self.source[idx])
    except Exception as e:  # an unreadable record is a bad image, not a crashed build
      out["error"] = f"cannot read record: {type(e).__name__}: {e}"
    return out


class _Views(grain.transforms.Map):
  """Decodes one image and draws its K views; failures become {"error": reason}."""

  def __init__(self, image_size: int, views: int, seed: int, augment: Augment):
    self.image_size = int(image_size)
    self.views = int(views)
    self.seed = int(seed)
    self.augment = augment

  def map(self, record: dict) -> dict:
    from alit_jax.data import transforms as T

    s, k = self.image_size, self.views
    out = {
      "shard": record["shard"],
      "index": record["index"],
      "label": int(record.get("label", -1)),
      "id": "",
      "error": "",
      "views": np.zeros((k, s, s, 3), np.uint8),
    }
    if record["index"] < 0:
      return out
    name = record.get("file_name", "")
    out["id"] = name if name else str(record["index"])
    if record.get("error") or record.get("image") is None:
      out["error"] = record.get("error") or "no image data"
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


def _collate(rows) -> dict:
  return {
    "views": np.stack([r["views"] for r in rows]),
    "shard": np.array([r["shard"] for r in rows], np.int64),
    "index": np.array([r["index"] for r in rows], np.int64),
    "label": np.array([r["label"] for r in rows], np.int64),
    "id": [r["id"] for r in rows],
    "error": [r["error"] for r in rows],
  }


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
  from alit_jax.tokenize_dataset import shard_done, shard_name

  out = pathlib.Path(out)
  job = json.loads((out / JOB_FILE).read_text())
  s_total = job["num_shards"]
  shards, bad = [], []
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
    "num_shards": s_total,
    "shards": shards,
    "num_images": sum(s["num_images"] for s in shards),
    "num_records": sum(s["num_records"] for s in shards),
    "num_bad": len(bad),
    "bad_images": bad,
    "record_format": {
      "container": "array_record (group_size 1), records in source order, views consecutive",
      "encoding": "msgpack map",
      "fields": fields,
    },
  }


class _Progress:
  def __init__(self, log: Log | None, total: int, every_s: float, views: int):
    self.log, self.total, self.every_s, self.views = log, total, every_s, views
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

  def line(self) -> str:
    dt = max(time.monotonic() - self.start, 1e-9)
    rate = self.seen / dt
    eta = (self.total - self.seen) / rate if rate > 0 else float("inf")
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
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
  log: Log | None = _default_log,
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
  import jax

  from alit_jax.models import rollout as rollout_lib
  from alit_jax.tokenize_dataset import (
    atomic_write_text,
    clean_tmp,
    params_sha256,
    shard_done,
    write_shard,
  )
  from alit_jax.train import steps

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
    base_sha256=params_sha256(base_vars),
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
  _check_or_write_job(out, job)
  s_total = job["num_shards"]
  mine = list(range(process_index, s_total, process_count))
  pending = [s for s in mine if not shard_done(out, s, s_total)]
  clean_tmp(out, mine, s_total)
  if log:
    log(
      f"base_cache: {n} of {n_source} images x {views} views in {s_total} shards of "
      f"{shard_size} -> {out}; {len(mine) - len(pending)} of this process's {len(mine)} shards "
      f"already done; base {base_cfg.kind} from {base_path}, batch {batch_size} x {views}"
    )
  shard_col, index_col = [], []
  for s in pending:
    lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
    m = math.ceil((hi - lo) / batch_size) * batch_size
    idx = np.full((m,), -1, np.int64)
    idx[: hi - lo] = np.arange(lo, hi)
    shard_col.append(np.full((m,), s, np.int64))
    index_col.append(idx)
  total = sum(min(n, (s + 1) * shard_size) - s * shard_size for s in pending)
  progress = _Progress(log, total, log_every_s, views)
  gt_dtype = job["record"].get("gt_indices_dtype", "int32")
  encode = jax.jit(lambda bv, x: rollout_lib.base_encode(base, bv, steps.to_float(x)))
  precision = (
    jax.default_matmul_precision(matmul_precision) if matmul_precision != "default" else None
  )
  t_start = time.monotonic()
  if pending:
    ds = (
      grain.MapDataset.source(
        _ShardImages(source, np.concatenate(shard_col), np.concatenate(index_col))
      )
      .map(_Views(image_size, views, seed, augment))
      .batch(batch_size, batch_fn=_collate)
    )
    it = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)
    )
    if worker_count > 0:
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    iterator = iter(it)
    try:
      cur, records, bad, good_images = None, [], [], 0
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
          if not good[r]:
            bad.append({"index": int(index[r]), "id": batch["id"][r], "reason": errors[r]})
            if log:
              log(
                f"base_cache: skipping bad image {batch['id'][r]!r} (index {index[r]}): {errors[r]}"
              )
            continue
          good_images += 1
          for k in range(views):
            records.append(
              encode_record(
                index=int(index[r]),
                view=k,
                id=batch["id"][r],
                label=int(batch["label"][r]),
                image=batch["views"][r, k],
                base_features=feats[r, k],
                gt_indices=None if gt is None else gt[r, k],
                gt_dtype=gt_dtype,
              )
            )
        progress.update(int(rows.size), int(real.sum() - rows.size), int(real.sum()))
        lo, hi = shard * shard_size, min(n, (shard + 1) * shard_size)
        if good_images + len(bad) == hi - lo:
          meta = {
            "format": FORMAT,
            "shard": shard,
            "start": lo,
            "stop": hi,
            "num_images": good_images,
            "num_records": len(records),
            "bad": bad,
            "written_by": {"process_index": process_index, "process_count": process_count},
          }
          try:
            write_shard(out, shard, s_total, records, meta, lambda stage: None)
          except OSError as e:
            raise OSError(f"{out / SHARD_DIR}: cannot write shard {shard}: {e}") from e
          progress.shards += 1
          cur, records, bad, good_images = None, [], [], 0
    finally:
      close = getattr(iterator, "close", None)
      if close is not None:
        close()
  seconds = time.monotonic() - t_start
  if log and pending:
    log(progress.line())
  complete = all(shard_done(out, s, s_total) for s in range(s_total))
  manifest = None
  if complete:
    manifest = build_manifest(out)
    atomic_write_text(out / MANIFEST_FILE, json.dumps(manifest, indent=1))
    if log:
      log(
        f"base_cache: complete: {manifest['num_images']} images ({manifest['num_records']} "
        f"records), {manifest['num_bad']} bad images skipped -> {out / MANIFEST_FILE}"
      )
  elif log:
    left = sum(not shard_done(out, s, s_total) for s in range(s_total))
    log(f"base_cache: {left} of {s_total} shards still pending (other processes)")
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
  from alit_jax.tokenize_dataset import params_sha256

  job = cache.job
  inp = config.input
  want = {
    "base tokenizer": (job["base"], base_json(model_config.base)),
    "base tokenizer parameters (sha256)": (
      job["checkpoint"]["params_sha256"],
      params_sha256(base_vars),
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


# ------------------------------------------------------------------------------------------------
# Command line


def main(argv) -> None:
  """The command line (flags: `_define_flags`)."""
  from absl import app, flags

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS

  def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)

  if (f.num_processes is None) != (f.process_id is None):
    raise app.UsageError("give both --num_processes and --process_id")
  try:
    result = build_from_config(
      _CONFIG.value,
      f.out,
      views=f.views,
      seed=f.seed,
      num_images=f.num_images,
      batch_size=f.batch,
      shard_size=f.shard_size,
      process_index=f.process_id or 0,
      process_count=f.num_processes or 1,
      worker_count=f.worker_count,
      num_threads=f.num_threads,
      log=log,
      log_every_s=f.log_every,
    )
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  status = "complete" if result.complete else "incomplete (other processes pending)"
  print(
    f"{result.out}: {status}; {result.shards_done} shards written, {result.shards_skipped} "
    f"already done, {result.images} images cached, {result.bad} bad images skipped, "
    f"{result.images_per_s:.1f} img/s"
  )


_CONFIG = None


def _define_flags() -> None:
  global _CONFIG
  from absl import flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Stage-1 training config (configs/demo_alit.py:ARGS).", lock_config=True
  )
  flags.DEFINE_string("out", None, "Cache folder (rerun with the same --out to resume).")
  flags.DEFINE_integer("views", 1, "K: augmented views per image (epoch e reads view e % K).")
  flags.DEFINE_integer("seed", None, "View seed (default: config.seed).")
  flags.DEFINE_integer("num_images", -1, "Cache the first N images of the source (-1: all).")
  flags.DEFINE_integer("batch", 32, "Source images per base-encoder call (x views).")
  flags.DEFINE_integer("shard_size", 1024, "Source images per shard (the resume unit).")
  flags.DEFINE_integer("worker_count", 0, "grain decoding worker processes.")
  flags.DEFINE_integer("num_threads", 8, "grain decoding threads.")
  flags.DEFINE_float("log_every", 30.0, "Seconds between progress lines.")
  flags.DEFINE_integer("num_processes", None, "Independent workers (with --process_id).")
  flags.DEFINE_integer("process_id", None, "This worker's index.")
  flags.mark_flags_as_required(["config", "out"])


if __name__ == "__main__":
  from absl import app

  # Run the importable module's copy, so grain worker processes can unpickle its transforms.
  from alit_jax.data import base_cache as _module

  _module._define_flags()
  app.run(_module.main)
