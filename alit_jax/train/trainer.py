"""`train_and_evaluate(config, workdir)`: the stage-1 (latent distillation) training loop.

One process per host; all processes run the same program (SPMD). Per step: the grain iterator
yields this process's share of the global batch (uint8), `make_array_from_process_local_data`
assembles the global batch sharded over the mesh, and the jitted `steps.train_step` updates the
sharded, donated train state. Metrics are fetched one step late (the host never waits for the
step it just dispatched), except before a checkpoint: a checkpoint is only written after the
losses of every step up to it were checked finite.

See `configs/alit_pretrain.py` for the config fields.
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
from jax.experimental import multihost_utils

from alit_jax import checkpoint
from alit_jax.data import pipeline, sources
from alit_jax.models import configs as model_configs
from alit_jax.models import rollout as rollout_lib
from alit_jax.models.alit import ALIT
from alit_jax.models.base_tokenizers import build_base
from alit_jax.train import checkpoints, optim, sharding, steps, writers

BASE_HELP = """\
config.base_checkpoint must name a converted base tokenizer directory. Convert the reference's
base tokenizer checkpoint once with
  python -m alit_jax.convert /path/to/vqgan.ckpt --out /path/to/vqgan_jax      (MaskGIT VQGAN)
  python -m alit_jax.convert /path/to/kl16.ckpt --out /path/to/kl16_jax        (MAR KL-16 VAE)
and pass --config.base_checkpoint=/path/to/vqgan_jax (or a full tokenizer directory, whose base
part is used). For quick checks only, --config.random_base=True uses a random frozen base."""


# One-off initialisation functions: XLA's backend optimisations cost more compile time than
# they save (the random-number graphs of the initialisers are large).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


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


def build_model_config(model_cfg: ml_collections.ConfigDict) -> model_configs.ModelConfig:
  """ModelConfig from `config.model` (a reference preset, or "test" = `tiny_config`)."""
  name = model_cfg.name
  kw = dict(quantize_latent=model_cfg.quantize_latent, factorize_latent=model_cfg.factorize_latent)
  if name == "test":
    return model_configs.tiny_config(model_cfg.base, **kw, **dict(model_cfg.get("test", {})))
  return model_configs.named_config(name, model_cfg.base, **kw)


def check_base_compatible(config: model_configs.ModelConfig, base_cfg: Any, where: str) -> None:
  """Raises ValueError if a base tokenizer cannot feed this ALIT."""
  a = config.alit
  problems = []
  if base_cfg.kind != a.base:
    problems.append(f"it is a {base_cfg.kind}, the model expects a {a.base}")
  if base_cfg.embed_dim != a.base_embed_dim:
    problems.append(f"embed_dim {base_cfg.embed_dim} != {a.base_embed_dim}")
  if a.base == "vqgan" and base_cfg.n_embed != a.base_codebook_size:
    problems.append(f"codebook size {base_cfg.n_embed} != {a.base_codebook_size}")
  if base_cfg.downsample * a.grid_size != a.image_size:
    problems.append(
      f"its {base_cfg.downsample}x downsampling does not give the {a.grid_size}x{a.grid_size} grid"
    )
  if problems:
    raise ValueError(f"base tokenizer {where} does not fit {config.name}: " + "; ".join(problems))


def _is_main() -> bool:
  return jax.process_index() == 0


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=FAST_COMPILE)
def _init_random_base(base_cfg: Any, image_size: int, seed: jax.Array) -> Any:
  key = jax.random.fold_in(steps.stream_key(jax.random.key(seed), "params"), 1)
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return build_base(base_cfg).init(key, images)


def _setup_base(
  config: ml_collections.ConfigDict, model_config: model_configs.ModelConfig, workdir: pathlib.Path
) -> tuple[model_configs.ModelConfig, Any]:
  """The frozen base: the workdir's copy (resume), a converted checkpoint, or random."""
  base_dir = workdir / checkpoints.BASE_DIR
  have_copy = (base_dir / checkpoint.CONFIG_FILE).is_file()
  _barrier("alit_base_exists")
  if have_copy:
    base_cfg, base_vars = checkpoint.load_base(base_dir)
    where = str(base_dir)
  elif config.base_checkpoint:
    path = pathlib.Path(os.path.expanduser(config.base_checkpoint))
    if not (path / checkpoint.CONFIG_FILE).is_file():
      raise FileNotFoundError(f"{path}: not a converted base tokenizer directory.\n{BASE_HELP}")
    base_cfg, base_vars = checkpoint.load_base(path)
    where = str(path)
  elif config.random_base:
    base_cfg = model_config.base
    base_vars = jax.device_get(
      _init_random_base(base_cfg, model_config.alit.image_size, np.uint32(config.seed))
    )
    where = "(random)"
    logging.warning("Using a RANDOM frozen base tokenizer (config.random_base=True).")
  else:
    raise ValueError(f"no base tokenizer given.\n{BASE_HELP}")
  check_base_compatible(model_config, base_cfg, where)
  model_config = dataclasses.replace(model_config, base=base_cfg)
  if not have_copy:
    # Collective Orbax save (every process takes part), then the small JSON from process 0.
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(base_dir / checkpoint.PARAMS_DIR, jax.device_get(base_vars), force=True)
    if _is_main():
      body = {
        "base": {"kind": base_cfg.kind, **dataclasses.asdict(base_cfg)},
        "meta": {"source": where},
      }
      checkpoints.write_json_atomic(base_dir / checkpoint.CONFIG_FILE, body)
    _barrier("alit_base_written")
  return model_config, base_vars


