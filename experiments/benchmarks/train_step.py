r"""Throughput and memory of the stage-1 train step (forward, backward, clip, AdamW, EMA).

  python experiments/benchmarks/train_step.py                       # CPU: tiny, medium, small
  python experiments/benchmarks/train_step.py --configs=small --batches=2,4 --impl=unrolled
  python experiments/benchmarks/train_step.py --out=/tmp/train_step.json

Configs (all with the reference's training settings: VQGAN base, quantized + factorized
latents, sampled dynamic halting at 0.55, loss at every iteration):
  tiny    models.configs.tiny_config(): 64x64 images, width 64, 1 layer, 4 tokens x 3 iterations,
          small 5-level VQGAN (the runlocal / test model);
  medium  alit_tiny (width 512, 8 layers, 8 heads) on the full 256x256 VQGAN;
  small   alit_small (width 1024, 8 layers, 8 heads) on the full 256x256 VQGAN.
Weights are random (speed does not depend on them). Every (config, batch) runs in a fresh
subprocess so that its peak resident memory is its own. Reported: images/s over the timed steps
(after compiling and `--warmup` untimed steps), compile time, XLA's planned device memory
(arguments + outputs + temporaries, from `compiled.memory_analysis()`), the device's peak bytes
in use when the backend reports it (GPU/TPU), and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CONFIGS = ("tiny", "medium", "small")
DEFAULT_BATCHES = {"tiny": (8, 32), "medium": (2, 4), "small": (2,)}


def model_config(name: str):
  from alit_jax.models import configs

  if name == "tiny":
    return configs.tiny_config("vqgan")
  if name == "medium":
    return configs.named_config("alit_tiny", "vqgan")
  if name == "small":
    return configs.named_config("alit_small", "vqgan")
  raise ValueError(f"unknown config {name!r}; choose from {CONFIGS}")


def run_one(name: str, batch: int, steps: int, impl: str, dtype: str, warmup: int = 1) -> dict:
  """Times `steps` train steps of one config in this process."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from alit_jax.models import rollout as rollout_lib
  from alit_jax.models.alit import ALIT
  from alit_jax.models.base_tokenizers import build_base
  from alit_jax.train import steps as steps_lib

  mc = model_config(name)
  cdtype = jnp.dtype(dtype)
  model, base = ALIT(mc.alit, dtype=cdtype), build_base(mc.base, dtype=cdtype)
  spec = steps_lib.Stage1Spec(
    halting=rollout_lib.Halting("sample", mc.alit.halting_threshold), impl=impl
  )
  fast = {"xla_backend_optimization_level": 0}
  state = jax.jit(steps_lib.create_train_state, static_argnums=(1, 2), compiler_options=fast)(
    jax.random.key(0), model, spec
  )
  s = mc.alit.image_size
  base_vars = jax.jit(build_base(mc.base).init, compiler_options=fast)(
    jax.random.key(1), jnp.zeros((1, s, s, 3), jnp.float32)
  )
  hp = steps_lib.hparams(
    lr=1e-4, min_lr=0.0, warmup_steps=0, total_steps=1000, ema_decay=0.9999, steps_per_epoch=100
  )
  seed = jnp.uint32(0)
  rng = np.random.default_rng(0)
  images = [jnp.asarray(rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8)) for _ in range(2)]
  step = jax.jit(steps_lib.train_step, static_argnums=(5, 6, 7), donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = step.lower(state, base_vars, images[0], hp, seed, model, base, spec).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  planned = None
  if mem is not None:
    planned = int(
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes
    )
  for i in range(warmup):
    state, m = compiled(state, base_vars, images[i % 2], hp, seed)
    jax.block_until_ready(m)
  times = []
  for i in range(steps):
    t = time.perf_counter()
    state, m = compiled(state, base_vars, images[i % 2], hp, seed)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  dev = jax.devices()[0]
  stats = dev.memory_stats() or {}
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
  med = float(np.median(times))
  return {
    "config": name,
    "model": mc.name,
    "batch": batch,
    "impl": impl,
    "dtype": dtype,
    "device": f"{dev.platform}:{dev.device_kind}",
    "num_devices": 1,
    "params_m": n_params / 1e6,
    "steps_timed": steps,
    "step_s_median": med,
    "step_s_mean": float(np.mean(times)),
    "images_per_s": batch / med,
    "compile_s": compile_s,
    "xla_planned_bytes": planned,
    "device_peak_bytes": stats.get("peak_bytes_in_use"),
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "loss": float(m["loss"]),
  }


def _fmt_bytes(b):
  return "-" if b is None else f"{b / 2**30:.2f}G"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--configs", default=",".join(CONFIGS))
  p.add_argument("--batches", default="", help="comma list (default: per config)")
  p.add_argument("--steps", type=int, default=3, help="timed steps per run")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
  p.add_argument("--impl", default="scan", choices=("scan", "unrolled"))
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--out", default="", help="write the results as JSON here")
  p.add_argument("--one", default="", help=argparse.SUPPRESS)  # "config:batch" (subprocess)
  args = p.parse_args(argv)

  if args.one:
    name, batch = args.one.split(":")
    print(json.dumps(run_one(name, int(batch), args.steps, args.impl, args.dtype, args.warmup)))
    return 0

  results = []
  for name in args.configs.split(","):
    batches = [int(b) for b in args.batches.split(",")] if args.batches else DEFAULT_BATCHES[name]
    for batch in batches:
      cmd = [
        sys.executable,
        __file__,
        f"--one={name}:{batch}",
        f"--steps={args.steps}",
        f"--impl={args.impl}",
        f"--dtype={args.dtype}",
      ]
      env = dict(os.environ)
      env.setdefault(
        "PYTHONPATH", os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
      )
      proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
      if proc.returncode != 0:
        print(f"{name} batch {batch}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
        continue
      r = json.loads(proc.stdout.strip().splitlines()[-1])
      results.append(r)
      print(
        f"{r['config']:>7} {r['model']:>17} b={r['batch']:<3} {r['impl']:>8} {r['dtype']:>8} "
        f"{r['images_per_s']:9.3f} img/s  step {r['step_s_median']:8.3f}s  "
        f"compile {r['compile_s']:6.1f}s  xla {_fmt_bytes(r['xla_planned_bytes']):>7}  "
        f"dev-peak {_fmt_bytes(r['device_peak_bytes']):>7}  rss {_fmt_bytes(r['peak_rss_bytes'])}"
        f"  [{r['device']}]",
        flush=True,
      )
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
