"""Parameter initialisation for a full tokenizer (ALIT + base)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from alit_jax.models.alit import ALIT
from alit_jax.models.base_tokenizers import build_base
from alit_jax.models.configs import ModelConfig


def init_variables(config: ModelConfig, rng: jax.Array) -> dict[str, Any]:
  """`{"alit": ..., "base": ...}` variables for `config`, float32.

  ALIT parameters follow the reference's rules, one per parameter in `models/init_rules.py`
  (embeddings `width ** -0.5 * randn`, Linear/Conv normal(0.02), xavier in_proj, uniform
  codebook); the base tokenizer keeps Flax's defaults (it is always loaded or trained apart).
  """
  s = config.alit.image_size
  g = config.alit.grid_size
  images = jnp.zeros((1, s, s, 3), jnp.float32)
  feats = jnp.zeros((1, g, g, config.alit.base_embed_dim), jnp.float32)
  k1, k2 = jax.random.split(rng)
  alit = jax.jit(ALIT(config.alit).init)(k1, images, feats)
  base = jax.jit(build_base(config.base).init)(k2, images)
  return {"alit": alit, "base": base}
