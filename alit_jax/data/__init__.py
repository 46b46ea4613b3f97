"""Input pipeline: TFDS array_record sources (no TensorFlow) -> grain batches.

  sources.get_source(spec, split, data_dir)  random-access image sources
  pipeline.make_train_iterator(...)          infinite, resumable, process-sharded train batches
  pipeline.make_eval_iterator(...)           padded + masked eval batches, every example once
  transforms                                 decode / RandomResizedCrop / center crop (grain)
  synthetic                                  procedural images of graded complexity
  build_folder                               `python -m alit_jax.data.build_folder SRC --out DIR`
  token_dataset(OUT)                         token shards of `python -m alit_jax.tokenize_dataset`
  base_cache                                 `python -m alit_jax.data.base_cache` (stage-1 cache)
  image_folder                               plain image folders / arrays as sources
  shards, files                              the sharded-output machinery, atomic writes, walks

Apart from `token_dataset` (numpy + msgpack), this package imports nothing itself: import the
submodule you need (e.g. `from alit_jax.data import pipeline`). transforms/pipeline import grain;
tensorflow_datasets is only imported when a TFDS source is opened or a folder is built.

`alit_jax.data.token_dataset` is the function (it shadows its module's name); import the module's
other names with `from alit_jax.data.token_dataset import TokenDataset, bucket_batches, ...`.
"""

from alit_jax.data.token_dataset import TokenDataset, token_dataset

__all__ = ["TokenDataset", "token_dataset"]
