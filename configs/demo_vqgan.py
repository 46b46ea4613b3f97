r"""The bundled demo model, step 1 of 2: a small VQGAN base tokenizer on offline data.

64x64 images, 2 downsamplings (a 16x16 grid as in the paper), trained with
`configs/vqgan_train.py`'s objective minus the parts that need weights a fresh machine does not
have: LPIPS needs VGG16 weights (none ship offline), so `lpips.weight = 0`; the GAN stays off
(its discriminator needs LPIPS-quality reconstructions to help, and CPU time is short). What
remains is taming's L1 reconstruction + VQ codebook/commitment loss. Data: the `demo:` source
(crops of the photos scikit-image / scikit-learn / matplotlib ship, plus procedural images of
controlled complexity; `alit_jax/data/demo_data.py`). The held-out photos in
`alit_jax/assets/samples` are never seen in training.

The full recipe (measured times and status: README.md, "Demo model"):

  python -m alit_jax.train --config=configs/demo_vqgan.py --workdir=runs/demo_vqgan
  python -m alit_jax.train.export runs/demo_vqgan --out runs/demo_vqgan_export
  python -m alit_jax.train --config=configs/demo_alit.py \
    --config.base_checkpoint=runs/demo_vqgan_export --workdir=runs/demo_alit
  python -m alit_jax.train.export runs/demo_alit --out alit_jax/assets/demo

Quick check (a few steps): `--config=configs/demo_vqgan.py:runlocal`.
"""

from __future__ import annotations

import ml_collections

from configs import common, vqgan_train


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Demo VQGAN config; `arg` may be "runlocal" (a few steps on a few images)."""
  a = common.parse_arg(arg, runlocal=False)
  c = vqgan_train.get_config("variant=demo")
  c.model.ch = 32
  # One normalization group instead of the reference's 32: on a flat image every feature map is
  # constant and a group norm keeps only each group's pattern across its channels, dropping the
  # group's mean and scale (the colour). Held-out L1 (256 `demo:` validation images, this config,
  # 450 steps) with 8 groups and EMA 0.995 -> 1 group and EMA 0.98: photos 0.136 -> 0.088, flat
  # 0.178 -> 0.110, gradient 0.152 -> 0.083, few shapes 0.204 -> 0.111, many shapes 0.210 ->
  # 0.161, texture 0.174 -> 0.173, noise 0.251 -> 0.250 (1 group with EMA 0.995: 0.102, 0.132,
  # 0.101, 0.136, 0.177, 0.174, 0.251).
  c.model.norm_groups = 1
  # The encoder sees 2x - 1 (a probe on flat colours: L1 0.25 after 60 steps with x in [0, 1],
  # 0.15 with 2x - 1).
  c.model.signed_input = True
  c.model.ch_mult = (1, 2, 2)
  c.model.num_res_blocks = 1
  c.model.embed_dim = 32
  c.model.n_embed = 256

  c.input.data = "demo:num_examples=200000,image_size=64,all_photos=1"
  c.input.global_batch_size = 32
  c.input.worker_count = 1
  c.input.num_threads = 2
  c.input.prefetch_buffer_size = 8
  c.input.scale = (0.5, 1.0)

  del c.total_epochs, c.warmup_epochs
  c.total_steps = 450
  c.warmup_steps = 50
  del c.blr
  c.lr = 1e-3
  c.min_lr = 1e-4
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.99
  c.ema.decay = 0.98  # 450 steps: 0.995 averaged in weights from ~200 steps back (see above)

  # taming's near-zero codebook init leaves most codes unused on a short run (at step 150: 11 of
  # 256 codes, perplexity 11.5); restarting unused codes on batch features fixes that.
  c.vq.restart_dead_codes_every_steps = 10
  c.lpips.weight = 0.0
  c.gan.weights = (0.0,)
  c.gan.start_epochs = ()

  del c.image_summary_every_epochs, c.checkpoint_every_epochs, c.keep_every_epochs
  c.log_every_steps = 50
  c.image_summary_every_steps = 225
  c.checkpoint_every_steps = 100
  c.keep_checkpoints = 1
  if a.runlocal:
    c.input.data = "demo:num_examples=64,image_size=64"
    c.input.global_batch_size = 8
    c.total_steps = 6
    c.warmup_steps = 1
    c.log_every_steps = 2
    c.image_summary_every_steps = 6
    c.checkpoint_every_steps = 6
  return c
