"""ml_collections training configs (`get_config(arg)` files for `python -m alit_jax.train`)."""
