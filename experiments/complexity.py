r"""Token count vs image complexity (paper claim: complex images need more tokens).

  python experiments/complexity.py --checkpoint CKPT --data SRC [--data SRC2 ...] --out OUT \
      [--criterion l1] [--thresholds 0.07] [--max-images N] [--num-heads H]

Per dataset: every image's adaptive token count (per threshold) and its PNG / JPEG-q95 bits per
pixel and mean gradient magnitude, Spearman correlations (also of the L1 error at the smallest
and largest token counts), a scatter plot and a per-image CSV. Writes OUT/complexity.json,
OUT/complexity_<data>.png and OUT/complexity_<data>.csv.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import sys

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import fmt, slug, write_json

from alit_jax import evaluate as ev
from alit_jax.analysis import complexity, tokens


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ev.add_checkpoint_args(p)
  ev.add_data_args(p, multiple=True)
  p.add_argument("--out", required=True)
  p.add_argument("--criterion", default="l1")
  p.add_argument("--thresholds", default="0.07")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  tok = ev.load_tokenizer(args.checkpoint, args.num_heads)
  reports = []
  for data in args.data:
    col = tokens.collect_token_counts(
      tok,
      data,
      criteria=[c.strip() for c in args.criterion.split(",")],
      thresholds=ev.parse_thresholds(args.thresholds),
      max_images=args.max_images,
      batch_size=args.batch_size,
      split=args.split,
      data_dir=args.data_dir,
      resize=ev.resize_arg(args.resize),
      measures=True,
      progress=not args.no_progress,
    )
    rep = complexity.complexity_report(col)
    name = slug(col["data"])
    complexity.plot_scatter(col, rep, out / f"complexity_{name}.png")
    with open(out / f"complexity_{name}.csv", "w", newline="") as f:
      w = csv.writer(f)
      keys = list(col["tokens"])
      meas = list(col["measures"])
      w.writerow(["index", "label"] + [f"tokens_{k}" for k in keys] + meas)
      for r in range(len(col["index"])):
        w.writerow(
          [col["index"][r], col["label"][r]]
          + [col["tokens"][k][r] for k in keys]
          + [col["measures"][m][r] for m in meas]
        )
    reports.append(rep)
    print(f"== {rep['data']}: {rep['num_images']} images")
    for key, row in rep["tokens"].items():
      rhos = ", ".join(
        f"{m} rho {fmt(row[m]['rho'])} (p {fmt(row[m]['p'], '.2g')})" for m in complexity.MEASURES
      )
      print(f"  tokens[{key}]: mean {row['mean']:.1f}, median {row['median']:.0f}; {rhos}")
    for k in rep:
      if k.startswith("l1_at_"):
        rhos = ", ".join(f"{m} rho {fmt(rep[k][m]['rho'])}" for m in complexity.MEASURES)
        print(f"  {k}: {rhos}")
  write_json(out / "complexity.json", {"checkpoint": args.checkpoint, "datasets": reports})
  print(f"wrote {out}/complexity.json and plots")
  return 0


if __name__ == "__main__":
  sys.exit(main())
