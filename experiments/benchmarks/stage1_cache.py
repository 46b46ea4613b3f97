r"""Stage-1 steps/s of the demo config with and without the base cache (`alit_jax.data.base_cache`).

  PYTHONPATH=. python experiments/benchmarks/stage1_cache.py [--phases warmup,full] \
      [--steps warmup=40,full=10] [--base DIR] [--out experiments/benchmarks/results/...json]

For each phase of `configs/demo_alit.py` (`warmup`: 1 rollout iteration, the recipe's first run;
`full`: all 8), two measurements, each without and with the cache:

* trainer: `python -m alit_jax.train`'s loop (`trainer.train_and_evaluate`) for `steps + 1`
  steps with the demo config as it is (data pipeline with its grain worker, sampled halting,
  metrics fetched one step late), the first step (compilation) excluded: steps/s is the
  trainer's own `images_per_sec` / batch. Checkpoints only at the end and no image summaries,
  so neither is in the timed window.
* step: the jitted step alone (`steps.train_step` on uint8 images vs `steps.train_step_cached`
  on the cached arrays), median of `steps` calls after one compiling call, no data loading;
  beside it the base encoder alone on the same batch (what the cache removes).

The cache is built once (`base_cache.build_from_config`, 1 view per image, as many images as the
longest trainer run reads) and its build rate is reported. The base is the demo VQGAN's
architecture (`configs/demo_vqgan.py`) with random weights unless `--base` names an exported
one: speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "experiments" / "benchmarks" / "results" / "stage1_cache_cpu.json"
DEFAULT_STEPS = {"warmup": 40, "full": 10}


def _cpu_name() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "?"


def random_demo_base(directory: pathlib.Path) -> pathlib.Path:
  """Writes a random-weight VQGAN with `configs/demo_vqgan.py`'s architecture to `directory`."""
  import jax
  import numpy as np

  from alit_jax import checkpoint
  from alit_jax.train import common, gan_stage
  from configs import demo_vqgan

  cfg = gan_stage.vqgan_model_config(demo_vqgan.get_config(None).model)
  variables = jax.device_get(common.init_random_base(cfg, 64, np.uint32(0)))
  checkpoint.save_base(directory, cfg, variables, meta={"source": "random (benchmark)"})
  return directory


def demo_config(phase: str, base_dir: pathlib.Path, steps: int, cache: str | None):
  from configs import demo_alit

  c = demo_alit.get_config(f"phase={phase}")
  c.base_checkpoint = str(base_dir)
  c.total_steps = steps + 1
  c.log_every_steps = steps + 1
  c.checkpoint_every_steps = steps + 1
  c.image_summary_every_steps = 0
  c.input.base_cache = cache
  return c


def trainer_steps_per_s(config, workdir: pathlib.Path) -> dict:
  """Runs the trainer; steps/s over all but the first step (the trainer's own timing)."""
  from alit_jax.train import trainer

  t0 = time.perf_counter()
  result = trainer.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - t0
  ips = result["metrics"]["images_per_sec"]
  return {
    "steps_per_s": ips / config.input.global_batch_size,
    "timed_steps": config.total_steps - 1,
    "wall_s_incl_compile": wall,
    "final_loss": result["metrics"]["loss"],
  }


