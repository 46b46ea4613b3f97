"""Architecture descriptions of the base tokenizers and of ALIT.

These are plain frozen dataclasses: they are what `convert` infers from a checkpoint, what is
written next to an Orbax checkpoint as JSON, and what the Flax modules are built from (the modules
take the fields they need explicitly). Named presets mirror the reference factories
(`adaptive_tokenizers/__init__.py`), including its quirk that `alit_small` has the semi-large width
(reference README quirk 14).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Literal

BaseKind = Literal["vqgan", "vae"]


@dataclasses.dataclass(frozen=True)
class VQGANConfig:
  """MaskGIT-style VQGAN under taming names (reference quirk 11).

  The released one is ``ch=128, ch_mult=(1, 1, 2, 2, 4), z_channels=embed_dim=256, n_embed=1024``.
  """

  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  z_channels: int = 256
  embed_dim: int = 256
  n_embed: int = 1024
  in_channels: int = 3
  out_ch: int = 3
  resolution: int = 256
  # GroupNorm groups (the reference: 32, i.e. one channel per group at ch 32). The demo VQGAN
  # uses 8: a probe trained on flat colours reached L1 0.15 with 8 groups vs 0.19 with 32.
  norm_groups: int = 32
  # Feed the encoder 2x - 1 instead of x in [0, 1] (the reference: x). Measured on a probe trained
  # on flat colours only (60 Adam steps, no quantizer): L1 0.25 with x, 0.15 with 2x - 1.
  signed_input: bool = False

  @property
  def kind(self) -> str:
    return "vqgan"

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """LDM KL autoencoder as used by MAR (reference quirk 12); KL-16 has ``embed_dim=16``."""

  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  embed_dim: int = 16
  encoder_attn_resolutions: tuple[int, ...] = (16,)
  decoder_attn_resolutions: tuple[int, ...] = ()
  in_channels: int = 3
  out_ch: int = 3
  resolution: int = 256
  scale_factor: float = 0.2325

  @property
  def kind(self) -> str:
    return "vae"

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)


@dataclasses.dataclass(frozen=True)
class ALITConfig:
  """The latent-distillation encoder/decoder (``AdaptiveLengthImageTokenizer`` minus the base)."""

  base: BaseKind = "vqgan"
  base_embed_dim: int = 256  # E: channels of the base tokenizer's 2D tokens
  base_codebook_size: int = 1024  # VQGAN codes (decoder logits); unused for the VAE
  encoder_width: int = 1024
  encoder_layers: int = 8
  encoder_heads: int = 8
  decoder_width: int = 1024
  decoder_layers: int = 8
  decoder_heads: int = 8
  mlp_ratio: float = 4.0
  quantize_latent: bool = True
  factorize_latent: bool = True
  codebook_size: int = 4096
  token_dim: int = 12
  commitment_cost: float = 0.25
  use_l2_norm: bool = True
  num_latent_tokens: int = 32
  image_size: int = 256
  patch_size: int = 16
  max_rollout_iters: int = 8
  halting_threshold: float = 0.55
  # Not in the reference (0 = off, the reference). Continuous latents only: the decoder reads the
  # l2-normalised latent plus N(0, std^2) noise in training, a channel of known capacity
  # (`latent_capacity_bits`); without a noise key (inference) it reads the normalised latent.
  # For the known-answer test of the recurrence (`analysis/known_answer.py`).
  latent_noise_std: float = 0.0
  # Not in the reference (0 = off). Latent slot j of every iteration is given a region of the
  # grid (one of `num_latent_tokens` tiles): attention between that slot and grid position p, in
  # the encoder (image tokens) and the decoder (mask tokens), gets the additive bias
  # -d(p, centre_j)^2 / (2 latent_locality^2), d in grid cells (`alit.locality_bias`). A prior
  # against slots that all read the same global average; no parameters, so checkpoints convert
  # the same.
  latent_locality: float = 0.0

  def __post_init__(self):
    if self.latent_locality < 0:
      raise ValueError(f"latent_locality={self.latent_locality}: must be >= 0 (0: off)")
    if self.latent_noise_std < 0 or (self.latent_noise_std > 0 and self.quantize_latent):
      raise ValueError(
        f"latent_noise_std={self.latent_noise_std}: must be >= 0, and > 0 only with continuous "
        "latents (quantize_latent=False)"
      )
    if self.quantize_latent and not self.factorize_latent:
      # The reference forces factorize_latent=True when quantizing (quirk 8).
      object.__setattr__(self, "factorize_latent", True)
    if self.encoder_width % self.encoder_heads or self.decoder_width % self.decoder_heads:
      raise ValueError(
        f"width must be divisible by heads: encoder {self.encoder_width}/{self.encoder_heads}, "
        f"decoder {self.decoder_width}/{self.decoder_heads}"
      )
    if self.image_size % self.patch_size:
      raise ValueError(
        f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
      )
    if self.encoder_width <= self.base_embed_dim:
      raise ValueError(
        f"encoder_width {self.encoder_width} must exceed the base embed dim {self.base_embed_dim} "
        "(patch_embed has encoder_width - E channels)"
      )

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_image_tokens(self) -> int:
    return self.grid_size**2

  @property
  def max_latent_tokens(self) -> int:
    return self.num_latent_tokens * self.max_rollout_iters

  @property
  def decoder_output_dim(self) -> int:
    return self.base_codebook_size if self.base == "vqgan" else self.base_embed_dim

  @property
  def latent_capacity_bits(self) -> float:
    """Upper bound on the bits one latent token carries through the noisy channel (inf if none).

    Shannon's capacity of D parallel Gaussian channels under the unit-norm power constraint that
    the l2 normalisation sets: `D / 2 * log2(1 + 1 / (D * std^2))`.
    """
    if self.latent_noise_std == 0:
      return math.inf
    d = self.latent_dim
    return d / 2 * math.log2(1 + 1 / (d * self.latent_noise_std**2))

  @property
  def latent_dim(self) -> int:
    """Dimension of the tokens handed to the decoder (and returned as continuous tokens)."""
    return self.token_dim if self.factorize_latent else self.encoder_width


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A full tokenizer: base tokenizer + ALIT."""

  alit: ALITConfig
  base: VQGANConfig | VAEConfig
  name: str = "custom"

  def to_json(self) -> str:
    return json.dumps(
      {
        "name": self.name,
        "alit": dataclasses.asdict(self.alit),
        "base": dataclasses.asdict(self.base),
      },
      indent=2,
      sort_keys=True,
    )

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    alit = dict(d["alit"])
    base = dict(d["base"])
    for k, v in base.items():
      if isinstance(v, list):
        base[k] = tuple(v)
    base_cls = VQGANConfig if alit.get("base", "vqgan") == "vqgan" else VAEConfig
    return cls(alit=ALITConfig(**alit), base=base_cls(**base), name=d.get("name", "custom"))

  @classmethod
  def from_json(cls, s: str) -> ModelConfig:
    return cls.from_dict(json.loads(s))


