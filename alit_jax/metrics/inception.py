"""The InceptionV3 network of pytorch-fid (``InceptionV3([3])``) in Flax, for FID features.

This is the FID variant of InceptionV3 (weights ported from TensorFlow's
inception-2015-12-05 graph), which differs from torchvision's Inception3 in three places:
the Mixed_5* / Mixed_6b-e / Mixed_7b average pools do not count the zero padding, and the
pool branch of Mixed_7c uses a max pool. Inputs in [0, 1] are resized to 299x299 with
PyTorch's bilinear interpolation (``align_corners=False``, no antialiasing), scaled to
[-1, 1], and the 2048-d output of the final average pool is returned.

Parameter names mirror the keys of ``pt_inception-2015-12-05-6726825d.pth``
(``Mixed_5b.branch1x1.conv.weight``, ``Conv2d_1a_3x3.bn.running_mean``, ...), so the file
converts with :func:`alit_jax.convert.mapping.state_dict_to_tree`; its classifier ``fc.*``
is not used and is ignored.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alit_jax.convert import mapping

Array = jax.Array
PrecisionLike = Any

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILE
)
# Environment variable read by `load_inception()` when no path is given.
WEIGHTS_ENV = "ALIT_INCEPTION_WEIGHTS"
# Keys of the weights file that the feature extractor does not use (the 1008-way classifier).
IGNORED_PREFIXES = ("fc.",)
INPUT_SIZE = 299
FEATURE_DIM = 2048


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) interpolation weights of torch bilinear resizing with align_corners=False.

  The source coordinate is ``src = (dst + 0.5) * scale - 0.5`` with the float32 ``scale = in /
  out``, evaluated as one fused multiply-add rounded to float32 (what PyTorch's compiled kernels
  do: a plain float32 multiply then subtract is off by up to 4e-6 in the weights), clamped at 0;
  it interpolates between ``floor(src)`` and the next pixel (clamped at the edge). No
  antialiasing, also when downsampling.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  # float32 * float32 is exact in float64, so this rounds once, like an FMA.
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * np.float64(scale) - 0.5
  src = np.maximum(src.astype(np.float32), np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = src - i0.astype(np.float32)
  w0 = np.float32(1.0) - w1
  m = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), w0)
  np.add.at(m, (rows, i1), w1)
  return m


def resize_bilinear_torch(
  images: Array, size: tuple[int, int], precision: PrecisionLike = jax.lax.Precision.HIGHEST
) -> Array:
  """Resizes like ``torch.nn.functional.interpolate(mode='bilinear', align_corners=False)``.

  ``jax.image.resize`` antialiases when downsampling, which torch does not; this version
  reproduces torch for both directions.

  Args:
    images: (B, H, W, C) float.
    size: output (height, width).
    precision: matmul precision of the separable interpolation.

  Returns:
    (B, size[0], size[1], C) float32.
  """
  images = jnp.asarray(images, jnp.float32)
  mh = jnp.asarray(_bilinear_matrix(images.shape[1], size[0]))
  mw = jnp.asarray(_bilinear_matrix(images.shape[2], size[1]))
  x = jnp.einsum("oh,bhwc->bowc", mh, images, precision=precision)
  return jnp.einsum("pw,bowc->bopc", mw, x, precision=precision)


class BasicConv2d(nn.Module):
  """Conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  dtype: Any = jnp.float32
  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Conv(
      self.features,
      self.kernel_size,
      strides=self.strides,
      padding=[(p, p) for p in self.padding],
      use_bias=False,
      dtype=self.dtype,
      precision=self.precision,
      name="conv",
    )(x)
    # A frozen feature extractor: BatchNorm always uses the converted running statistics.
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=jnp.float32, name="bn")(
      x.astype(jnp.float32)
    )
    return nn.relu(x).astype(self.dtype)


def _avg_pool_3x3(x: Array) -> Array:
  # TensorFlow's average pool (count_include_pad=False), the FID patch of blocks A, C, E_1.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: Array) -> Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2))


