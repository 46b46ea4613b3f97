"""`train_and_evaluate(config, workdir)`: the training loop of every stage.

Stages (`config.stage`), each a small object that sets up its model, state and jitted steps
while the loop (data, mesh, resume, checkpoints, logging, NaN guard, summaries) is shared:

* "latent_distillation": stage 1 (`configs/alit_pretrain.py`, `steps.train_step`);
* "full_finetuning": stage 2 (`configs/alit_finetune.py`, `gan_steps` with `ALITTask`);
* "vqgan": a base VQGAN from scratch (`configs/vqgan_train.py`, `gan_steps` with `VQGANTask`).

One process per host; all processes run the same program (SPMD). Per step: the grain iterator
yields this process's share of the global batch (uint8), `make_array_from_process_local_data`
assembles the global batch sharded over the mesh, and the stage's jitted step(s) update the
sharded, donated train state. Metrics are fetched one step late (the host never waits for the
step it just dispatched), except before a checkpoint: a checkpoint is only written after the
losses of every step up to it were checked finite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging as std_logging
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from alit_jax import checkpoint
from alit_jax.data import base_cache, pipeline, sources
from alit_jax.models import configs as model_configs
from alit_jax.models.alit import ALIT
from alit_jax.models.base_tokenizers import build_base
from alit_jax.train import checkpoints, common, gan_stage, optim, sharding, steps, writers


class _QuietOrbax(std_logging.Filter):
  """Drops Orbax's per-save INFO chatter (warnings and errors still pass)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno > std_logging.INFO or "orbax" not in record.pathname


def _quiet_orbax_logs() -> None:
  logger = std_logging.getLogger("absl")
  if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
    logger.addFilter(_QuietOrbax())


class NonFiniteLossError(FloatingPointError):
  """The loss or gradient norm became NaN/Inf; training stopped without saving."""


def _setup_base(
  config: ml_collections.ConfigDict, model_config: model_configs.ModelConfig, workdir: pathlib.Path
) -> tuple[model_configs.ModelConfig, Any]:
  """The frozen base: the workdir's copy (resume), a converted checkpoint, or random."""
  base_dir = workdir / checkpoints.BASE_DIR
  have_copy = (base_dir / checkpoint.CONFIG_FILE).is_file()
  common.barrier("alit_base_exists")
  if have_copy:
    base_cfg, base_vars = checkpoint.load_base(base_dir)
    where = str(base_dir)
  else:
    base_cfg, base_vars, where = common.load_config_base(config, model_config)
    if not config.base_checkpoint:  # config.random_base
      logging.warning("Using a RANDOM frozen base tokenizer (config.random_base=True).")
  model_config = common.adapt_to_base(model_config, base_cfg, where)
  if not have_copy:
    # Collective Orbax save (every process takes part), then the small JSON from process 0.
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(base_dir / checkpoint.PARAMS_DIR, jax.device_get(base_vars), force=True)
    if common.is_main():
      body = {
        "base": {"kind": base_cfg.kind, **dataclasses.asdict(base_cfg)},
        "meta": {"source": where},
      }
      checkpoints.write_json_atomic(base_dir / checkpoint.CONFIG_FILE, body)
    common.barrier("alit_base_written")
  return model_config, base_vars


def _log_source_report(source: Any, writer) -> None:
  """Names the files that `build_folder` skipped (corrupt/unreadable) when the dataset was made."""
  dataset_dir = getattr(source, "dataset_dir", None)
  base = getattr(source, "base", None)
  if dataset_dir is None and base is not None:
    dataset_dir = getattr(base, "dataset_dir", None)
  if dataset_dir is None:
    return
  report_path = pathlib.Path(dataset_dir) / "build_report.json"
  if not report_path.is_file():
    return
  report = json.loads(report_path.read_text())
  skipped = report.get("skipped", [])
  reencoded = report.get("reencoded", [])
  if reencoded:
    logging.info(
      "%d images of %s were converted to RGB when it was built", len(reencoded), report_path.parent
    )
  if not skipped:
    return
  lines = [f"{s['kind']}: {s['file']} ({s['reason']})" for s in skipped]
  logging.warning(
    "%d files under %s were skipped when the dataset was built (%s):\n  %s",
    len(skipped),
    report.get("source", "?"),
    report_path,
    "\n  ".join(lines[:100]) + (f"\n  ... {len(lines) - 100} more" if len(lines) > 100 else ""),
  )
  writer.write_texts(0, {"data/skipped_files": "\n\n".join(lines[:1000])})


