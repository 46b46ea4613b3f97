"""alit-jax: Adaptive Length Image Tokenizer (ALIT) in JAX/Flax."""
