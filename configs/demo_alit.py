r"""The bundled demo model, step 2 of 2: a small ALIT on the demo VQGAN (stage 1 only).

64x64 images with patch 4 over `configs/demo_vqgan.py`'s VQGAN (4x downsampling): the paper's
16x16 grid of 2D tokens and 32..256 1D tokens (8 iterations of 32). A narrow transformer
(width 128, 2 encoder + 2 decoder layers, 1 head: on CPU attention is memory-bound, so one head
is ~2x faster than 4 at this width) with the reference's quantized, factorized latents and its
stage-1 objective (per-iteration cross-entropy on the base codes, dynamic halting by sampling).
Stage 2 is skipped: without VGG weights offline there is no LPIPS, and the demo only has to show
adaptivity. Data as the VQGAN's (`demo:`; the held-out sample photos are never trained on).

  python -m alit_jax.train --config=configs/demo_alit.py \
    --config.base_checkpoint=runs/demo_vqgan_export --workdir=runs/demo_alit
  python -m alit_jax.train.export runs/demo_alit --out alit_jax/assets/demo

(the first two commands of the recipe are in `configs/demo_vqgan.py`).
"""

from __future__ import annotations

import ml_collections

from configs import alit_pretrain, common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Demo ALIT config; `arg` may be "runlocal" (a few steps)."""
  a = common.parse_arg(arg, runlocal=False)
  c = alit_pretrain.get_config("variant=tiny,base=vqgan")
  c.model.name = "test"  # models.configs.tiny_config(**model.test), base sizes from the base
  c.model.test = ml_collections.ConfigDict(
    dict(
      name="alit_demo",
      width=128,
      layers=2,
      heads=1,
      tokens=32,
      iterations=8,
      codebook_size=1024,
      token_dim=12,
    )
  )
  c.model.image_size = 64
  c.model.patch_size = 4

  c.input.data = "demo:num_examples=200000,image_size=64,all_photos=1"
  c.input.global_batch_size = 16
  c.input.worker_count = 1
  c.input.num_threads = 2
  c.input.prefetch_buffer_size = 8
  c.input.scale = (0.5, 1.0)

  del c.total_epochs, c.warmup_epochs, c.blr
  c.total_steps = 500
  c.warmup_steps = 30
  c.lr = 1e-3
  c.min_lr = 1e-4
  c.ema.decay = 0.99
  c.ema.reset_every_epoch = False
  c.compute_dtype = "float32"  # bfloat16 is slower on CPU

  del c.image_summary_every_epochs, c.checkpoint_every_epochs, c.keep_every_epochs
  c.log_every_steps = 20
  c.image_summary_every_steps = 250
  c.checkpoint_every_steps = 50
  c.keep_checkpoints = 1
  if a.runlocal:
    c.input.data = "demo:num_examples=64,image_size=64"
    c.input.global_batch_size = 8
    c.total_steps = 4
    c.warmup_steps = 1
    c.log_every_steps = 2
    c.image_summary_every_steps = 4
    c.checkpoint_every_steps = 4
  return c
