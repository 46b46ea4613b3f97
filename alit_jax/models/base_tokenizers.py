"""The frozen 2D base tokenizers: the MaskGIT-style VQGAN and the LDM KL-VAE.

Both are the taming / LDM convolutional autoencoders, with parameter names mirroring the
reference state dicts (`base_tokenizer.vqgan.*`, `base_tokenizer.vae.*`). Layout is NHWC.

Differences between the two (reference README quirks 11 and 12), all selected by `kind`:

| | VQGAN (`vqgan`) | KL-VAE (`vae`) |
|---|---|---|
| ResnetBlock conv bias | no | yes |
| `nin_shortcut` when channels change | 1x1 on **h** (out->out), no residual x | 1x1 on x (in->out) |
| encoder downsampling | avg-pool 2 | zero-pad (0,1,0,1) + 3x3 stride-2 conv |
| attention | none | encoder at `encoder_attn_resolutions`, `mid.attn_1` |
| decoder blocks per level | `num_res_blocks` | `num_res_blocks + 1` |
| encoder `conv_out` | 1x1 -> z_channels | 3x3 -> 2E, then `quant_conv` 1x1 |
| decoder input | z | `post_quant_conv` 1x1 first |
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from alit_jax.models.configs import VAEConfig, VQGANConfig

Dtype = Any


def swish(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(x)


def group_norm(name: str, groups: int = 32) -> nn.GroupNorm:
  """`GroupNorm(groups, eps=1e-6)` with float32 two-pass statistics (the reference: 32)."""
  return nn.GroupNorm(
    num_groups=groups, epsilon=1e-6, dtype=jnp.float32, use_fast_variance=False, name=name
  )


def conv(
  features: int,
  kernel: int,
  name: str,
  *,
  bias: bool = True,
  dtype: Dtype = jnp.float32,
  stride: int = 1,
  pad: Any = "same",
):
  """A PyTorch-style Conv2d (symmetric padding k//2 unless `pad` is given)."""
  if pad == "same":
    pad = ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=pad,
    use_bias=bias,
    dtype=dtype,
    name=name,
  )


