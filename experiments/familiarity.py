r"""Token counts of in- vs out-of-distribution images (paper claim: unfamiliar images need more
tokens at the same reconstruction threshold).

  python experiments/familiarity.py --checkpoint CKPT --data IN_DIST --data OOD [--data ...] \
      --out OUT [--criterion l1] [--thresholds 0.07] [--max-images N]

The first --data is the reference (in-distribution) set. Per threshold: mean/median/histogram of
token counts per dataset, two-sided Mann-Whitney U tests against the first, and side-by-side
histograms. Writes OUT/familiarity.json and OUT/familiarity_<selection>.png.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import _common  # noqa: F401
from _common import fmt, slug, write_json

from alit_jax import evaluate as ev
from alit_jax.analysis import familiarity, tokens


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ev.add_checkpoint_args(p)
  ev.add_data_args(p, multiple=True)
  p.add_argument("--out", required=True)
  p.add_argument("--criterion", default="l1")
  p.add_argument("--thresholds", default="0.07")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  if len(args.data) < 2:
    p.error("give at least two --data sources (the first is the in-distribution set)")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  tok = ev.load_tokenizer(args.checkpoint, args.num_heads)
  cols = []
  for data in args.data:
    cols.append(
      tokens.collect_token_counts(
        tok,
        data,
        criteria=[c.strip() for c in args.criterion.split(",")],
        thresholds=ev.parse_thresholds(args.thresholds),
        max_images=args.max_images,
        batch_size=args.batch_size,
        split=args.split,
        data_dir=args.data_dir,
        resize=ev.resize_arg(args.resize),
        progress=not args.no_progress,
      )
    )
  counts = tok.token_counts
  results = {}
  for key in cols[0]["tokens"]:
    by_data = {c["data"]: c["tokens"][key] for c in cols}
    rep = familiarity.compare(by_data, counts)
    results[key] = rep
    familiarity.plot_histograms(
      by_data, counts, out / f"familiarity_{slug(key)}.png", title=f"selection {key}"
    )
    print(f"== selection {key}")
    for name, s in rep["datasets"].items():
      print(f"  {name}: {s['num_images']} images, mean {s['mean']:.1f}, median {s['median']:.0f}")
    for name, t in rep["tests"].items():
      print(
        f"  {name}: mean difference {t['mean_difference']:+.1f} tokens, "
        f"Mann-Whitney p {fmt(t['p'], '.3g')}"
      )
  write_json(out / "familiarity.json", {"checkpoint": args.checkpoint, "selections": results})
  print(f"wrote {out}/familiarity.json and plots")
  return 0


if __name__ == "__main__":
  sys.exit(main())
