"""The tokenization job: `tokenize_dataset` (see the package docstring for what it writes)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from alit_jax.data import shards
from alit_jax.data.shards import Log
from alit_jax.tokenize_dataset import records
from alit_jax.tokenize_dataset.lock import OutputLock

# Test hook: "process=1,shards=2,stage=data" makes process 1 SIGKILL itself while writing its
# 2nd shard of this run, at "stage": "tmp" (data written under the temporary name), "data" (data
# renamed, JSON not yet written) or "commit" (default; both done).
DIE_ENV = "ALIT_TOKENIZE_TEST_SIGKILL"


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


class _Progress(shards.Progress):
  """`shards.Progress` with the tokens counted (`tokens`) and a per-device rate."""

  def __init__(self, log: Log | None, total: int, every_s: float, devices: int, tag: str):
    super().__init__(log, total, every_s)
    self.devices, self.tag = devices, tag
    self.tokens = 0

  def line(self) -> str:
    rate, eta_s = self.rate_and_eta()
    mean = self.tokens / self.images if self.images else 0.0
    return (
      f"{self.tag}{self.seen}/{self.total} images, {self.shards} shards | {rate:.1f} img/s "
      f"({rate / self.devices:.1f}/device) | ETA {eta_s} | mean tokens/image {mean:.1f} | "
      f"bad {self.bad}"
    )


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


@dataclasses.dataclass
class _Run:
  """One call's resolved settings (what the steps of `tokenize_dataset` share)."""

  tokenizer: Any
  out: pathlib.Path
  source: Any
  job: dict
  criterion: str
  threshold: float
  batch_size: int
  process_index: int
  process_count: int
  wait_for_others: bool
  log0: Log | None  # process 0's log (None elsewhere)
  tag: str

  @property
  def num_shards(self) -> int:
    return self.job["num_shards"]


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
  log: Log | None = shards.default_log,
  log_every_s: float = 30.0,
  poll_s: float = 1.0,
  early_exit: bool = True,
) -> Result:
  """Tokenizes every image of a source into OUT (see the package docstring), resuming OUT.

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

  crit = criteria.get(criterion)
  if not isinstance(criterion, str) or crit.name not in criteria.REGISTRY:
    raise ValueError("criterion must be a registered name (it is recorded in the job identity)")
  if threshold is None:
    threshold = tokenizer.default_threshold(crit)
  tdtype = records.token_dtype_for(tokenizer, token_dtype)
  source, data = _open_data(data, split, data_dir)
  job = records.job_identity(
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
  (out / shards.SHARD_DIR).mkdir(parents=True, exist_ok=True)
  run = _Run(
    tokenizer=tokenizer,
    out=out,
    source=source,
    job=job,
    criterion=crit.name,
    threshold=float(threshold),
    batch_size=batch_size,
    process_index=process_index,
    process_count=process_count,
    wait_for_others=wait_for_others,
    log0=log if process_index == 0 else None,
    tag=f"tokenize[{process_index}/{process_count}] ",
  )
  # One writer per process index for the whole job (flock: released on exit, even by SIGKILL).
  with OutputLock(out, process_index):
    _check_job(run, poll_s)
    mine, pending = shards.own_shards(out, run.num_shards, process_index, process_count)
    devices = tokenizer.mesh.size if tokenizer.mesh is not None else 1
    op = ">" if crit.higher_is_better else "<"
    _log_start(run, len(mine), len(pending), devices, f"{crit.name} {op} {threshold}")
    shard_col, index_col, total = shards.shard_work(pending, len(source), shard_size, batch_size)
    progress = _Progress(run.log0, total, log_every_s, devices, run.tag)
    t_start = time.monotonic()
    if pending:
      work = shards.ShardRecords(source, shard_col, index_col)
      prepare = records.Prepare(tokenizer.image_size, resize, interpolation)
      with shards.shard_batches(
        work,
        prepare,
        _collate_images,
        batch_size,
        num_threads=num_threads,
        prefetch_buffer_size=prefetch_buffer_size,
        worker_count=worker_count,
      ) as batches:
        _encode_batches(run, batches, progress, tdtype, early_exit)
    seconds = time.monotonic() - t_start
    if run.log0 and pending:
      run.log0(progress.line())
    complete, manifest = _finish(run, poll_s)
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


def _open_data(data: Any, split: str, data_dir: str | None) -> tuple[Any, str]:
  """(the source, its spec as recorded): `open_source` of a spec, or a source object and its repr.

  Raises:
    ValueError: the source has no records.
  """
  if isinstance(data, str | os.PathLike):
    data = os.fspath(data)
    source = records.open_source(data, split, data_dir)
  else:
    source, data = data, repr(data)
  if len(source) == 0:
    raise ValueError(f"{data}: the source has no records")
  return source, data


def _collate_images(rows: list[dict]) -> dict:
  """grain's `batch_fn`: `shards.collate` of the prepared "image"s."""
  return shards.collate(rows, "image")