def step_seconds(config, cache_dir: str, steps: int) -> dict:
  """Median seconds of the jitted step alone, on the same 16 cached views both ways."""
  import jax
  import numpy as np

  from alit_jax.data import base_cache
  from alit_jax.models.alit import ALIT
  from alit_jax.models.base_tokenizers import build_base
  from alit_jax.train import steps as steps_lib
  from alit_jax.train import trainer

  model_config, _, base_vars, _ = base_cache.resolve_base(config)
  model, base = ALIT(model_config.alit), build_base(model_config.base)
  spec = trainer.stage1_spec(config, model_config)
  cache = base_cache.BaseCache(cache_dir)
  b = config.input.global_batch_size
  recs = [cache.view(i, 0) for i in range(b)]
  images = np.stack([r["image"] for r in recs])
  cached = {k: np.stack([r[k] for r in recs]) for k in base_cache.BASE_KEYS}
  hp = steps_lib.hparams(
    lr=1e-3, min_lr=1e-4, warmup_steps=30, total_steps=1000, ema_decay=0.99, steps_per_epoch=1000
  )
  seed = np.uint32(0)
  out = {}
  # The part the cache removes, alone: the frozen base encoder on the batch.
  from alit_jax.models import rollout as rollout_lib

  encode = jax.jit(lambda bv, x: rollout_lib.base_encode(base, bv, steps_lib.to_float(x)))
  jax.block_until_ready(encode(base_vars, images))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(encode(base_vars, images))
    times.append(time.perf_counter() - t0)
  out["base_encode_alone"] = {"median_s": statistics.median(times), "times": times}
  for name in ("images", "cache"):
    state = jax.jit(steps_lib.create_train_state, static_argnums=(1, 2))(
      jax.random.key(0), model, spec
    )
    if name == "images":
      f = jax.jit(steps_lib.train_step, static_argnums=(5, 6, 7), donate_argnums=(0,))

      def call(s, f=f):
        return f(s, base_vars, images, hp, seed, model, base, spec)
    else:
      f = jax.jit(steps_lib.train_step_cached, static_argnums=(6, 7, 8), donate_argnums=(0,))

      def call(s, f=f):
        return f(s, base_vars, images, cached, hp, seed, model, base, spec)

    t0 = time.perf_counter()
    state, m = call(state)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, m = call(state)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    out[name] = {"median_s": statistics.median(times), "first_call_s": compile_s, "times": times}
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--phases", default="warmup,full")
  p.add_argument("--steps", default="", help="timed steps per phase, e.g. warmup=40,full=10")
  p.add_argument("--base", default=None, help="an exported demo VQGAN (default: random weights)")
  p.add_argument("--out", default=str(DEFAULT_OUT))
  args = p.parse_args(argv)
  from absl import flags

  flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
  import jax

  from alit_jax.data import base_cache

  phases = [x for x in args.phases.split(",") if x]
  n_steps = dict(DEFAULT_STEPS)
  for item in filter(None, args.steps.split(",")):
    k, _, v = item.partition("=")
    n_steps[k] = int(v)
  results = {
    "date": datetime.date.today().isoformat(),
    "machine": {
      "cpu": _cpu_name(),
      "cores": os.cpu_count(),
      "platform": jax.default_backend(),
      "jax": jax.__version__,
      # The machine may be shared: the 1-minute load average before and after the runs.
      "load_average_start": os.getloadavg()[0],
    },
    "config": "configs/demo_alit.py (batch 16, 64x64, width 128, 2+2 layers, 8 x 32 tokens)",
    "phases": {},
  }
  with tempfile.TemporaryDirectory(prefix="stage1_cache_bench_") as tmp:
    tmp = pathlib.Path(tmp)
    base_dir = pathlib.Path(args.base) if args.base else random_demo_base(tmp / "base")
    results["base"] = str(args.base) if args.base else "demo VQGAN architecture, random weights"
    # One cache for every run: 1 view per image, enough images that no run repeats one.
    num_images = 16 * (max(n_steps[ph] for ph in phases) + 1)
    cache_dir = tmp / "cache"
    t0 = time.perf_counter()
    built = base_cache.build_from_config(
      demo_config(phases[0], base_dir, 1, None), cache_dir, views=1, num_images=num_images, log=None
    )
    build_s = time.perf_counter() - t0
    results["cache_build"] = {
      "images": built.images,
      "views": 1,
      "seconds_incl_compile": build_s,
      "images_per_s": built.images_per_s,
      "bytes": sum(f.stat().st_size for f in (cache_dir / "shards").glob("*.array_record")),
    }
    print(
      f"cache: {built.images} images x 1 view in {build_s:.1f} s ({built.images_per_s:.1f} img/s)",
      flush=True,
    )
    for ph in phases:
      s = n_steps[ph]
      row = {"timed_steps": s}
      for name, cache in (("images", None), ("cache", str(cache_dir))):
        c = demo_config(ph, base_dir, s, cache)
        row[f"trainer_{name}"] = trainer_steps_per_s(c, tmp / f"wd_{ph}_{name}")
        print(
          f"{ph} trainer {name}: {row[f'trainer_{name}']['steps_per_s']:.3f} steps/s", flush=True
        )
      row["step"] = step_seconds(demo_config(ph, base_dir, s, None), str(cache_dir), s)
      results["phases"][ph] = row
  results["machine"]["load_average_end"] = os.getloadavg()[0]
  print(
    f"\nload average (1 min): {results['machine']['load_average_start']:.2f} at the start, "
    f"{results['machine']['load_average_end']:.2f} at the end"
  )
  print(
    "| phase | trainer steps/s, images | trainer steps/s, cache | speedup | step s, images |"
    " step s, cache | speedup | base encoder alone, s |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for ph, row in results["phases"].items():
    a, b = row["trainer_images"]["steps_per_s"], row["trainer_cache"]["steps_per_s"]
    sa, sb = row["step"]["images"]["median_s"], row["step"]["cache"]["median_s"]
    row["trainer_speedup"], row["step_speedup"] = b / a, sa / sb
    enc = row["step"]["base_encode_alone"]["median_s"]
    print(
      f"| {ph} | {a:.3f} | {b:.3f} | {b / a:.2f}x | {sa:.3f} | {sb:.3f} | {sa / sb:.2f}x "
      f"| {enc:.3f} |"
    )
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=1) + "\n")
  print(f"\nwrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
