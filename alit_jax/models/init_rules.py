"""The reference's initialisation rule for every ALIT parameter, in one place.

The official model (`adaptive_vqgan.py` / `adaptive_vae.py`) initialises in three steps, and
this table follows each:

1. `nn.Parameter(scale * torch.randn(...))` with `scale = encoder_width ** -0.5` for every raw
   embedding of the ALIT (positional, class, mask, latent, timestep), including the decoder-side
   ones; the decoder's own `latent_token_positional_embedding` uses `decoder_width ** -0.5`.
2. `self.apply(_init_weights)`: every `nn.Linear` / `nn.Conv2d` weight (the transformer MLPs,
   attention `out_proj`, `pre_quantizer_mlp`, `decoder_embed`, the decoder `ffn`, and
   `patch_embed`) becomes `trunc_normal_(std=0.02)` with zero bias; its cut is at +-2 absolute,
   i.e. 100 standard deviations, so it is a plain normal(0.02). LayerNorms become ones/zeros.
   `nn.MultiheadAttention`'s fused `in_proj_weight` is a raw Parameter, not a Linear, so it keeps
   PyTorch's `xavier_uniform_` (zero bias).
3. The latent quantizer is built after step 2, so its codebook keeps `uniform_(-1/K, 1/K)`.

`rule_for(path, config)` names the rule of a Flax parameter path; the modules draw with the
initializers defined here, and `tests/test_models.py` checks a drawn model against the table.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal

import flax.linen as nn
import jax

from alit_jax.models.configs import ALITConfig

Kind = Literal["normal", "uniform", "ones", "zeros"]

# `_init_weights`: every Linear / Conv weight.
DENSE_INIT = nn.initializers.normal(0.02)
# `nn.MultiheadAttention._reset_parameters`: in_proj_weight (3W, W) -> Flax kernel (W, 3W); the
# fans are the same either way round.
IN_PROJ_INIT = nn.initializers.xavier_uniform()


def embedding_init(width: int) -> nn.initializers.Initializer:
  """`width ** -0.5 * randn` (the reference's raw `nn.Parameter` embeddings)."""
  return nn.initializers.normal(width**-0.5)


def codebook_init(codebook_size: int) -> nn.initializers.Initializer:
  """`uniform_(-1/K, 1/K)` of the latent quantizer's codebook."""

  def init(key, shape, dtype=jax.numpy.float32):
    k = 1.0 / codebook_size
    return jax.random.uniform(key, shape, dtype, -k, k)

  return init


@dataclasses.dataclass(frozen=True)
class InitRule:
  """One parameter's distribution.

  Attributes:
    kind: `normal` (mean 0, std `scale`), `uniform` (on [-scale, scale]), `ones` or `zeros`.
    scale: the std of a normal, or the bound of a uniform.
    source: the reference's statement of the rule, for messages.
  """

  kind: Kind
  scale: float = 0.0
  source: str = ""

  @property
  def mean(self) -> float:
    return 1.0 if self.kind == "ones" else 0.0

  @property
  def std(self) -> float:
    if self.kind == "normal":
      return self.scale
    if self.kind == "uniform":
      return self.scale / math.sqrt(3.0)
    return 0.0


_ENCODER_WIDTH_EMBEDDINGS = (
  "encoder_positional_embedding",
  "encoder_class_embedding",
  "encoder_mask_token",
  "decoder_positional_embedding",
  "decoder_class_embedding",
  "decoder_mask_token",
  "latent_tokens",
  "latent_token_positional_embedding",
  "timestep_embedding",
)


def rule_for(path: str, config: ALITConfig, shape: tuple[int, ...]) -> InitRule:
  """The reference's rule for the ALIT parameter at `path` ("a/b/kernel").

  Raises:
    KeyError: for a path the table does not know (a new parameter must be added here).
  """
  parts = path.split("/")
  leaf = parts[-1]
  if path in _ENCODER_WIDTH_EMBEDDINGS:
    return InitRule("normal", config.encoder_width**-0.5, "encoder_width ** -0.5 * randn")
  if path == "decoder/latent_token_positional_embedding":
    return InitRule("normal", config.decoder_width**-0.5, "decoder_width ** -0.5 * randn")
  if path == "quantize/embedding/embedding":
    return InitRule("uniform", 1.0 / config.codebook_size, "uniform_(-1/K, 1/K)")
  if leaf == "bias":
    return InitRule("zeros", source="zero bias (Linear, Conv, LayerNorm, in_proj)")
  if leaf == "scale" and re.search(r"(^|_)ln(_|$)", parts[-2]):
    return InitRule("ones", source="LayerNorm weight 1")
  if leaf == "kernel" and parts[-2] == "in_proj":
    fan_in, fan_out = shape[0], shape[1]
    return InitRule("uniform", math.sqrt(6.0 / (fan_in + fan_out)), "xavier_uniform_")
  if leaf == "kernel":
    return InitRule("normal", 0.02, "_init_weights: trunc_normal_(std=0.02)")
  raise KeyError(f"no reference initialisation rule for ALIT parameter {path!r}")
