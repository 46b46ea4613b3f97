r"""Dataset tokenization throughput: early exit per batch vs the full rollout.

  python experiments/benchmarks/tokenize_dataset.py [--checkpoint DIR] [--num_images 128] \
      [--batch 4,16] [--quantiles 0.5,0.9,1.0] [--json PATH]

Runs `alit_jax.tokenize_dataset.tokenize_dataset` end to end (grain reading, encoding on all
local devices, array_record writing) on a mix of simple (flat, gradient) and complex (texture,
noise) 64x64 synthetic images (or the checkpoint's resolution), once with early exit and once
with every rollout iteration, and prints images/s per device and mean tokens per image. It also
checks that both modes write identical records (early exit changes the cost, never the tokens).

Images/s are measured by `tokenize_dataset` itself over its encode loop (reading, decoding,
encoding, writing; compilation is done beforehand); `--repeats R` keeps the fastest of R runs,
which helps on a shared machine.

Thresholds. Without `--checkpoint` the model is `tiny_config(iterations=8)` with random weights.
Its L1 does not fall with more tokens (the decoder ignores them) and does not follow image
complexity, so a fixed threshold such as 0.07 is never met and early exit could not show. The
script therefore measures every image's per-iteration L1 first and sets the threshold at
quantile q of the first-iteration scores: a fraction q of the images then meet it with the
first T tokens and the rest never do (they get all N*T tokens). That is the situation a trained
model creates for simple vs complex images. Early exit is per batch, so a batch stops early only
when all its images are done; two orders show the range:
  mixed   images in source order (simple and complex interleaved, as in a real dataset);
  sorted  images ordered by first-iteration score (batches of alike images, as when a dataset is
          bucketed by a complexity estimate).
With a trained checkpoint pass `--checkpoint` (the same quantile thresholds are used; add
`--thresholds` to use fixed ones instead).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

import jax
import numpy as np

from alit_jax import tokenize_dataset as td
from alit_jax.data import synthetic
from alit_jax.data.token_dataset import records_equal, token_dataset
from alit_jax.models.configs import tiny_config
from alit_jax.tokenizer import Tokenizer, local_mesh

KINDS = ("flat", "gradient", "texture", "noise")  # two simple, two complex


class MixSource:
  """In-memory images in a given order (picklable; fingerprint = content of the order)."""

  def __init__(self, images: np.ndarray, names: list[str], order: np.ndarray):
    self.images, self.names, self.order = images, names, np.asarray(order)

  def __len__(self) -> int:
    return len(self.order)

  def __getitem__(self, i: int) -> dict:
    k = int(self.order[int(i)])
    return {"image": self.images[k], "label": -1, "file_name": self.names[k]}

  def fingerprint(self) -> str:
    return hashlib.sha256(",".join(self.names[k] for k in self.order).encode()).hexdigest()

  def __repr__(self) -> str:
    return f"MixSource(n={len(self)})"


def _records(out: pathlib.Path) -> dict[str, dict]:
  ds = token_dataset(out)
  return {r["id"]: r for r in (ds[i] for i in range(len(ds)))}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--checkpoint", default=None, help="pretrained dir (default: random tiny model)")
  p.add_argument("--num_images", type=int, default=128)
  p.add_argument("--batch", default="4,16", help="per-process batch sizes")
  p.add_argument("--quantiles", default="0.5,0.9,1.0", help="fractions meeting at iteration 1")
  p.add_argument("--thresholds", default=None, help="fixed L1 thresholds instead of quantiles")
  p.add_argument("--iterations", type=int, default=8, help="rollout iterations (random model)")
  p.add_argument("--repeats", type=int, default=1, help="runs per setting; the fastest counts")
  p.add_argument("--json", default="experiments/benchmarks/results/tokenize_dataset.json")
  args = p.parse_args(argv)

  from absl import flags

  flags.FLAGS.mark_as_parsed()
  mesh = local_mesh()
  if args.checkpoint:
    tok = Tokenizer.from_pretrained(args.checkpoint, mesh=mesh)
    model_desc = f"{args.checkpoint} ({tok.config.name})"
  else:
    cfg = tiny_config(iterations=args.iterations)
    tok = Tokenizer.random(cfg, seed=0, mesh=mesh)
    model_desc = f"random tiny_config(iterations={args.iterations}), seed 0"
  n_dev = mesh.size
  size = tok.image_size
  t, n_it = tok.tokens_per_iteration, tok.num_iterations
  print(f"model: {model_desc}; {n_it} iterations x {t} tokens; {size}x{size}")
  print(f"devices: {n_dev} x {jax.devices()[0].device_kind} ({jax.default_backend()})")

  names, imgs = [], []
  for i in range(args.num_images):
    kind = KINDS[i % len(KINDS)]
    img, _ = synthetic.synthetic_image(i, size, seed=0, kind=kind)
    imgs.append(img)
    names.append(f"{kind}/{i:05d}")
  images = np.stack(imgs)

  # Per-iteration L1 of every image (threshold -1 is never met: every iteration is scored).
  scores = []
  for i in range(0, len(images), 16):
    enc = tok.encode(images[i : i + 16], "l1", -1.0, early_exit=False)
    scores.append(np.asarray(enc.scores))
  scores = np.concatenate(scores, axis=1)  # (N, num_images)
  print("\nmean L1 per iteration (rows: kind):")
  table = {}
  for k, kind in enumerate(KINDS):
    row = scores[:, k :: len(KINDS)].mean(axis=1)
    table[kind] = [round(float(v), 5) for v in row]
    print(f"  {kind:9s} " + " ".join(f"{v:.4f}" for v in row))
  first = scores[0]
  if args.thresholds:
    settings = [(None, float(x)) for x in args.thresholds.split(",")]
  else:
    settings = []
    for q in (float(x) for x in args.quantiles.split(",")):
      # Just above the q-quantile (or the maximum) so that a fraction q meets it.
      thr = float(np.quantile(first, q)) + 1e-6 if q < 1 else float(first.max()) + 1e-3
      settings.append((q, thr))
  orders = {"mixed": np.arange(len(images)), "sorted": np.argsort(first, kind="stable")}

  runs, identical = [], True
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="tokbench-"))
  try:
    for b in (int(x) for x in args.batch.split(",")):
      for early in (True, False):  # compile outside the timed runs
        jax.block_until_ready(tok.encode(images[:b], "l1", 0.0, early_exit=early).tokens)
      for q, thr in settings:
        for order_name, order in orders.items():
          outs = {}
          for early in (True, False):
            if not early and order_name != "mixed":
              continue  # the full rollout's cost does not depend on the order
            rates = []
            for rep in range(args.repeats):
              out = tmp / f"b{b}_{thr}_{order_name}_{early}_{rep}"
              res = td.tokenize_dataset(
                tok,
                out,
                MixSource(images, names, order),
                threshold=thr,
                batch_size=b,
                shard_size=b * max(1, 64 // b),
                process_index=0,
                process_count=1,
                early_exit=early,
                log=None,
              )
              rates.append(res.images_per_s)
            m = res.manifest
            run = {
              "batch": b,
              "quantile": q,
              "threshold": thr,
              "order": order_name,
              "early_exit": early,
              "images_per_s": round(max(rates), 2),
              "images_per_s_per_device": round(max(rates) / n_dev, 2),
              "images_per_s_all_repeats": [round(r, 2) for r in rates],
              "mean_tokens_per_image": round(m["mean_tokens_per_image"], 3),
              "token_length_histogram": m["token_length_histogram"],
              "num_images": res.images,
            }
            runs.append(run)
            outs[early] = out
            print(
              f"batch {b:3d} | q={q} thr={thr:.4f} | {order_name:6s} | "
              f"{'early exit' if early else 'full rollout':12s} | "
              f"{run['images_per_s_per_device']:7.1f} img/s/device | "
              f"mean tokens {run['mean_tokens_per_image']:.2f}"
            )
          if False in outs:
            a, c = _records(outs[True]), _records(outs[False])
            same = a.keys() == c.keys() and all(records_equal(a[k], c[k]) for k in a)
            identical &= same
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print(f"\nearly-exit and full-rollout outputs identical: {identical}")

  result = {
    "benchmark": "tokenize_dataset",
    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    "host": platform.node(),
    "backend": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
    "num_devices": n_dev,
    "cpu_count": os.cpu_count(),
    "model": model_desc,
    "iterations": n_it,
    "tokens_per_iteration": t,
    "image_size": size,
    "num_images": len(images),
    "kinds": list(KINDS),
    "mean_l1_per_iteration": table,
    "runs": runs,
    "early_and_full_identical": identical,
  }
  path = pathlib.Path(args.json)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1))
  print(f"wrote {path}")
  return 0 if identical else 1


if __name__ == "__main__":
  sys.exit(main())
