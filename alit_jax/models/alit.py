"""ALIT's latent-distillation encoder/decoder (`AdaptiveLengthImageTokenizer` minus the base).

Parameter names and shapes mirror the PyTorch state dict (the raw `nn.Parameter`s keep their
PyTorch shapes, e.g. `encoder_mask_token` is (1, 1, W)), so `convert.mapping` needs no table.

The module only defines the pieces; the recurrent rollout that strings them together lives in
`alit_jax.models.rollout` as pure functions over `(module, variables)`, so that it can run as a
`lax.scan` / `lax.while_loop` over a fixed-size token buffer or as an unrolled growing sequence.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from alit_jax.models.configs import ALITConfig
from alit_jax.models.init_rules import DENSE_INIT, codebook_init, embedding_init
from alit_jax.models.layers import (
  ResidualAttentionBlock,
  Transformer,
  l2_normalize,
  layer_norm,
)

Dtype = Any


class VectorQuantizer(nn.Module):
  """l2-normalized nearest-neighbour quantizer with a straight-through estimator (quirk 8).

  Attributes:
    codebook_size: number of codes K.
    token_dim: code dimension D.
    commitment_cost: weight of the commitment term.
    use_l2_norm: normalize z and the codebook before the distance (the released models do).
  """

  codebook_size: int
  token_dim: int
  commitment_cost: float = 0.25
  use_l2_norm: bool = True

  def setup(self):
    self.embedding = nn.Embed(
      self.codebook_size, self.token_dim, embedding_init=codebook_init(self.codebook_size)
    )

  def codebook(self) -> jax.Array:
    """(K, D) codebook as the distance sees it (normalized if `use_l2_norm`)."""
    e = self.embedding.embedding.astype(jnp.float32)
    return l2_normalize(e) if self.use_l2_norm else e

  def __call__(
    self, z: jax.Array, valid: jax.Array | None = None
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Quantizes tokens.

    Args:
      z: (B, L, D) factorized latents.
      valid: optional bool (B, L); the losses average over valid tokens only (padded slots of
        the fixed rollout buffer are excluded, so the value equals the reference's mean over the
        32(i+1) real tokens).

    Returns:
      z_st: (B, L, D) `z + stop_gradient(z_q - z)` on the (normalized) z, what the decoder sees.
      aux: `indices` (B, L) int32, `z` and `z_q` (normalized), `commitment_loss`,
        `codebook_loss`, `quantizer_loss` (scalars, float32).
    """
    z = z.astype(jnp.float32)
    zn = l2_normalize(z) if self.use_l2_norm else z
    e = self.codebook()
    d = (
      jnp.sum(zn * zn, axis=-1, keepdims=True)
      + jnp.sum(e * e, axis=-1)
      - 2.0 * jnp.einsum("bld,kd->blk", zn, e, precision=jax.lax.Precision.HIGHEST)
    )
    idx = jnp.argmin(d, axis=-1).astype(jnp.int32)
    zq = self.lookup(idx)
    if valid is None:
      valid = jnp.ones(z.shape[:2], bool)
    w = valid.astype(jnp.float32)[..., None]
    denom = jnp.maximum(jnp.sum(w) * z.shape[-1], 1.0)
    commitment = self.commitment_cost * jnp.sum(w * (jax.lax.stop_gradient(zq) - zn) ** 2) / denom
    codebook = jnp.sum(w * (zq - jax.lax.stop_gradient(zn)) ** 2) / denom
    z_st = zn + jax.lax.stop_gradient(zq - zn)
    aux = {
      "indices": idx,
      "z": zn,
      "z_q": zq,
      "commitment_loss": commitment,
      "codebook_loss": codebook,
      "quantizer_loss": commitment + codebook,
    }
    return z_st, aux

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Codes for indices, normalized if `use_l2_norm` (what the decoder receives)."""
    zq = self.embedding.embedding.astype(jnp.float32)[indices]
    return l2_normalize(zq) if self.use_l2_norm else zq


class LatentDecoder(nn.Module):
  """Decodes 1D latents + 2D mask tokens into per-position outputs (reference `Decoder`)."""

  width: int
  layers: int
  heads: int
  factorize_latent: bool
  output_dim: int
  max_latent_tokens: int = 256
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.factorize_latent:
      self.decoder_embed = nn.Dense(self.width, dtype=self.dtype, kernel_init=DENSE_INIT)
    self.ln_pre = layer_norm("ln_pre")
    self.transformer = [
      ResidualAttentionBlock(self.width, self.heads, self.mlp_ratio, dtype=self.dtype)
      for _ in range(self.layers)
    ]
    self.ln_post = layer_norm("ln_post")
    self.ffn_0 = nn.Dense(2 * self.width, dtype=self.dtype, kernel_init=DENSE_INIT)
    self.ffn_2 = nn.Dense(self.output_dim, dtype=self.dtype, kernel_init=DENSE_INIT)
    self.latent_token_positional_embedding = self.param(
      "latent_token_positional_embedding",
      embedding_init(self.width),
      (self.max_latent_tokens, self.width),
    )

  def __call__(
    self,
    latents: jax.Array,
    mask_tokens: jax.Array,
    latent_valid: jax.Array | None = None,
    return_weights: bool = False,
    attn_bias: jax.Array | None = None,
  ):
    """Decodes.

    Args:
      latents: (B, L, D_in) quantized / factorized latents (D_in = token_dim if factorized, else W).
      mask_tokens: (257, W) or (B, 257, W) `[class, 256 mask tokens] + positional embedding`.
      latent_valid: optional bool (B, L) or (L,); False latent slots are masked out as keys.
      return_weights: also return every layer's (B, S, S) attention weights.
      attn_bias: optional (257 + L, 257 + L) additive attention bias (`locality_bias`).

    Returns:
      (B, 256, output_dim) float32 (VQGAN logits or VAE codes) [, list of weights].
    """
    b, length = latents.shape[:2]
    x = latents.astype(jnp.float32)
    if self.factorize_latent:
      x = self.decoder_embed(x).astype(jnp.float32)
    # Zero positions for unfactorized widths would be a silent bug; the slice must fit.
    x = x + self.latent_token_positional_embedding[:length]
    if mask_tokens.ndim == 2:
      mask_tokens = jnp.broadcast_to(mask_tokens, (b,) + mask_tokens.shape)
    n_q = mask_tokens.shape[1]
    x = jnp.concatenate([mask_tokens.astype(jnp.float32), x], axis=1)
    key_mask = None
    if latent_valid is not None:
      latent_valid = jnp.broadcast_to(latent_valid, (b, length))
      key_mask = jnp.concatenate([jnp.ones((b, n_q), bool), latent_valid], axis=1)
    x = self.ln_pre(x)
    weights = []
    for block in self.transformer:
      if return_weights:
        x, w = block(x, key_mask, return_weights=True, attn_bias=attn_bias)
        weights.append(w)
      else:
        x = block(x, key_mask, attn_bias=attn_bias)
    x = self.ln_post(x[:, 1:n_q])
    x = jnp.tanh(self.ffn_0(x).astype(jnp.float32))
    x = self.ffn_2(x).astype(jnp.float32)
    return (x, weights) if return_weights else x


def locality_bias(config: ALITConfig) -> np.ndarray:
  """The additive attention bias of `ALITConfig.latent_locality` (not in the reference).

  Both transformers lay their sequence out as `[class, grid positions 0..n-1, latent slots]`, so
  one matrix serves the encoder (image tokens) and the decoder (mask tokens). Slot s (of any
  iteration) owns tile `s % num_latent_tokens` of a rows x cols tiling of the g x g grid (rows x
  cols = num_latent_tokens, as square as it divides); between the slot and grid position p the
  bias is `-d^2 / (2 sigma^2)`, d the distance in cells from p to the tile's centre, sigma =
  `latent_locality`. Everything else (class token, slot-slot, position-position) gets 0.

  Returns:
    (1 + n + max_latent_tokens, same) float32.
  """
  c = config
  g, t, n = c.grid_size, c.num_latent_tokens, c.num_image_tokens
  rows = max(r for r in range(1, int(math.isqrt(t)) + 1) if t % r == 0)
  cols = t // rows
  j = np.arange(c.max_latent_tokens) % t
  cy = (j // cols + 0.5) * g / rows - 0.5
  cx = (j % cols + 0.5) * g / cols - 0.5
  py, px = np.divmod(np.arange(n), g)
  d2 = (py[:, None] - cy[None]) ** 2 + (px[:, None] - cx[None]) ** 2  # (n, slots)
  grid_to_slot = -d2 / (2 * c.latent_locality**2)
  s = 1 + n + c.max_latent_tokens
  bias = np.zeros((s, s), np.float32)
  bias[1 : n + 1, n + 1 :] = grid_to_slot
  bias[n + 1 :, 1 : n + 1] = grid_to_slot.T
  return bias


class ALIT(nn.Module):
  """The parameters and per-step pieces of the ALIT rollout.

  Attributes:
    config: architecture (a frozen, typed dataclass; hashable, so it can be a static jit arg).
    dtype: compute dtype of matmuls/convolutions; params stay float32, and norms, softmax,
      distances and the residual stream stay float32.
  """

  config: ALITConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    w, d = c.encoder_width, c.decoder_width
    n_img = c.num_image_tokens
    # The reference draws every embedding as `encoder_width ** -0.5 * randn` (quirk 14).
    init = embedding_init(w)
    self.encoder_positional_embedding = self.param(
      "encoder_positional_embedding", init, (n_img + 1, w)
    )
    self.encoder_class_embedding = self.param("encoder_class_embedding", init, (1, w))
    self.encoder_mask_token = self.param("encoder_mask_token", init, (1, 1, w))
    self.decoder_positional_embedding = self.param(
      "decoder_positional_embedding", init, (n_img + 1, d)
    )
    self.decoder_class_embedding = self.param("decoder_class_embedding", init, (1, d))
    self.decoder_mask_token = self.param("decoder_mask_token", init, (1, 1, d))
    self.latent_tokens = self.param("latent_tokens", init, (c.num_latent_tokens, w))
    self.latent_token_positional_embedding = self.param(
      "latent_token_positional_embedding", init, (c.num_latent_tokens, w)
    )
    self.timestep_embedding = self.param(
      "timestep_embedding", init, (c.max_rollout_iters, c.num_latent_tokens, w)
    )
    self.encoder_ln_pre = layer_norm("encoder_ln_pre")
    self.encoder_ln_post = layer_norm("encoder_ln_post")
    self.encoder_ln_recursive = layer_norm("encoder_ln_recursive")
    self.pre_quantizer_mlp = nn.Dense(c.token_dim, dtype=self.dtype, kernel_init=DENSE_INIT)
    self.encoder = Transformer(w, c.encoder_layers, c.encoder_heads, c.mlp_ratio, self.dtype)
    self.decoder = LatentDecoder(
      d,
      c.decoder_layers,
      c.decoder_heads,
      c.factorize_latent,
      c.decoder_output_dim,
      max_latent_tokens=c.max_latent_tokens,
      mlp_ratio=c.mlp_ratio,
      dtype=self.dtype,
    )
    p = c.patch_size
    self.patch_embed = nn.Conv(
      w - c.base_embed_dim,
      (p, p),
      strides=(p, p),
      padding="VALID",
      dtype=self.dtype,
      kernel_init=DENSE_INIT,  # `_init_weights` covers the Conv2d too (not Flax's lecun)
    )
    if c.quantize_latent:
      self.quantize = VectorQuantizer(
        c.codebook_size, c.token_dim, c.commitment_cost, c.use_l2_norm
      )

  # ---- used only to create every parameter (init) ----
  def __call__(self, images: jax.Array, base_features: jax.Array) -> jax.Array:
    c = self.config
    img = self.embed_images(images, base_features)
    x = self.encoder_ln_pre(self.encoder_sequence(img, self.fresh_latents(0)))
    x = self.encoder(x)
    lat = x[:, c.num_image_tokens + 1 :]
    h = self.encoder_ln_post(lat)
    f = self.pre_quantizer_mlp(h)  # always created: the reference keeps it even unfactorized
    head = self.latent_head(lat)
    out = self.decoder(head["decoder_input"], self.decoder_queries())
    x = self.encoder_ln_recursive(
      self.mask_image_tokens(x, jnp.zeros(x.shape[:1] + (c.num_image_tokens,), bool))
    )
    return out.sum() + f.sum() + x.sum()

  # ---- pieces of the rollout ----
  def embed_images(self, images: jax.Array, base_features: jax.Array) -> jax.Array:
    """`normalize(concat[base_features, patch_embed(images)])` as tokens (quirk 6).

    Args:
      images: (B, H, W, 3) float32 in [0, 1].
      base_features: (B, g, g, E) continuous base-tokenizer features (VQGAN pre-quantization
        features, or the VAE's scaled posterior mode).

    Returns:
      (B, g*g, W) float32, token t = row * g + col.
    """
    patches = self.patch_embed(images).astype(jnp.float32)
    x = jnp.concatenate([base_features.astype(jnp.float32), patches], axis=-1)
    b, g1, g2, w = x.shape
    return l2_normalize(x.reshape(b, g1 * g2, w))

  def encoder_sequence(self, img_tokens: jax.Array, latents: jax.Array) -> jax.Array:
    """`[cls, img] + encoder_positional_embedding` followed by `latents` (before ln_pre).

    Args:
      img_tokens: (B, 256, W).
      latents: (T', W) or (B, T', W) latent tokens to append (anything for buffer slots).
    """
    b = img_tokens.shape[0]
    cls = jnp.broadcast_to(self.encoder_class_embedding[None], (b, 1, img_tokens.shape[-1]))
    x = jnp.concatenate([cls, img_tokens], axis=1) + self.encoder_positional_embedding
    if latents.ndim == 2:
      latents = jnp.broadcast_to(latents, (b,) + latents.shape)
    return jnp.concatenate([x, latents.astype(jnp.float32)], axis=1)

  def fresh_latents(self, i: int | jax.Array) -> jax.Array:
    """(T, W) `latent_tokens + latent_token_positional_embedding + timestep_embedding[i]`."""
    return self.latent_tokens + self.latent_token_positional_embedding + self.timestep_embedding[i]

  def ln_pre(self, x: jax.Array) -> jax.Array:
    return self.encoder_ln_pre(x)

  def ln_recursive(self, x: jax.Array) -> jax.Array:
    return self.encoder_ln_recursive(x)

  def encode(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    """One pass of the encoder transformer over the whole sequence (B, S, W)."""
    return self.encoder(x, key_mask, attn_bias=self._locality(x.shape[1])).astype(jnp.float32)

  def _locality(self, length: int) -> jax.Array | None:
    if self.config.latent_locality <= 0:
      return None
    return jnp.asarray(locality_bias(self.config)[:length, :length])

  def latent_head(
    self,
    latents: jax.Array,
    valid: jax.Array | None = None,
    noise_key: jax.Array | None = None,
  ) -> dict[str, jax.Array]:
    """`encoder_ln_post` -> (`pre_quantizer_mlp`) -> (quantizer): what the decoder receives.

    Args:
      latents: (B, L, W) encoder outputs at the latent positions (before ln_post).
      valid: optional bool (B, L) of real tokens (for the quantizer's loss means).
      noise_key: with `latent_noise_std` > 0 (continuous latents), the key of the channel noise.

    Returns:
      dict with `factorized_latent` (B, L, D) (the quantizer input; equals ln_post output when
      not factorized), `decoder_input` (B, L, D), and, if quantized, `quant_indices` and the
      quantizer loss terms.
    """
    c = self.config
    h = self.encoder_ln_post(latents)
    f = self.pre_quantizer_mlp(h).astype(jnp.float32) if c.factorize_latent else h
    out = {"factorized_latent": f}
    if c.quantize_latent:
      z_st, aux = self.quantize(f, valid)
      out.update(
        decoder_input=z_st,
        quant_indices=aux["indices"],
        commitment_loss=aux["commitment_loss"],
        codebook_loss=aux["codebook_loss"],
        quantizer_loss=aux["quantizer_loss"],
      )
    else:
      if c.latent_noise_std > 0:
        f = l2_normalize(f)
        if noise_key is not None:
          f = f + c.latent_noise_std * jax.random.normal(noise_key, f.shape, f.dtype)
      out["decoder_input"] = f
    return out

  def decoder_queries(self) -> jax.Array:
    """(257, D) `[decoder_class_embedding, 256 x decoder_mask_token] + positional embedding`."""
    c = self.config
    d = self.decoder_mask_token.shape[-1]
    tok = jnp.broadcast_to(self.decoder_mask_token[0], (c.num_image_tokens, d))
    return (
      jnp.concatenate([self.decoder_class_embedding, tok], axis=0)
      + self.decoder_positional_embedding
    )

  def decode(
    self,
    decoder_input: jax.Array,
    latent_valid: jax.Array | None = None,
    return_weights: bool = False,
  ):
    """Decoder output for the 2D positions: (B, 256, n_embed) logits or (B, 256, E) codes."""
    bias = self._locality(self.config.num_image_tokens + 1 + decoder_input.shape[1])
    return self.decoder(
      decoder_input,
      self.decoder_queries(),
      latent_valid,
      return_weights=return_weights,
      attn_bias=bias,
    )

  def tokens_to_decoder_input(self, tokens: jax.Array) -> jax.Array:
    """Quantizer indices (B, L) int -> normalized codes; continuous (B, L, D) passes through."""
    if self.config.quantize_latent:
      return self.quantize.lookup(tokens)
    return tokens.astype(jnp.float32)

  def mask_image_tokens(self, x: jax.Array, drop: jax.Array) -> jax.Array:
    """Dynamic halting: masked image tokens become `pos[1+j] + encoder_mask_token` (quirk 4).

    Args:
      x: (B, S, W) encoder output (class token at 0, image tokens at 1..256).
      drop: (B, 256) bool, True where the image token is masked.
    """
    n = self.config.num_image_tokens
    masked = self.encoder_positional_embedding[1 : n + 1] + self.encoder_mask_token[0]
    img = jnp.where(drop[..., None], masked[None], x[:, 1 : n + 1])
    return jnp.concatenate([x[:, :1], img, x[:, n + 1 :]], axis=1)