def _flat_metrics(m: dict[str, np.ndarray]) -> dict[str, float]:
  out = {}
  for k, v in m.items():
    v = np.asarray(v)
    if v.ndim == 0:
      out[k] = float(v)
    else:
      for i, x in enumerate(v.reshape(-1)):
        out[f"{k}_{i}"] = float(x)
  return out


class MetricsWindow:
  """Averages step metrics over a logging window.

  A metrics dict may carry one one-hot/mask weight vector named `*_iters` (stage 1:
  `loss_iters`; stage 2: `gen_iters` / `disc_iters`); its other (N,) arrays are per-iteration
  values averaged over the steps that took them. Scalars are averaged over the dicts that hold
  them; `lr` and `gan_weight` keep their last value.
  """

  LAST = ("lr", "gan_weight")

  def __init__(self, omit_unvisited: bool = False, num_iters: int | None = None):
    self.omit_unvisited = omit_unvisited
    self.squeeze = num_iters == 1
    self.reset(time.perf_counter())

  def reset(self, t: float) -> None:
    self.sums: dict[str, np.ndarray] = {}
    self.counts: dict[str, np.ndarray] = {}
    self.steps = 0
    self.untimed = 0
    self.t0 = t
    self.last: dict[str, np.ndarray] = {}

  def start_timing(self, t: float) -> None:
    """Excludes the steps so far from the throughput (compilation)."""
    self.untimed = self.steps
    self.t0 = t

  def add_step(self, ms: list[dict[str, np.ndarray]]) -> None:
    """Adds the metrics dicts of one data step (one per update made)."""
    self.steps += 1
    for m in ms:
      self._add(m)

  def _add(self, m: dict[str, np.ndarray]) -> None:
    wkeys = [k for k in m if k.endswith("_iters")]
    # float: summing boolean masks over steps would OR them instead of counting
    w = np.asarray(m[wkeys[0]], np.float32) if wkeys else None
    for k, v in m.items():
      if k == "finite" or k in wkeys:
        continue
      v = np.asarray(v)
      count = w if (v.ndim and w is not None) else np.ones((), np.float32)
      self.sums[k] = v if k not in self.sums else self.sums[k] + v
      self.counts[k] = count if k not in self.counts else self.counts[k] + count
      self.last[k] = v

  def summary(self, t: float, global_batch: int) -> dict[str, float]:
    out = {}
    for k, v in self.sums.items():
      if k in self.LAST:
        out[k] = self.last[k]
        continue
      count = self.counts[k]
      mean = v / np.maximum(count, 1)
      if np.ndim(mean) and self.omit_unvisited:
        mean = np.where(count > 0, mean, np.nan)
      out[k] = mean[0] if (self.squeeze and np.ndim(mean) == 1 and mean.shape[0] == 1) else mean
    out = {k: v for k, v in _flat_metrics(out).items() if np.isfinite(v) or not self.omit_unvisited}
    if self.steps > self.untimed:
      out["images_per_sec"] = (self.steps - self.untimed) * global_batch / max(t - self.t0, 1e-9)
    return out


def _load_init_params(path: str, target: Any) -> Any:
  """Params from a pretrained dir (config.json) or another workdir (its latest EMA)."""
  p = pathlib.Path(os.path.expanduser(path))
  if checkpoints.is_workdir(p):
    step, params = checkpoints.restore_params(p, target, which="ema_params")
    logging.info("init_from: EMA params of %s at step %d", p, step)
    return params
  if not (p / checkpoint.CONFIG_FILE).is_file():
    raise FileNotFoundError(
      f"init_from {p}: neither a pretrained directory (config.json) nor a training workdir"
    )
  _, variables, _ = checkpoint.load_pretrained(p)
  params = variables["alit"]["params"]
  bad = common.shape_mismatches(params, target)
  if bad is None:
    raise ValueError(f"init_from {p}: parameter tree differs from the model's")
  if bad:
    raise ValueError(f"init_from {p}: shapes differ from the model's: {bad}")
  logging.info("init_from: params of pretrained dir %s", p)
  return sharding.put_global(params, jax.tree.map(lambda t: t.sharding, target))


STAGES = ("latent_distillation", "full_finetuning", "vqgan")


