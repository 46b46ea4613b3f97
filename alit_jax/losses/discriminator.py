"""PatchGAN discriminator (``NLayerDiscriminator``) of ALIT's stage-2 fine-tuning, in Flax.

Layer names mirror the PyTorch ``nn.Sequential`` indices below ``gan_losses.<i>.discriminator.``:
with ``n_layers = 3`` the layers are ``main.0`` conv (bias) / ``main.1`` LeakyReLU /
``main.2`` conv (no bias) / ``main.3`` BatchNorm / ``main.4`` LeakyReLU / ``main.5`` /
``main.6`` / ``main.7`` / ``main.8`` (stride 1) / ``main.9`` / ``main.10`` / ``main.11`` conv to one
channel (bias), i.e. Flax modules ``main_0``, ``main_2``, ``main_3``, ... ``main_11``.

BatchNorm follows ``torch.nn.BatchNorm2d`` exactly (:class:`BatchNorm2d`): in training the batch
is normalised with its biased variance and the running statistics move by ``momentum = 0.1``
towards the batch mean and the *unbiased* batch variance; in eval the running statistics are used.
Statistics are taken over the whole (global) batch given to one call. The reference runs under
DDP with plain BatchNorm2d, so each GPU there normalises with its own per-GPU batch (12 images in
the released run) and the running buffers are those of rank 0.

Initialisation follows the reference's ``weights_init``: conv kernels N(0, 0.02), BatchNorm scale
N(1, 0.02) and bias 0; conv biases keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _torch_conv_bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _normal_around(mean: float, std: float):
  def init(key, shape, dtype=jnp.float32):
    return mean + std * jax.random.normal(key, shape, dtype)

  return init


class BatchNorm2d(nn.Module):
  """``torch.nn.BatchNorm2d`` over the last (channel) axis of (B, H, W, C) inputs.

  Params ``scale`` / ``bias``; ``batch_stats`` ``mean`` / ``var`` (torch ``running_mean`` /
  ``running_var``). Statistics are float32 whatever the input dtype.

  Attributes:
    momentum: PyTorch convention: ``running = (1 - momentum) * running + momentum * batch``.
    epsilon: added to the variance.
  """

  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Normalises; with ``train`` also updates ``batch_stats`` (make it mutable).

    Args:
      x: (B, H, W, C).
      train: use (and update) batch statistics instead of the running ones.

    Returns:
      (B, H, W, C) in ``x.dtype``.
    """
    c = x.shape[-1]
    scale = self.param("scale", _normal_around(1.0, 0.02), (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    x32 = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      n = math.prod(x.shape[:-1])
      if n < 2:
        raise ValueError(
          f"BatchNorm2d in training needs more than 1 value per channel, got {x.shape}"
        )
      mean = jnp.mean(x32, axes)
      var = jnp.mean(jnp.square(x32 - mean), axes)
      # Flax's own BatchNorm skips the update during init; keep that (torch buffers start at 0/1).
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1.0 - m) * ra_mean.value + m * jax.lax.stop_gradient(mean)
        ra_var.value = (1.0 - m) * ra_var.value + m * jax.lax.stop_gradient(var) * (n / (n - 1))
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(x.dtype)


class NLayerDiscriminator(nn.Module):
  """PatchGAN discriminator (Pix2Pix), BatchNorm variant as used by ALIT.

  Attributes:
    input_nc: input channels (3 for RGB; checked against the input).
    ndf: filters of the first conv.
    n_layers: number of stride-2 downsampling convs (the last conv before the head has stride 1).
    dtype: compute dtype of the convolutions (params float32; BatchNorm statistics float32).
  """

  input_nc: int = 3
  ndf: int = 64
  n_layers: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Patch logits.

    Args:
      x: (B, H, W, input_nc) images (ALIT passes [0, 1] images and reconstructions).
      train: BatchNorm uses and updates batch statistics (``mutable=["batch_stats"]``).

    Returns:
      (B, H', W', 1) float32 logits; for 256x256 inputs and n_layers 3, H' = W' = 30.
    """
    if x.shape[-1] != self.input_nc:
      raise ValueError(f"NLayerDiscriminator expects {self.input_nc} channels, got {x.shape}")
    idx = 0
    in_ch = self.input_nc

    def conv(features, stride, use_bias):
      nonlocal idx, in_ch
      layer = nn.Conv(
        features,
        (4, 4),
        strides=(stride, stride),
        padding=1,
        use_bias=use_bias,
        dtype=self.dtype,
        kernel_init=nn.initializers.normal(0.02),
        bias_init=_torch_conv_bias_init(in_ch * 16),
        name=f"main_{idx}",
      )
      idx += 1
      in_ch = features
      return layer

    x = conv(self.ndf, 2, True)(x.astype(self.dtype))
    x = nn.leaky_relu(x, 0.2)
    idx += 1
    mults = [min(2**n, 8) for n in range(self.n_layers + 1)]
    for n in range(1, self.n_layers + 1):
      stride = 2 if n < self.n_layers else 1
      x = conv(self.ndf * mults[n], stride, False)(x)
      x = BatchNorm2d(name=f"main_{idx}")(x, train=train)
      idx += 1
      x = nn.leaky_relu(x, 0.2)
      idx += 1
    x = conv(1, 1, True)(x)
    return x.astype(jnp.float32)