class ResnetBlock(nn.Module):
  in_channels: int
  out_channels: int
  kind: str  # "vqgan" | "vae"
  dtype: Dtype = jnp.float32
  groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    bias = self.kind == "vae"
    h = swish(group_norm("norm1", self.groups)(x))
    h = conv(self.out_channels, 3, "conv1", bias=bias, dtype=self.dtype)(h)
    h = swish(group_norm("norm2", self.groups)(h))
    h = conv(self.out_channels, 3, "conv2", bias=bias, dtype=self.dtype)(h).astype(jnp.float32)
    if self.in_channels != self.out_channels:
      if self.kind == "vqgan":
        # MaskGIT port: the shortcut is computed from the residual branch h, and x is dropped.
        x = conv(self.out_channels, 1, "nin_shortcut", bias=False, dtype=self.dtype)(h)
      else:
        x = conv(self.out_channels, 1, "nin_shortcut", bias=True, dtype=self.dtype)(x)
    return x.astype(jnp.float32) + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention of the LDM autoencoder (1x1 conv q/k/v/proj_out)."""

  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    h = group_norm("norm")(x)
    q = conv(c, 1, "q", dtype=self.dtype)(h).reshape(b, hh * ww, c)
    k = conv(c, 1, "k", dtype=self.dtype)(h).reshape(b, hh * ww, c)
    v = conv(c, 1, "v", dtype=self.dtype)(h).reshape(b, hh * ww, c)
    logits = jnp.einsum("bic,bjc->bij", q, k).astype(jnp.float32) * (c**-0.5)
    w = jax.nn.softmax(logits, axis=-1)
    h = jnp.einsum("bij,bjc->bic", w.astype(v.dtype), v).reshape(b, hh, ww, c)
    return x + conv(c, 1, "proj_out", dtype=self.dtype)(h).astype(jnp.float32)


class Downsample(nn.Module):
  channels: int
  with_conv: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.with_conv:
      # PyTorch pads (0, 1, 0, 1) by hand, then a valid 3x3 stride-2 conv.
      return conv(self.channels, 3, "conv", stride=2, pad=((0, 1), (0, 1)), dtype=self.dtype)(
        x
      ).astype(jnp.float32)
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class Upsample(nn.Module):
  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2
    return conv(self.channels, 3, "conv", dtype=self.dtype)(x).astype(jnp.float32)


class Level(nn.Module):
  """One resolution level (`down.<i>` / `up.<i>`): blocks, optional attention, resampling."""

  in_channels: int
  out_channels: int
  num_blocks: int
  attn: bool
  resample: str | None  # None | "down_pool" | "down_conv" | "up"
  kind: str
  dtype: Dtype = jnp.float32
  groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ch = self.in_channels
    for j in range(self.num_blocks):
      x = ResnetBlock(ch, self.out_channels, self.kind, self.dtype, self.groups, name=f"block_{j}")(
        x
      )
      ch = self.out_channels
      if self.attn:
        x = AttnBlock(ch, self.dtype, name=f"attn_{j}")(x)
    if self.resample in ("down_pool", "down_conv"):
      x = Downsample(ch, self.resample == "down_conv", self.dtype, name="downsample")(x)
    elif self.resample == "up":
      x = Upsample(ch, self.dtype, name="upsample")(x)
    return x


class Mid(nn.Module):
  channels: int
  kind: str
  dtype: Dtype = jnp.float32
  groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, g = self.channels, self.groups
    x = ResnetBlock(c, c, self.kind, self.dtype, g, name="block_1")(x)
    if self.kind == "vae":
      x = AttnBlock(self.channels, self.dtype, name="attn_1")(x)
    return ResnetBlock(c, c, self.kind, self.dtype, g, name="block_2")(x)


class Encoder(nn.Module):
  """(B, H, W, 3) -> (B, H/f, W/f, out_channels)."""

  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  out_channels: int
  kind: str
  resolution: int = 256
  attn_resolutions: tuple[int, ...] = ()
  dtype: Dtype = jnp.float32
  groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    vae = self.kind == "vae"
    h = conv(self.ch, 3, "conv_in", bias=vae, dtype=self.dtype)(x).astype(jnp.float32)
    in_mult = (1,) + tuple(self.ch_mult)
    res = self.resolution
    n = len(self.ch_mult)
    for i in range(n):
      last = i == n - 1
      h = Level(
        self.ch * in_mult[i],
        self.ch * self.ch_mult[i],
        self.num_res_blocks,
        attn=vae and res in self.attn_resolutions,
        resample=None if last else ("down_conv" if vae else "down_pool"),
        kind=self.kind,
        dtype=self.dtype,
        groups=self.groups,
        name=f"down_{i}",
      )(h)
      if not last:
        res //= 2
    block_in = self.ch * self.ch_mult[-1]
    h = Mid(block_in, self.kind, self.dtype, self.groups, name="mid")(h)
    h = swish(group_norm("norm_out", self.groups)(h))
    k = 3 if vae else 1
    return conv(self.out_channels, k, "conv_out", dtype=self.dtype)(h).astype(jnp.float32)


class Decoder(nn.Module):
  """(B, h, w, z_channels) -> (B, h*f, w*f, 3)."""

  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  out_ch: int
  kind: str
  resolution: int = 256
  attn_resolutions: tuple[int, ...] = ()
  dtype: Dtype = jnp.float32
  groups: int = 32

  @nn.compact
  def __call__(self, z: jax.Array, features_only: bool = False) -> jax.Array:
    """Decodes; with `features_only`, stops before `conv_out` (see `decoder_conv_out`)."""
    vae = self.kind == "vae"
    n = len(self.ch_mult)
    block_in = self.ch * self.ch_mult[-1]
    res = self.resolution // 2 ** (n - 1)
    h = conv(block_in, 3, "conv_in", dtype=self.dtype)(z).astype(jnp.float32)
    h = Mid(block_in, self.kind, self.dtype, self.groups, name="mid")(h)
    nblocks = self.num_res_blocks + 1 if vae else self.num_res_blocks
    for i in reversed(range(n)):
      out = self.ch * self.ch_mult[i]
      h = Level(
        block_in,
        out,
        nblocks,
        attn=vae and res in self.attn_resolutions,
        resample="up" if i != 0 else None,
        kind=self.kind,
        dtype=self.dtype,
        groups=self.groups,
        name=f"up_{i}",
      )(h)
      block_in = out
      if i != 0:
        res *= 2
    h = swish(group_norm("norm_out", self.groups)(h))
    if features_only:
      return h
    return conv(self.out_ch, 3, "conv_out", dtype=self.dtype)(h).astype(jnp.float32)


def decoder_conv_out(conv_out_params: Any, features: jax.Array, dtype: Dtype = jnp.float32):
  """The decoder's last layer (`decoder.conv_out`, 3x3) applied to `features_only` features.

  `decode(z) == decoder_conv_out(params["decoder"]["conv_out"], decode(z, features_only=True))`
  exactly: stage-2 training splits the decoder here to take the gradients of its losses with
  respect to this layer's kernel (the adaptive GAN weight) without a second backward pass.

  Args:
    conv_out_params: `{"kernel": (3, 3, C, out_ch), "bias": (out_ch,)}`.
    features: (B, H, W, C) float32.
    dtype: compute dtype (as the decoder's).

  Returns:
    (B, H, W, out_ch) float32.
  """
  out_ch = conv_out_params["kernel"].shape[-1]
  layer = conv(out_ch, 3, "conv_out", dtype=dtype)
  return layer.apply({"params": conv_out_params}, features).astype(jnp.float32)


class Codebook(nn.Module):
  """`quantize.embedding.weight` holder (taming VectorQuantizer2 without remap)."""

  n_embed: int
  embed_dim: int

  def setup(self):
    init = nn.initializers.uniform(scale=2.0 / self.n_embed)
    self.embedding = nn.Embed(
      self.n_embed,
      self.embed_dim,
      embedding_init=lambda k, s, d: init(k, s, d) - 1.0 / self.n_embed,
    )

  def __call__(self) -> jax.Array:
    return self.embedding.embedding


def nearest_code(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """argmin_k |z - e_k|^2 computed as |z|^2 + |e|^2 - 2 z.e (the reference formula), float32.

  Args:
    z: (..., E) features.
    codebook: (K, E).

  Returns:
    (...) int32 indices.
  """
  z = z.astype(jnp.float32)
  codebook = codebook.astype(jnp.float32)
  d = (
    jnp.sum(z * z, axis=-1, keepdims=True)
    + jnp.sum(codebook * codebook, axis=-1)
    - 2.0 * jnp.einsum("...d,kd->...k", z, codebook, precision=jax.lax.Precision.HIGHEST)
  )
  return jnp.argmin(d, axis=-1).astype(jnp.int32)


class VQGAN(nn.Module):
  """VQGAN base tokenizer: `encoder`, `decoder`, `quantize` (no quant_conv, quirk 11)."""

  config: VQGANConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    self.encoder = Encoder(
      c.ch,
      tuple(c.ch_mult),
      c.num_res_blocks,
      c.z_channels,
      "vqgan",
      c.resolution,
      dtype=self.dtype,
      groups=c.norm_groups,
    )
    self.decoder = Decoder(
      c.ch,
      tuple(c.ch_mult),
      c.num_res_blocks,
      c.out_ch,
      "vqgan",
      c.resolution,
      dtype=self.dtype,
      groups=c.norm_groups,
    )
    self.quantize = Codebook(c.n_embed, c.embed_dim)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Encode + decode through the codebook (used for initialisation and sanity checks)."""
    _, idx = self.encode(images)
    return self.decode_indices(idx)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Continuous pre-quantization features and their nearest codes.

    Args:
      images: (B, H, W, 3) float32 in [0, 1] (the reference feeds [0, 1] directly).

    Returns:
      features (B, h, w, E) and indices (B, h*w) int32, token t = row * w + col.
    """
    feats = self.features(images)
    b, h, w, e = feats.shape
    idx = nearest_code(feats, self.codebook()).reshape(b, h * w)
    return feats, idx

  def features(self, images: jax.Array) -> jax.Array:
    """(B, H, W, 3) in [0, 1] -> (B, h, w, E) pre-quantization features (the encoder's input is
    2x - 1 with `config.signed_input`, else x as the reference)."""
    if self.config.signed_input:
      images = images * 2.0 - 1.0
    return self.encoder(images)

  def codebook(self) -> jax.Array:
    """(n_embed, E) codebook."""
    return self.quantize()

  def decode(self, z: jax.Array, features_only: bool = False) -> jax.Array:
    """(B, h, w, E) codes -> (B, H, W, 3) images (unclipped, as the reference).

    With `features_only`, the (B, H, W, ch * ch_mult[0]) input of `decoder.conv_out`.
    """
    return self.decoder(z, features_only)

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    """(B, h*w) code indices -> images."""
    b, n = indices.shape
    g = int(round(n**0.5))
    return self.decode(self.codebook()[indices].reshape(b, g, g, -1))


class VAE(nn.Module):
  """LDM KL autoencoder (`AutoencoderKL` of MAR): `encoder`, `quant_conv`, `post_quant_conv`, `decoder`."""

  config: VAEConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    self.encoder = Encoder(
      c.ch,
      tuple(c.ch_mult),
      c.num_res_blocks,
      2 * c.embed_dim,
      "vae",
      c.resolution,
      tuple(c.encoder_attn_resolutions),
      dtype=self.dtype,
    )
    self.decoder = Decoder(
      c.ch,
      tuple(c.ch_mult),
      c.num_res_blocks,
      c.out_ch,
      "vae",
      c.resolution,
      tuple(c.decoder_attn_resolutions),
      dtype=self.dtype,
    )
    self.quant_conv = conv(2 * c.embed_dim, 1, "quant_conv", dtype=self.dtype)
    self.post_quant_conv = conv(c.embed_dim, 1, "post_quant_conv", dtype=self.dtype)

  def __call__(self, images: jax.Array) -> jax.Array:
    mean, _ = self.encode_moments(images)
    return self.decode(mean)

  def encode_moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior mean and log-variance (B, h, w, E) each; logvar clamped to [-30, 20]."""
    moments = self.quant_conv(self.encoder(images)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def encode(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Scaled latent tokens: posterior mode (rng None) or a sample, times `scale_factor`.

    The reference samples (`posterior.sample() * 0.2325`); the reference vectors and this
    package's default use the mode, which makes tokenization deterministic.

    Returns:
      (B, h, w, E) float32.
    """
    mean, logvar = self.encode_moments(images)
    z = mean
    if rng is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return z * self.config.scale_factor

  def decode(self, z: jax.Array, features_only: bool = False) -> jax.Array:
    """(B, h, w, E) latents -> (B, H, W, 3). ALIT passes the scaled code unscaled (quirk 12).

    With `features_only`, the input of `decoder.conv_out`.
    """
    return self.decoder(self.post_quant_conv(z).astype(jnp.float32), features_only)


def build_base(config: VQGANConfig | VAEConfig, dtype: Dtype = jnp.float32) -> VQGAN | VAE:
  return VQGAN(config, dtype) if isinstance(config, VQGANConfig) else VAE(config, dtype)
