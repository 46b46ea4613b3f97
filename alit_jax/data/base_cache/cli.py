"""The command line of `python -m alit_jax.data.base_cache` (flags: `define_flags`)."""

from __future__ import annotations

import sys
import time

from alit_jax.data.base_cache.build import build_from_config

# ------------------------------------------------------------------------------------------------
# Command line


def main(argv) -> None:
  """The command line (flags: `define_flags`)."""
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


def define_flags() -> None:
  """Defines the command line's absl flags (once, before `app.run(main)`)."""
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
