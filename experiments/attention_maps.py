r"""Decoder attention between latent tokens and 2D positions, per iteration (the paper's
object-discovery figure).

  python experiments/attention_maps.py --checkpoint CKPT (--image PATH | --data SRC --index I) \
      --out OUT [--layer 6|-1|mean] [--direction image_to_latent|latent_to_image] [--num-tokens 8]

Writes OUT/attention_iterations.png (rows: iterations; columns: input, the latent token each
position attends to most, the first --num-tokens tokens' maps), OUT/attention_iter<i>.png (all
tokens of iteration i, for each of --iterations: default the first and the last), OUT/attention.npz
(the maps) and OUT/attention.json (a per-iteration summary).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import _common  # noqa: F401
import numpy as np
from _common import write_json

from alit_jax import evaluate as ev
from alit_jax.analysis import attention


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ev.add_checkpoint_args(p)
  p.add_argument("--image", default=None, help="an image file")
  p.add_argument("--data", default=None, help="or a data source and --index")
  p.add_argument("--index", type=int, default=0)
  p.add_argument("--split", default="validation")
  p.add_argument("--no-resize", action="store_true", help="center crop only")
  p.add_argument(
    "--layer", default=None, help="decoder layer index, or 'mean' (default: 6 or last)"
  )
  p.add_argument(
    "--direction", choices=("image_to_latent", "latent_to_image"), default="image_to_latent"
  )
  p.add_argument("--num-tokens", type=int, default=8)
  p.add_argument(
    "--iterations",
    default="0,-1",
    help="iterations with a per-token figure: 'all' or indices (default first and last)",
  )
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  if (args.image is None) == (args.data is None):
    p.error("give exactly one of --image and --data")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  tok = ev.load_tokenizer(args.checkpoint, args.num_heads)
  img = attention.load_model_image(
    tok, args.image, data=args.data, index=args.index, split=args.split, resize=not args.no_resize
  )
  layer = args.layer
  if layer is not None and layer != "mean":
    layer = int(layer)
  att = attention.decoder_attention(tok, img, layer=layer)
  attention.plot_iterations(
    img,
    att,
    out / "attention_iterations.png",
    direction=args.direction,
    num_tokens=args.num_tokens,
  )
  n = len(att["num_tokens"])
  if args.iterations == "all":
    its = list(range(n))
  else:
    its = sorted({int(i) % n for i in args.iterations.split(",") if i.strip()})
  for i in its:
    attention.plot_tokens(img, att, i, out / f"attention_iter{i}.png", direction=args.direction)
  np.savez(out / "attention.npz", image=img, **{k: np.asarray(v) for k, v in att.items()})
  summary = []
  for i in range(n):
    used = len(np.unique(att["assignment"][i]))
    m = att[args.direction][i, : att["num_tokens"][i]]
    mass = float(att["image_to_latent"][i].sum(axis=0).mean())
    summary.append(
      {
        "tokens": att["num_tokens"][i],
        "distinct_argmax_tokens": used,
        "image_attention_mass_on_latents": mass,
        "mean_peak_to_mean": float(np.mean(m.max(axis=(1, 2)) / (m.mean(axis=(1, 2)) + 1e-12))),
      }
    )
    print(
      f"  iteration {i} ({att['num_tokens'][i]} tokens): {used} distinct argmax tokens over "
      f"the {att['assignment'].shape[1]}x{att['assignment'].shape[2]} grid; 2D positions put "
      f"{mass:.3f} of their attention on latents; peak/mean of token maps "
      f"{summary[-1]['mean_peak_to_mean']:.2f}"
    )
  write_json(
    out / "attention.json",
    {
      "layer": att["layer"],
      "direction": args.direction,
      "iterations": summary,
      "checkpoint": args.checkpoint,
    },
  )
  print(f"layer {att['layer']}; wrote {out}/attention_iterations.png and attention_iter*.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
