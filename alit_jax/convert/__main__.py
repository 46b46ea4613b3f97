r"""Converts an official PyTorch checkpoint into an alit-jax pretrained directory.

    python -m alit_jax.convert CKPT --out DIR [--num-heads N] [--overwrite]

CKPT is an ALIT checkpoint (`.pth`: plain state dict, `{'model', 'ema'}` (ema used) or
`{'state_dict'}`; also `.safetensors` / `.npz`), or a standalone base tokenizer (the VQGAN `.ckpt`
the reference downloads, or the KL-16 VAE `.ckpt`). torch is not needed. The architecture is
inferred from key shapes; only the head count must be given for non-reference sizes.

DIR receives `config.json` and Orbax `params/` (and `gan_losses/` for full_finetuning
checkpoints, kept for stage-2 fine-tuning). Nothing is written unless the whole conversion
succeeds, and an existing DIR is only replaced with --overwrite, and only if alit-jax wrote it
(`alit_jax.outputs`): a DIR holding other files, or the input checkpoint, is refused.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def _count(tree) -> int:
  import jax

  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def _root_name(where: str) -> str:
  """`select_state_dict`'s subscript as words: "['ema']" or "the top level"."""
  return where if where else "the top-level state dict"


def convert(
  ckpt: str, out: str, *, num_heads: int | None = None, overwrite: bool = False, log=print
) -> dict:
  """Library form of the command; returns a summary dict."""
  from alit_jax import checkpoint, outputs
  from alit_jax.convert import alit_checkpoint, pth

  outputs.check_output_dir(out, overwrite=overwrite, inputs=[ckpt])  # before reading anything
  sd, where = pth.load_state_dict(ckpt)
  log(
    f"read {ckpt}: {len(sd)} tensors from {_root_name(where)}, "
    f"{sum(np.size(v) for v in sd.values()):,} values"
  )
  shapes = {k: tuple(np.shape(v)) for k, v in sd.items()}
  is_alit = alit_checkpoint.looks_like_alit(shapes)
  summary: dict = {"source": os.path.abspath(ckpt), "state_dict": where}
  if is_alit:
    config = alit_checkpoint.infer_config(shapes, num_heads=num_heads, name=ckpt)
    variables, gan = alit_checkpoint.convert_state_dict(sd, config, name=ckpt)
    a = config.alit
    log(
      f"found ALIT ({config.name}): base={a.base} width={a.encoder_width} layers={a.encoder_layers}/"
      f"{a.decoder_layers} heads={a.encoder_heads} quantize={a.quantize_latent} factorize={a.factorize_latent} "
      f"codebook={a.codebook_size}x{a.token_dim} tokens={a.num_latent_tokens}x{a.max_rollout_iters} "
      f"image={a.image_size}/{a.patch_size}"
    )
    log(f"base tokenizer: {config.base}")
    log(f"params: alit {_count(variables['alit']):,}, base {_count(variables['base']):,}")
    gan_tree = None
    if gan:
      gan_tree = alit_checkpoint.convert_gan_losses(gan, a.max_rollout_iters, name=ckpt)
      log(
        f"gan_losses: {len(gan)} keys -> {len(gan_tree['discriminators'])} PatchGAN discriminators + "
        "LPIPS, saved in gan_losses/ for stage-2 fine-tuning"
      )
    summary.update(kind="alit", config=config.name, gan_losses_keys=len(gan))
    checkpoint.save_pretrained(
      out,
      config,
      variables,
      meta=summary,
      gan_losses=gan_tree,
      overwrite=overwrite,
      inputs=[ckpt],
    )
  else:
    base_cfg, variables = alit_checkpoint.convert_base_checkpoint(sd, name=ckpt)
    log(f"found standalone base tokenizer: {base_cfg}")
    log(f"params: {_count(variables):,}")
    summary.update(kind=base_cfg.kind)
    checkpoint.save_base(out, base_cfg, variables, meta=summary, overwrite=overwrite, inputs=[ckpt])
  log(f"wrote {out}")
  return summary


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m alit_jax.convert", description=__doc__.split("\n\n")[1]
  )
  parser.add_argument("ckpt", help="PyTorch checkpoint (.pth/.ckpt/.safetensors/.npz)")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument(
    "--num-heads", type=int, default=None, help="attention heads (default: per named model)"
  )
  parser.add_argument(
    "--overwrite",
    action="store_true",
    help="replace an output directory that alit-jax wrote before (never any other)",
  )
  args = parser.parse_args(argv)
  try:
    convert(args.ckpt, args.out, num_heads=args.num_heads, overwrite=args.overwrite)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
