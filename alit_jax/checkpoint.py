"""Saving and restoring tokenizer weights (Orbax) with their architecture (JSON).

A *pretrained directory* (written by `python -m alit_jax.convert`, by `Tokenizer.save_pretrained`
and exported by training) holds:

    DIR/config.json     {"model": ModelConfig, "meta": {...}}
    DIR/params/         Orbax StandardCheckpointer item: {"alit": {"params": ...}, "base": {"params": ...}}
    DIR/gan_losses/     optional Orbax item: stage-2 discriminators and LPIPS (converted checkpoints)
    DIR/.alit-jax-output.json   the marker that lets `--overwrite` replace DIR (`alit_jax.outputs`)

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place
only when complete, so an interrupted or refused conversion never leaves a half-written DIR and
never overwrites a good one. Only a directory this project wrote is ever replaced.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable
from typing import Any

import jax
import orbax.checkpoint as ocp

from alit_jax import outputs
from alit_jax.models.configs import ModelConfig

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
GAN_DIR = "gan_losses"


def _write_atomically(
  directory: str | os.PathLike,
  overwrite: bool,
  write,
  *,
  kind: str,
  inputs: Iterable[str | os.PathLike] = (),
) -> pathlib.Path:
  """Calls `write(tmp_dir)` on a fresh sibling temp dir, then moves it to `directory`.

  `outputs.write_dir`: an existing non-empty `directory` is only replaced (with `overwrite`) if
  this project wrote it, never if it contains one of `inputs`, and only after the new one is
  complete; on any error the temp dir is removed and `directory` is untouched.
  """
  return outputs.write_dir(directory, write, kind=kind, overwrite=overwrite, inputs=inputs)


def save_pretrained(
  directory: str | os.PathLike,
  config: ModelConfig,
  variables: dict[str, Any],
  *,
  meta: dict[str, Any] | None = None,
  gan_losses: Any = None,
  overwrite: bool = False,
  inputs: Iterable[str | os.PathLike] = (),
) -> pathlib.Path:
  """Writes a pretrained directory atomically.

  Args:
    directory: destination.
    config: the architecture.
    variables: `{"alit": ..., "base": ...}`.
    meta: free-form provenance (source file, step, ...), stored in config.json.
    gan_losses: optional stage-2 loss-network variables.
    overwrite: replace an existing directory this project wrote (only after the new one is
      complete; `alit_jax.outputs`).
    inputs: files or directories this output was made from: a `directory` containing one of
      them is refused.

  Returns:
    The directory path.
  """

  def write(tmp: pathlib.Path):
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / PARAMS_DIR, jax.device_get(variables))
      if gan_losses is not None:
        ckptr.save(tmp / GAN_DIR, jax.device_get(gan_losses))
    body = {"model": json.loads(config.to_json()), "meta": meta or {}}
    (tmp / CONFIG_FILE).write_text(json.dumps(body, indent=2, sort_keys=True))

  return _write_atomically(directory, overwrite, write, kind="pretrained", inputs=inputs)


def read_config(directory: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
  """(ModelConfig, meta) from DIR/config.json, with a clear error if it is not a pretrained dir."""
  directory = pathlib.Path(directory)
  path = directory / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(
      f"{directory}: no {CONFIG_FILE}; expected a directory written by `python -m alit_jax.convert` "
      "or `Tokenizer.save_pretrained` (or a training workdir)"
    )
  try:
    d = json.loads(path.read_text())
    return ModelConfig.from_dict(d["model"]), d.get("meta", {})
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{path}: not a valid alit-jax config ({e})") from e


def load_pretrained(
  directory: str | os.PathLike,
) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
  """Restores (config, variables, meta) from a pretrained directory, checking every shape."""
  from alit_jax.convert.alit_checkpoint import abstract_variables

  directory = pathlib.Path(directory).absolute()
  config, meta = read_config(directory)
  target = abstract_variables(config)
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(directory / PARAMS_DIR, target)
  return config, variables, meta


def load_gan_losses(directory: str | os.PathLike) -> Any | None:
  """The stage-2 loss networks saved next to converted weights, or None."""
  path = pathlib.Path(directory).absolute() / GAN_DIR
  if not path.exists():
    return None
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path)


def save_base(
  directory: str | os.PathLike,
  config: Any,
  variables: dict[str, Any],
  *,
  meta: dict[str, Any] | None = None,
  overwrite: bool = False,
  inputs: Iterable[str | os.PathLike] = (),
) -> pathlib.Path:
  """Writes a standalone base tokenizer (VQGAN / KL-VAE) directory: config.json {"base": ...}."""
  import dataclasses

  def write(tmp: pathlib.Path):
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / PARAMS_DIR, jax.device_get(variables))
    body = {"base": {"kind": config.kind, **dataclasses.asdict(config)}, "meta": meta or {}}
    (tmp / CONFIG_FILE).write_text(json.dumps(body, indent=2, sort_keys=True))

  return _write_atomically(directory, overwrite, write, kind="base", inputs=inputs)


def load_base(directory: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
  """Restores (base config, variables) of a standalone base tokenizer directory.

  Also accepts a full tokenizer directory (its base part is returned).
  """
  import jax.numpy as jnp

  from alit_jax.models.base_tokenizers import build_base
  from alit_jax.models.configs import VAEConfig, VQGANConfig

  directory = pathlib.Path(directory).absolute()
  path = directory / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(
      f"{directory}: no {CONFIG_FILE}; convert the base tokenizer with `python -m alit_jax.convert`"
    )
  d = json.loads(path.read_text())
  if "model" in d:
    config, variables, _ = load_pretrained(directory)
    return config.base, variables["base"]
  b = dict(d["base"])
  kind = b.pop("kind")
  b = {k: tuple(v) if isinstance(v, list) else v for k, v in b.items()}
  cfg = VQGANConfig(**b) if kind == "vqgan" else VAEConfig(**b)
  base = build_base(cfg)
  s = cfg.resolution
  target = jax.eval_shape(
    base.init, jax.random.key(0), jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
  )
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(directory / PARAMS_DIR, target)
  return cfg, variables
