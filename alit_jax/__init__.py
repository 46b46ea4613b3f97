"""alit-jax: Adaptive Length Image Tokenizer (ALIT) in JAX/Flax.

`from alit_jax import Tokenizer` is the entry point; see `alit_jax.tokenizer`.
"""

from alit_jax.tokenizer import Encoding, Tokenizer

__all__ = ["Encoding", "Tokenizer"]
__version__ = "0.1.0"
