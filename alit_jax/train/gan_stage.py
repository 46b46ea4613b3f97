"""The adversarial stages of `trainer.train_and_evaluate`: ALIT stage 2 and base-VQGAN training.

`GanStage` sets up the model, the frozen LPIPS, the initial state and the jitted
`gan_steps.generator_step` / `gan_steps.discriminator_step`, and dispatches them per data step
following `gan_steps.Schedule`; data, mesh, resume, checkpoints, logging and summaries are the
shared loop's (`trainer.py`).

Stage 2 (`config.stage == "full_finetuning"`, `configs/alit_finetune.py`) starts from
`config.init_from`:

* a stage-1 workdir: its EMA ALIT weights and its base tokenizer copy;
* a stage-2 workdir: its EMA ALIT + base weights and its discriminators;
* a pretrained directory (`python -m alit_jax.convert`, `Tokenizer.save_pretrained`, an export):
  its ALIT + base weights and, for a converted full_finetuning checkpoint, its `gan_losses/`
  (the N discriminators with their BatchNorm statistics, and LPIPS);
* nothing: a fresh ALIT on `config.base_checkpoint` (or `config.random_base`, for checks).

LPIPS (frozen) comes from, in order: the workdir's copy (a resumed run), `config.lpips.vgg16_path`
+ `config.lpips.heads_path`, the init checkpoint's `gan_losses`; with none of these the
perceptual weight is 0 (logged). It is copied into WORKDIR/lpips/ so a resumed run uses the same.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from alit_jax import checkpoint
from alit_jax.losses import lpips as lpips_lib
from alit_jax.losses.discriminator import NLayerDiscriminator
from alit_jax.models import configs as model_configs
from alit_jax.models.alit import ALIT
from alit_jax.models.base_tokenizers import VQGAN, build_base
from alit_jax.train import checkpoints, common, gan_steps, gan_tasks, optim, sharding, steps

LPIPS_DIR = "lpips"
FINETUNE = "full_finetuning"
VQGAN_STAGE = "vqgan"


def vqgan_model_config(model: ml_collections.ConfigDict) -> model_configs.VQGANConfig:
  """The VQGAN to train from `config.model` of `configs/vqgan_train.py`."""
  ch_mult = tuple(int(m) for m in model.ch_mult)
  groups = int(model.get("norm_groups", 32))
  bad = [int(model.ch) * m for m in (1,) + ch_mult if (int(model.ch) * m) % groups]
  if bad:
    raise ValueError(
      f"config.model: channel counts {bad} (ch x ch_mult) are not multiples of {groups}, which "
      f"the VQGAN's GroupNorm({groups}) needs (config.model.norm_groups)"
    )
  if int(model.image_size) % 2 ** (len(ch_mult) - 1):
    raise ValueError(
      f"config.model.image_size {model.image_size} is not divisible by the "
      f"{2 ** (len(ch_mult) - 1)}x downsampling of ch_mult {ch_mult}"
    )
  return model_configs.VQGANConfig(
    ch=int(model.ch),
    ch_mult=ch_mult,
    num_res_blocks=int(model.num_res_blocks),
    z_channels=int(model.embed_dim),
    embed_dim=int(model.embed_dim),
    n_embed=int(model.n_embed),
    resolution=int(model.image_size),
    norm_groups=groups,
    signed_input=bool(model.get("signed_input", False)),
  )


def spec_from_config(config: ml_collections.ConfigDict, lpips_on: bool) -> gan_steps.GanSpec:
  """The static `gan_steps.GanSpec` of the config (an LPIPS term only when `lpips_on`)."""
  g = config.gan
  dtype = jnp.dtype(config.compute_dtype)
  return gan_steps.GanSpec(
    disc=NLayerDiscriminator(ndf=int(g.disc_ndf), n_layers=int(g.disc_layers), dtype=dtype),
    lpips=lpips_lib.LPIPS(use_dropout=True, dtype=dtype) if lpips_on else None,
    perceptual_weight=float(config.lpips.weight) if lpips_on else 0.0,
    lpips_dropout=bool(config.lpips.dropout),
    disc_loss=str(g.loss),
    disc_factor=float(g.disc_factor),
    weight_when_off=float(g.weight_when_off),
    max_adaptive_weight=float(g.max_adaptive_weight),
    optimizer=optim.OptimizerSpec(**config.optimizer),
    disc_optimizer=optim.OptimizerSpec(**g.optimizer),
    generator_updates_discriminator=bool(g.generator_updates_discriminator),
    ema_reset_every_epoch=bool(config.ema.reset_every_epoch),
  )


def gan_schedule(
  config: ml_collections.ConfigDict, steps_per_epoch: int, num_iters: int
) -> gan_steps.Schedule:
  """`gan_steps.Schedule` from `config.gan` (starts in `start_epochs` or `start_steps`)."""
  g = config.gan
  by_epoch, by_step = g.get("start_epochs"), g.get("start_steps")
  if by_epoch is not None and by_step is not None:
    raise ValueError("set only one of config.gan.start_epochs and config.gan.start_steps")
  if by_step is not None:
    starts = tuple(int(s) for s in by_step)
  else:
    starts = tuple(int(round(float(e) * steps_per_epoch)) for e in (by_epoch or ()))
  return gan_steps.Schedule(
    weights=tuple(g.weights),
    starts=starts,
    steps_per_epoch=steps_per_epoch,
    num_iters=num_iters,
    pattern=str(g.pattern),
    disc_steps=int(g.disc_steps_per_generator_step),
  )


def _stack(trees: list[Any]) -> Any:
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _alit_diff(a: model_configs.ALITConfig, b: model_configs.ALITConfig) -> str:
  da, db = dataclasses.asdict(a), dataclasses.asdict(b)
  return ", ".join(f"{k}: {da[k]!r} vs {db[k]!r}" for k in da if da[k] != db[k])


class GanStage:
  """Stage object for `trainer.train_and_evaluate` (stages "full_finetuning" and "vqgan")."""

  omit_unvisited = True

  def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path):
    self.config = config
    self.workdir = workdir
    self.init: dict[str, Any] = {}

  # ---- model, sources, LPIPS ----

  def prepare(self) -> None:
    config = self.config
    dtype = jnp.dtype(config.compute_dtype)
    resuming = checkpoints.latest_step(self.workdir) is not None
    if config.stage == VQGAN_STAGE:
      base_cfg = vqgan_model_config(config.model)
      self._write_base_description(base_cfg)
      self.model_config = None
      self.base_config = base_cfg
      self.task = gan_tasks.VQGANTask(
        VQGAN(base_cfg, dtype),
        beta=float(config.vq.beta),
        codebook_weight=float(config.vq.codebook_weight),
        restart_dead_codes_every=int(config.vq.get("restart_dead_codes_every_steps", 0)),
      )
      self.image_size = base_cfg.resolution
      self.name = f"vqgan (ch {base_cfg.ch}, ch_mult {base_cfg.ch_mult}, {base_cfg.n_embed} codes)"
    else:
      model_config = common.build_model_config(config.model)
      if resuming:
        saved, _ = checkpoints.read_model_config(self.workdir)
        wanted = common.adapt_to_base(model_config, saved.base, str(self.workdir))
        if wanted.alit != saved.alit:
          raise ValueError(
            f"{self.workdir} holds a different model than config.model; use a new workdir: "
            + _alit_diff(saved.alit, wanted.alit)
          )
        model_config = saved
      else:
        model_config = self._load_init_sources(model_config)
      common.write_model_config(
        self.workdir,
        model_config,
        {"stage": FINETUNE, "init_from": str(config.init_from or "")},
      )
      self.model_config = model_config
      self.base_config = model_config.base
      a = model_config.alit
      self.task = gan_tasks.ALITTask(
        ALIT(a, dtype=dtype),
        build_base(model_config.base, dtype=dtype),
        halting=common.halting_from_config(config, a),
        vae_posterior=str(config.loss.vae_posterior),
      )
      self.image_size = a.image_size
      self.name = model_config.name
    self.num_iters = self.task.num_iters
    self.lpips_vars = self._setup_lpips()
    self.spec = spec_from_config(config, self.lpips_vars is not None)

  def _write_base_description(self, base_cfg: model_configs.VQGANConfig) -> None:
    path = self.workdir / checkpoints.MODEL_CONFIG
    body = {"base": {"kind": base_cfg.kind, **dataclasses.asdict(base_cfg)}}
    new = json.loads(json.dumps(body["base"]))
    if path.is_file():
      old = json.loads(path.read_text()).get("base")
      if old != new:
        raise ValueError(
          f"{path} describes a different base tokenizer than this config; use a new workdir.\n"
          f"workdir: {json.dumps(old, sort_keys=True)}\nconfig:  {json.dumps(new, sort_keys=True)}"
        )
      return
    if common.is_main():
      body["meta"] = {"stage": VQGAN_STAGE}
      checkpoints.write_json_atomic(path, body)

  def _load_init_sources(self, model_config: model_configs.ModelConfig):
    """Reads `config.init_from` (or the base) into `self.init`; returns the model config."""
    config = self.config
    if not config.init_from:
      if config.base_checkpoint:
        path = pathlib.Path(os.path.expanduser(config.base_checkpoint))
        if not (path / checkpoint.CONFIG_FILE).is_file():
          raise FileNotFoundError(f"{path}: not a converted base tokenizer directory")
        base_cfg, base_vars = checkpoint.load_base(path)
        where = str(path)
      elif config.random_base:
        base_cfg = model_config.base
        base_vars = jax.device_get(
          common.init_random_base(base_cfg, model_config.alit.image_size, np.uint32(config.seed))
        )
        where = "(random)"
        logging.warning("Stage 2 from a RANDOM base tokenizer and a fresh ALIT (checks only).")
      else:
        raise ValueError(
          "stage 2 needs config.init_from (a stage-1 workdir, or a pretrained / converted "
          "full_finetuning directory), or config.base_checkpoint to start a fresh ALIT"
        )
      model_config = common.adapt_to_base(model_config, base_cfg, where)
      self.init = {"base": base_vars["params"], "where": where}
      return model_config

    p = pathlib.Path(os.path.expanduser(config.init_from))
    if checkpoints.is_workdir(p):
      src_config, meta = checkpoints.read_model_config(p)
      stage = meta.get("stage", "latent_distillation")
      abstract = self._abstract_variables(src_config)
      if stage == FINETUNE:
        targets = {
          "ema_params": {"alit": abstract["alit"]["params"], "base": abstract["base"]["params"]}
        }
        disc_target = jax.eval_shape(
          functools.partial(
            gan_steps.init_discriminators,
            disc=self._disc_module(),
            n=src_config.alit.max_rollout_iters,
            size=src_config.alit.image_size,
          ),
          jax.random.key(0),
        )
        targets["disc_params"] = disc_target["params"]
        targets["disc_batch_stats"] = disc_target["batch_stats"]
        step, out = checkpoints.restore_items(p, targets)
        self.init = {
          "alit": out["ema_params"]["alit"],
          "base": out["ema_params"]["base"],
          "discs": {"params": out["disc_params"], "batch_stats": out["disc_batch_stats"]},
        }
      else:
        step, alit = checkpoints.restore_params(p, abstract["alit"]["params"])
        base_cfg, base_vars = checkpoint.load_base(p / checkpoints.BASE_DIR)
        if base_cfg != src_config.base:
          raise ValueError(f"{p}: its base tokenizer copy differs from its model config")
        self.init = {"alit": alit, "base": base_vars["params"]}
      self.init["where"] = f"{p} (step {step}, EMA)"
    elif (p / checkpoint.CONFIG_FILE).is_file():
      src_config, variables, _ = checkpoint.load_pretrained(p)
      self.init = {
        "alit": variables["alit"]["params"],
        "base": variables["base"]["params"],
        "where": str(p),
      }
      gan = checkpoint.load_gan_losses(p)
      if gan is not None:
        self.init.update(self._discs_from_gan_losses(gan, src_config, p))
    else:
      raise FileNotFoundError(
        f"init_from {p}: neither a training workdir nor a pretrained directory (config.json)"
      )
    model_config = common.adapt_to_base(model_config, src_config.base, str(p))
    if src_config.alit != model_config.alit:
      raise ValueError(
        f"init_from {p}: its ALIT differs from config.model's ({config.model.name}): "
        + _alit_diff(src_config.alit, model_config.alit)
      )
    logging.info(
      "init_from %s: ALIT + base weights%s%s",
      self.init["where"],
      ", discriminators" if "discs" in self.init else "",
      ", LPIPS" if "lpips" in self.init else "",
    )
    return model_config

  def _disc_module(self) -> NLayerDiscriminator:
    g = self.config.gan
    return NLayerDiscriminator(ndf=int(g.disc_ndf), n_layers=int(g.disc_layers))

  @staticmethod
  def _abstract_variables(config: model_configs.ModelConfig) -> dict[str, Any]:
    from alit_jax.convert.alit_checkpoint import abstract_variables

    return abstract_variables(config)

  def _discs_from_gan_losses(self, gan: Any, src_config, path) -> dict[str, Any]:
    out = {}
    n = src_config.alit.max_rollout_iters
    discs = gan.get("discriminators") or {}
    if discs:
      if sorted(discs, key=int) != [str(i) for i in range(n)]:
        raise ValueError(
          f"{path}/gan_losses: discriminators {sorted(discs)} do not match the {n} rollout "
          "iterations"
        )
      target = jax.eval_shape(
        lambda k: self._disc_module().init(
          k, jnp.zeros((2, src_config.alit.image_size, src_config.alit.image_size, 3)), train=False
        ),
        jax.random.key(0),
      )
      for i in range(n):
        got = jax.tree.map(np.shape, discs[str(i)])
        want = jax.tree.map(lambda s: tuple(s.shape), target)
        if got != want:
          raise ValueError(
            f"{path}/gan_losses: discriminator {i} does not fit NLayerDiscriminator("
            f"ndf={self.config.gan.disc_ndf}, n_layers={self.config.gan.disc_layers}) "
            "(config.gan.disc_ndf / disc_layers)"
          )
      out["discs"] = _stack([discs[str(i)] for i in range(n)])
    if gan.get("lpips") is not None:
      out["lpips"] = gan["lpips"]
    return out

  def _setup_lpips(self) -> Any | None:
    config = self.config
    lp = config.lpips
    copy = self.workdir / LPIPS_DIR
    common.barrier("alit_lpips_exists")
    have_copy = copy.is_dir()
    if float(lp.weight) <= 0:
      logging.info("Perceptual (LPIPS) term off: config.lpips.weight = %s.", lp.weight)
      return None
    if have_copy:
      with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(copy.absolute())
    if lp.vgg16_path or lp.heads_path:
      variables = lpips_lib.load_lpips(
        os.path.expanduser(lp.vgg16_path) if lp.vgg16_path else None,
        os.path.expanduser(lp.heads_path) if lp.heads_path else None,
      )
      where = f"{lp.vgg16_path} + {lp.heads_path}"
    elif "lpips" in self.init:
      variables = self.init["lpips"]
      where = f"the gan_losses of {self.init['where']}"
    else:
      logging.warning(
        "No LPIPS weights given (config.lpips.vgg16_path + config.lpips.heads_path, or an "
        "init_from checkpoint with converted gan_losses): training WITHOUT the perceptual term "
        "(perceptual weight 0)."
      )
      return None
    logging.info("LPIPS (frozen) from %s, weight %s", where, lp.weight)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(copy.absolute(), jax.device_get(variables), force=True)
    common.barrier("alit_lpips_written")
    return variables

  # ---- state, steps ----

  def build(self, ctx: common.Context) -> None:
    self.ctx = ctx
    task, spec = self.task, self.spec
    create = functools.partial(
      gan_steps.init_state, task=task, spec=spec, image_size=self.image_size
    )
    abstract = jax.eval_shape(lambda r: create(r, None, None), ctx.root)
    sh = functools.partial(
      sharding.tree_shardings, mesh=ctx.mesh, rules=ctx.rules, min_size=ctx.min_fsdp_size
    )
    self.state_sh = sh(abstract)
    self.abstract_state = common.with_shardings(abstract, self.state_sh)
    frozen = {} if self.lpips_vars is None else {"lpips": self.lpips_vars}
    frozen_sh = sh(frozen)
    self.frozen = sharding.put_global(frozen, frozen_sh)
    repl = sharding.replicated(ctx.mesh)
    batch_sh = sharding.batch_sharding(ctx.mesh)
    self.plan_sh = jax.tree.map(lambda _: repl, gan_steps.plan_inputs(0, 0.0))
    ins = (self.state_sh, frozen_sh, batch_sh, repl, repl, self.plan_sh)
    self.p_gen = jax.jit(
      gan_steps.generator_step,
      static_argnums=(6, 7, 8, 9),
      in_shardings=ins,
      out_shardings=(self.state_sh, repl),
      donate_argnums=(0,),
      compiler_options=common.step_compiler_options(self.config),
    )
    self.p_disc = jax.jit(
      gan_steps.discriminator_step,
      static_argnums=(6, 7, 8),
      in_shardings=ins,
      out_shardings=(self.state_sh, repl),
      donate_argnums=(0,),
      compiler_options=common.step_compiler_options(self.config),
    )
    self.which = "ema_params" if self.config.summary_params == "ema" else "params"
    self.p_reconstruct = jax.jit(
      gan_steps.reconstruct,
      static_argnums=(4, 5),
      in_shardings=(self.state_sh[self.which], batch_sh, repl, repl),
      out_shardings=repl,
      compiler_options=common.step_compiler_options(self.config),
    )
    self.schedule = gan_schedule(self.config, ctx.steps_per_epoch, self.num_iters)
    logging.info(
      "GAN weights %s from steps %s; pattern %r (%d discriminator steps per generator step); "
      "%d discriminator(s); perceptual weight %s",
      self.schedule.weights,
      (0,) + self.schedule.starts,
      self.schedule.pattern,
      self.schedule.period - 1,
      self.num_iters,
      spec.perceptual_weight,
    )

  def init_state(self) -> Any:
    params = discs = None
    if "base" in self.init:
      target = self.abstract_state["params"]
      host = {"base": self.init["base"]}
      if "alit" in self.init:
        host["alit"] = self.init["alit"]
      else:  # a fresh ALIT on a given base, initialised as stage 1's
        fresh = jax.jit(
          steps.init_params, static_argnums=(0,), compiler_options=common.FAST_COMPILE
        )(self.task.model, steps.stream_key(self.ctx.root, "params"))
        host["alit"] = jax.device_get(fresh)
      self._check_shapes(host, target, "params")
      params = sharding.put_global(host, self.state_sh["params"])
    if "discs" in self.init:
      d_sh = {
        "params": self.state_sh["disc_params"],
        "batch_stats": self.state_sh["disc_batch_stats"],
      }
      target = {
        "params": self.abstract_state["disc_params"],
        "batch_stats": self.abstract_state["disc_batch_stats"],
      }
      self._check_shapes(self.init["discs"], target, "discriminators")
      discs = sharding.put_global(self.init["discs"], d_sh)
    state = jax.jit(
      gan_steps.init_state,
      static_argnums=(3, 4, 5),
      out_shardings=self.state_sh,
      compiler_options=common.FAST_COMPILE,
    )(self.ctx.root, params, discs, self.task, self.spec, self.image_size)
    self.init = {}  # host copies no longer needed
    return state

  def _check_shapes(self, tree: Any, target: Any, what: str) -> None:
    where = self.init.get("where", "init")
    bad = common.shape_mismatches(tree, target)
    if bad is None:
      raise ValueError(f"{where}: {what} tree differs from the model's")
    if bad:
      raise ValueError(f"{where}: {what} shapes differ from the model's: {bad}")

  def describe(self) -> str:
    count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))  # noqa: E731
    p = self.abstract_state["params"]
    frozen = jax.tree.leaves(self.task.frozen(p))
    trained = sum(int(np.prod(x.shape)) for x, f in zip(jax.tree.leaves(p), frozen) if not f)
    lp = "off" if self.lpips_vars is None else f"{count(self.lpips_vars) / 1e6:.2f}M frozen"
    return (
      f"{self.name}: {trained / 1e6:.2f}M trainable generator params ({count(p) / 1e6:.2f}M "
      f"in all); {self.num_iters} discriminator(s), "
      f"{count(self.abstract_state['disc_params']) / 1e6:.2f}M params; LPIPS {lp}"
    )

  def train_step(self, state: Any, images: jax.Array, step: int) -> tuple[Any, list[dict]]:
    c = self.ctx
    plan = self.schedule.plan(step)
    pin = sharding.put_global(gan_steps.plan_inputs(plan.iteration, plan.gan_weight), self.plan_sh)
    ms = []
    if "gen" in plan.kinds:
      state, m = self.p_gen(
        state,
        self.frozen,
        images,
        c.hp,
        c.seed,
        pin,
        self.task,
        self.spec,
        plan.with_disc,
        plan.kinds == ("gen",),
      )
      ms.append(m)
    if "disc" in plan.kinds:
      state, m = self.p_disc(
        state,
        self.frozen,
        images,
        c.hp,
        c.seed,
        pin,
        self.task,
        self.spec,
        plan.kinds == ("disc",),
      )
      ms.append(m)
    return state, ms

  def write_summary(self, writer, state: Any, images: jax.Array, step: int) -> None:
    out = self.p_reconstruct(
      state[self.which], images, self.ctx.seed, state["step"], self.task, self.ctx.num_summary
    )
    common.write_reconstructions(writer, step, out, self.config.summary_params)
