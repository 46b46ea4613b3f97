"""What the training stages share: processes, shardings, the model and base config, workdir files.

`trainer.py` (the loop and stage 1) and `gan_stage.py` (stage 2 and base-VQGAN training) both
build on this module instead of on each other; the `data/base_cache` package resolves the stage-1 base
tokenizer through it, as the trainer does.
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
from absl import logging
from jax.experimental import multihost_utils

from alit_jax import checkpoint
from alit_jax.models import configs as model_configs
from alit_jax.models import rollout as rollout_lib
from alit_jax.models.base_tokenizers import build_base
from alit_jax.train import checkpoints, sharding, steps

BASE_HELP = """\
config.base_checkpoint must name a converted base tokenizer directory. Convert the reference's
base tokenizer checkpoint once with
  python -m alit_jax.convert /path/to/vqgan.ckpt --out /path/to/vqgan_jax      (MaskGIT VQGAN)
  python -m alit_jax.convert /path/to/kl16.ckpt --out /path/to/kl16_jax        (MAR KL-16 VAE)
and pass --config.base_checkpoint=/path/to/vqgan_jax (or a full tokenizer directory, whose base
part is used). For quick checks only, --config.random_base=True uses a random frozen base."""

# `where` of a random base (`config.random_base`).
RANDOM_BASE = "(random)"

# One-off initialisation functions: XLA's backend optimisations cost more compile time than
# they save (the random-number graphs of the initialisers are large).
FAST_COMPILE = {"xla_backend_optimization_level": 0}
# `config.fast_compile`: also for the train steps (CPU checks and tests).
STEP_FAST_COMPILE = {**FAST_COMPILE, "xla_llvm_disable_expensive_passes": True}


def step_compiler_options(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """XLA options of the jitted train steps: `FAST_COMPILE` with `config.fast_compile`."""
  return dict(STEP_FAST_COMPILE) if config.get("fast_compile", False) else None


@dataclasses.dataclass
class Context:
  """What the loop hands a stage when it builds its jitted steps."""

  mesh: Any
  rules: tuple
  min_fsdp_size: int
  hp: dict[str, jax.Array]
  seed: jax.Array
  root: jax.Array
  steps_per_epoch: int
  total_steps: int
  global_batch: int
  num_summary: int


# ---- processes and shardings ----


def is_main() -> bool:
  """Whether this is process 0 (the one that writes the workdir's small files)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits for every process (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def with_shardings(tree: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct`s of `tree`'s leaves carrying `shardings` (restore targets)."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def shape_mismatches(tree: Any, target: Any) -> list[str] | None:
  """None if the trees differ in structure, else the leaves whose shapes differ ("path: a vs b")."""
  if jax.tree_util.tree_structure(tree) != jax.tree_util.tree_structure(target):
    return None
  return [
    f"{sharding.path_name(k)}: {np.shape(a)} vs {b.shape}"
    for (k, a), b in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(target))
    if tuple(np.shape(a)) != tuple(b.shape)
  ]


# ---- the model and its base tokenizer ----


def build_model_config(model_cfg: ml_collections.ConfigDict) -> model_configs.ModelConfig:
  """ModelConfig from `config.model` (a reference preset, or "test" = `tiny_config`).

  `model.image_size` / `model.patch_size` (None: the preset's) change ALIT's input size and
  patch size, e.g. 64x64 images with patch 4 over a base tokenizer that downsamples 4x.
  """
  name = model_cfg.name
  kw = dict(quantize_latent=model_cfg.quantize_latent, factorize_latent=model_cfg.factorize_latent)
  size = {k: model_cfg.get(k) for k in ("image_size", "patch_size") if model_cfg.get(k) is not None}
  # Not the reference's (0 = off): ALITConfig.latent_noise_std and latent_locality.
  extra = {k: model_cfg[k] for k in ("latent_noise_std", "latent_locality") if model_cfg.get(k)}
  if name == "test":
    test = dict(model_cfg.get("test", {}))
    test.update(size)
    label = test.pop("name", None)  # e.g. "alit_demo": the name the exported model reports
    config = model_configs.tiny_config(model_cfg.base, **kw, **test)
    if label:
      config = dataclasses.replace(config, name=label)
  else:
    config = model_configs.named_config(name, model_cfg.base, **kw)
    if size:
      config = dataclasses.replace(config, alit=dataclasses.replace(config.alit, **size))
  if extra:
    config = dataclasses.replace(config, alit=dataclasses.replace(config.alit, **extra))
  return config


