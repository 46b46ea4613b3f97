"""Weights out of a training workdir: `Tokenizer.from_pretrained(WORKDIR)` and a pretrained dir.

    python -m alit_jax.train.export WORKDIR --out DIR [--step S] [--params]

writes DIR in the format of `python -m alit_jax.convert` (config.json + Orbax params/), with
the EMA weights of the latest checkpoint by default. For a base-VQGAN training workdir
(`configs/vqgan_train.py`) DIR is a base tokenizer directory (`checkpoint.load_base`), usable as
`config.base_checkpoint` of `configs/alit_pretrain.py`.
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Any

from alit_jax import checkpoint, criteria
from alit_jax.models.configs import ModelConfig
from alit_jax.train import checkpoints

is_workdir = checkpoints.is_workdir


def load_workdir(
  workdir: str | os.PathLike, *, step: int | None = None, ema: bool = True
) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
  """(ModelConfig, `{"alit": {"params": ...}, "base": ...}`, meta) from an ALIT training workdir.

  Stage 1 pairs the trained ALIT with the frozen base copy; stage 2 (full fine-tuning) trains
  both, so both come from the checkpoint.

  Args:
    workdir: the training workdir.
    step: checkpoint step (default: the latest).
    ema: the EMA weights (default, what the reference evaluates) or the raw params.
  """
  from alit_jax.convert.alit_checkpoint import abstract_variables

  workdir = _check_workdir(workdir)
  config, meta = checkpoints.read_model_config(workdir)
  target = abstract_variables(config)
  which = "ema_params" if ema else "params"
  if meta.get("stage") == "full_finetuning":
    both = {"alit": target["alit"]["params"], "base": target["base"]["params"]}
    step, params = checkpoints.restore_params(workdir, both, step=step, which=which)
    variables = {"alit": {"params": params["alit"]}, "base": {"params": params["base"]}}
  else:
    step, params = checkpoints.restore_params(
      workdir, target["alit"]["params"], step=step, which=which
    )
    base_cfg, base_vars = checkpoint.load_base(workdir / checkpoints.BASE_DIR)
    if base_cfg != config.base:
      raise ValueError(f"{workdir}: base tokenizer config {base_cfg} differs from {config.base}")
    variables = {"alit": {"params": params}, "base": base_vars}
  meta = dict(meta, workdir=str(workdir), step=int(step), weights=which)
  return config, variables, meta


def _check_workdir(workdir: str | os.PathLike) -> pathlib.Path:
  workdir = pathlib.Path(workdir).absolute()
  if not checkpoints.is_workdir(workdir):
    raise FileNotFoundError(
      f"{workdir}: not a training workdir (expected {checkpoints.MODEL_CONFIG} and "
      f"{checkpoints.CHECKPOINTS}/)"
    )
  return workdir


def load_base_workdir(
  workdir: str | os.PathLike, *, step: int | None = None, ema: bool = True
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
  """(VQGANConfig, `{"params": ...}`, meta) from a `configs/vqgan_train.py` workdir."""
  from alit_jax.models.base_tokenizers import build_base
  from alit_jax.models.configs import VQGANConfig

  workdir = _check_workdir(workdir)
  d = checkpoints.read_workdir_description(workdir)
  if "base" not in d:
    raise ValueError(f"{workdir}: not a base-tokenizer training workdir")
  b = dict(d["base"])
  kind = b.pop("kind")
  if kind != "vqgan":
    raise ValueError(f"{workdir}: unknown base kind {kind!r}")
  cfg = VQGANConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in b.items()})
  import jax
  import jax.numpy as jnp

  s = cfg.resolution
  target = jax.eval_shape(
    build_base(cfg).init, jax.random.key(0), jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
  )
  which = "ema_params" if ema else "params"
  step, params = checkpoints.restore_params(
    workdir, {"base": target["params"]}, step=step, which=which
  )
  meta = dict(d.get("meta", {}), workdir=str(workdir), step=int(step), weights=which)
  return cfg, {"params": params["base"]}, meta


def export_pretrained(
  workdir: str | os.PathLike,
  out: str | os.PathLike,
  *,
  step: int | None = None,
  ema: bool = True,
  overwrite: bool = False,
  default_thresholds: dict[str, float] | None = None,
) -> pathlib.Path:
  """Writes a pretrained directory (`Tokenizer.from_pretrained(out)`) from an ALIT workdir, or a
  base tokenizer directory (`checkpoint.load_base(out)`, `config.base_checkpoint`) from a
  `configs/vqgan_train.py` workdir."""
  from alit_jax import outputs

  workdir = _check_workdir(workdir)
  # Refused before anything is read: an --out that holds the workdir or foreign files.
  outputs.check_output_dir(out, overwrite=overwrite, inputs=[workdir])
  if checkpoints.workdir_stage(workdir) == "vqgan":
    cfg, variables, meta = load_base_workdir(workdir, step=step, ema=ema)
    return checkpoint.save_base(
      out, cfg, variables, meta=meta, overwrite=overwrite, inputs=[workdir]
    )
  config, variables, meta = load_workdir(workdir, step=step, ema=ema)
  if default_thresholds:
    meta = dict(meta, default_thresholds=dict(default_thresholds))
  return checkpoint.save_pretrained(
    out, config, variables, meta=meta, overwrite=overwrite, inputs=[workdir]
  )


def main(argv=None) -> int:
  import argparse

  p = argparse.ArgumentParser(
    prog="python -m alit_jax.train.export",
    description="Export the (EMA) weights of a training workdir as a pretrained directory.",
  )
  p.add_argument("workdir")
  p.add_argument("--out", required=True)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--params", action="store_true", help="raw params instead of the EMA")
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="replace an output directory that alit-jax wrote before (never any other)",
  )
  p.add_argument(
    "--default-threshold",
    action="append",
    default=[],
    metavar="CRIT=T",
    help="record the model's default threshold for a criterion (e.g. l1=0.05; repeatable), used "
    "by Tokenizer.encode / tokenize when no threshold is given",
  )
  args = p.parse_args(argv)
  thresholds = {}
  for item in args.default_threshold:
    name, eq, value = item.partition("=")
    try:
      thresholds[name.strip()] = float(value)
    except ValueError:
      p.error(f"--default-threshold expects CRIT=T, got {item!r}")
    if not eq or name.strip() not in criteria.REGISTRY:
      p.error(
        f"--default-threshold expects CRIT=T with CRIT in {sorted(criteria.REGISTRY)}, got {item!r}"
      )
  try:
    out = export_pretrained(
      args.workdir,
      args.out,
      step=args.step,
      ema=not args.params,
      overwrite=args.overwrite,
      default_thresholds=thresholds,
    )
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
