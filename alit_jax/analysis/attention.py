"""Decoder attention between latent tokens and the 2D positions (the paper's object-discovery
figure).

The ALIT decoder attends over `[class, 256 mask tokens (one per 2D position), L latents]`. For
each rollout iteration i (L = T(i+1) valid latents) and decoder layer, the head-averaged
attention weights (B, S, S), S = 257 + 256 latent slots (padded slots get no attention), give:

* `image_to_latent[i, j]` (g, g): how much each 2D position (query) attends to latent token j
  (key): which image regions read from token j. This is what the reference's
  `token_visualization.ipynb` shows (layer 6 of 8, head average, per-map min-max scaling); the
  notebook indexes the key as `256 + j`, one slot before latent j (the class token is at 0 and
  the 256 positions at 1..256), which we read as an off-by-one: here latent j is key `257 + j`.
* `latent_to_image[i, j]` (g, g): how latent token j (query) attends over the 2D positions.
* `assignment[i]` (g, g): for each 2D position, the latent token it attends to most (a
  token-to-region segmentation).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from alit_jax.models.alit import ALIT

Direction = Literal["image_to_latent", "latent_to_image"]
REFERENCE_LAYER = 6  # the layer token_visualization.ipynb shows (of 8)


@functools.partial(jax.jit, static_argnames=("model",))
def _decoder_weights(alit_vars, decoder_input, valid, *, model):
  _, weights = model.apply(alit_vars, decoder_input, valid, return_weights=True, method=ALIT.decode)
  return jnp.stack(weights)  # (layers, N, S, S)


def default_layer(num_layers: int) -> int:
  """The reference's layer 6 when the decoder has more than 6 layers, else the last one."""
  return REFERENCE_LAYER if num_layers > REFERENCE_LAYER else num_layers - 1


def decoder_attention(tokenizer, image: Any, *, layer: int | str | None = None) -> dict[str, Any]:
  """Decoder attention maps of one image at every iteration (halting off).

  Args:
    tokenizer: a `Tokenizer`.
    image: (S, S, 3) uint8 or float in [0, 1] (already at the model's resolution).
    layer: decoder layer index (negative counts from the end), "mean" (average over layers), or
      None for `default_layer`.

  Returns:
    {"image_to_latent": (N, L, g, g), "latent_to_image": (N, L, g, g) (zeros for latents not
     valid at iteration i), "assignment": (N, g, g) int, "num_tokens": [T(i+1)], "layer":
     the layer used}.
  """
  from alit_jax.evaluate import tokenizer_precision

  c = tokenizer.config.alit
  trace = tokenizer.rollout(image, reconstruct=False)
  dec_in = trace["decoder_latent_input"][:, 0]  # (N, L, D)
  n, length = dec_in.shape[:2]
  counts = tokenizer.tokens_per_iteration * (np.arange(n) + 1)
  valid = jnp.asarray(np.arange(length)[None, :] < counts[:, None])
  with tokenizer_precision(tokenizer):
    w = np.asarray(
      _decoder_weights(tokenizer.variables["alit"], dec_in, valid, model=tokenizer.model)
    )
  num_layers = w.shape[0]
  if layer is None:
    layer = default_layer(num_layers)
  if layer == "mean":
    a = w.mean(axis=0)
  else:
    li = int(layer)
    if not -num_layers <= li < num_layers:
      raise ValueError(f"layer {li} out of range for a decoder with {num_layers} layers")
    layer = li % num_layers
    a = w[layer]
  p = c.num_image_tokens
  g = c.grid_size
  img_to_lat = a[:, 1 : p + 1, p + 1 : p + 1 + length]  # (N, P, L)
  lat_to_img = a[:, p + 1 : p + 1 + length, 1 : p + 1]  # (N, L, P)
  vmask = np.asarray(valid)
  img_to_lat = np.where(vmask[:, None, :], img_to_lat, 0.0)
  lat_to_img = np.where(vmask[:, :, None], lat_to_img, 0.0)
  assignment = np.argmax(np.where(vmask[:, None, :], img_to_lat, -np.inf), axis=-1)
  return {
    "image_to_latent": np.transpose(img_to_lat, (0, 2, 1)).reshape(n, length, g, g),
    "latent_to_image": lat_to_img.reshape(n, length, g, g),
    "assignment": assignment.reshape(n, g, g),
    "num_tokens": [int(t) for t in counts],
    "layer": layer,
  }


