"""Checkpoint conversion: torch-free readers, PyTorch-name <-> Flax-tree mapping, config inference.

Command line: `python -m alit_jax.convert CKPT --out DIR [--num-heads N]`.
"""
