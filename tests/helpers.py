"""Helpers shared by the tests (imported as `helpers`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import jax
import numpy as np

from alit_jax.tokenizer import Tokenizer

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def load_experiment(name):
  """Imports experiments/<name>.py as a module (the scripts import their sibling _common)."""
  if str(EXPERIMENTS) not in sys.path:
    sys.path.insert(0, str(EXPERIMENTS))
  spec = importlib.util.spec_from_file_location(f"exp_{name}", EXPERIMENTS / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def fast_random_tokenizer(config, seed=0):
  """A tokenizer with random weights drawn by numpy on the abstract shapes: no init compile
  (`Tokenizer.random` compiles the whole init, ~10-40 s on this CPU). LayerNorm/GroupNorm scales
  1, biases 0, kernels N(0, 1/fan_in), embeddings N(0, 1/dim)."""
  from alit_jax.convert.alit_checkpoint import abstract_variables

  rng = np.random.default_rng(seed)

  def make(path, s):
    name = path[-1].key
    if name == "scale":
      return np.ones(s.shape, np.float32)
    if name == "bias":
      return np.zeros(s.shape, np.float32)
    fan_in = int(np.prod(s.shape[:-1])) if name == "kernel" else s.shape[-1]
    return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)

  return Tokenizer(config, jax.tree_util.tree_map_with_path(make, abstract_variables(config)))
