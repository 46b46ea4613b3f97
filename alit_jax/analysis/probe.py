"""Linear probes on pooled latent tokens of every rollout iteration.

ALIT's claim: the 1D latents carry semantic information, more of it with more tokens. For every
iteration i (token count T(i+1)) the valid latent tokens are mean-pooled into one vector per
image, and a linear softmax classifier (optax AdamW, full batch, standardized features) is
trained on a training split and scored on a held-out split.

The "oracle" token count of a test image is the smallest count whose probe classifies it
correctly (`criteria.select_iterations` on the per-iteration correctness; images that are never
correct get the largest count), the paper's task-dependent selection. `probe_oracle_criterion`
gives the same rule as a `criteria.Criterion` for `alit_jax.evaluate`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alit_jax import criteria as criteria_lib
from alit_jax import evaluate as evaluate_lib

Feature = Literal["latent_tokens", "factorized_latent"]


def pool_latents(latents: Any, tokens_per_iteration: int) -> np.ndarray:
  """Mean over each iteration's valid latent slots.

  Args:
    latents: (N, B, L, D) per-iteration latents; iteration i's valid slots are the first T(i+1).
    tokens_per_iteration: T.

  Returns:
    (N, B, D) float32.
  """
  lat = np.asarray(latents, np.float32)
  n, _, length, _ = lat.shape
  counts = tokens_per_iteration * (np.arange(n) + 1)
  valid = (np.arange(length)[None, :] < counts[:, None]).astype(np.float32)  # (N, L)
  return np.einsum("nbld,nl->nbd", lat, valid) / counts[:, None, None].astype(np.float32)


def pooled_latents(
  tokenizer,
  data: Any,
  *,
  feature: Feature = "latent_tokens",
  max_images: int | None = None,
  batch_size: int = 16,
  split: str = "validation",
  data_dir: str | None = None,
  resize: bool | None = None,
  num_devices: int | None = None,
  progress: bool = True,
) -> dict[str, Any]:
  """Pooled latents of every iteration for a dataset (no image decoding).

  Args:
    tokenizer: a `Tokenizer`.
    data: anything `alit_jax.evaluate.resolve_source` accepts.
    feature: "latent_tokens" (encoder outputs, width W) or "factorized_latent" (the D-dim
      latents that are quantized and decoded).
    max_images, batch_size, split, data_dir, resize, num_devices, progress: as for `evaluate`.

  Returns:
    {"features": (N, M, D) float32, "labels": (M,) int, "index": (M,), "data": description,
     "num_classes": int, "label_names": list}.
  """
  source, description, default_resize = evaluate_lib.resolve_source(
    data, split=split, data_dir=data_dir
  )
  if max_images is not None:
    from alit_jax.data.image_folder import PrefixSource

    source = PrefixSource(source, max_images)
  feats, labels, index = [], [], []
  for out in evaluate_lib.iterate_rollouts(
    tokenizer,
    source,
    batch_size=batch_size,
    resize=default_resize if resize is None else resize,
    want_latents=True,
    reconstruct=False,
    num_devices=num_devices,
    progress=progress,
    desc=f"latents {description}",
  ):
    m = np.asarray(out["mask"], bool)
    feats.append(pool_latents(out[feature], tokenizer.tokens_per_iteration)[:, m])
    labels.append(np.asarray(out["label"])[m])
    index.append(np.asarray(out["index"])[m])
  labels = np.concatenate(labels)
  names = list(getattr(source, "label_names", ()) or ())
  return {
    "features": np.concatenate(feats, axis=1),
    "labels": labels,
    "index": np.concatenate(index),
    "data": description,
    "num_classes": max(len(names), int(labels.max()) + 1 if labels.size else 0),
    "label_names": names,
  }


@dataclasses.dataclass
class LinearProbe:
  """A linear softmax classifier on standardized features: `((x - mean) / std) @ w + b`."""

  w: np.ndarray
  b: np.ndarray
  mean: np.ndarray
  std: np.ndarray

  def logits(self, x: Any) -> jax.Array:
    x = (jnp.asarray(x, jnp.float32) - self.mean) / self.std
    return x @ self.w + self.b

  def predict(self, x: Any) -> np.ndarray:
    return np.asarray(jnp.argmax(self.logits(x), axis=-1))


@functools.partial(
  jax.jit, static_argnames=("num_classes", "steps", "learning_rate", "weight_decay")
)
def _fit(x, y, key, *, num_classes, steps, learning_rate, weight_decay):
  d = x.shape[1]
  params = {
    "w": 0.01 * jax.random.normal(key, (d, num_classes), jnp.float32),
    "b": jnp.zeros((num_classes,), jnp.float32),
  }
  opt = optax.adamw(learning_rate, weight_decay=weight_decay)
  state = opt.init(params)

  def loss_fn(p):
    logits = x @ p["w"] + p["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, _):
    p, s = carry
    loss, g = jax.value_and_grad(loss_fn)(p)
    upd, s = opt.update(g, s, p)
    return (optax.apply_updates(p, upd), s), loss

  (params, _), losses = jax.lax.scan(step, (params, state), None, length=steps)
  return params, losses


def train_linear_probe(
  x: Any,
  y: Any,
  num_classes: int,
  *,
  steps: int = 500,
  learning_rate: float = 0.05,
  weight_decay: float = 1e-4,
  seed: int = 0,
) -> LinearProbe:
  """Fits a linear probe with full-batch AdamW on softmax cross-entropy.

  Args:
    x: (M, D) features; y: (M,) int labels in [0, num_classes).
    num_classes: C.
    steps, learning_rate, weight_decay, seed: optimisation settings.
  """
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.int32)
  if x.ndim != 2 or y.shape != (x.shape[0],):
    raise ValueError(f"expected (M, D) features and (M,) labels, got {x.shape} and {y.shape}")
  if y.min() < 0 or y.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
  mean = x.mean(axis=0)
  std = x.std(axis=0) + 1e-6
  xs = (x - mean) / std
  params, _ = _fit(
    jnp.asarray(xs),
    jnp.asarray(y),
    jax.random.key(seed),
    num_classes=int(num_classes),
    steps=int(steps),
    learning_rate=float(learning_rate),
    weight_decay=float(weight_decay),
  )
  return LinearProbe(np.asarray(params["w"]), np.asarray(params["b"]), mean, std)


def probe_per_length(
  train_features: Any,
  train_labels: Any,
  test_features: Any,
  test_labels: Any,
  num_classes: int,
  token_counts: Sequence[int],
  **train_kwargs: Any,
) -> tuple[dict[str, Any], list[LinearProbe]]:
  """One probe per token count; accuracies and the oracle token counts of the test images.

  Args:
    train_features, test_features: (N, M, D) pooled latents per iteration.
    train_labels, test_labels: (M,) labels.
    num_classes: C.
    token_counts: the N token counts.
    **train_kwargs: passed to `train_linear_probe`.

  Returns:
    (report, probes): report has `per_length` [{"tokens", "train_accuracy", "test_accuracy"}],
    `chance` (majority-class test accuracy), and `oracle` {"mean_tokens", "median_tokens",
    "accuracy"} (the smallest count whose probe is right, per test image).
  """
  tr = np.asarray(train_features)
  te = np.asarray(test_features)
  ytr = np.asarray(train_labels)
  yte = np.asarray(test_labels)
  probes, rows, correct = [], [], []
  for i, t in enumerate(token_counts):
    p = train_linear_probe(tr[i], ytr, num_classes, **train_kwargs)
    c = p.predict(te[i]) == yte
    probes.append(p)
    correct.append(c)
    rows.append(
      {
        "tokens": int(t),
        "train_accuracy": float(np.mean(p.predict(tr[i]) == ytr)),
        "test_accuracy": float(np.mean(c)),
      }
    )
  correct = np.stack(correct)
  it = criteria_lib.select_iterations(correct)
  oracle_tokens = np.asarray(token_counts)[it]
  majority = np.bincount(ytr, minlength=num_classes).argmax()
  report = {
    "per_length": rows,
    "chance": float(np.mean(yte == majority)),
    "oracle": {
      "mean_tokens": float(oracle_tokens.mean()),
      "median_tokens": float(np.median(oracle_tokens)),
      "accuracy": float(np.mean(correct.any(axis=0))),
    },
    "num_train": int(len(ytr)),
    "num_test": int(len(yte)),
    "num_classes": int(num_classes),
  }
  return report, probes


def probe_oracle_criterion(
  probes: Sequence[LinearProbe], tokens_per_iteration: int, name: str = "probe_oracle"
) -> criteria_lib.Criterion:
  """The oracle as a criterion: meets when the iteration's probe classifies the pooled
  `latent_tokens` correctly (labels and latents supplied by `alit_jax.evaluate`)."""

  def classify(latents, latent_valid):
    valid = np.asarray(latent_valid)
    n_valid = int(valid[0].sum())
    i = n_valid // tokens_per_iteration - 1
    w = valid[..., None].astype(np.float32)
    pooled = (np.asarray(latents, np.float32) * w).sum(axis=1) / n_valid
    return probes[i].logits(pooled)

  return criteria_lib.classification_oracle(classify, on="latents", name=name)


def plot_accuracy(report: dict[str, Any], path: Any, *, title: str = "") -> None:
  """Test (and train) accuracy against the token count, with chance and oracle."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = report["per_length"]
  t = [r["tokens"] for r in rows]
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  ax.plot(t, [r["test_accuracy"] for r in rows], "o-", label="test")
  ax.plot(t, [r["train_accuracy"] for r in rows], "o--", alpha=0.6, label="train")
  ax.axhline(report["chance"], color="gray", ls=":", label="majority class")
  o = report["oracle"]
  ax.plot(o["mean_tokens"], o["accuracy"], "s", color="C3", label="oracle (mean tokens)")
  ax.set_xticks(t)
  ax.set_xlabel("tokens")
  ax.set_ylabel("accuracy")
  ax.set_ylim(0, 1.02)
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
