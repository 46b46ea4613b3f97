"""The command line of `python -m alit_jax.tokenize_dataset` (flags: `parse_args`)."""

from __future__ import annotations

import os
import sys
import time

from alit_jax.tokenize_dataset.job import tokenize_dataset
from alit_jax.tokenize_dataset.lock import OutputLockedError


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
