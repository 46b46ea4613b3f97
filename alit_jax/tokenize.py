r"""Tokenize images with an adaptive number of tokens.

    python -m alit_jax.tokenize PATH... [--model demo|DIR|CKPT] [--num-heads N]
        [--criterion l1] [--threshold T] [--halting off] [--out OUT] [--batch-size B] [--grid F]

PATH are image files or folders (searched recursively). For every image the command prints the
number of tokens chosen (the fewest whose reconstruction meets the criterion) and the
reconstruction error, and writes to OUT:

* `<name>.npz`: `tokens` (the chosen length; int indices or float latents), `length`,
  `scores` (criterion at every token count), `token_counts`, `source` (the image path);
* `<name>.png`: the input, then the reconstruction at every token count (32, 64, ..., 256), the
  chosen one framed in red, with the score under each;
* `summary.csv`: one row per image, skipped files included (their `error` column says why);
* with `--grid FILE`, every strip stacked into one picture.

Unreadable files are reported by name and skipped; the others still run.
"""

from __future__ import annotations

import argparse
import csv
import os
import pathlib
import sys

import numpy as np

from alit_jax import criteria
from alit_jax import images as images_lib


def _grid(
  image: np.ndarray,
  recons: np.ndarray,
  scores: np.ndarray,
  chosen: int,
  counts: list[int],
  crit: str,
) -> np.ndarray:
  """(H, (N+1)*(W+pad), 3) uint8 strip: input, then every reconstruction, the chosen one framed.

  Images narrower than 128 px are enlarged by an integer factor (nearest neighbour).
  """
  from PIL import Image, ImageDraw

  h, w, _ = image.shape
  zoom = max(1, -(-128 // w))  # small images (the 64x64 demo) shown at >= 128 px, nearest
  if zoom > 1:
    image = np.repeat(np.repeat(np.asarray(image), zoom, 0), zoom, 1)
    recons = np.repeat(np.repeat(np.asarray(recons), zoom, 1), zoom, 2)
    h, w = h * zoom, w * zoom
  pad, label = 4, 14
  n = len(recons)
  canvas = Image.new("RGB", ((n + 1) * (w + pad) + pad, h + 2 * pad + label), "white")
  draw = ImageDraw.Draw(canvas)
  tiles = [np.asarray(image)] + [np.clip(r * 255.0 + 0.5, 0, 255).astype(np.uint8) for r in recons]
  texts = ["input"] + [f"{c}: {crit} {s:.3f}" for c, s in zip(counts, scores)]
  for j, (tile, text) in enumerate(zip(tiles, texts)):
    x0 = pad + j * (w + pad)
    canvas.paste(Image.fromarray(tile), (x0, pad))
    draw.text((x0 + 2, h + pad + 1), text, fill="black")
    if j == chosen + 1:
      draw.rectangle([x0 - 2, pad - 2, x0 + w + 1, pad + h + 1], outline="red", width=3)
  return np.asarray(canvas)


def _write_summary(
  out: pathlib.Path, rows: list[dict], skipped, crit_name: str, counts, log
) -> None:
  """summary.csv (tokenized rows, then the skipped files with their error) and the printed table."""
  if rows or skipped:
    fields = (list(rows[0]) if rows else ["file", "name", "tokens"]) + ["error"]
    with open(out / "summary.csv", "w", newline="") as fh:
      w = csv.DictWriter(fh, fieldnames=fields, restval="")
      w.writeheader()
      w.writerows(rows)
      w.writerows({"file": f, "name": pathlib.Path(f).stem, "error": e} for f, e in skipped)
  if rows:
    width = max(len(r["name"]) for r in rows)
    log(
      f"{'image':<{width}}  tokens  {crit_name:>8}  met  {crit_name + '@' + str(counts[0]):>10}  {crit_name + '@' + str(counts[-1]):>10}"
    )
    for r in rows:
      log(
        f"{r['name']:<{width}}  {r['tokens']:>6}  {r[crit_name]:>8.4f}  {'yes' if r['met'] else 'no ':>3}  "
        f"{r[f'{crit_name}@{counts[0]}']:>10.4f}  {r[f'{crit_name}@{counts[-1]}']:>10.4f}"
      )
    log(
      f"mean tokens per image: {np.mean([r['tokens'] for r in rows]):.1f} over {len(rows)} images"
    )


def tokenize_paths(
  paths: list[str],
  *,
  model: str = "demo",
  num_heads: int | None = None,
  criterion: str = "l1",
  threshold: float | None = None,
  halting: str = "off",
  out: str | os.PathLike = "tokenize_out",
  batch_size: int = 8,
  progress: bool = True,
  grid: str | os.PathLike | None = None,
  log=print,
) -> list[dict]:
  """Library form of the command; returns one summary dict per tokenized image.

  With `grid`, also writes every image's strip stacked into one picture at that path.
  """
  import jax
  from PIL import Image
  from tqdm import tqdm

  from alit_jax.tokenizer import Tokenizer

  tok = Tokenizer.load(model, num_heads=num_heads)
  crit = criteria.get(criterion)
  if threshold is None:
    threshold = tok.default_threshold(crit)
  files = images_lib.list_images(paths)
  if not files:
    raise FileNotFoundError(f"no images found in {paths}")
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  counts = tok.token_counts
  rows, skipped, strips = [], [], []
  log(
    f"model: {tok.config.name} ({model}), image size {tok.image_size}, criterion {crit.name} threshold {threshold}"
  )
  bar = tqdm(total=len(files), disable=not progress or len(files) < 2, unit="img", file=sys.stderr)
  used_names: set[str] = set()
  for start in range(0, len(files), batch_size):
    batch_files, batch = [], []
    for f in files[start : start + batch_size]:
      try:
        batch.append(images_lib.load_image(f, tok.image_size))
        batch_files.append(f)
      except (ValueError, FileNotFoundError) as e:
        skipped.append((f, str(e)))
        log(f"skipped: {e}")
    bar.update(len(files[start : start + batch_size]))
    if not batch:
      continue
    x = np.stack(batch)
    trace = tok.rollout(x, halting=halting, rng=jax.random.key(0) if halting == "sample" else None)
    recon = np.asarray(trace["reconstructions"])  # (N, B, H, W, 3)
    xf = x.astype(np.float32) / 255.0
    scores = np.stack([np.asarray(crit(xf, r)) for r in recon])  # (N, B)
    chosen = criteria.first_meeting(scores, threshold, crit.higher_is_better)
    key = "quant_indices" if tok.config.alit.quantize_latent else "factorized_latent"
    toks = np.asarray(trace[key])
    for b, f in enumerate(batch_files):
      it = int(chosen[b])
      length = counts[it]
      stem = pathlib.Path(f).stem
      name, k = stem, 1
      while name in used_names:
        k += 1
        name = f"{stem}_{k}"
      used_names.add(name)
      np.savez(
        out / f"{name}.npz",
        tokens=toks[it, b, :length],
        length=length,
        scores=scores[:, b],
        token_counts=np.asarray(counts),
        source=os.path.abspath(f),
      )
      strip = _grid(batch[b], recon[:, b], scores[:, b], it, counts, crit.name)
      Image.fromarray(strip).save(out / f"{name}.png")
      if grid is not None:
        strips.append(strip)
      score = float(scores[it, b])
      met = score > threshold if crit.higher_is_better else score < threshold
      rows.append(
        {
          "file": f,
          "name": name,
          "tokens": length,
          crit.name: score,
          "met": bool(met),
          f"{crit.name}@{counts[0]}": float(scores[0, b]),
          f"{crit.name}@{counts[-1]}": float(scores[-1, b]),
        }
      )
  bar.close()
  _write_summary(out, rows, skipped, crit.name, counts, log)
  if grid is not None and strips:
    pathlib.Path(grid).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(strips, axis=0)).save(grid)
    log(f"wrote {grid} ({len(strips)} images)")
  if skipped:
    log(f"skipped {len(skipped)} unreadable file(s): " + ", ".join(f for f, _ in skipped))
  if rows:
    log(f"wrote {out}/ (<name>.npz tokens, <name>.png reconstructions, summary.csv)")
  else:
    log(f"no image could be read; nothing tokenized (reasons in {out}/summary.csv)")
  return rows


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m alit_jax.tokenize", description=__doc__.split("\n\n")[0]
  )
  p.add_argument("paths", nargs="+", help="image files or folders")
  p.add_argument(
    "--model", default="demo", help="'demo', a pretrained/training dir, or a PyTorch checkpoint"
  )
  p.add_argument(
    "--num-heads", type=int, default=None, help="attention heads for a non-reference checkpoint"
  )
  p.add_argument("--criterion", default="l1", choices=sorted(criteria.REGISTRY))
  p.add_argument(
    "--threshold",
    type=float,
    default=None,
    help="default: the model's (the demo: see its meta) or the criterion's (l1 0.07)",
  )
  p.add_argument("--halting", default="off", choices=["off", "threshold", "sample"])
  p.add_argument("--out", default="tokenize_out")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--grid", default=None, help="also write all strips stacked into this PNG")
  a = p.parse_args(argv)
  try:
    rows = tokenize_paths(
      a.paths,
      model=a.model,
      num_heads=a.num_heads,
      criterion=a.criterion,
      threshold=a.threshold,
      halting=a.halting,
      out=a.out,
      batch_size=a.batch_size,
      progress=not a.no_progress,
      grid=a.grid,
    )
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0 if rows else 1


if __name__ == "__main__":
  sys.exit(main())
