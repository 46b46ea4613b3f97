"""A freshly drawn ALIT follows the reference's initialisation rule for every parameter.

If this fails, training from scratch starts from a different point than the official code does
(for example Flax's lecun_normal `patch_embed`, std 0.144 at patch 4 against the reference's
0.02, lets the pixel half of each image token swamp the base features before l2 normalisation).
"""

import math

import jax
import numpy as np
import pytest

from alit_jax.models import init_rules
from alit_jax.models.alit import ALIT
from alit_jax.models.configs import ALITConfig
from alit_jax.train import steps

CONFIG = ALITConfig(
  base_embed_dim=32,
  base_codebook_size=64,
  encoder_width=128,
  encoder_layers=2,
  encoder_heads=4,
  decoder_width=96,
  decoder_layers=1,
  decoder_heads=4,
  codebook_size=64,
  token_dim=12,
  image_size=64,
  patch_size=4,
  max_rollout_iters=3,
)


@pytest.fixture(scope="module")
def drawn():
  params = steps.init_params(ALIT(CONFIG), jax.random.key(3))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(k.key for k in path): np.asarray(v, np.float64) for path, v in flat}


def test_every_parameter_has_a_rule(drawn):
  """A parameter added without a rule here would silently keep a Flax default."""
  for path, v in drawn.items():
    init_rules.rule_for(path, CONFIG, v.shape)  # raises KeyError when missing


def test_init_matches_reference_rules(drawn):
  """Mean and std of each parameter within 5 standard errors of its rule's."""
  bad = []
  for path, v in drawn.items():
    rule = init_rules.rule_for(path, CONFIG, v.shape)
    if rule.kind in ("ones", "zeros"):
      if not np.all(v == rule.mean):
        bad.append(f"{path}: expected all {rule.mean}")
      continue
    n = v.size
    se_mean = rule.std / math.sqrt(n)
    se_std = rule.std / math.sqrt(2 * n)
    if abs(v.mean() - rule.mean) > 5 * se_mean or abs(v.std() - rule.std) > 5 * se_std + 1e-7:
      bad.append(
        f"{path}: mean {v.mean():.4g} std {v.std():.4g}, rule {rule.source} std {rule.std:.4g}"
      )
    if rule.kind == "uniform" and np.abs(v).max() > rule.scale:
      bad.append(f"{path}: |value| {np.abs(v).max():.4g} beyond the uniform bound {rule.scale:.4g}")
  assert not bad, "\n".join(bad)


def test_patch_embed_is_not_lecun(drawn):
  """The one rule that differed (issue 15): `patch_embed` is normal(0.02), not 1/sqrt(fan_in)."""
  k = drawn["patch_embed/kernel"]
  lecun = 1.0 / math.sqrt(CONFIG.patch_size**2 * 3)  # 0.144
  assert abs(k.std() - 0.02) < 0.002 and k.std() < lecun / 5


def test_unknown_parameter_is_refused():
  with pytest.raises(KeyError, match="no reference initialisation rule"):
    init_rules.rule_for("new_embedding", CONFIG, (4, 4))