def load_model_image(
  tokenizer,
  image: Any = None,
  *,
  data: Any = None,
  index: int = 0,
  split: str = "validation",
  resize: bool = True,
) -> np.ndarray:
  """The (S, S, 3) uint8 image the tokenizer sees: from a file path, or record `index` of a data
  source, with the evaluation transform (shorter side resized, bicubic; center crop)."""
  from PIL import Image

  from alit_jax.data import transforms

  size = tokenizer.image_size
  if image is not None:
    try:
      with Image.open(image) as im:
        pil = im.convert("RGB")
    except (OSError, ValueError) as e:
      raise ValueError(f"{image}: cannot read image ({type(e).__name__}: {e})") from e
  else:
    from alit_jax.evaluate import resolve_source

    source, description, _ = resolve_source(data, split=split)
    if not 0 <= index < len(source):
      raise IndexError(f"{description}: index {index} out of range [0, {len(source)})")
    pil = transforms.decode_image(source[index]["image"])
  if resize:
    pil = transforms.resize_shorter_side(pil, size)
  return np.asarray(transforms.center_crop(pil, size), np.uint8)


def _normalize(m: np.ndarray) -> np.ndarray:
  lo, hi = float(m.min()), float(m.max())
  return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def _overlay(ax, image: np.ndarray, m: np.ndarray) -> None:
  h, w = image.shape[:2]
  ax.imshow(_normalize(m), cmap="jet", extent=(0, w, h, 0), interpolation="bilinear")
  ax.imshow(image, alpha=0.4, extent=(0, w, h, 0))
  ax.set_xticks([])
  ax.set_yticks([])


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def plot_iterations(
  image: np.ndarray,
  att: dict[str, Any],
  path: str | os.PathLike,
  *,
  direction: Direction = "image_to_latent",
  num_tokens: int = 8,
) -> None:
  """Rows: iterations. Columns: input, the token-assignment map, then the maps of the first
  `num_tokens` latent tokens (present at every iteration)."""
  plt = _pyplot()
  maps = att[direction]
  n = maps.shape[0]
  k = min(num_tokens, att["num_tokens"][0])
  fig, axes = plt.subplots(n, k + 2, figsize=(1.4 * (k + 2), 1.4 * n + 0.5), squeeze=False)
  h, w = image.shape[:2]
  for i in range(n):
    axes[i, 0].imshow(image)
    axes[i, 0].set_ylabel(f"{att['num_tokens'][i]} tok", fontsize=8)
    axes[i, 1].imshow(att["assignment"][i], cmap="tab20", extent=(0, w, h, 0), alpha=1.0)
    axes[i, 1].imshow(image, alpha=0.35, extent=(0, w, h, 0))
    for j in range(k):
      _overlay(axes[i, j + 2], image, maps[i, j])
    for ax in axes[i, :2]:
      ax.set_xticks([])
      ax.set_yticks([])
  axes[0, 0].set_title("input", fontsize=8)
  axes[0, 1].set_title("argmax token", fontsize=8)
  for j in range(k):
    axes[0, j + 2].set_title(f"token {j}", fontsize=8)
  fig.suptitle(f"decoder attention ({direction}, layer {att['layer']})", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_tokens(
  image: np.ndarray,
  att: dict[str, Any],
  iteration: int,
  path: str | os.PathLike,
  *,
  direction: Direction = "image_to_latent",
  columns: int = 8,
) -> None:
  """Every valid latent token of one iteration (as the reference notebook: 8 per row)."""
  plt = _pyplot()
  count = att["num_tokens"][iteration]
  rows = int(np.ceil(count / columns))
  fig, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.3 * rows + 0.4), squeeze=False)
  for j, ax in enumerate(axes.flat):
    if j < count:
      _overlay(ax, image, att[direction][iteration, j])
      ax.set_title(str(j), fontsize=6, pad=1)
    else:
      ax.axis("off")
  fig.suptitle(
    f"iteration {iteration} ({count} tokens), {direction}, layer {att['layer']}", fontsize=9
  )
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