class _Stage1:
  """Stage 1 (latent distillation): a frozen base, ALIT trained by `steps.train_step`."""

  omit_unvisited = False

  def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path):
    self.config = config
    self.workdir = workdir

  def prepare(self) -> None:
    config = self.config
    model_config = common.build_model_config(config.model)
    self.model_config, base_vars = _setup_base(config, model_config, self.workdir)
    self.base_vars_host = base_vars
    # Stage 1 on cached base outputs (`python -m alit_jax.data.base_cache`), checked up front.
    self.base_cache = None
    if config.input.get("base_cache"):
      self.base_cache = base_cache.BaseCache(os.path.expanduser(config.input.base_cache))
      base_cache.check_for_training(
        self.base_cache,
        config,
        self.model_config,
        base_vars,
        str(self.workdir / checkpoints.BASE_DIR),
      )
    common.write_model_config(self.workdir, self.model_config, {"stage": config.stage})
    dtype = jnp.dtype(config.compute_dtype)
    self.model = ALIT(self.model_config.alit, dtype=dtype)
    self.base = build_base(self.model_config.base, dtype=dtype)
    self.spec = stage1_spec(config, self.model_config)
    self.image_size = self.model_config.alit.image_size
    self.num_iters = self.model_config.alit.max_rollout_iters

  def build(self, ctx: common.Context) -> None:
    self.ctx = ctx
    model, spec = self.model, self.spec
    abstract = jax.eval_shape(
      functools.partial(steps.create_train_state, model=model, spec=spec), ctx.root
    )
    self.state_sh = sharding.tree_shardings(abstract, ctx.mesh, ctx.rules, ctx.min_fsdp_size)
    self.abstract_state = common.with_shardings(abstract, self.state_sh)
    base_sh = sharding.tree_shardings(self.base_vars_host, ctx.mesh, ctx.rules, ctx.min_fsdp_size)
    self.base_vars = sharding.put_global(self.base_vars_host, base_sh)
    repl = sharding.replicated(ctx.mesh)
    batch_sh = sharding.batch_sharding(ctx.mesh)
    # Module-level functions with static positional args: re-jitting them in a later call
    # (a resumed run, tests) hits JAX's compilation cache.
    self.p_train_step = jax.jit(
      steps.train_step,
      static_argnums=(5, 6, 7),
      in_shardings=(self.state_sh, base_sh, batch_sh, repl, repl),
      out_shardings=(self.state_sh, repl),
      donate_argnums=(0,),
      compiler_options=common.step_compiler_options(self.config),
    )
    if self.base_cache is not None:
      self.p_train_step_cached = jax.jit(
        steps.train_step_cached,
        static_argnums=(6, 7, 8),
        in_shardings=(self.state_sh, base_sh, batch_sh, batch_sh, repl, repl),
        out_shardings=(self.state_sh, repl),
        donate_argnums=(0,),
        compiler_options=common.step_compiler_options(self.config),
      )
    self.which = "ema_params" if self.config.summary_params == "ema" else "params"
    self.p_reconstruct = jax.jit(
      steps.reconstruct,
      static_argnums=(5, 6, 7, 8, 9),
      in_shardings=(self.state_sh[self.which], base_sh, batch_sh, repl, repl),
      out_shardings=repl,
    )

  def init_state(self) -> Any:
    if self.config.init_from:
      params = _load_init_params(self.config.init_from, self.abstract_state["params"])
      return jax.jit(
        steps.init_train_state,
        static_argnums=(1,),
        out_shardings=self.state_sh,
        compiler_options=common.FAST_COMPILE,
      )(params, self.spec)
    return jax.jit(
      steps.create_train_state,
      static_argnums=(1, 2),
      out_shardings=self.state_sh,
      compiler_options=common.FAST_COMPILE,
    )(self.ctx.root, self.model, self.spec)

  def describe(self) -> str:
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state["params"]))
    return f"{self.model_config.name}: {n / 1e6:.2f}M trainable params"

  def train_step(self, state: Any, images: jax.Array, step: int) -> tuple[Any, list[dict]]:
    c = self.ctx
    state, metrics = self.p_train_step(
      state, self.base_vars, images, c.hp, c.seed, self.model, self.base, self.spec
    )
    return state, [metrics]

  def train_step_cached(
    self, state: Any, images: jax.Array, batch: dict[str, np.ndarray], step: int
  ) -> tuple[Any, list[dict]]:
    """`train_step` with the base outputs taken from the host batch (`config.input.base_cache`)."""
    c = self.ctx
    keys = [k for k in base_cache.BASE_KEYS if k in batch]
    base_batch = {k: sharding.global_batch(batch[k], c.mesh) for k in keys}
    state, metrics = self.p_train_step_cached(
      state, self.base_vars, images, base_batch, c.hp, c.seed, self.model, self.base, self.spec
    )
    return state, [metrics]

  def write_summary(self, writer, state: Any, images: jax.Array, step: int) -> None:
    out = self.p_reconstruct(
      state[self.which],
      self.base_vars,
      images,
      self.ctx.seed,
      state["step"],
      self.model,
      self.base,
      self.spec.halting,
      self.spec.impl,
      self.ctx.num_summary,
    )
    common.write_reconstructions(writer, step, out, self.config.summary_params)


