r"""Reconstruction quality at every token count and under adaptive token selection.

  python -m alit_jax.evaluate --checkpoint CKPT --data SRC --out OUT [--max-images N]
      [--num-heads H] [--criterion l1] [--thresholds 0.05,0.07,0.1]
      [--lpips-vgg vgg16-397923af.pth --lpips-heads vgg.pth]
      [--inception pt_inception-2015-12-05-6726825d.pth] [--batch-size 16]

CKPT: a directory from `python -m alit_jax.convert` / `save_pretrained` / training, `demo`, or an
official PyTorch checkpoint (.pth/.safetensors/.npz; `--num-heads` if not the factory default).

SRC (see `resolve_source`):
  * a folder of image files (read directly, labels from first-level subfolders like ImageFolder;
    no dataset is built): resized (shorter side, bicubic, antialiased) and center cropped, the
    reference's `evaluate_rfid.py --testing_custom_images` transform;
  * a folder built by `python -m alit_jax.data.build_folder` or `folder:PATH`: the same transform;
  * a TFDS dataset prepared as array_record, `NAME` (with `--split`, default validation) or
    `NAME/SPLIT`, e.g. `imagenet2012/validation`: center crop only, the reference's transform
    for ImageNet/COCO (`CenterCrop(256)`; smaller images are zero padded); `--data-dir` as TFDS;
  * `synthetic:num_examples=64,image_size=256` (procedural images of graded complexity).
`--resize yes|no` overrides the transform.

For every token count (32, 64, ..., 256) and for every adaptive selection (criterion, threshold):
L1, MSE, PSNR, SSIM, LPIPS (with LPIPS weights), rFID (with Inception weights), 1D codebook usage
and perplexity (ALIT's quantizer, quantized models) and 2D usage and perplexity (the VQGAN codes
the decoder predicts, `argmax` of its logits; VQGAN models). Adaptive rows add the mean and
median token count. Writes OUT/results.json, per_length.csv, adaptive.csv, per_image.csv,
per_image.npz, metrics_vs_tokens.png, token_histogram.png and grid.png. Files that cannot be
decoded are skipped, listed in results.json (`skipped`: index, file, reason) and counted in the
printed table.

How this follows the reference (`evaluate_rfid.py`), and where it departs:
  * Metrics are computed on 8-bit reconstructions: `floor(clip(x, 0, 1) * 255) / 255`, which is
    what the reference's saved PNGs hold (`astype(uint8)` truncates) and what its L1/MSE and
    pytorch-fid rFID read back (`--quantize round|none` for other conventions). PSNR uses
    data range 1; SSIM is skimage's Gaussian SSIM; LPIPS is the standard metric on [-1, 1]
    images (the reference's training loss feeds [0, 1]).
  * Adaptive selection is per image (`criteria.select_iterations`, the rule of
    `Tokenizer.encode`): the fewest tokens whose *unquantized, unclipped* reconstruction meets the
    criterion, else 256. The reference's `encode` picks one length per batch (quirk 16).
  * Halting is off by default; the reference's model evaluates with Bernoulli-sampled halting
    (`--halting sample --seed S` for that).
  * rFID needs at least 2 images (and is noisy below a few thousand); the reference's numbers
    use the full validation set.

Batches are data parallel over the local devices (a 1-D `Mesh` with a `NamedSharding` on the
batch axis; the batch size is rounded up to a multiple of the device count). In a multi-process
job every process evaluates the whole set: run it as a single process.
"""

from __future__ import annotations

import sys

# The implementation lives in the `alit_jax.eval` package; this module keeps the names that
# `from alit_jax import evaluate` users (analysis, experiments, tests) and `python -m` rely on.
from alit_jax.eval.cli import (
  LPIPS_HELP,
  add_checkpoint_args,
  add_data_args,
  main,
  parse_thresholds,
  resize_arg,
)
from alit_jax.eval.metrics import (
  METRICS,
  USAGE,
  MetricAccumulator,
  Quantize,
  Selection,
  make_selections,
  quantize_images,
)
from alit_jax.eval.outputs import (
  PLOT_LABELS,
  ROW_COLUMNS,
  format_table,
  plot_metrics,
  plot_token_histograms,
  save_grid,
  write_outputs,
)
from alit_jax.eval.rollouts import (
  criterion_scores,
  evaluate,
  iterate_rollouts,
  tokenizer_precision,
)
from alit_jax.eval.sources import load_tokenizer, resolve_source, skipped_file

__all__ = [
  "LPIPS_HELP",
  "METRICS",
  "PLOT_LABELS",
  "ROW_COLUMNS",
  "USAGE",
  "MetricAccumulator",
  "Quantize",
  "Selection",
  "add_checkpoint_args",
  "add_data_args",
  "criterion_scores",
  "evaluate",
  "format_table",
  "iterate_rollouts",
  "load_tokenizer",
  "main",
  "make_selections",
  "parse_thresholds",
  "plot_metrics",
  "plot_token_histograms",
  "quantize_images",
  "resize_arg",
  "resolve_source",
  "save_grid",
  "skipped_file",
  "tokenizer_precision",
  "write_outputs",
]

if __name__ == "__main__":
  sys.exit(main())
