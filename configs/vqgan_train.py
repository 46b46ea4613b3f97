r"""Train a VQGAN base tokenizer from scratch (L1 + LPIPS + PatchGAN + VQ losses).

For new domains, and for small demo models. The architecture is the MaskGIT-style VQGAN that
ALIT uses (`alit_jax.models.base_tokenizers.VQGAN`); the objective is taming's
`VQLPIPSWithDiscriminator` through the same steps as ALIT's stage 2 (`alit_jax.train.gan_steps`
with `VQGANTask`):

    loss = mean |x - x_rec| + lpips_weight * LPIPS + adaptive_weight * disc_factor * g_loss
           + codebook_weight * [mean((sg(zq) - z)^2) + beta * mean((zq - sg(z))^2)]

(taming's VectorQuantizer2 legacy form, beta 0.25, straight-through), a hinge PatchGAN with its
own optimizer, a generator step and a discriminator step on every batch once the GAN weight is
on (`gan.pattern = "both"`, taming's schedule); before that (`gan.start_epochs`) only the
generator step, without the discriminator. Set `gan.weights = (0.0,)` and
`gan.start_epochs = ()` to train without the GAN, `lpips.weight = 0` without LPIPS.

Variants: `demo` (64x64 images, 2 downsamplings -> a 16x16 grid, ch 64, ch_mult (1, 2, 2),
512 codes of dim 64) and `maskgit` (the released 256x256 VQGAN architecture, 16x downsampling).

  python -m alit_jax.data.build_folder /data/my_images --out /data/my_images_ds
  python -m alit_jax.train --config=configs/vqgan_train.py:variant=demo \
    --config.input.data=folder:/data/my_images_ds \
    --config.lpips.vgg16_path=/weights/vgg16-397923af.pth \
    --config.lpips.heads_path=/weights/lpips_vgg_v0.1.pth --workdir=/runs/vqgan_demo
  python -m alit_jax.train.export /runs/vqgan_demo --out /ckpts/vqgan_demo

and then ALIT on it (64x64 images, patch 4 = the base's downsampling):

  python -m alit_jax.train --config=configs/alit_pretrain.py:variant=tiny \
    --config.model.image_size=64 --config.model.patch_size=4 \
    --config.base_checkpoint=/ckpts/vqgan_demo --workdir=/runs/alit_demo

Quick check on CPU (tiny VQGAN, generated images, GAN from step 8):

  python -m alit_jax.train --config=configs/vqgan_train.py:runlocal --workdir=/tmp/vqgan_local
"""

from __future__ import annotations

import ml_collections

from configs import alit_pretrain, common

VARIANTS = {
  "demo": dict(
    image_size=64, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, embed_dim=64, n_embed=512
  ),
  "maskgit": dict(
    image_size=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, embed_dim=256, n_embed=1024
  ),
  "test": dict(image_size=64, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, embed_dim=16, n_embed=64),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The VQGAN-training config; `arg` is e.g. "variant=demo" or "runlocal"."""
  a = common.parse_arg(arg, variant="demo", runlocal=False)
  if a.variant not in VARIANTS:
    raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {a.variant!r}")
  # The training plumbing (data, durations, EMA, mesh, logging, checkpoints) as stage 1's.
  c = alit_pretrain.get_config("runlocal" if a.runlocal else "")
  c.stage = "vqgan"
  del c.base_checkpoint, c.random_base, c.init_from, c.loss
  if "rollout_impl" in c:
    del c.rollout_impl
  c.model = ml_collections.ConfigDict(VARIANTS["test" if a.runlocal else a.variant])

  # restart_dead_codes_every_steps > 0: codes no feature of the batch chose move onto random
  # encoder features every that many steps (not in taming; see gan_tasks.VQGANTask).
  c.vq = ml_collections.ConfigDict(
    dict(beta=0.25, codebook_weight=1.0, restart_dead_codes_every_steps=0)
  )

  c.input.global_batch_size = 64
  c.total_epochs = 40
  c.warmup_epochs = 1
  c.blr = 4.5e-6 * 256  # taming: lr = 4.5e-6 x batch size
  # taming trains with Adam(0.5, 0.9), no weight decay, no clipping.
  c.optimizer = ml_collections.ConfigDict(
    dict(b1=0.5, b2=0.9, eps=1e-8, weight_decay=0.0, grad_clip_norm=float("inf"))
  )
  c.ema = ml_collections.ConfigDict(dict(decay=0.999, reset_every_epoch=False))
  c.compute_dtype = "float32"

  c.gan = ml_collections.ConfigDict()
  c.gan.weights = (0.0, 0.8)  # taming's disc_weight 0.8, off before the start
  c.gan.start_epochs = (10,)
  c.gan.pattern = "both"  # a generator and a discriminator step on every batch
  c.gan.disc_steps_per_generator_step = 1  # unused by "both"
  c.gan.loss = "hinge"
  c.gan.disc_factor = 1.0
  c.gan.weight_when_off = 0.0
  c.gan.max_adaptive_weight = 1e4
  c.gan.disc_ndf = 64
  c.gan.disc_layers = 3
  c.gan.generator_updates_discriminator = False
  c.gan.optimizer = ml_collections.ConfigDict(
    dict(b1=0.5, b2=0.9, eps=1e-8, weight_decay=0.0, grad_clip_norm=float("inf"))
  )

  c.lpips = ml_collections.ConfigDict()
  c.lpips.vgg16_path = ""
  c.lpips.heads_path = ""
  c.lpips.weight = 1.0  # 0 when no weights are found (logged)
  c.lpips.dropout = True

  c.image_summary_every_epochs = 1
  c.checkpoint_every_epochs = 1
  c.keep_every_epochs = 10
  if a.runlocal:
    del c.total_epochs, c.warmup_epochs, c.image_summary_every_epochs
    del c.checkpoint_every_epochs, c.keep_every_epochs
    c.input.data = "synthetic:num_examples=64,image_size=64"
    c.input.global_batch_size = 8
    c.total_steps = 16
    c.warmup_steps = 2
    c.lr = 1e-3
    c.fast_compile = True
    c.ema.decay = 0.9
    del c.gan.start_epochs
    c.gan.start_steps = (8,)
    c.gan.disc_ndf = 16
    c.log_every_steps = 4
    c.image_summary_every_steps = 8
    c.checkpoint_every_steps = 8
  return c
