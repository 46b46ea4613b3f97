r"""Does a model adapt? L1 vs token count, and tokens chosen vs image complexity.

  python experiments/demo_adaptivity.py                       # the bundled demo, held-out images
  python experiments/demo_adaptivity.py --data /my/images     # any folder (repeatable)
  python experiments/demo_adaptivity.py --checkpoint DIR --data SRC --threshold 0.07

For every image: the L1 reconstruction error at each token count (32, 64, ..., 256), the tokens
chosen at the threshold (the fewest whose L1 is below it; 256 if none), and its complexity as
PNG bits per pixel (lossless compressed size, at the model's input size). Prints mean L1 per
token count, how many images' L1 falls at every step, and the Spearman correlation of the tokens
chosen with PNG bpp (and with JPEG bpp and gradient magnitude). Writes OUT/adaptivity.json.

The default data are images the demo model never saw: `demo:...` validation split = random
crops of the held-out photos (the ones in `alit_jax/assets/samples`) and procedural images drawn
with a different seed than training (see `alit_jax/data/demo_data.py`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import _common  # noqa: F401  (puts the repository on sys.path)
import numpy as np
from _common import fmt, write_json

from alit_jax import evaluate as ev
from alit_jax.analysis import complexity, tokens

DEFAULT_DATA = "demo:num_examples=256,image_size=64,seed=1"


def report(tok, data: str, threshold: float, args) -> dict:
  col = tokens.collect_token_counts(
    tok,
    data,
    criteria=["l1"],
    thresholds={"l1": [threshold]},
    max_images=args.max_images,
    batch_size=args.batch_size,
    split=args.split,
    data_dir=args.data_dir,
    resize=ev.resize_arg(args.resize),
    measures=True,
    progress=not args.no_progress,
  )
  l1 = np.asarray(col["l1"])  # (M, N)
  counts = list(col["token_counts"])
  (key,) = col["tokens"]
  chosen = np.asarray(col["tokens"][key])
  steps = np.diff(l1, axis=1)
  rep = {
    "data": col["data"],
    "num_images": int(l1.shape[0]),
    "threshold": threshold,
    "token_counts": counts,
    "mean_l1": l1.mean(0).tolist(),
    "median_l1": np.median(l1, 0).tolist(),
    "fraction_of_steps_where_l1_falls": float(np.mean(steps < 0)),
    "images_with_l1_falling_at_every_step": int(np.sum(np.all(steps < 0, axis=1))),
    "mean_tokens": float(chosen.mean()),
    "tokens_histogram": {int(c): int(np.sum(chosen == c)) for c in counts},
    "spearman_tokens_vs": {k: complexity.spearman(chosen, v) for k, v in col["measures"].items()},
  }
  return rep


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ev.add_checkpoint_args(p, default="demo")
  ev.add_data_args(p, multiple=True, default_data=DEFAULT_DATA, batch_size=32)
  p.add_argument(
    "--threshold", type=float, default=None, help="L1 threshold (default: the model's, else 0.07)"
  )
  p.add_argument("--out", default="adaptivity_out")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  tok = ev.load_tokenizer(args.checkpoint, args.num_heads)
  threshold = args.threshold if args.threshold is not None else tok.default_threshold("l1")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  reports = []
  for data in args.data or [DEFAULT_DATA]:
    rep = report(tok, data, threshold, args)
    reports.append(rep)
    print(f"\n{rep['data']}: {rep['num_images']} images, L1 threshold {rep['threshold']}")
    print("tokens   " + " ".join(f"{c:>7d}" for c in rep["token_counts"]))
    print("mean L1  " + " ".join(f"{v:7.4f}" for v in rep["mean_l1"]))
    print("median L1" + " ".join(f"{v:7.4f}" for v in rep["median_l1"]))
    print(
      f"L1 falls at {100 * rep['fraction_of_steps_where_l1_falls']:.1f}% of the 32-token steps; "
      f"at every step for {rep['images_with_l1_falling_at_every_step']}/{rep['num_images']} images"
    )
    hist = ", ".join(f"{c}: {n}" for c, n in rep["tokens_histogram"].items())
    print(f"tokens chosen: mean {rep['mean_tokens']:.1f}; histogram {hist}")
    sp = rep["spearman_tokens_vs"]
    print(
      "Spearman(tokens chosen, complexity): "
      + ", ".join(f"{k} rho {fmt(v['rho'])} (p {fmt(v['p'], '.1e')})" for k, v in sp.items())
    )
  write_json(out / "adaptivity.json", reports)
  print(f"\nwrote {out / 'adaptivity.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