def _write_model_config(workdir: pathlib.Path, model_config, meta: dict[str, Any]) -> None:
  path = workdir / checkpoints.MODEL_CONFIG
  new = json.loads(model_config.to_json())
  if path.is_file():
    old = json.loads(path.read_text())["model"]
    if old != new:
      raise ValueError(
        f"{path} describes a different model than this config; use a new workdir.\n"
        f"workdir: {json.dumps(old, sort_keys=True)}\nconfig:  {json.dumps(new, sort_keys=True)}"
      )
    return
  if _is_main():
    checkpoints.write_json_atomic(path, {"model": new, "meta": meta})


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


class _Window:
  """Averages step metrics over a logging window (per-iteration terms over the steps that took them)."""

  PER_ITER = (
    "nll_loss",
    "code_loss",
    "quantization_loss",
    "commitment_loss",
    "codebook_loss",
    "masked_fraction",
  )

  def __init__(self):
    self.reset(time.perf_counter())

  def reset(self, t: float) -> None:
    self.sums: dict[str, np.ndarray] = {}
    self.iter_counts = None
    self.steps = 0
    self.untimed = 0
    self.t0 = t
    self.last: dict[str, np.ndarray] = {}

  def start_timing(self, t: float) -> None:
    """Excludes the steps so far from the throughput (compilation)."""
    self.untimed = self.steps
    self.t0 = t

  def add(self, m: dict[str, np.ndarray]) -> None:
    self.steps += 1
    w = m["loss_iters"]
    self.iter_counts = w if self.iter_counts is None else self.iter_counts + w
    for k, v in m.items():
      if k in ("finite", "loss_iters"):
        continue
      self.sums[k] = v if k not in self.sums else self.sums[k] + v
    self.last = m

  def summary(self, t: float, global_batch: int) -> dict[str, float]:
    out = {}
    for k, v in self.sums.items():
      if k == "lr":
        out[k] = self.last[k]
      elif k in self.PER_ITER:
        out[k] = v / np.maximum(self.iter_counts, 1)
      else:
        out[k] = v / self.steps
    out = _flat_metrics(out)
    if self.steps > self.untimed:
      out["images_per_sec"] = (self.steps - self.untimed) * global_batch / max(t - self.t0, 1e-9)
    return out