# Reference factories: (width, layers, heads). alit_small uses the semi-large width (quirk 14).
NAMED_ALIT = {
  "alit_tiny": (512, 8, 8),
  "alit_small": (1024, 8, 8),
  "alit_base": (768, 12, 12),
  "alit_semilarge": (1024, 16, 16),
}
# Head counts by (width, layers), used when converting a checkpoint without --num-heads.
DEFAULT_HEADS = {(w, n): h for (w, n, h) in NAMED_ALIT.values()}
HALTING_THRESHOLD = {"vqgan": 0.55, "vae": 0.025}


def named_config(
  name: str = "alit_small",
  base: BaseKind = "vqgan",
  *,
  quantize_latent: bool = True,
  factorize_latent: bool = True,
) -> ModelConfig:
  """The reference's full-size configurations (`alit_{tiny,small,base,semilarge}` x vqgan/vae)."""
  if name not in NAMED_ALIT:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(NAMED_ALIT)}")
  width, layers, heads = NAMED_ALIT[name]
  base_cfg = VQGANConfig() if base == "vqgan" else VAEConfig()
  alit = ALITConfig(
    base=base,
    base_embed_dim=base_cfg.embed_dim,
    base_codebook_size=base_cfg.n_embed if base == "vqgan" else 0,
    encoder_width=width,
    encoder_layers=layers,
    encoder_heads=heads,
    decoder_width=width,
    decoder_layers=layers,
    decoder_heads=heads,
    quantize_latent=quantize_latent,
    factorize_latent=factorize_latent,
    halting_threshold=HALTING_THRESHOLD[base],
  )
  return ModelConfig(alit=alit, base=base_cfg, name=f"{name}_{base}")


def tiny_config(
  base: BaseKind = "vqgan",
  *,
  image_size: int = 64,
  width: int = 64,
  layers: int = 1,
  heads: int = 2,
  tokens: int = 4,
  iterations: int = 3,
  quantize_latent: bool = True,
  factorize_latent: bool = True,
  codebook_size: int = 32,
  token_dim: int = 8,
  patch_size: int = 16,
) -> ModelConfig:
  """A very small model for tests and `runlocal` configs (seconds to compile on CPU).

  The base tokenizer keeps the real 16x downsampling (5 levels) at 32 channels, so the 2D grid is
  `image_size / 16` per side and ALIT's patch size stays 16. With another `patch_size` the base
  here does not fit; the trainer then takes the base from `config.base_checkpoint` (e.g. a small
  VQGAN trained with `configs/vqgan_train.py`, whose downsampling must equal the patch size).
  """
  if base == "vqgan":
    base_cfg: VQGANConfig | VAEConfig = VQGANConfig(
      ch=32,
      ch_mult=(1, 1, 1, 1, 2),
      num_res_blocks=1,
      z_channels=16,
      embed_dim=16,
      n_embed=64,
      resolution=image_size,
    )
  else:
    base_cfg = VAEConfig(
      ch=32,
      ch_mult=(1, 1, 1, 1, 2),
      num_res_blocks=1,
      embed_dim=8,
      encoder_attn_resolutions=(image_size // 16,),
      resolution=image_size,
    )
  alit = ALITConfig(
    base=base,
    base_embed_dim=base_cfg.embed_dim,
    base_codebook_size=base_cfg.n_embed if base == "vqgan" else 0,
    encoder_width=width,
    encoder_layers=layers,
    encoder_heads=heads,
    decoder_width=width,
    decoder_layers=layers,
    decoder_heads=heads,
    quantize_latent=quantize_latent,
    factorize_latent=factorize_latent,
    codebook_size=codebook_size,
    token_dim=token_dim,
    num_latent_tokens=tokens,
    image_size=image_size,
    patch_size=patch_size,
    max_rollout_iters=iterations,
    halting_threshold=HALTING_THRESHOLD[base],
  )
  return ModelConfig(alit=alit, base=base_cfg, name=f"tiny_{base}")