def _make_stage(config: ml_collections.ConfigDict, workdir: pathlib.Path):
  if config.stage == "latent_distillation":
    return _Stage1(config, workdir)
  if config.input.get("base_cache"):
    raise ValueError(
      f"config.input.base_cache is for stage 1 (latent_distillation), not {config.stage!r}"
    )
  return gan_stage.GanStage(config, workdir)


def non_finite_message(s: int, m: dict[str, np.ndarray], last_saved, ckpt_dir) -> str:
  """One line: the step, the values, what is kept and what a rerun does."""
  if last_saved:
    kept = (
      f"the last good checkpoint (step {last_saved}) in {ckpt_dir} is intact, and a rerun "
      "resumes from it"
    )
  else:
    kept = "no checkpoint was written yet, so a rerun starts from step 0"
  values = ", ".join(
    f"{k} {np.asarray(m[k]).sum():.4g}"
    for k in ("loss", "grad_norm", "disc_loss", "disc_grad_norm")
    if k in m
  )
  return (
    f"non-finite loss or gradient norm ({values}) at step {s}; training stopped and nothing "
    f"was saved after it: {kept}. Lower the learning rate (config.lr, or config.blr when lr is "
    "unset) or use float32 (config.compute_dtype) before rerunning."
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Trains (or resumes training) as configured; checkpoints and logs go to `workdir`.

  Args:
    config: a `configs/alit_pretrain.py`, `configs/alit_finetune.py` or `configs/vqgan_train.py`
      ConfigDict (`config.stage` selects the stage).
    workdir: output directory; rerunning with the same workdir resumes from its newest
      checkpoint that restores (model, optimizer(s), EMA, discriminators, step and data
      position); `metrics.jsonl` rows past that step are dropped and rewritten.

  Returns:
    {"state": the final train state, "step": its step, "metrics": the last logged metrics}.

  Raises:
    NonFiniteLossError: a step produced a NaN/Inf loss or gradient norm (nothing is saved after
      the last good checkpoint).
    checkpoints.NoUsableCheckpointError: the workdir has checkpoints but none restores (a
      newer one that does not is moved aside and the one before it used instead).
  """
  if config.stage not in STAGES:
    raise ValueError(f"unknown stage {config.stage!r}; this trainer implements {STAGES}")
  workdir = pathlib.Path(os.path.expanduser(os.fspath(workdir))).absolute()
  _quiet_orbax_logs()
  if common.is_main():
    workdir.mkdir(parents=True, exist_ok=True)
  common.barrier("alit_workdir")
  logging.info(
    "workdir %s; process %d of %d; %d devices (%d local)",
    workdir,
    jax.process_index(),
    jax.process_count(),
    jax.device_count(),
    jax.local_device_count(),
  )
  stage = _make_stage(config, workdir)
  stage.prepare()
  if common.is_main():
    checkpoints.write_json_atomic(
      workdir / checkpoints.TRAIN_CONFIG, json.loads(config.to_json_best_effort())
    )

  cache = getattr(stage, "base_cache", None)  # stage 1 on cached base outputs
  inp = config.input
  source = (
    cache if cache is not None else sources.get_source(inp.data, inp.split, inp.data_dir or None)
  )
  gbs = int(inp.global_batch_size)
  d = optim.durations(config, len(source), gbs)
  logging.info(
    "%d examples, %d steps/epoch; %d steps (%.2f epochs), warm-up %d; peak lr %.3g",
    len(source),
    d.steps_per_epoch,
    d.total,
    d.total / d.steps_per_epoch,
    d.warmup,
    d.lr,
  )
  root = jax.random.key(config.seed)
  data_seed = int(jax.random.randint(steps.stream_key(root, "data"), (), 0, 2**31 - 1))
  mesh = sharding.make_mesh(dict(config.mesh))
  if gbs % mesh.size:
    raise ValueError(f"global batch {gbs} is not divisible by the {mesh.size} devices of the mesh")
  stage.build(_context(config, mesh, d, root, gbs))

  writer = writers.create_writer(workdir, enabled=common.is_main())
  _log_source_report(source, writer)
  if cache is not None:
    logging.info(
      "training from %s (%d bad images skipped when it was built)", cache, cache.manifest["num_bad"]
    )
  iterator = _train_iterator(config, source, cache, stage.image_size, data_seed)
  ckpt = checkpoints.TrainCheckpointer(
    workdir,
    max_to_keep=config.keep_checkpoints,
    keep_period=d.keep_every,
    async_save=bool(config.async_checkpoints),
  )
  precision = (
    contextlib.nullcontext()
    if config.matmul_precision == "default"
    else jax.default_matmul_precision(config.matmul_precision)
  )
  try:
    with precision:
      return _run_loop(config, workdir, stage, d, mesh, writer, iterator, ckpt, cache is not None)
  finally:
    ckpt.close()  # waits for an in-flight save
    writer.close()
    if hasattr(iterator, "close"):
      iterator.close()


def _context(config, mesh, d: optim.Durations, root: jax.Array, gbs: int) -> common.Context:
  """What a stage's `build` needs: mesh, sharding rules, replicated hparams and seed."""
  repl = sharding.replicated(mesh)
  hp_host = dict(
    lr=d.lr,
    min_lr=float(config.min_lr),
    warmup_steps=d.warmup,
    total_steps=d.total,
    ema_decay=float(config.ema.decay),
    steps_per_epoch=d.steps_per_epoch,
  )
  return common.Context(
    mesh=mesh,
    rules=tuple((rx, rule) for rx, rule in config.sharding.rules),
    min_fsdp_size=int(config.sharding.min_fsdp_size),
    hp=sharding.put_global(steps.hparams(**hp_host), jax.tree.map(lambda _: repl, hp_host)),
    seed=sharding.put_global(np.uint32(config.seed), repl),
    root=root,
    steps_per_epoch=d.steps_per_epoch,
    total_steps=d.total,
    global_batch=gbs,
    num_summary=min(int(config.num_summary_images), gbs),
  )


def _train_iterator(config, source, cache, image_size: int, data_seed: int):
  """The grain iterator of images (or of cached base outputs), resumable with the checkpoint."""
  inp = config.input
  make_iterator = pipeline.make_train_iterator if cache is None else base_cache.make_train_iterator
  return make_iterator(
    source,
    global_batch_size=int(inp.global_batch_size),
    image_size=image_size,
    seed=data_seed,
    worker_count=inp.worker_count,
    num_threads=inp.num_threads,
    prefetch_buffer_size=inp.prefetch_buffer_size,
    worker_buffer_size=inp.worker_buffer_size,
    scale=tuple(inp.scale),
    ratio=tuple(inp.ratio),
    flip_prob=inp.flip_prob,
    interpolation=inp.interpolation,
  )


class _Consumer:
  """Fetches step metrics one step late; stops on a non-finite loss; logs every log_every."""

  def __init__(self, stage, d: optim.Durations, start: int, writer, ckpt_dir, gbs: int):
    self.window = MetricsWindow(stage.omit_unvisited, stage.num_iters)
    self.pending: list[tuple[int, list[dict]]] = []
    self.last_saved = start if start > 0 else None
    self.logged: dict[str, float] = {}
    self.d, self.start, self.writer, self.ckpt_dir, self.gbs = d, start, writer, ckpt_dir, gbs

  def __call__(self) -> None:
    while self.pending:
      s, ms = self.pending.pop(0)
      ms = [{k: sharding.host_value(v) for k, v in m.items()} for m in ms]
      for m in ms:
        if not bool(m["finite"]):
          raise NonFiniteLossError(non_finite_message(s, m, self.last_saved, self.ckpt_dir))
      self.window.add_step(ms)
      if s == self.start + 1:
        self.window.start_timing(time.perf_counter())  # the first step includes compilation
      if s % self.d.log_every == 0 or s == self.d.total:
        now = time.perf_counter()
        self.logged = self.window.summary(now, self.gbs)
        self.logged["epoch"] = s / self.d.steps_per_epoch
        self.writer.write_scalars(s, {f"train/{k}": v for k, v in self.logged.items()})
        self.window.reset(now)


def _initial_state(config, workdir, stage, d: optim.Durations, mesh, writer, iterator, ckpt):
  """Resumes from the newest checkpoint, or starts (init_from or fresh); rewinds metrics.jsonl."""
  start, state = ckpt.restore_latest(stage.abstract_state, iterator, log=logging.warning)
  if start is not None:
    logging.info("resumed from %s at step %d", ckpt.directory, start)
  else:
    start = 0
    state = stage.init_state()
  logging.info("%s; mesh %s", stage.describe(), dict(mesh.shape))
  # Rows past the restored step are recomputed: drop them first (exactly once each).
  has_hparams = common.is_main() and writers.rewind_jsonl(workdir / writers.METRICS_FILE, start)
  if common.is_main() and not has_hparams:
    writer.write_hparams(
      dict(_flat_config(config), steps_per_epoch=d.steps_per_epoch, total_steps=d.total)
    )
  return start, state


def _run_loop(config, workdir, stage, d: optim.Durations, mesh, writer, iterator, ckpt, cached):
  """Steps from the initial state to `d.total`: summaries, checkpoints, metrics one step late."""
  start, state = _initial_state(config, workdir, stage, d, mesh, writer, iterator, ckpt)
  report = None
  if common.is_main():
    report = writers.periodic_actions.ReportProgress(
      num_train_steps=d.total, writer=writer, every_steps=d.log_every, every_secs=None
    )
  consume = _Consumer(stage, d, start, writer, ckpt.directory, int(config.input.global_batch_size))
  t_start = time.perf_counter()
  step = start
  while step < d.total:
    batch = next(iterator)
    images = sharding.global_batch(batch["image"], mesh)
    if not cached:
      state, metrics = stage.train_step(state, images, step)
    else:  # the base outputs come with the batch
      state, metrics = stage.train_step_cached(state, images, batch, step)
    step += 1
    consume()  # the previous step's metrics: by now they are (nearly) ready
    consume.pending.append((step, metrics))
    if step == start + 1:
      logging.info("first step dispatched after %.1fs", time.perf_counter() - t_start)
    if report is not None:
      report(step)
    if d.summary_every and (step % d.summary_every == 0 or step == start + 1):
      stage.write_summary(writer, state, images, step)
    if step % d.checkpoint_every == 0 or step == d.total:
      consume()  # never save a state whose loss was not checked
      ckpt.save(step, state, iterator)
      consume.last_saved = step
      writer.flush()  # the metrics up to this checkpoint survive a crash
  consume()
  return {"state": state, "step": step, "metrics": consume.logged}


def stage1_spec(
  config: ml_collections.ConfigDict, model_config: model_configs.ModelConfig
) -> steps.Stage1Spec:
  """The static step settings from the config (halting threshold defaults to the model's)."""
  n = model_config.alit.max_rollout_iters
  if config.rollout_impl == "unrolled" and 0 < config.loss.loss_iters < n:
    raise ValueError(
      f"config.loss.loss_iters={config.loss.loss_iters} draws the loss iterations inside the "
      "jitted step, which needs config.rollout_impl='scan' (the unrolled rollout needs a "
      "concrete iteration mask)"
    )
  if config.rollout_impl not in ("scan", "unrolled"):
    raise ValueError(
      f"config.rollout_impl must be 'scan' or 'unrolled', got {config.rollout_impl!r}"
    )
  rollout_iters = int(config.loss.get("rollout_iters", -1))
  if 0 < rollout_iters < n and 0 < config.loss.loss_iters < n:
    raise ValueError(
      f"config.loss.rollout_iters={rollout_iters} and config.loss.loss_iters="
      f"{config.loss.loss_iters}: set at most one"
    )
  return steps.Stage1Spec(
    halting=common.halting_from_config(config, model_config.alit),
    loss_iters=int(config.loss.loss_iters),
    lam=tuple(float(x) for x in config.loss.lam),
    impl=config.rollout_impl,
    optimizer=optim.OptimizerSpec(**config.optimizer),
    ema_reset_every_epoch=bool(config.ema.reset_every_epoch),
    rollout_iters=rollout_iters,
  )


def _flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  out = {}

  def walk(prefix, node):
    for k, v in node.items():
      name = f"{prefix}{k}"
      if isinstance(v, ml_collections.ConfigDict | dict):
        walk(name + ".", v)
      else:
        out[name] = v

  walk("", config)
  return out
