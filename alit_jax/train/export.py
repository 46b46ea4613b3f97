"""Weights out of a training workdir: `Tokenizer.from_pretrained(WORKDIR)` and a pretrained dir.

    python -m alit_jax.train.export WORKDIR --out DIR [--step S] [--params]

writes DIR in the format of `python -m alit_jax.convert` (config.json + Orbax params/), with
the EMA weights of the latest checkpoint by default.
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Any

from alit_jax import checkpoint
from alit_jax.models.configs import ModelConfig
from alit_jax.train import checkpoints

is_workdir = checkpoints.is_workdir


def load_workdir(
  workdir: str | os.PathLike, *, step: int | None = None, ema: bool = True
) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
  """(ModelConfig, `{"alit": {"params": ...}, "base": ...}`, meta) from a training workdir.

  Args:
    workdir: the training workdir.
    step: checkpoint step (default: the latest).
    ema: the EMA weights (default, what the reference evaluates) or the raw params.
  """
  from alit_jax.convert.alit_checkpoint import abstract_variables

  workdir = pathlib.Path(workdir).absolute()
  if not checkpoints.is_workdir(workdir):
    raise FileNotFoundError(
      f"{workdir}: not a training workdir (expected {checkpoints.MODEL_CONFIG} and "
      f"{checkpoints.CHECKPOINTS}/)"
    )
  config, meta = checkpoints.read_model_config(workdir)
  target = abstract_variables(config)["alit"]["params"]
  which = "ema_params" if ema else "params"
  step, params = checkpoints.restore_params(workdir, target, step=step, which=which)
  base_cfg, base_vars = checkpoint.load_base(workdir / checkpoints.BASE_DIR)
  if base_cfg != config.base:
    raise ValueError(f"{workdir}: base tokenizer config {base_cfg} differs from {config.base}")
  meta = dict(meta, workdir=str(workdir), step=int(step), weights=which)
  return config, {"alit": {"params": params}, "base": base_vars}, meta


def export_pretrained(
  workdir: str | os.PathLike,
  out: str | os.PathLike,
  *,
  step: int | None = None,
  ema: bool = True,
  overwrite: bool = False,
) -> pathlib.Path:
  """Writes a pretrained directory (`Tokenizer.from_pretrained(out)`) from a workdir."""
  config, variables, meta = load_workdir(workdir, step=step, ema=ema)
  return checkpoint.save_pretrained(out, config, variables, meta=meta, overwrite=overwrite)


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
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)
  try:
    out = export_pretrained(
      args.workdir, args.out, step=args.step, ema=not args.params, overwrite=args.overwrite
    )
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
