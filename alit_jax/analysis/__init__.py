"""Analyses of where ALIT spends its tokens (the library behind `experiments/`).

* `tokens`: per-image adaptive token counts of a dataset (and simple image measures on the same
  cropped images the model sees).
* `complexity`: compressed bits per pixel (PNG, JPEG q95), gradient magnitude, Spearman
  correlations with the token count.
* `familiarity`: token-count distributions of several datasets side by side.
* `probe`: linear probes (optax) on pooled latent tokens of every iteration.
* `attention`: decoder attention between latent tokens and the 2D positions, per iteration.
"""
