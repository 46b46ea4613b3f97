"""`python -m alit_jax.evaluate`: its command line, and the argument helpers the experiments share
(`add_checkpoint_args`, `add_data_args`, `parse_thresholds`, `resize_arg`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from alit_jax import criteria as criteria_lib
from alit_jax.eval.outputs import format_table
from alit_jax.eval.rollouts import evaluate
from alit_jax.eval.sources import load_tokenizer


def parse_thresholds(text: str | None) -> list[float] | dict[str, list[float]] | None:
  """'0.05,0.07' -> [0.05, 0.07]; 'l1=0.05,0.07;psnr=25' -> {'l1': [...], 'psnr': [25.0]}."""
  if text is None or not text.strip():
    return None
  try:
    if "=" in text:
      out = {}
      for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, vals = part.partition("=")
        out[name.strip()] = [float(v) for v in vals.split(",") if v.strip()]
      return out
    return [float(v) for v in text.split(",") if v.strip()]
  except ValueError as e:
    raise ValueError(
      f"bad --thresholds {text!r}: expected '0.05,0.07' or 'l1=0.05,0.07;psnr=25' ({e})"
    ) from e


def add_checkpoint_args(p: argparse.ArgumentParser, *, default: str | None = None) -> None:
  """--checkpoint / --num-heads, shared by the experiments (required unless `default`)."""
  p.add_argument(
    "--checkpoint",
    required=default is None,
    default=default,
    help="'demo', a pretrained dir (convert/save_pretrained/training workdir) or a PyTorch .pth"
    + (f" (default: {default})" if default else ""),
  )
  p.add_argument("--num-heads", type=int, default=None, help="heads of a .pth checkpoint")


def add_data_args(
  p: argparse.ArgumentParser,
  *,
  multiple: bool = False,
  default_data: str | None = None,
  batch_size: int = 16,
) -> None:
  """--data / --split / --data-dir / --max-images / --batch-size / --resize.

  `--data` is required unless `default_data` is given (then a repeatable `--data` replaces it,
  and the parsed value is None when not given).
  """
  if multiple:
    p.add_argument(
      "--data",
      action="append",
      required=default_data is None,
      default=None,
      help="image source (repeatable)" + (f"; default: {default_data}" if default_data else ""),
    )
  else:
    p.add_argument(
      "--data",
      required=default_data is None,
      default=default_data,
      help="folder of images, folder:PATH, TFDS NAME[/SPLIT] or synthetic:...",
    )
  p.add_argument("--split", default="validation", help="split of TFDS / synthetic sources")
  p.add_argument("--data-dir", default=None, help="TFDS data_dir")
  p.add_argument("--max-images", type=int, default=None)
  p.add_argument("--batch-size", type=int, default=batch_size)
  p.add_argument(
    "--resize",
    choices=("auto", "yes", "no"),
    default="auto",
    help="resize the shorter side before the center crop (auto: folders yes, TFDS no)",
  )


def resize_arg(value: str) -> bool | None:
  return {"auto": None, "yes": True, "no": False}[value]


def _inception_help() -> str:
  from alit_jax.metrics import inception

  return (
    "rFID skipped: no Inception weights. Download "
    f"{inception.FID_WEIGHTS_FILE} ({inception.FID_WEIGHTS_URL}) and pass --inception PATH "
    f"(or set ${inception.WEIGHTS_ENV})."
  )


LPIPS_HELP = (
  "LPIPS skipped: pass --lpips-vgg vgg16-397923af.pth (torchvision's ImageNet VGG16) and "
  "--lpips-heads vgg.pth (LPIPS v0.1 heads, in the `lpips` package under weights/v0.1/)."
)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m alit_jax.evaluate",
    description="ALIT reconstruction metrics at every token count and under adaptive selection.",
  )
  add_checkpoint_args(p)
  add_data_args(p)
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument(
    "--criterion", default="l1", help="selection criteria, comma separated (l1, mse, psnr, lpips)"
  )
  p.add_argument(
    "--thresholds",
    default="0.05,0.07,0.1",
    help="'0.05,0.07,0.1' for every criterion, or 'l1=0.05,0.07;psnr=25,30'",
  )
  p.add_argument("--lpips-vgg", default=None)
  p.add_argument("--lpips-heads", default=None)
  p.add_argument(
    "--inception",
    default=None,
    help="pt_inception-2015-12-05-6726825d.pth (default: $ALIT_INCEPTION_WEIGHTS)",
  )
  p.add_argument("--quantize", choices=("floor", "round", "none"), default="floor")
  p.add_argument("--halting", choices=("off", "threshold", "sample"), default="off")
  p.add_argument("--halting-threshold", type=float, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--grid-images", type=int, default=8)
  p.add_argument("--num-devices", type=int, default=None, help="default: all local devices")
  p.add_argument("--no-progress", action="store_true")
  return p


def _lpips_and_criteria(p: argparse.ArgumentParser, args: argparse.Namespace):
  """(LPIPS variables or None, criterion names); registers the LPIPS criterion if selected."""
  lpips_vars = None
  if args.lpips_vgg is not None:
    from alit_jax.losses.lpips import load_lpips

    lpips_vars = load_lpips(args.lpips_vgg, args.lpips_heads)
  else:
    print(LPIPS_HELP, file=sys.stderr)
  crit_names = [c.strip() for c in args.criterion.split(",") if c.strip()]
  if "lpips" in crit_names:
    if lpips_vars is None:
      p.error("--criterion lpips needs --lpips-vgg and --lpips-heads")
    criteria_lib.register(criteria_lib.lpips_criterion(lpips_vars))
  return lpips_vars, crit_names


def _inception_weights(args: argparse.Namespace):
  """Inception variables from --inception or $ALIT_INCEPTION_WEIGHTS, else None (no rFID)."""
  from alit_jax.metrics import inception as inception_lib

  path = args.inception or os.environ.get(inception_lib.WEIGHTS_ENV)
  if path:
    return inception_lib.load_inception(path)
  print(_inception_help(), file=sys.stderr)
  return None


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m alit_jax.evaluate` (see `alit_jax.evaluate` for the arguments); returns 0."""
  p = _parser()
  args = p.parse_args(argv)
  if (args.lpips_vgg is None) != (args.lpips_heads is None):
    p.error("--lpips-vgg and --lpips-heads go together")
  tok = load_tokenizer(args.checkpoint, args.num_heads)
  lpips_vars, crit_names = _lpips_and_criteria(p, args)
  inception_vars = _inception_weights(args)
  results = evaluate(
    tok,
    args.data,
    max_images=args.max_images,
    batch_size=args.batch_size,
    criteria=crit_names,
    thresholds=parse_thresholds(args.thresholds),
    lpips=lpips_vars,
    inception=inception_vars,
    out_dir=args.out,
    split=args.split,
    data_dir=args.data_dir,
    resize=resize_arg(args.resize),
    quantize=args.quantize,
    halting=args.halting,
    halting_threshold=args.halting_threshold,
    seed=args.seed,
    grid_images=args.grid_images,
    num_devices=args.num_devices,
    progress=not args.no_progress,
  )
  print(format_table(results))
  print(f"wrote {args.out}/results.json, per_length.csv, adaptive.csv, per_image.csv, plots")
  return 0
