r"""Stage-2 full fine-tuning of ALIT (pixel + LPIPS + GAN losses), the reference recipe.

Reference: `main_full_finetuning.py` + `engines/full_finetuning.py` + `modules/losses/` with
`run_scripts/full_finetuning.sh` (8 GPUs x 12 = global batch 96, 200 epochs, 20 warm-up epochs,
blr 1e-4, weight decay 0.05, from the stage-1 checkpoint). The base tokenizer is trained too;
reconstructions go through the soft code softmax(logits) @ codebook (VQGAN) or the decoded code
(VAE) into the base decoder, at one rollout iteration per generator step in round-robin; one
PatchGAN per iteration with its own AdamW (betas 0.9/0.95, weight decay 0.01, the same lr
schedule, clip 3.0); 8 discriminator steps per generator step once the GAN weight is on (0 for
epochs 0-20, 0.2 for 21-100, 0.8 after); the adaptive generator weight; frozen LPIPS.
See `alit_jax/train/gan_steps.py` for the objective and the reference's quirks kept.

From a stage-1 run (its EMA weights and its base tokenizer):

  python -m alit_jax.train --config=configs/alit_finetune.py:variant=small,base=vqgan \
    --config.init_from=/runs/alit_small_vqgan \
    --config.lpips.vgg16_path=/weights/vgg16-397923af.pth \
    --config.lpips.heads_path=/weights/lpips_vgg_v0.1.pth --workdir=/runs/alit_small_vqgan_ft

From a converted official full_finetuning checkpoint (its discriminators and LPIPS included):

  python -m alit_jax.convert /ckpts/alit_small_vqgan.pth --out /ckpts/alit_small_vqgan_jax
  python -m alit_jax.train --config=configs/alit_finetune.py:variant=small,base=vqgan \
    --config.init_from=/ckpts/alit_small_vqgan_jax --workdir=/runs/ft_more

Where the LPIPS weights come from: `alit_jax.losses.lpips.load_lpips` (torchvision's VGG16
ImageNet weights and the `lpips` package's v0.1 heads). Without them (and without converted
gan_losses) the perceptual weight is 0 and the log says so.

Quick check on CPU (tiny model, random base, generated images, GAN on from the start):

  python -m alit_jax.train --config=configs/alit_finetune.py:runlocal --workdir=/tmp/alit_ft

Durations and periods as in `configs/alit_pretrain.py` (`*_epochs` or `*_steps`); the GAN
weight schedule as `gan.weights` with `gan.start_epochs` (or `gan.start_steps`): weights[k+1]
applies from start k on. A rerun with the same workdir resumes.
"""

from __future__ import annotations

import ml_collections

from configs import alit_pretrain, common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The stage-2 config; `arg` as `alit_pretrain` ("variant=small,base=vqgan", "runlocal")."""
  a = common.parse_arg(
    arg, variant="small", base="vqgan", quantized=True, factorized=True, runlocal=False
  )
  c = alit_pretrain.get_config(
    f"variant={a.variant},base={a.base},quantized={a.quantized},factorized={a.factorized},"
    f"runlocal={a.runlocal}"
  )
  c.stage = "full_finetuning"
  # A stage-1 workdir, a stage-2 workdir, or a pretrained / converted directory. Without it,
  # a fresh ALIT on config.base_checkpoint (or config.random_base).
  c.init_from = ""

  if not a.runlocal:
    c.input.global_batch_size = 96  # 8 GPUs x 12
    c.blr = 1e-4
    c.total_epochs = 200
    c.warmup_epochs = 20

  # Stage-2 rollout: halting as in stage 1; one iteration decoded per step (scan rollout).
  del c.loss.lam, c.loss.loss_iters, c.rollout_impl
  c.loss.vae_posterior = "mode"  # VAE base: "mode" (this package) or "sample" (the reference)

  c.gan = ml_collections.ConfigDict()
  c.gan.weights = (0.0, 0.2, 0.8)  # GAN weight before the first start, then after each start
  c.gan.start_epochs = (21, 101)  # `epoch <= 20: 0; epoch <= 100: 0.2; else 0.8`
  c.gan.pattern = "alit"  # the reference's step pattern (see gan_steps.Schedule)
  c.gan.disc_steps_per_generator_step = 8  # the reference's max_iters
  c.gan.loss = "hinge"
  c.gan.disc_factor = 1.0
  c.gan.weight_when_off = 0.2  # discriminator_weight while the GAN weight is 0 (logged d_weight)
  c.gan.max_adaptive_weight = 1e4
  c.gan.disc_ndf = 64
  c.gan.disc_layers = 3
  # The reference's generator optimizer also steps the trained iteration's discriminator.
  c.gan.generator_updates_discriminator = True
  c.gan.optimizer = ml_collections.ConfigDict(
    dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, grad_clip_norm=3.0)
  )

  c.lpips = ml_collections.ConfigDict()
  c.lpips.vgg16_path = ""  # torchvision vgg16-397923af.pth (.pth or .npz)
  c.lpips.heads_path = ""  # lpips/weights/v0.1/vgg.pth
  c.lpips.weight = 1.0  # perceptual weight (0 when no weights are found)
  c.lpips.dropout = True  # the reference trains with the heads' dropout on

  if a.runlocal:  # on top of alit_pretrain's runlocal (tiny model, random base, float32)
    c.input.data = "synthetic:num_examples=64,image_size=64"
    c.total_steps = 24
    c.warmup_steps = 2
    c.lr = 1e-4
    c.fast_compile = True
    c.gan.start_epochs = (0, 2)  # GAN weight 0.2 from the start, 0.8 from epoch 2 (step 16)
    c.gan.disc_steps_per_generator_step = 1  # alternate, so every iteration gets trained
    c.gan.disc_ndf = 16
    c.log_every_steps = 6
    c.image_summary_every_steps = 12
    c.checkpoint_every_steps = 12
  return c