def _recon_grid(images: np.ndarray, recons: np.ndarray) -> np.ndarray:
  """(n, H, W, 3) inputs and (N, n, H, W, 3) reconstructions -> (n*H, (N+1)*W, 3) uint8."""
  cols = np.concatenate([images[None], recons], axis=0)  # (N+1, n, H, W, 3)
  k, n, h, w, c = cols.shape
  grid = cols.transpose(1, 2, 0, 3, 4).reshape(n * h, k * w, c)
  return (np.clip(grid, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


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
  want = jax.tree_util.tree_structure(target)
  if jax.tree_util.tree_structure(params) != want:
    raise ValueError(f"init_from {p}: parameter tree differs from the model's")
  bad = [
    f"{sharding.path_name(k)}: {np.shape(a)} vs {b.shape}"
    for (k, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(target))
    if tuple(np.shape(a)) != tuple(b.shape)
  ]
  if bad:
    raise ValueError(f"init_from {p}: shapes differ from the model's: {bad}")
  logging.info("init_from: params of pretrained dir %s", p)
  return sharding.put_global(params, jax.tree.map(lambda t: t.sharding, target))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Trains (or resumes training) as configured; checkpoints and logs go to `workdir`.

  Args:
    config: a `configs/alit_pretrain.py` ConfigDict.
    workdir: output directory; rerunning with the same workdir resumes from its latest
      checkpoint (model, optimizer, EMA, step and data position).

  Returns:
    {"state": the final train state, "step": its step, "metrics": the last logged metrics}.

  Raises:
    NonFiniteLossError: a step produced a NaN/Inf loss or gradient norm (nothing is saved after
      the last good checkpoint).
  """
  if config.stage != "latent_distillation":
    raise ValueError(
      f"unknown stage {config.stage!r}; this trainer implements 'latent_distillation'"
    )
  workdir = pathlib.Path(os.path.expanduser(os.fspath(workdir))).absolute()
  _quiet_orbax_logs()
  if _is_main():
    workdir.mkdir(parents=True, exist_ok=True)
  _barrier("alit_workdir")
  logging.info(
    "workdir %s; process %d of %d; %d devices (%d local)",
    workdir,
    jax.process_index(),
    jax.process_count(),
    jax.device_count(),
    jax.local_device_count(),
  )

  # ---- model and frozen base ----
  model_config = build_model_config(config.model)
  model_config, base_vars = _setup_base(config, model_config, workdir)
  _write_model_config(workdir, model_config, {"stage": config.stage})
  if _is_main():
    checkpoints.write_json_atomic(
      workdir / checkpoints.TRAIN_CONFIG, json.loads(config.to_json_best_effort())
    )
  dtype = jnp.dtype(config.compute_dtype)
  model = ALIT(model_config.alit, dtype=dtype)
  base = build_base(model_config.base, dtype=dtype)
  spec = stage1_spec(config, model_config)

  # ---- data and durations ----
  inp = config.input
  source = sources.get_source(inp.data, inp.split, inp.data_dir or None)
  gbs = int(inp.global_batch_size)
  spe = len(source) // gbs
  if spe < 1:
    raise ValueError(f"the training data has {len(source)} examples, fewer than one batch of {gbs}")
  total_steps = optim.steps_from_config("total", config, spe)
  if total_steps is None:
    raise ValueError("set config.total_steps or config.total_epochs")
  warmup_steps = optim.steps_from_config("warmup", config, spe, default=0)
  log_every = optim.steps_from_config("log_every", config, spe, default=50)
  ckpt_every = optim.steps_from_config("checkpoint_every", config, spe, default=total_steps)
  keep_every = optim.steps_from_config("keep_every", config, spe)
  summary_every = optim.steps_from_config("image_summary_every", config, spe, default=0)
  lr = optim.peak_lr(config, gbs)
  logging.info(
    "%d examples, %d steps/epoch; %d steps (%.2f epochs), warm-up %d; peak lr %.3g",
    len(source),
    spe,
    total_steps,
    total_steps / spe,
    warmup_steps,
    lr,
  )
  root = jax.random.key(config.seed)
  data_seed = int(jax.random.randint(steps.stream_key(root, "data"), (), 0, 2**31 - 1))

  # ---- mesh and shardings ----
  mesh = sharding.make_mesh(dict(config.mesh))
  if gbs % mesh.size:
    raise ValueError(f"global batch {gbs} is not divisible by the {mesh.size} devices of the mesh")
  rules = tuple((rx, rule) for rx, rule in config.sharding.rules)
  min_size = int(config.sharding.min_fsdp_size)

  abstract = jax.eval_shape(
    functools.partial(steps.create_train_state, model=model, spec=spec), root
  )
  state_sh = sharding.tree_shardings(abstract, mesh, rules, min_size)
  base_sh = sharding.tree_shardings(base_vars, mesh, rules, min_size)
  repl = sharding.replicated(mesh)
  batch_sh = sharding.batch_sharding(mesh)
  base_vars = sharding.put_global(base_vars, base_sh)
  hp_host = dict(
    lr=lr,
    min_lr=float(config.min_lr),
    warmup_steps=warmup_steps,
    total_steps=total_steps,
    ema_decay=float(config.ema.decay),
    steps_per_epoch=spe,
  )
  hp = sharding.put_global(steps.hparams(**hp_host), jax.tree.map(lambda _: repl, hp_host))
  seed = sharding.put_global(np.uint32(config.seed), repl)
  # Module-level functions with static positional args: re-jitting them in a later call
  # (a resumed run, tests) hits JAX's compilation cache.
  p_train_step = jax.jit(
    steps.train_step,
    static_argnums=(5, 6, 7),
    in_shardings=(state_sh, base_sh, batch_sh, repl, repl),
    out_shardings=(state_sh, repl),
    donate_argnums=(0,),
  )
  which = "ema_params" if config.summary_params == "ema" else "params"
  p_reconstruct = jax.jit(
    steps.reconstruct,
    static_argnums=(5, 6, 7, 8, 9),
    in_shardings=(state_sh[which], base_sh, batch_sh, repl, repl),
    out_shardings=repl,
  )
  num_summary = min(int(config.num_summary_images), gbs)

  writer = writers.create_writer(workdir, enabled=_is_main())
  _log_source_report(source, writer)
  iterator = pipeline.make_train_iterator(
    source,
    global_batch_size=gbs,
    image_size=model_config.alit.image_size,
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
  ckpt = checkpoints.TrainCheckpointer(
    workdir,
    max_to_keep=config.keep_checkpoints,
    keep_period=keep_every,
    async_save=bool(config.async_checkpoints),
  )
  precision = (
    contextlib.nullcontext()
    if config.matmul_precision == "default"
    else jax.default_matmul_precision(config.matmul_precision)
  )
  try:
    with precision:
      # ---- initial state: resume, init_from, or fresh ----
      start = ckpt.latest_step()
      if start is not None:
        state = ckpt.restore(start, _with_shardings(abstract, state_sh), iterator)
        logging.info("resumed from %s at step %d", ckpt.directory, start)
      else:
        start = 0
        if config.init_from:
          params = _load_init_params(
            config.init_from, _with_shardings(abstract["params"], state_sh["params"])
          )
          state = jax.jit(
            steps.init_train_state,
            static_argnums=(1,),
            out_shardings=state_sh,
            compiler_options=FAST_COMPILE,
          )(params, spec)
        else:
          state = jax.jit(
            steps.create_train_state,
            static_argnums=(1, 2),
            out_shardings=state_sh,
            compiler_options=FAST_COMPILE,
          )(root, model, spec)
      n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
      logging.info(
        "%s: %.2fM trainable params; mesh %s", model_config.name, n_params / 1e6, dict(mesh.shape)
      )
      if _is_main() and start == 0:
        writer.write_hparams(
          dict(_flat_config(config), steps_per_epoch=spe, total_steps=total_steps)
        )
      report = None
      if _is_main():
        report = writers.periodic_actions.ReportProgress(
          num_train_steps=total_steps, writer=writer, every_steps=log_every, every_secs=None
        )
      window = _Window()
      pending: list[tuple[int, dict]] = []
      last_saved = start if start > 0 else None
      logged: dict[str, float] = {}

      def consume() -> None:
        """Fetches pending step metrics; stops on a non-finite loss; logs every log_every."""
        nonlocal logged
        while pending:
          s, m = pending.pop(0)
          m = {k: sharding.host_value(v) for k, v in m.items()}
          if not bool(m["finite"]):
            kept = (
              f"the last good checkpoint (step {last_saved}) in {ckpt.directory} is intact"
              if last_saved
              else "no checkpoint was written"
            )
            raise NonFiniteLossError(
              f"non-finite loss {float(m['loss'])} (grad norm {float(m['grad_norm'])}) at step "
              f"{s}; training stopped and nothing was saved after it: {kept}. Lower the learning "
              "rate (config.blr/config.lr) or use float32 (config.compute_dtype) and rerun to "
              "resume from that checkpoint."
            )
          window.add(m)
          if s == start + 1:
            window.start_timing(time.perf_counter())  # the first step includes compilation
          if s % log_every == 0 or s == total_steps:
            now = time.perf_counter()
            logged = window.summary(now, gbs)
            logged["epoch"] = s / spe
            writer.write_scalars(s, {f"train/{k}": v for k, v in logged.items()})
            window.reset(now)

      t_start = time.perf_counter()
      step = start
      while step < total_steps:
        batch = next(iterator)
        images = sharding.global_batch(batch["image"], mesh)
        state, metrics = p_train_step(state, base_vars, images, hp, seed, model, base, spec)
        step += 1
        consume()  # the previous step's metrics: by now they are (nearly) ready
        pending.append((step, metrics))
        if step == start + 1:
          logging.info("first step dispatched after %.1fs", time.perf_counter() - t_start)
        if report is not None:
          report(step)
        if summary_every and (step % summary_every == 0 or step == start + 1):
          out = p_reconstruct(
            state[which],
            base_vars,
            images,
            seed,
            state["step"],
            model,
            base,
            spec.halting,
            spec.impl,
            num_summary,
          )
          _write_reconstructions(writer, step, out, config.summary_params)
        if step % ckpt_every == 0 or step == total_steps:
          consume()  # never save a state whose loss was not checked
          ckpt.save(step, state, iterator)
          last_saved = step
      consume()
  finally:
    ckpt.close()  # waits for an in-flight save
    writer.close()
    if hasattr(iterator, "close"):
      iterator.close()
  return {"state": state, "step": step, "metrics": logged}


def stage1_spec(
  config: ml_collections.ConfigDict, model_config: model_configs.ModelConfig
) -> steps.Stage1Spec:
  """The static step settings from the config (halting threshold defaults to the model's)."""
  threshold = config.loss.halting_threshold
  if threshold is None:
    threshold = model_config.alit.halting_threshold
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
  return steps.Stage1Spec(
    halting=rollout_lib.Halting(
      config.loss.halting, float(threshold), bool(config.loss.vae_masking)
    ),
    loss_iters=int(config.loss.loss_iters),
    lam=tuple(float(x) for x in config.loss.lam),
    impl=config.rollout_impl,
    optimizer=optim.OptimizerSpec(**config.optimizer),
    ema_reset_every_epoch=bool(config.ema.reset_every_epoch),
  )


def _with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def _write_reconstructions(writer, step: int, out: dict, which: str) -> None:
  if not _is_main():
    return
  x = sharding.host_value(out["images"])
  r = sharding.host_value(out["reconstructions"])
  writer.write_images(step, {f"reconstructions/{which}": _recon_grid(x, r)})
  l1 = np.abs(r - x[None]).mean(axis=(1, 2, 3, 4))
  writer.write_scalars(step, {f"summary/l1_iter_{i}": v for i, v in enumerate(l1)})


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
