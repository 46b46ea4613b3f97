"""Transformer layers with PyTorch semantics (reference quirks 9 and 10).

* LayerNorm with eps 1e-5, statistics in float32 (two-pass variance, as PyTorch computes it).
* `nn.MultiheadAttention` semantics: fused q/k/v projection (`in_proj`, PyTorch `in_proj_weight`
  rows [Wq; Wk; Wv]), heads as contiguous slices of width W/heads, q scaled by 1/sqrt(head_dim),
  `out_proj` with bias. The optional key mask is the only addition; it lets a fixed-size buffer
  of tokens behave exactly like the reference's growing sequence.
* Pre-LN residual blocks: ``x += attn(ln_1 x); x += mlp(ln_2 x)`` with an exact (erf) GELU.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The initialisation rules (normal(0.02) Linears, xavier in_proj, ...) live in one table.
from alit_jax.models.init_rules import DENSE_INIT, IN_PROJ_INIT

Dtype = Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  xc = x - mean
  var = jnp.mean(xc * xc, axis=-1, keepdims=True)  # two-pass, as PyTorch
  rstd = jax.lax.rsqrt(var + eps)
  xhat = xc * rstd
  return xhat * scale + bias, (xhat, rstd, scale)


def _layer_norm_bwd(eps, res, g):
  xhat, rstd, scale = res
  g = g.astype(jnp.float32)
  gxhat = g * scale
  dx = rstd * (
    gxhat
    - jnp.mean(gxhat, axis=-1, keepdims=True)
    - xhat * jnp.mean(gxhat * xhat, axis=-1, keepdims=True)
  )
  red = tuple(range(g.ndim - 1))
  return dx, jnp.sum(g * xhat, axis=red), jnp.sum(g, axis=red)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
  """PyTorch-equivalent LayerNorm (`scale`/`bias` params, float32, two-pass variance).

  The backward is written out (custom VJP, saving x-hat and 1/std): with autodiff'd
  normalisation XLA:CPU re-derives every later layer's norm backward inside each weight
  gradient, which made a deep encoder's backward ~3x slower than PyTorch's.
  """

  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
    return _layer_norm(x, scale, bias, self.epsilon)


def layer_norm(name: str, eps: float = 1e-5) -> LayerNorm:
  """PyTorch-equivalent LayerNorm: float32 statistics and output, two-pass variance."""
  return LayerNorm(epsilon=eps, name=name)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """`torch.nn.functional.normalize`: x / max(||x||, eps), in float32."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


class MultiheadAttention(nn.Module):
  """Self-attention with `torch.nn.MultiheadAttention` parameters and numerics.

  Attributes:
    width: model width W.
    heads: number of heads; W must be divisible by it.
    dtype: compute dtype of the projections (softmax is always float32).
  """

  width: int
  heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    key_mask: jax.Array | None = None,
    return_weights: bool = False,
    attn_bias: jax.Array | None = None,
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attends every token to every (unmasked) token.

    Args:
      x: (B, L, W) tokens.
      key_mask: optional bool (B, L) or (L,); False keys receive no attention.
      return_weights: also return the head-averaged attention weights (B, L, L), as PyTorch's
        `need_weights=True` does.
      attn_bias: optional float (L, L) added to every head's logits (not in the reference:
        `ALITConfig.latent_locality`).

    Returns:
      (B, L, W) outputs, and the weights if requested.
    """
    b, length, w = x.shape
    hd = w // self.heads
    qkv = nn.Dense(3 * w, dtype=self.dtype, kernel_init=IN_PROJ_INIT, name="in_proj")(x)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    # (B, H, L, hd) layout with plain batched matmuls: XLA:CPU runs these ~1.5x faster than the
    # equivalent "bqhd,bkhd->bhqk" einsums (measured, experiments/benchmarks/rollout.py notes).
    q = jnp.transpose(q.reshape(b, length, self.heads, hd), (0, 2, 1, 3)) * jnp.asarray(
      hd**-0.5, q.dtype
    )
    k = jnp.transpose(k.reshape(b, length, self.heads, hd), (0, 2, 3, 1))
    v = jnp.transpose(v.reshape(b, length, self.heads, hd), (0, 2, 1, 3))
    logits = jnp.matmul(q, k).astype(jnp.float32)  # (B, H, L, L)
    if attn_bias is not None:
      logits = logits + attn_bias.astype(jnp.float32)
    if key_mask is not None:
      key_mask = jnp.broadcast_to(key_mask, (b, length)) if key_mask.ndim == 1 else key_mask
      logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.matmul(weights.astype(v.dtype), v)  # (B, H, L, hd)
    out = jnp.transpose(out, (0, 2, 1, 3)).reshape(b, length, w)
    out = nn.Dense(w, dtype=self.dtype, kernel_init=DENSE_INIT, name="out_proj")(out)
    if return_weights:
      return out, weights.mean(axis=1)
    return out


class Mlp(nn.Module):
  """`c_fc -> GELU(erf) -> c_proj` (PyTorch `nn.Sequential` named mlp)."""

  width: int
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=DENSE_INIT, name="c_fc")(x)
    x = jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(self.dtype)
    return nn.Dense(self.width, dtype=self.dtype, kernel_init=DENSE_INIT, name="c_proj")(x)


class ResidualAttentionBlock(nn.Module):
  """Pre-LN transformer block (reference `modules/base.py` ResidualAttentionBlock)."""

  width: int
  heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    key_mask: jax.Array | None = None,
    return_weights: bool = False,
    attn_bias: jax.Array | None = None,
  ) -> jax.Array | tuple[jax.Array, jax.Array]:
    attn = MultiheadAttention(self.width, self.heads, dtype=self.dtype, name="attn")
    y = attn(layer_norm("ln_1")(x), key_mask, return_weights=return_weights, attn_bias=attn_bias)
    if return_weights:
      y, weights = y
    x = x + y.astype(x.dtype)
    y = Mlp(self.width, int(self.width * self.mlp_ratio), dtype=self.dtype, name="mlp")(
      layer_norm("ln_2")(x)
    )
    x = x + y.astype(x.dtype)
    if return_weights:
      return x, weights
    return x


class Transformer(nn.Module):
  """A stack of blocks named `transformer_<i>` (PyTorch `transformer.<i>`)."""

  width: int
  layers: int
  heads: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32

  def setup(self):
    self.transformer = [
      ResidualAttentionBlock(self.width, self.heads, self.mlp_ratio, dtype=self.dtype)
      for _ in range(self.layers)
    ]

  def __call__(
    self,
    x: jax.Array,
    key_mask: jax.Array | None = None,
    return_weights: bool = False,
    attn_bias: jax.Array | None = None,
  ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
    """Runs the blocks; with `return_weights`, also the (B, L, L) weights of every layer."""
    all_weights = []
    for block in self.transformer:
      if return_weights:
        x, w = block(x, key_mask, return_weights=True, attn_bias=attn_bias)
        all_weights.append(w)
      else:
        x = block(x, key_mask, attn_bias=attn_bias)
    if return_weights:
      return x, all_weights
    return x
