r"""The bundled demo model, step 2 of 2: a small ALIT on the demo VQGAN (stage 1 only).

64x64 images with patch 4 over `configs/demo_vqgan.py`'s VQGAN (4x downsampling): the paper's
16x16 grid of 2D tokens and 32..256 1D tokens (8 iterations of 32). A narrow transformer
(width 128, 2 encoder + 2 decoder layers, 1 head: on CPU attention is memory-bound, so one head
is ~2x faster than 4 at this width) with the reference's quantized, factorized latents and its
stage-1 objective (per-iteration cross-entropy on the base codes, dynamic halting by sampling).
Stage 2 is skipped: without VGG weights offline there is no LPIPS, and the demo only has to show
adaptivity. Data as the VQGAN's (`demo:`; the held-out sample photos are never trained on).

Two runs. A 1-iteration warm-up first (`loss.rollout_iters=1`, a curriculum stage that is not in
the reference): at B16 the full 8-iteration model sat at the marginal code distribution for all
of its first 500 steps (NLL 4.45 at every iteration, every image decoded to the same map), while a
1-iteration rollout costs ~1/6 of a step and left that plateau after ~550 steps. Then all 8
iterations, starting from the warm-up's EMA weights:

  python -m alit_jax.train --config=configs/demo_alit.py:phase=warmup \
    --config.base_checkpoint=runs/demo_vqgan_export --workdir=runs/demo_alit_warmup
  python -m alit_jax.train --config=configs/demo_alit.py \
    --config.base_checkpoint=runs/demo_vqgan_export --config.init_from=runs/demo_alit_warmup \
    --workdir=runs/demo_alit
  python -m alit_jax.train.export runs/demo_alit --out alit_jax/assets/demo

(the first two commands of the recipe are in `configs/demo_vqgan.py`).
"""

from __future__ import annotations

import ml_collections

from configs import alit_pretrain, common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Demo ALIT config.

  Args:
    arg: `phase=warmup|full` (default full), `latent=quantized|continuous` (default quantized;
      continuous is the reference's `quantize_latent=False` configuration) and/or "runlocal"
      (a few steps).
  """
  a = common.parse_arg(arg, runlocal=False, phase="full", latent="quantized")
  if a.phase not in ("warmup", "full"):
    raise ValueError(f"configs/demo_alit.py: phase must be 'warmup' or 'full', got {a.phase!r}")
  if a.latent not in ("quantized", "continuous"):
    raise ValueError(
      f"configs/demo_alit.py: latent must be 'quantized' or 'continuous', got {a.latent!r}"
    )
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
  c.model.quantize_latent = a.latent == "quantized"
  c.model.image_size = 64
  c.model.patch_size = 4

  c.input.data = "demo:num_examples=200000,image_size=64,all_photos=1"
  c.input.global_batch_size = 16
  c.input.worker_count = 1
  c.input.num_threads = 2
  c.input.prefetch_buffer_size = 8
  c.input.scale = (0.5, 1.0)

  del c.total_epochs, c.warmup_epochs, c.blr
  c.total_steps = 1000
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
  if a.phase == "warmup":
    c.loss.rollout_iters = 1
    c.total_steps = 1500
    c.log_every_steps = 50
    c.image_summary_every_steps = 1500
    c.checkpoint_every_steps = 250
  if a.runlocal:
    c.input.data = "demo:num_examples=64,image_size=64"
    c.input.global_batch_size = 8
    c.total_steps = 4
    c.warmup_steps = 1
    c.log_every_steps = 2
    c.image_summary_every_steps = 4
    c.checkpoint_every_steps = 4
  return c
