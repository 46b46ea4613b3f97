r"""Linear probe on pooled latent tokens per token count (paper claim: the 1D latents carry
semantics that grow with the token count; the task decides how many tokens are needed).

  python experiments/linear_probe.py --checkpoint CKPT --data SRC --out OUT \
      [--train-split train] [--test-split validation] [--max-images N] [--feature latent_tokens]

Default data is procedural images whose label is their complexity kind (flat, gradient,
few_shapes, many_shapes, texture, noise): `synthetic:num_examples=600,image_size=256`. Per token
count: a linear softmax probe (optax AdamW, full batch) on the mean-pooled latents of that
iteration, train/test accuracy; and the oracle token count (smallest count whose probe is right).
Writes OUT/linear_probe.json and OUT/linear_probe.png.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import _common  # noqa: F401
from _common import write_json

from alit_jax import evaluate as ev
from alit_jax.analysis import probe


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ev.add_checkpoint_args(p)
  p.add_argument("--data", default="synthetic:num_examples=600,image_size=256")
  p.add_argument("--test-data", default=None, help="default: --data with --test-split")
  p.add_argument("--train-split", default="train")
  p.add_argument("--test-split", default="validation")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--max-images", type=int, default=None, help="per split")
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--resize", choices=("auto", "yes", "no"), default="auto")
  p.add_argument(
    "--feature", choices=("latent_tokens", "factorized_latent"), default="latent_tokens"
  )
  p.add_argument("--steps", type=int, default=500)
  p.add_argument("--learning-rate", type=float, default=0.05)
  p.add_argument("--weight-decay", type=float, default=1e-4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", required=True)
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  tok = ev.load_tokenizer(args.checkpoint, args.num_heads)
  common = dict(
    feature=args.feature,
    max_images=args.max_images,
    batch_size=args.batch_size,
    data_dir=args.data_dir,
    resize=ev.resize_arg(args.resize),
    progress=not args.no_progress,
  )
  train = probe.pooled_latents(tok, args.data, split=args.train_split, **common)
  test = probe.pooled_latents(tok, args.test_data or args.data, split=args.test_split, **common)
  num_classes = max(train["num_classes"], test["num_classes"])
  if num_classes < 2:
    p.error(f"{train['data']}: needs labels of at least 2 classes")
  report, _ = probe.probe_per_length(
    train["features"],
    train["labels"],
    test["features"],
    test["labels"],
    num_classes,
    tok.token_counts,
    steps=args.steps,
    learning_rate=args.learning_rate,
    weight_decay=args.weight_decay,
    seed=args.seed,
  )
  report.update(
    train_data=train["data"],
    test_data=test["data"],
    feature=args.feature,
    label_names=train["label_names"],
    checkpoint=args.checkpoint,
  )
  probe.plot_accuracy(report, out / "linear_probe.png", title=f"{train['data']} ({args.feature})")
  write_json(out / "linear_probe.json", report)
  print(
    f"train {train['data']} ({report['num_train']}), test {test['data']} "
    f"({report['num_test']}), {num_classes} classes, chance {report['chance']:.3f}"
  )
  for r in report["per_length"]:
    print(
      f"  {r['tokens']:4d} tokens: test accuracy {r['test_accuracy']:.3f} "
      f"(train {r['train_accuracy']:.3f})"
    )
  o = report["oracle"]
  print(
    f"  oracle: mean {o['mean_tokens']:.1f} tokens (median {o['median_tokens']:.0f}), "
    f"{o['accuracy']:.3f} of test images correct at some length"
  )
  print(f"wrote {out}/linear_probe.json and linear_probe.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
