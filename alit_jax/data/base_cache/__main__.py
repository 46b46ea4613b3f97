"""`python -m alit_jax.data.base_cache`: see the package docstring."""

from absl import app

from alit_jax.data.base_cache import cli

if __name__ == "__main__":
  cli.define_flags()
  app.run(cli.main)