class _Block(nn.Module):
  dtype: Any = jnp.float32
  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  def conv(self, features, kernel_size, strides=(1, 1), padding=(0, 0), *, name):
    return BasicConv2d(
      features,
      kernel_size,
      strides,
      padding,
      dtype=self.dtype,
      precision=self.precision,
      name=name,
    )


class InceptionA(_Block):
  """FIDInceptionA: 1x1 / 5x5 / double 3x3 / avg-pool branches (64 + 64 + 96 + pool)."""

  pool_features: int = 32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = self.conv(64, (1, 1), name="branch1x1")(x)
    b5 = self.conv(48, (1, 1), name="branch5x5_1")(x)
    b5 = self.conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = self.conv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = self.conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = self.conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = self.conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Grid reduction 35 -> 17 (Mixed_6a): strided 3x3 / double 3x3 / max-pool branches."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = self.conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = self.conv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = self.conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = self.conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
  """FIDInceptionC: factorised 7x7 branches (192 each) and an avg-pool branch."""

  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c7 = self.channels_7x7
    b1 = self.conv(192, (1, 1), name="branch1x1")(x)
    b7 = self.conv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = self.conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = self.conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = self.conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = self.conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = self.conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = self.conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = self.conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = self.conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """Grid reduction 17 -> 8 (Mixed_7a): 3x3 / 7x7-then-3x3 / max-pool branches."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = self.conv(192, (1, 1), name="branch3x3_1")(x)
    b3 = self.conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = self.conv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = self.conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = self.conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = self.conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
  """FIDInceptionE_1 (``pool='avg'``, Mixed_7b) / FIDInceptionE_2 (``pool='max'``, Mixed_7c)."""

  pool: str = "avg"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = self.conv(320, (1, 1), name="branch1x1")(x)
    b3 = self.conv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate(
      [
        self.conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        self.conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
      ],
      axis=-1,
    )
    bd = self.conv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = self.conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
      [
        self.conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        self.conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
      ],
      axis=-1,
    )
    if self.pool == "avg":
      pooled = _avg_pool_3x3(x)
    elif self.pool == "max":
      # pytorch-fid's Mixed_7c max-pools here (a quirk of the TF graph the weights come from).
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"InceptionE.pool must be 'avg' or 'max', got {self.pool!r}")
    bp = self.conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """pytorch-fid's ``InceptionV3(output_blocks=[3])`` with the FID Inception blocks.

  Attributes:
    resize_input: resize inputs to 299x299 (torch bilinear, align_corners=False) first.
    normalize_input: map inputs from [0, 1] to [-1, 1].
    dtype: compute dtype of the convolutions (BatchNorm and the output are float32).
    precision: convolution / resize precision; HIGHEST keeps float32 accuracy on GPU/TPU.
  """

  resize_input: bool = True
  normalize_input: bool = True
  dtype: Any = jnp.float32
  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: Array) -> Array:
    """Pool3 features.

    Args:
      images: (B, H, W, 3) float in [0, 1], any H, W (299x299 after resizing).

    Returns:
      (B, 2048) float32 features.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"InceptionV3: expected (B, H, W, 3) images, got shape {images.shape}")
    x = jnp.asarray(images, jnp.float32)
    if self.resize_input:
      x = resize_bilinear_torch(x, (INPUT_SIZE, INPUT_SIZE), precision=self.precision)
    if self.normalize_input:
      x = 2.0 * x - 1.0
    x = x.astype(self.dtype)
    kw = dict(dtype=self.dtype, precision=self.precision)
    x = BasicConv2d(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3", **kw)(x)
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3", **kw)(x)
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3", **kw)(x)
    x = _max_pool_3x3_s2(x)
    x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1", **kw)(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3", **kw)(x)
    x = _max_pool_3x3_s2(x)
    x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x)
    x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x)
    x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x)
    x = InceptionB(name="Mixed_6a", **kw)(x)
    x = InceptionC(channels_7x7=128, name="Mixed_6b", **kw)(x)
    x = InceptionC(channels_7x7=160, name="Mixed_6c", **kw)(x)
    x = InceptionC(channels_7x7=160, name="Mixed_6d", **kw)(x)
    x = InceptionC(channels_7x7=192, name="Mixed_6e", **kw)(x)
    x = InceptionD(name="Mixed_7a", **kw)(x)
    x = InceptionE(pool="avg", name="Mixed_7b", **kw)(x)
    x = InceptionE(pool="max", name="Mixed_7c", **kw)(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


@functools.lru_cache(maxsize=1)
def inception_shapes() -> dict[str, Any]:
  """``{'params', 'batch_stats'}`` of :class:`InceptionV3` as ``jax.ShapeDtypeStruct``s."""
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(InceptionV3().init, jax.random.key(0), x)


def inception_variables_from_state_dict(
  state_dict: Mapping[str, Any], *, name: str = "state dict"
) -> dict[str, Any]:
  """Converts a pytorch-fid Inception state dict to Flax variables.

  ``fc.*`` (the classifier, unused for features) is ignored; every other key must match the
  network exactly (:class:`alit_jax.convert.mapping.ConversionError` lists all problems).

  Args:
    state_dict: flat ``{key: array}`` as in ``pt_inception-2015-12-05-6726825d.pth``.
    name: what to call the source in error messages (usually the file path).

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of float32 numpy arrays.
  """
  kept = {k: v for k, v in state_dict.items() if not k.startswith(IGNORED_PREFIXES)}
  return mapping.state_dict_to_tree(kept, inception_shapes(), name=name)


def _missing_weights_message(path: Any) -> str:
  where = f"{path!r} does not exist" if path else f"no path given and ${WEIGHTS_ENV} is not set"
  return (
    f"FID InceptionV3 weights not found: {where}. Download {FID_WEIGHTS_FILE} from the "
    f"pytorch-fid GitHub release ({FID_WEIGHTS_URL}) and pass its path, e.g. "
    f"load_inception('/path/to/{FID_WEIGHTS_FILE}') or {WEIGHTS_ENV}=/path/to/{FID_WEIGHTS_FILE}. "
    "A .npz of the same state dict (numpy arrays under the same keys) also works."
  )


def _read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a flat state dict of numpy arrays from .pth / .safetensors / .npz (no torch needed)."""
  path = os.fspath(path)
  if path.endswith(".npz"):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  from alit_jax.convert import pth

  state_dict, _ = pth.load_state_dict(path)
  return {k: np.asarray(v) for k, v in state_dict.items()}


def load_inception(path: str | os.PathLike | None = None) -> dict[str, Any]:
  """Loads the FID Inception weights as Flax variables.

  Args:
    path: ``pt_inception-2015-12-05-6726825d.pth`` (or an .npz of its state dict). When None,
      the ``ALIT_INCEPTION_WEIGHTS`` environment variable is used. Nothing is downloaded.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` (jax arrays) for :func:`inception_features`.

  Raises:
    FileNotFoundError: with the expected file name and where to get it.
    alit_jax.convert.mapping.ConversionError: if the file is not this network's state dict.
  """
  if path is None:
    path = os.environ.get(WEIGHTS_ENV) or None
  if path is not None:
    path = os.fspath(path)
  if path is None or not os.path.isfile(path):
    raise FileNotFoundError(_missing_weights_message(path))
  variables = inception_variables_from_state_dict(_read_state_dict(path), name=path)
  return jax.tree.map(jnp.asarray, variables)


@jax.jit
def inception_features(variables: Mapping[str, Any], images: Array) -> Array:
  """2048-d FID features of a batch (the pytorch-fid pool3 activations).

  Args:
    variables: from :func:`load_inception`.
    images: (B, H, W, 3) float in [0, 1], any size (resized to 299x299 inside).

  Returns:
    (B, 2048) float32.
  """
  return InceptionV3().apply(variables, images)
