"""Evaluation of a tokenizer, by stage; `alit_jax.evaluate` is the entry point and re-exports it.

* `sources`: the tokenizer of a checkpoint, the image source of `--data`, skipped records;
* `metrics`: 8-bit quantization, selections and the streaming `MetricAccumulator`;
* `rollouts`: rollouts at every token count over the local devices, criterion scores and
  `evaluate`;
* `outputs`: results.json, CSVs, plots, the grid and the printed table;
* `cli`: `python -m alit_jax.evaluate` and the argument helpers the experiments share.
"""