def check_base_compatible(config: model_configs.ModelConfig, base_cfg: Any, where: str) -> None:
  """Raises ValueError if a base tokenizer cannot feed this ALIT (kind or grid size)."""
  a = config.alit
  problems = []
  if base_cfg.kind != a.base:
    problems.append(f"it is a {base_cfg.kind}, the model expects a {a.base}")
  if base_cfg.downsample * a.grid_size != a.image_size:
    problems.append(
      f"its {base_cfg.downsample}x downsampling does not give the {a.grid_size}x{a.grid_size} "
      f"grid of {a.image_size}px images with patch size {a.patch_size} (the base's downsampling "
      "must equal the patch size)"
    )
  if problems:
    raise ValueError(f"base tokenizer {where} does not fit {config.name}: " + "; ".join(problems))


def adapt_to_base(
  config: model_configs.ModelConfig, base_cfg: Any, where: str
) -> model_configs.ModelConfig:
  """`config` with this base, after `check_base_compatible`.

  ALIT's base-dependent sizes (the base's embedding dim and, for a VQGAN, its codebook size,
  i.e. ALIT's decoder output) follow the base tokenizer, so a small base trained with
  `configs/vqgan_train.py` can be used with any ALIT preset.
  """
  check_base_compatible(config, base_cfg, where)
  a = config.alit
  changes = {}
  if base_cfg.embed_dim != a.base_embed_dim:
    changes["base_embed_dim"] = base_cfg.embed_dim
  if a.base == "vqgan" and base_cfg.n_embed != a.base_codebook_size:
    changes["base_codebook_size"] = base_cfg.n_embed
  if changes:
    logging.info("ALIT's base-dependent sizes follow the base tokenizer %s: %s", where, changes)
    a = dataclasses.replace(a, **changes)
  return dataclasses.replace(config, alit=a, base=base_cfg)


@functools.partial(jax.jit, static_argnums=(0, 1), compiler_options=FAST_COMPILE)
def init_random_base(base_cfg: Any, image_size: int, seed: jax.Array) -> Any:
  """Random variables of a base tokenizer (`config.random_base`: quick checks only)."""
  key = jax.random.fold_in(steps.stream_key(jax.random.key(seed), "params"), 1)
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return build_base(base_cfg).init(key, images)


def load_config_base(
  config: ml_collections.ConfigDict, model_config: model_configs.ModelConfig
) -> tuple[Any, Any, str]:
  """The base tokenizer a config names: `config.base_checkpoint`, else `config.random_base`.

  Returns:
    (base config, host base variables, where: the checkpoint path or `RANDOM_BASE`).

  Raises:
    FileNotFoundError: `config.base_checkpoint` is not a converted base tokenizer directory.
    ValueError: neither is set.
  """
  if config.base_checkpoint:
    path = pathlib.Path(os.path.expanduser(config.base_checkpoint))
    if not (path / checkpoint.CONFIG_FILE).is_file():
      raise FileNotFoundError(f"{path}: not a converted base tokenizer directory.\n{BASE_HELP}")
    base_cfg, base_vars = checkpoint.load_base(path)
    return base_cfg, base_vars, str(path)
  if config.random_base:
    base_cfg = model_config.base
    base_vars = jax.device_get(
      init_random_base(base_cfg, model_config.alit.image_size, np.uint32(config.seed))
    )
    return base_cfg, base_vars, RANDOM_BASE
  raise ValueError(f"no base tokenizer given.\n{BASE_HELP}")


def halting_from_config(
  config: ml_collections.ConfigDict, alit_config: model_configs.ALITConfig
) -> rollout_lib.Halting:
  """`config.loss`'s halting rule (the threshold defaults to the model's)."""
  threshold = config.loss.halting_threshold
  if threshold is None:
    threshold = alit_config.halting_threshold
  return rollout_lib.Halting(config.loss.halting, float(threshold), bool(config.loss.vae_masking))


# ---- workdir files ----


def write_model_config(workdir: pathlib.Path, model_config, meta: dict[str, Any]) -> None:
  """Writes WORKDIR/model_config.json, or checks that the one there describes this model."""
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
  if is_main():
    checkpoints.write_json_atomic(path, {"model": new, "meta": meta})


def recon_grid(images: np.ndarray, recons: np.ndarray) -> np.ndarray:
  """(n, H, W, 3) inputs and (N, n, H, W, 3) reconstructions -> (n*H, (N+1)*W, 3) uint8."""
  cols = np.concatenate([images[None], recons], axis=0)  # (N+1, n, H, W, 3)
  k, n, h, w, c = cols.shape
  grid = cols.transpose(1, 2, 0, 3, 4).reshape(n * h, k * w, c)
  return (np.clip(grid, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_reconstructions(writer, step: int, out: dict, which: str) -> None:
  """The summary images (inputs | one column per iteration) and per-iteration L1 (process 0)."""
  if not is_main():
    return
  x = sharding.host_value(out["images"])
  r = sharding.host_value(out["reconstructions"])
  writer.write_images(step, {f"reconstructions/{which}": recon_grid(x, r)})
  l1 = np.abs(r - x[None]).mean(axis=(1, 2, 3, 4))
  writer.write_scalars(step, {f"summary/l1_iter_{i}": v for i, v in enumerate(l1)})
