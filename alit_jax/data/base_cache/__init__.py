r"""Stage 1 on cached base codes: the frozen base tokenizer's outputs, computed once per view.

Stage 1 (`steps.train_step`) runs the frozen base encoder on every batch before the ALIT
transformer. Its output depends only on the augmented image, so it can be computed once:

  python -m alit_jax.data.base_cache --config=configs/demo_alit.py \
    --config.base_checkpoint=runs/demo_vqgan_export --out=runs/demo_base_cache \
    --views=2 --num_images=24000
  python -m alit_jax.train --config=configs/demo_alit.py:phase=warmup \
    --config.base_checkpoint=runs/demo_vqgan_export \
    --config.input.base_cache=runs/demo_base_cache --workdir=runs/demo_alit_warmup

The cache is built from the training config itself (the same `--config` and overrides as the
training run): its data (`config.input.data`, `split`, `data_dir`), its augmentation
(`input.scale`, `ratio`, `flip_prob`, `interpolation`), its image size, its base tokenizer
(`base_checkpoint` or `random_base`, resolved as the trainer does) and its `compute_dtype` and
`matmul_precision`. A training run with `config.input.base_cache=DIR` checks all of these against
the cache before it starts and refuses a mismatch, naming each difference.

Views. Augmentation is random per draw in the image pipeline (`pipeline.make_train_iterator`);
the cache instead stores K fixed views per image (`--views`): view k of source image i is
`transforms.TrainAugment` (RandomResizedCrop + horizontal flip, the trainer's) drawn from
`np.random.default_rng([seed, i, k])` (`view_rng`; `--seed`, default `config.seed`). Training
from the cache visits every image once per epoch, in an order reshuffled every epoch (as the
image pipeline), and uses view `epoch % K` in epoch `epoch`: with K >= the number of epochs no
view is seen twice. Only the first `--num_images` images of the source are cached (default all;
e.g. the demo's 200000-image procedural source is never trained for a whole epoch).

Output (the shard machinery of `alit_jax.data.shards`: committed shards, resumable):
  OUT/job.json                                  the cache's identity (see `cache_identity`)
  OUT/shards/tokens-SSSSS-of-TTTTT.array_record one shard per `--shard_size` source images
  OUT/shards/tokens-SSSSS-of-TTTTT.json         its counts and bad images
  OUT/manifest.json                             written once every shard is committed
A rerun with the same OUT skips committed shards (and refuses a different job, listing the
differences). Undecodable images get no record: they are skipped, counted in the progress lines
and listed with their id and reason in the shard JSON and the manifest.

Record format: each array_record record is a msgpack map
  {"index": int (position of the image in the source), "view": int k, "id": str,
   "label": int, "image": bytes, "base_features": bytes, "gt_indices": bytes (VQGAN only)}
with `image` the (H, W, 3) uint8 augmented view (ALIT's `patch_embed` reads it), `base_features`
the base encoder's (g, g, E) little-endian float32 output and `gt_indices` its (g*g,) nearest-code
indices (int16 when the codebook has at most 32768 codes, else int32). Records are in source
order, the K views of an image consecutive, so cached image j (counting only good images) has
records j*K ... j*K + K - 1. A VQGAN's codebook is not stored: the train step reads it from the
frozen base (whose parameter hash the cache records).

Modules: `records` (record format, augmentation settings, job identity), `build` (building the
cache), `reader` (reading it for training), `cli` (the command line); the shard layout and the
commit protocol are `alit_jax.data.shards`'.
"""

from alit_jax.data.base_cache.build import (
  Result,
  build_cache,
  build_from_config,
  build_manifest,
  resolve_base,
)
from alit_jax.data.base_cache.cli import main
from alit_jax.data.base_cache.reader import BaseCache, check_for_training, make_train_iterator
from alit_jax.data.base_cache.records import (
  BASE_KEYS,
  FORMAT,
  Augment,
  base_json,
  cache_identity,
  decode_record,
  encode_record,
  indices_dtype,
  view_rng,
)
from alit_jax.data.shards import JOB_FILE, MANIFEST_FILE, SHARD_DIR, Log

__all__ = [
  "BASE_KEYS",
  "FORMAT",
  "JOB_FILE",
  "MANIFEST_FILE",
  "SHARD_DIR",
  "Augment",
  "BaseCache",
  "Log",
  "Result",
  "base_json",
  "build_cache",
  "build_from_config",
  "build_manifest",
  "cache_identity",
  "check_for_training",
  "decode_record",
  "encode_record",
  "indices_dtype",
  "main",
  "make_train_iterator",
  "resolve_base",
  "view_rng",
]
