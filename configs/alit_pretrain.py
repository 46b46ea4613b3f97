r"""Stage-1 training of ALIT (latent distillation), the reference recipe.

Reference: `main_pretrain.py` + `engines/latent_distillation_pretrain.py` with
`run_scripts/latent_distillation_pretrain.sh` (8 GPUs x 32 = global batch 256, 200 epochs,
20 warm-up epochs, blr 1.5e-4, weight decay 0.05, quantized + factorized latents).

Train (`variant` = tiny | small | base | semilarge, `base` = vqgan | vae, `quantized`,
`factorized`; the base tokenizer is a directory converted from the reference's VQGAN/VAE .ckpt):

  python -m alit_jax.convert /ckpts/vqgan.ckpt --out /ckpts/vqgan_jax
  python -m alit_jax.train --config=configs/alit_pretrain.py:variant=small,base=vqgan \
    --config.base_checkpoint=/ckpts/vqgan_jax --config.input.data_dir=~/tensorflow_datasets \
    --workdir=/runs/alit_small_vqgan

Continuous latents on the KL-16 VAE:

  python -m alit_jax.train --config=configs/alit_pretrain.py:variant=small,base=vae,quantized=False \
    --config.base_checkpoint=/ckpts/kl16_jax --workdir=/runs/alit_small_vae

Small images, e.g. 64x64 with patch 4 over a small VQGAN trained with `configs/vqgan_train.py`
(exported with `python -m alit_jax.train.export VQGAN_WORKDIR --out /ckpts/vqgan_demo`; ALIT's
base-dependent sizes follow the base tokenizer):

  python -m alit_jax.train --config=configs/alit_pretrain.py:variant=tiny \
    --config.model.image_size=64 --config.model.patch_size=4 \
    --config.base_checkpoint=/ckpts/vqgan_demo --workdir=/runs/alit_tiny_64

Quick check on CPU (a tiny model on generated images, random frozen base, no dataset, ~1 min):

  python -m alit_jax.train --config=configs/alit_pretrain.py:runlocal --workdir=/tmp/alit_runlocal

Durations are given as `total_epochs`/`warmup_epochs` (or `*_steps`), and every other period as
`<name>_steps` or `<name>_epochs`; `alit_jax.train.optim.steps_from_config` converts them at run
time from the dataset size and batch size. A rerun with the same workdir resumes.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import common

VARIANTS = ("tiny", "small", "base", "semilarge")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The stage-1 config; `arg` is e.g. "variant=small,base=vqgan,quantized=True" or "runlocal"."""
  a = common.parse_arg(
    arg, variant="small", base="vqgan", quantized=True, factorized=True, runlocal=False
  )
  if a.variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {a.variant!r}")
  if a.base not in ("vqgan", "vae"):
    raise ValueError(f"base must be 'vqgan' or 'vae', got {a.base!r}")

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stage = "latent_distillation"

  c.model = ml_collections.ConfigDict()
  c.model.name = f"alit_{a.variant}"  # or "test": models.configs.tiny_config(**model.test)
  c.model.base = a.base
  c.model.quantize_latent = a.quantized
  c.model.factorize_latent = a.factorized
  c.model.latent_noise_std = 0.0  # not the reference: > 0 adds a noisy channel (continuous only)
  c.model.latent_locality = 0.0  # not the reference: > 0 gives latent slots grid regions
  c.model.test = ml_collections.ConfigDict(
    dict(image_size=64, width=64, layers=1, heads=2, tokens=4, iterations=3)
  )
  # Input size and patch size (None: the preset's 256 / 16, or model.test's). The base
  # tokenizer's downsampling must equal the patch size: e.g. 64x64 images with patch 4 over a
  # VQGAN from `configs/vqgan_train.py:variant=demo` (4x downsampling, a 16x16 grid).
  c.model.image_size = config_dict.placeholder(int)
  c.model.patch_size = config_dict.placeholder(int)
  # Converted base tokenizer dir (`python -m alit_jax.convert BASE.ckpt --out DIR`), frozen.
  c.base_checkpoint = ""
  c.random_base = False  # a randomly initialised frozen base (tests and runlocal only)
  c.init_from = ""  # a pretrained dir or another workdir (its EMA weights) to start from

  c.input = ml_collections.ConfigDict()
  c.input.data = "imagenet100"  # see alit_jax.data.sources.get_source
  c.input.data_dir = ""  # TFDS data_dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.input.split = "train"
  c.input.global_batch_size = 256
  c.input.worker_count = 8
  c.input.num_threads = 16
  c.input.prefetch_buffer_size = 128
  c.input.worker_buffer_size = 2
  c.input.scale = (0.8, 1.0)
  c.input.ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.input.flip_prob = 0.5
  c.input.interpolation = "bilinear"
  # A folder of `python -m alit_jax.data.base_cache` (built with this config): train on its
  # cached base-encoder outputs, so a step is the ALIT transformer alone. None: encode each batch.
  c.input.base_cache = config_dict.placeholder(str)

  c.total_epochs = 200
  c.warmup_epochs = 20
  c.lr = config_dict.placeholder(float)  # absolute peak lr; None: blr * global_batch / 256
  c.blr = 1.5e-4
  c.min_lr = 0.0
  c.optimizer = ml_collections.ConfigDict(
    dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, grad_clip_norm=3.0)
  )
  # The reference re-copies the model into its EMA at the start of every epoch.
  c.ema = ml_collections.ConfigDict(dict(decay=0.9999, reset_every_epoch=True))

  c.loss = ml_collections.ConfigDict()
  c.loss.lam = (2.5, 2.0, 1.5, 1.25, 1.0, 1.0, 1.0, 1.0)
  c.loss.loss_iters = -1  # >0: loss at that many random iterations per step (sample_grad_iters)
  # >0: run only the first that many iterations (a curriculum stage; not in the reference)
  c.loss.rollout_iters = -1
  c.loss.halting = "sample"  # dynamic halting during training: off | threshold | sample
  c.loss.halting_threshold = config_dict.placeholder(float)  # None: 0.55 VQGAN, 0.025 VAE
  c.loss.vae_masking = False  # the reference's VAE halting masks nothing (quirk 3)

  c.compute_dtype = "bfloat16"  # the reference trains under autocast; params stay float32
  c.matmul_precision = "default"
  # Compile the train steps with XLA's backend optimisation off: about half the compile time,
  # about 2x slower steps. For quick CPU checks and tests only.
  c.fast_compile = False
  # "unrolled" (the reference's growing sequence) does ~22% less arithmetic than "scan" (fixed
  # 513-token buffer) and needs less memory, but compiles ~4x longer; loss_iters > 0 needs scan.
  c.rollout_impl = "unrolled"

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # -1: all remaining devices
  # (regex on the parameter path, "fsdp" | "replicate" | PartitionSpec tuple); first match wins.
  c.sharding = ml_collections.ConfigDict(dict(rules=((".*", "fsdp"),), min_fsdp_size=2**18))

  c.log_every_steps = 50
  c.image_summary_every_epochs = 1  # the reference logs reconstructions once per epoch
  c.num_summary_images = 8
  c.summary_params = "ema"  # "ema" (as the reference) or "params"
  c.checkpoint_every_epochs = 1
  c.keep_checkpoints = 2
  c.keep_every_epochs = 40  # also keep these for good (the reference saves every 40 epochs)
  c.async_checkpoints = True

  if a.runlocal:
    c.model.name = "test"
    c.random_base = True
    c.input.data = "synthetic:num_examples=256,image_size=64"
    c.input.global_batch_size = 8
    c.input.worker_count = 0
    c.input.num_threads = 2
    c.input.prefetch_buffer_size = 16
    del c.total_epochs, c.warmup_epochs
    c.total_steps = 50
    c.warmup_steps = 5
    c.lr = 1e-3
    c.ema.decay = 0.9
    c.compute_dtype = "float32"
    c.rollout_impl = "scan"  # compiles fast
    c.log_every_steps = 10
    del c.image_summary_every_epochs, c.checkpoint_every_epochs, c.keep_every_epochs
    c.image_summary_every_steps = 25
    c.num_summary_images = 4
    c.checkpoint_every_steps = 25
  return c
