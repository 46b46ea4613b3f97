"""The known-answer base of `analysis/known_answer.py` and the latent-usage probe.

If these fail, `experiments/known_answer.py` measures against a wrong information bound, or its
code-usage numbers (the evidence that the quantizer collapses at init) mean something else.
"""

import math

import jax
import numpy as np
import pytest

from alit_jax.analysis import known_answer as ka
from alit_jax.models.alit import ALIT
from alit_jax.train import steps


def test_problem_carries_exactly_its_bits():
  """Each block of the code map is one bit, constant inside the block; features = code + noise."""
  p = ka.Problem(bits=16, noise=0.0)
  cb = p.codebook(0)
  out = p.batch(np.random.default_rng(0), cb, 64)
  gt = out["gt_indices"].reshape(64, 4, 4, 4, 4)  # (n, block row, row, block col, col)
  assert np.all(gt == gt[:, :, :1, :, :1])
  assert 0.4 < gt.mean() < 0.6
  np.testing.assert_array_equal(out["base_features"].reshape(64, 256, -1), cb[out["gt_indices"]])
  with pytest.raises(ValueError, match="square"):
    ka.Problem(bits=8).batch(np.random.default_rng(0), cb, 1)


def test_information_bound():
  assert ka.nll_bound(16, 8) == pytest.approx(math.log(2) / 2)  # 0.347
  assert ka.nll_bound(16, 16) == 0.0 and ka.nll_bound(16, 32) == 0.0


def test_latent_collapses_at_init():
  """At the reference's init every image picks the same code in every slot (measured: spread of
  the unit pre-quantizer vectors 0.012-0.014 across images, against ~1.4 between two codes);
  with the commitment loss on, training keeps it there (README in experiments/)."""
  p = ka.Problem()
  model = ALIT(ka.model_config(p))
  params = steps.init_params(model, jax.random.key(0))
  usage = ka.code_usage(model, params, p.batch(np.random.default_rng(1), p.codebook(0), 32))
  assert usage["distinct_per_slot"] == 1.0
  assert usage["spread"] < 0.05
