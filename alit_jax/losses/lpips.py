"""LPIPS perceptual distance (VGG16 variant, LPIPS v0.1 linear heads) in Flax.

This is the perceptual term of ALIT's stage-2 fine-tuning loss (``VQLPIPSWithDiscriminator`` in the
reference). Module names mirror the PyTorch state dict below the prefix
``gan_losses.<i>.perceptual_loss.``:

* ``net.slice1.0.weight`` ... ``net.slice5.28.bias`` -> ``net/slice1_0/kernel`` ...: the 13
  convolutions of torchvision's VGG16 ``features`` (indices 0, 2 | 5, 7 | 10, 12, 14 |
  17, 19, 21 | 24, 26, 28), cut into five slices that end at relu1_2, relu2_2, relu3_3, relu4_3
  and relu5_3;
* ``lin0.model.1.weight`` ... ``lin4.model.1.weight`` -> ``lin0/model_1/kernel`` ...: the 1x1
  bias-free "linear" heads (``model.0`` is a parameter-free Dropout);
* ``scaling_layer.shift`` / ``scaling_layer.scale``: fixed buffers, kept here as the module
  constants :data:`LPIPS_SHIFT` / :data:`LPIPS_SCALE`; the converters check the checkpoint's values.

Input range. LPIPS was designed for images in [-1, 1]: the shift/scale constants are the ImageNet
mean/std mapped to that range (2 * 0.485 - 1 = -0.030, 2 * 0.229 = 0.458). The ALIT reference,
however, feeds its images unchanged in [0, 1] (``ToTensor()`` without normalisation, and the
VQGAN decoder's output as is): ``self.perceptual_loss(inputs.contiguous(),
reconstructions.contiguous())``. :class:`LPIPS` applies no rescaling, so passing [0, 1] images
reproduces the reference; pass [-1, 1] images to get the standard LPIPS metric.

Dropout. The heads carry ``Dropout(p=0.5)``. The reference constructs the loss with ``.eval()``,
but the training engine then calls ``model.train(True)``, which switches the dropout back on, so
the reference trains with LPIPS dropout active. ``deterministic`` selects the behaviour here
(default True: eval mode; False needs a ``"dropout"`` rng).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alit_jax.convert import mapping

# ImageNet mean / std mapped to [-1, 1] (the LPIPS ScalingLayer buffers).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

# torchvision VGG16 `features` indices of the convolutions in each LPIPS slice. Slice k (k > 1)
# starts with the max-pool at the index before its first conv; every conv is followed by a ReLU.
VGG16_SLICES: tuple[tuple[int, ...], ...] = (
  (0, 2),
  (5, 7),
  (10, 12, 14),
  (17, 19, 21),
  (24, 26, 28),
)
VGG16_CHANNELS = (64, 128, 256, 512, 512)

_WEIGHTS_HELP = (
  "LPIPS needs two pretrained files that are never downloaded by alit_jax: (1) torchvision's "
  "ImageNet VGG16 weights (`torchvision.models.vgg16(weights='IMAGENET1K_V1')`, file "
  "vgg16-397923af.pth in the torch hub cache; keys `features.N.weight`/`features.N.bias`), and "
  "(2) the LPIPS v0.1 VGG heads, `lpips/weights/v0.1/vgg.pth` inside the `lpips` PyPI package "
  "(`pip download lpips --no-deps` and unzip the wheel; keys `lin0.model.1.weight` ... "
  "`lin4.model.1.weight`; the ALIT reference ships the identical file as "
  "base_tokenizers/taming/modules/autoencoder/lpips/vgg.pth). A stage-2 ALIT checkpoint also "
  "contains both, under `gan_losses.<i>.perceptual_loss.` (see `lpips_from_state_dict`)."
)


class VGG16Features(nn.Module):
  """The five LPIPS slices of VGG16 ``features`` (conv 3x3 + ReLU, 2x2 max-pool between slices).

  Attributes:
    dtype: compute dtype of the convolutions (params stay float32).
  """

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """Runs the slices.

    Args:
      x: (B, H, W, 3) scaled images (after the LPIPS scaling layer).

    Returns:
      Five feature maps (relu1_2 ... relu5_3), (B, H / 2^k, W / 2^k, C_k) for k = 0..4,
      C = 64, 128, 256, 512, 512.
    """
    feats = []
    for s, (idxs, ch) in enumerate(zip(VGG16_SLICES, VGG16_CHANNELS)):
      if s > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for i in idxs:
        x = nn.Conv(ch, (3, 3), padding=1, dtype=self.dtype, name=f"slice{s + 1}_{i}")(x)
        x = nn.relu(x)
      feats.append(x)
    return feats


class NetLinLayer(nn.Module):
  """LPIPS head: Dropout then a bias-free 1x1 conv to one channel (``model.0`` / ``model.1``).

  Attributes:
    use_dropout: whether the head has the Dropout (LPIPS default True).
    dropout_rate: dropout probability (torch ``nn.Dropout()`` default 0.5).
    dtype: compute dtype of the conv.
  """

  use_dropout: bool = True
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """(B, H, W, C) -> (B, H, W, 1)."""
    if self.use_dropout:
      x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    return nn.Conv(1, (1, 1), use_bias=False, dtype=self.dtype, name="model_1")(x)


def normalize_channels(x: jax.Array, eps: float = 1e-10) -> jax.Array:
  """x / (||x||_channels + eps), float32.

  The squared norm is floored at 1e-30 before the sqrt so that an all-zero feature vector has a
  zero (not NaN) gradient; the forward value is unchanged for any feature vector that is not
  ~1e-15 in norm, and is 0 either way for an all-zero one.
  """
  x = x.astype(jnp.float32)
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x / (jnp.sqrt(jnp.maximum(sq, 1e-30)) + eps)


class LPIPS(nn.Module):
  """LPIPS distance with VGG16 features and the v0.1 linear heads.

  Attributes:
    use_dropout: heads carry Dropout(0.5) as in the reference (no parameters; see module doc).
    dtype: compute dtype of the convolutions; normalisation, distances and the result are float32.
  """

  use_dropout: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, images0: jax.Array, images1: jax.Array, *, deterministic: bool = True
  ) -> jax.Array:
    """Per-image perceptual distance.

    Args:
      images0: (B, H, W, 3) images. The ALIT reference passes [0, 1] images (see module doc);
        nothing is rescaled here. H and W must be at least 16 (four 2x2 max-pools).
      images1: (B, H, W, 3) images in the same range.
      deterministic: False applies the heads' dropout (needs a ``"dropout"`` rng).

    Returns:
      (B,) float32 distances (the reference returns them as (B, 1, 1, 1)).
    """
    if images0.shape != images1.shape or images0.ndim != 4 or images0.shape[-1] != 3:
      raise ValueError(
        f"LPIPS expects two (B, H, W, 3) arrays of equal shape, got {images0.shape} and "
        f"{images1.shape}"
      )
    if min(images0.shape[1:3]) < 16:
      raise ValueError(f"LPIPS needs H, W >= 16 (four 2x2 max-pools), got {images0.shape}")
    shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
    scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
    b = images0.shape[0]
    x = jnp.concatenate([images0, images1], axis=0).astype(jnp.float32)
    x = ((x - shift) / scale).astype(self.dtype)
    # One VGG pass over both batches (VGG has no batch-dependent layers): half the XLA program,
    # and so about half the compile time, of two passes. LPIPS(x, x) is then ~1e-16, not 0.
    feats = VGG16Features(dtype=self.dtype, name="net")(x)
    total = jnp.zeros((b,), jnp.float32)
    for k, f in enumerate(feats):
      f = normalize_channels(f)
      diff = jnp.square(f[:b] - f[b:])
      head = NetLinLayer(use_dropout=self.use_dropout, dtype=self.dtype, name=f"lin{k}")
      total = total + jnp.mean(
        head(diff, deterministic=deterministic).astype(jnp.float32), (1, 2, 3)
      )
    return total


# ----------------------------------------------------------------------------------------------
# Conversion.


_TARGET_CACHE: dict[str, Any] = {}


def lpips_target() -> dict[str, Any]:
  """Shapes of the LPIPS variables (``jax.eval_shape``; no memory, cached)."""
  if "lpips" not in _TARGET_CACHE:
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    _TARGET_CACHE["lpips"] = jax.eval_shape(
      lambda a, b: LPIPS().init(jax.random.key(0), a, b), x, x
    )
  return _TARGET_CACHE["lpips"]


def _check_scaling_layer(state_dict: Mapping[str, Any], prefix: str) -> tuple[list[str], list[str]]:
  """Returns (problems, consumed keys) for the two ScalingLayer buffers."""
  problems, consumed = [], []
  for leaf, want in (("shift", LPIPS_SHIFT), ("scale", LPIPS_SCALE)):
    key = f"{prefix}scaling_layer.{leaf}"
    if key not in state_dict:
      problems.append(f"missing {key} (LPIPS ScalingLayer buffer)")
      continue
    consumed.append(key)
    value = np.asarray(state_dict[key], np.float64)
    if value.shape != (1, 3, 1, 1):
      problems.append(f"{key}: shape {value.shape}, expected (1, 3, 1, 1)")
    elif not np.allclose(value.reshape(3), want, rtol=0, atol=1e-6):
      problems.append(
        f"{key} = {value.reshape(3).tolist()}, expected the standard LPIPS constants {list(want)}"
      )
  return problems, consumed


def lpips_from_state_dict(
  state_dict: Mapping[str, Any], prefix: str = "", *, name: str = "checkpoint"
) -> dict[str, Any]:
  """Converts PyTorch LPIPS keys (ALIT's ``gan_losses.<i>.perceptual_loss.*``) to Flax variables.

  Args:
    state_dict: flat state dict of numpy arrays (other keys outside ``prefix`` are ignored).
    prefix: e.g. ``"gan_losses.0.perceptual_loss."``.
    name: source name for error messages (usually the file path).

  Returns:
    ``{"params": ...}`` for :class:`LPIPS`.

  Raises:
    mapping.ConversionError: listing missing / unexpected / mis-shaped keys, and ScalingLayer
      buffers that are absent or differ from :data:`LPIPS_SHIFT` / :data:`LPIPS_SCALE`.
  """
  problems, consumed = _check_scaling_layer(state_dict, prefix)
  rest = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k not in consumed}
  try:
    out = mapping.state_dict_to_tree(rest, lpips_target(), prefix=prefix, name=name)
  except mapping.ConversionError as e:
    problems.append(str(e))
    out = None
  if problems:
    raise mapping.ConversionError(
      f"{name}: LPIPS weights (prefix {prefix!r}) do not match:\n" + "\n".join(problems)
    )
  return out


def _vgg_slice_of(index: int) -> int | None:
  for s, idxs in enumerate(VGG16_SLICES):
    if index in idxs:
      return s + 1
  return None


def lpips_from_torchvision(
  vgg16_state_dict: Mapping[str, Any],
  heads_state_dict: Mapping[str, Any],
  *,
  name: str = "vgg16 + lpips heads",
) -> dict[str, Any]:
  """Builds LPIPS variables from a torchvision VGG16 state dict and the LPIPS head file.

  Args:
    vgg16_state_dict: torchvision ``vgg16`` state dict (``features.N.weight`` / ``.bias``;
      ``classifier.*`` keys are ignored, being unused by LPIPS).
    heads_state_dict: the ``lpips`` package's ``weights/v0.1/vgg.pth`` (``linK.model.1.weight``).
    name: source name for error messages.

  Returns:
    ``{"params": ...}`` for :class:`LPIPS`.

  Raises:
    mapping.ConversionError: on any missing or unexpected key (classifier keys aside).
  """
  sd: dict[str, Any] = {}
  unexpected = []
  for key, value in vgg16_state_dict.items():
    parts = key.split(".")
    if parts[0] == "classifier":
      continue
    if len(parts) == 3 and parts[0] == "features" and parts[1].isdigit():
      s = _vgg_slice_of(int(parts[1]))
      if s is not None:
        sd[f"net.slice{s}.{parts[1]}.{parts[2]}"] = value
        continue
    unexpected.append(key)
  for key, value in heads_state_dict.items():
    if not key.startswith("lin"):
      unexpected.append(key)
      continue
    sd[key] = value
  if unexpected:
    raise mapping.ConversionError(
      f"{name}: unexpected keys for LPIPS ({len(unexpected)}): " + ", ".join(unexpected)
    )
  sd["scaling_layer.shift"] = np.asarray(LPIPS_SHIFT, np.float32).reshape(1, 3, 1, 1)
  sd["scaling_layer.scale"] = np.asarray(LPIPS_SCALE, np.float32).reshape(1, 3, 1, 1)
  return lpips_from_state_dict(sd, "", name=name)


def _read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a flat state dict of numpy arrays from .pth / .safetensors / .npz (no torch needed)."""
  path = os.fspath(path)
  if path.endswith(".npz"):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  from alit_jax.convert import pth

  state_dict, _ = pth.load_state_dict(path)
  return {k: np.asarray(v) for k, v in state_dict.items()}


def load_lpips(
  vgg16_path: str | os.PathLike | None, heads_path: str | os.PathLike | None
) -> dict[str, Any]:
  """Reads the pretrained LPIPS weights from files (.pth or .npz).

  Args:
    vgg16_path: torchvision VGG16 ImageNet weights (``vgg16-397923af.pth``).
    heads_path: LPIPS v0.1 VGG heads (``lpips/weights/v0.1/vgg.pth``).

  Returns:
    ``{"params": ...}`` for :class:`LPIPS`.

  Raises:
    FileNotFoundError: when a path is missing, saying where the real weights come from.
  """
  for what, p in (("VGG16 weights", vgg16_path), ("LPIPS head weights", heads_path)):
    if p is None or not os.path.isfile(p):
      raise FileNotFoundError(f"{what} not found at {p!r}. {_WEIGHTS_HELP}")
  return lpips_from_torchvision(
    _read_state_dict(vgg16_path),
    _read_state_dict(heads_path),
    name=f"{os.fspath(vgg16_path)} + {os.fspath(heads_path)}",
  )


__all__ = [
  "LPIPS",
  "LPIPS_SCALE",
  "LPIPS_SHIFT",
  "NetLinLayer",
  "VGG16Features",
  "load_lpips",
  "lpips_from_state_dict",
  "lpips_from_torchvision",
  "lpips_target",
]
