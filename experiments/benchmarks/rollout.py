r"""Rollout and encode speed: scan vs unrolled, per config and batch size.

    python experiments/benchmarks/rollout.py [--configs tiny,medium,alit_small] [--batches 1,8]
        [--repeats 3] [--base-chunk auto|none|N] [--compare REFERENCE_JSON]
        [--out experiments/benchmarks/results/rollout_<platform>.json]

Times the full 8-iteration forward of the reference's evaluation (`forward(imgs,
reconstruction_iters="all")`: base encoder, every rollout iteration, and the base decoder at every
iteration) with random weights, float32, for both rollout implementations, and `encode` with the
scan / while_loop (a threshold no image meets, so all iterations run, and a loose one that exits
after the first). Prints a table (median of `--repeats` timed runs after one warm-up; compile time
separately) and writes JSON.

The reference side: `torch_reference.py` (same configs) writes a JSON that `--compare` reads.

Configs: `tiny` = the reference-vector case (ALIT 64 wide, 2 layers, 4 heads, VQGAN ch 32),
`medium` = ALIT 512 / 4 layers / 8 heads with the real VQGAN, `alit_small` = the released
alit_small (1024 / 8 / 8) with the real VQGAN.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from alit_jax import Tokenizer
from alit_jax.models.configs import ALITConfig, ModelConfig, VQGANConfig, named_config


def make_config(name: str) -> ModelConfig:
  if name == "alit_small":
    return named_config("alit_small", "vqgan")
  if name == "medium":
    c = named_config("alit_small", "vqgan")
    a = dataclasses.replace(
      c.alit,
      encoder_width=512,
      decoder_width=512,
      encoder_layers=4,
      decoder_layers=4,
      encoder_heads=8,
      decoder_heads=8,
    )
    return ModelConfig(alit=a, base=c.base, name="medium_vqgan")
  if name == "tiny":
    base = VQGANConfig(
      ch=32, ch_mult=(1, 1, 1, 1, 2), num_res_blocks=2, z_channels=32, embed_dim=32, n_embed=64
    )
    a = ALITConfig(
      base="vqgan",
      base_embed_dim=32,
      base_codebook_size=64,
      encoder_width=64,
      encoder_layers=2,
      encoder_heads=4,
      decoder_width=64,
      decoder_layers=2,
      decoder_heads=4,
      codebook_size=128,
      token_dim=12,
    )
    return ModelConfig(alit=a, base=base, name="tiny_vqgan")
  raise ValueError(f"unknown config {name!r}")


def _time(fn, repeats: int) -> tuple[float, float]:
  """(first call incl. compile, median of `repeats` later calls), seconds."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  runs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    runs.append(time.perf_counter() - t0)
  return first, statistics.median(runs)


def bench(
  config_name: str, batch: int, repeats: int, what: list[str], base_chunk="auto"
) -> list[dict]:
  cfg = make_config(config_name)
  tok = Tokenizer.random(cfg, seed=0, base_chunk=base_chunk)
  rng = np.random.default_rng(0)
  images = jnp.asarray(
    rng.uniform(0, 1, (batch, cfg.alit.image_size, cfg.alit.image_size, 3)), jnp.float32
  )
  rows = []
  cases = {
    "rollout_scan": lambda: tok.rollout(images, impl="scan")["reconstructions"],
    "rollout_unrolled": lambda: tok.rollout(images, impl="unrolled")["reconstructions"],
    "encode_all_iters": lambda: tok.encode(images, threshold=0.0).reconstructions,
    "encode_exit_at_32": lambda: tok.encode(images, threshold=1e9).reconstructions,
  }
  for name in what:
    first, med = _time(cases[name], repeats)
    rows.append(
      {
        "config": config_name,
        "batch": batch,
        "case": name,
        "first_call_s": round(first, 3),
        "median_s": round(med, 4),
        "images_per_s": round(batch / med, 3),
      }
    )
    print(
      f"  {config_name:>10} b{batch:<3} {name:<18} first {first:8.2f}s  median {med:8.3f}s  {batch / med:8.2f} img/s",
      flush=True,
    )
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--configs", default="tiny,medium,alit_small")
  p.add_argument("--batches", default="1,8")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument(
    "--cases", default="rollout_scan,rollout_unrolled,encode_all_iters,encode_exit_at_32"
  )
  p.add_argument(
    "--base-chunk",
    default="auto",
    help="images per base encoder/decoder call: auto (Tokenizer default), none (whole batch), or N",
  )
  p.add_argument(
    "--compare",
    default=None,
    help="JSON from torch_reference.py (same machine): adds the reference's time and the speedup",
  )
  p.add_argument("--out", default=None)
  a = p.parse_args()
  base_chunk = {"auto": "auto", "none": None}.get(a.base_chunk.lower(), None)
  if a.base_chunk.lower() not in ("auto", "none"):
    base_chunk = int(a.base_chunk)
  dev = jax.devices()[0]
  env = {
    "platform": dev.platform,
    "device": getattr(dev, "device_kind", str(dev)),
    "jax": jax.__version__,
    "cpu_count": os.cpu_count(),
    "machine": platform.machine(),
    "dtype": "float32",
    "base_chunk": a.base_chunk,
  }
  print(f"device: {env}")
  rows = []
  with jax.default_matmul_precision("highest"):
    for c in a.configs.split(","):
      for b in [int(v) for v in a.batches.split(",")]:
        rows += bench(c, b, a.repeats, a.cases.split(","), base_chunk)
  ref = {}
  if a.compare:
    for r in json.loads(pathlib.Path(a.compare).read_text())["rows"]:
      ref[(r["config"], r["batch"])] = r["median_s"]
  print(
    "\n| config | batch | case | compile+first (s) | median (s) | images/s | reference (s) "
    "| speedup |\n|---|---|---|---|---|---|---|---|"
  )
  for r in rows:
    t = ref.get((r["config"], r["batch"]))
    # Only the full rollouts do the reference forward's work; encode is this project's own.
    if t is not None and r["case"].startswith("rollout"):
      r["reference_median_s"] = t
      r["speedup_vs_reference"] = round(t / r["median_s"], 3)
    print(
      f"| {r['config']} | {r['batch']} | {r['case']} | {r['first_call_s']} | {r['median_s']} "
      f"| {r['images_per_s']} | {r.get('reference_median_s', '')} "
      f"| {r.get('speedup_vs_reference', '')} |"
    )
  out = pathlib.Path(a.out or f"experiments/benchmarks/results/rollout_{env['platform']}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"env": env, "rows": rows}, indent=2))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
