"""Parameter initialisation for a full tokenizer (ALIT + base), and the dummy inputs `init` traces.

`dummy_images` / `dummy_inputs` are the one place that says which inputs a tokenizer's modules
are initialised on (real and abstract initialisation, training states, discriminators).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from alit_jax.models.alit import ALIT
from alit_jax.models.base_tokenizers import build_base
from alit_jax.models.configs import ALITConfig, ModelConfig


def dummy_images(size: int, batch: int = 1, channels: int = 3) -> jax.Array:
  """Zero images (batch, size, size, channels), float32, to initialise a module on.

  A base tokenizer's or a discriminator's parameter shapes depend on these shapes only.
  """
  return jnp.zeros((batch, size, size, channels), jnp.float32)


def dummy_inputs(config: ALITConfig) -> tuple[jax.Array, jax.Array]:
  """`ALIT.init`'s inputs for `config`, float32 zeros.

  Returns:
    images (1, S, S, 3) at the model's image size S, and base features (1, g, g, E) on its grid
    g with the base tokenizer's embedding width E.
  """
  g = config.grid_size
  return dummy_images(config.image_size), jnp.zeros((1, g, g, config.base_embed_dim), jnp.float32)


def init_variables(config: ModelConfig, rng: jax.Array) -> dict[str, Any]:
  """`{"alit": ..., "base": ...}` variables for `config`, float32.

  ALIT parameters follow the reference's rules, one per parameter in `models/init_rules.py`
  (embeddings `width ** -0.5 * randn`, Linear/Conv normal(0.02), xavier in_proj, uniform
  codebook); the base tokenizer keeps Flax's defaults (it is always loaded or trained apart).
  """
  images, feats = dummy_inputs(config.alit)
  k1, k2 = jax.random.split(rng)
  alit = jax.jit(ALIT(config.alit).init)(k1, images, feats)
  base = jax.jit(build_base(config.base).init)(k2, images)
  return {"alit": alit, "base": base}