def _check_job(run: _Run, poll_s: float) -> None:
  """Every process checks OUT/job.json; process 0 (or, for independent workers, any) writes it."""
  out = run.out
  write = run.process_index == 0 or not run.wait_for_others
  shards.check_or_write_job(out, run.job, write=write, holds="tokens")
  if run.wait_for_others and run.process_index != 0:
    _wait(
      lambda: (out / shards.JOB_FILE).is_file(),
      poll_s,
      timeout_s=600.0,
      what=f"process 0 to write {out / shards.JOB_FILE} (did it fail?)",
    )
    shards.check_or_write_job(out, run.job, write=False, holds="tokens")


def _log_start(run: _Run, mine: int, pending: int, devices: int, criterion: str) -> None:
  """Process 0's opening lines: the job, this process's share and the criterion."""
  if not run.log0:
    return
  shard_size = run.job["shard_size"]
  if shard_size % run.batch_size:
    run.log0(
      f"note: shard_size {shard_size} is not a multiple of batch {run.batch_size}; the last "
      "batch of every shard is padded"
    )
  run.log0(
    f"{run.tag}{len(run.source)} images in {run.num_shards} shards of {shard_size} -> {run.out}; "
    f"this process: {mine} shards, {mine - pending} already done; batch {run.batch_size} on "
    f"{devices} device(s); criterion {criterion}"
  )


def _encode_batches(run: _Run, batches, progress: _Progress, tdtype: str, early_exit: bool) -> None:
  """Encodes the pending shards' batches and commits each shard once all its images are done."""
  import jax

  tokenizer = run.tokenizer
  die = _die_point({"process_index": run.process_index})
  buf = shards.ShardBuffer(len(run.source), run.job["shard_size"])
  hist, tokens_sum = {}, 0
  t = tokenizer.tokens_per_iteration
  for batch in batches:
    real, good, rows = buf.begin(batch)
    if rows.size:
      imgs = batch["image"]
      # Padding and bad rows repeat a real image: they cannot delay the early exit.
      imgs[~good] = imgs[rows[0]]
      enc = tokenizer.encode(imgs, run.criterion, run.threshold, early_exit=early_exit)
      toks, lens, scores = jax.device_get((enc.tokens, enc.lengths, enc.scores))
    n_tok = 0
    for r in np.flatnonzero(real):
      if not good[r]:
        buf.add_bad(batch, r)
        continue
      length = int(lens[r])
      buf.records.append(
        records.encode_record(
          index=int(batch["index"][r]),
          id=batch["id"][r],
          label=int(batch["label"][r]),
          tokens=toks[r, :length],
          scores=scores[: length // t, r],
          token_dtype=tdtype,
        )
      )
      buf.images += 1
      hist[str(length)] = hist.get(str(length), 0) + 1
      n_tok += length
    tokens_sum += n_tok
    progress.tokens += n_tok
    progress.update(int(rows.size), int(real.sum() - rows.size), int(real.sum()))
    if buf.full():
      meta = buf.meta(
        records.FORMAT,
        run.process_index,
        run.process_count,
        length_histogram={k: hist[k] for k in sorted(hist, key=int)},
        total_tokens=tokens_sum,
      )
      shards.write_shard(run.out, buf.shard, run.num_shards, buf.records, meta, die)
      progress.shards += 1
      buf.clear()
      hist, tokens_sum = {}, 0


def _finish(run: _Run, poll_s: float) -> tuple[bool, dict | None]:
  """Waits for the other processes (if asked) and writes the manifest once every shard is done.

  Returns:
    (complete, the manifest if this process wrote it else None).
  """
  out, s_total, log0, tag = run.out, run.num_shards, run.log0, run.tag
  if run.wait_for_others:

    def all_done() -> bool:
      return shards.all_committed(out, s_total)

    if not all_done() and log0:
      log0(f"{tag}own shards done; waiting for the other processes")
    # No timeout: if another process dies, jax.distributed's heartbeat ends this one.
    _wait(all_done, poll_s, what=f"{tag}the other processes' shards", log=log0)
  complete = shards.all_committed(out, s_total)
  manifest = None
  if complete and (run.process_index == 0 or not run.wait_for_others):
    manifest = records.build_manifest(out)
    shards.write_manifest(out, manifest)
    if log0:
      log0(
        f"{tag}complete: {manifest['num_records']} images tokenized, {manifest['num_bad']} bad, "
        f"mean {manifest['mean_tokens_per_image']:.2f} tokens/image, histogram "
        f"{manifest['token_length_histogram']} -> {out / shards.MANIFEST_FILE}"
      )
  elif not complete and log0:
    left = shards.num_pending(out, s_total)
    log0(f"{tag}{left} of {s_total} shards still pending (other processes)")
  return complete, manifest


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
