"""`python -m alit_jax.tokenize_dataset`: see the package docstring."""

import sys

from alit_jax.tokenize_dataset.cli import main

if __name__ == "__main__":
  sys.exit(main())
