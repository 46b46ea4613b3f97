"""Stage-1 loss and gradients against the official code (`vqgan_tiny_quantized_train.npz`).

Tolerances from the reference README: loss terms rtol=1e-5; each gradient array
max|g - g_ref| <= 1e-4 * max|g_ref| (many entries are near zero).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alit_jax import Tokenizer
from alit_jax.convert import mapping
from alit_jax.models import rollout as rollout_lib
from alit_jax.train import losses

CASE = "vqgan_tiny_quantized"


@pytest.fixture(scope="module")
def setup(reference_dir):
  d = reference_dir / CASE
  meta = json.loads((d / f"{CASE}.json").read_text())
  train = dict(np.load(d / f"{CASE}_train.npz"))
  tok = Tokenizer.from_pytorch(
    d / f"{CASE}.pth", num_heads=meta["alit_kwargs"]["encoder_num_heads"]
  )
  images = jnp.asarray(
    np.load(d / f"{CASE}.npz")["images_u8"].transpose(0, 2, 3, 1) / 255.0, jnp.float32
  )
  return tok, meta, train, images


def tok_dir(tok):
  import pathlib

  return pathlib.Path(tok.meta["source"]).parent


@pytest.mark.parametrize("mode", ["nohalt", "halt_partial"])
def test_stage1_loss_and_gradients_match_reference(setup, mode):
  """Loss terms per iteration, total loss, listed gradients and the global grad norm.

  Breaks if the objective deviates from the reference (label smoothing sneaking in, wrong
  lambda, code loss against the wrong target, quantizer terms over padded slots,
  straight-through on the un-normalized z) or if gradients take a different path (through the
  frozen codebook, through the halting mask, or missing the masked tokens' embedding).
  """
  tok, meta, train, images = setup
  if mode == "nohalt":
    halting = rollout_lib.Halting("off")
  else:
    halting = rollout_lib.Halting(
      "threshold", meta["modes"]["halt_partial"]["dynamic_halting_threshold"]
    )
  base_out = rollout_lib.base_encode(tok.base, tok.variables["base"], images)

  def f(params):
    return losses.stage1_loss(tok.model, {"params": params}, images, base_out, halting=halting)

  with jax.default_matmul_precision("highest"):
    (loss, m), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(tok.variables["alit"]["params"])
  np.testing.assert_allclose(float(loss), float(train[f"{mode}.loss"]), rtol=1e-5)
  for name in ("nll_loss", "code_loss", "quantization_loss", "commitment_loss", "codebook_loss"):
    np.testing.assert_allclose(
      np.asarray(m[name]), train[f"{mode}.{name}"], rtol=1e-5, err_msg=name
    )
  torch_grads = mapping.tree_to_state_dict({"params": grads})
  checked = 0
  for key in train:
    if not key.startswith(f"{mode}.grad."):
      continue
    pname = key[len(f"{mode}.grad.") :]
    ref = train[key]
    got = torch_grads[pname]
    assert got.shape == ref.shape, pname
    scale = max(np.abs(ref).max(), 1e-12)
    err = np.abs(got - ref).max()
    assert err <= 1e-4 * scale or (np.abs(ref).max() == 0 and err < 1e-7), (
      f"{pname}: {err} vs scale {scale}"
    )
    checked += 1
  assert checked == 11
  gnorm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(gnorm, float(train[f"{mode}.grad_global_norm"]), rtol=1e-5)
  # Every trainable PyTorch tensor has exactly one gradient here (the base tokenizer is frozen).
  train_meta = json.loads((tok_dir(tok) / f"{CASE}_train.json").read_text())
  assert sorted(torch_grads) == sorted(name for name, _ in train_meta["trainable_parameters"])
