"""Parity with the official PyTorch ALIT on `../shared/reference/vqgan_tiny_quantized`.

The reference vectors were produced by the PyTorch code on CPU with random tiny weights (see the
README there). Tolerances follow its guidance: atol=rtol=1e-4 for transformer outputs, 1e-3 for
the 256x256 reconstructions; indices and masks must match exactly.
"""

import json

import numpy as np
import pytest

from alit_jax import Tokenizer

CASE = "vqgan_tiny_quantized"
MODES = ("nohalt", "halt_partial", "halt_all")
ITER_ARRAYS = (
  "latent_tokens",
  "factorized_latent",
  "quant_indices",
  "logits",
  "pred_gt_prob",
  "drop_mask",
  "decoded_code",
  "decoder_latent_input",
)


@pytest.fixture(scope="module")
def case(reference_dir):
  d = reference_dir / CASE
  npz = dict(np.load(d / f"{CASE}.npz"))
  meta = json.loads((d / f"{CASE}.json").read_text())
  heads = meta["alit_kwargs"]["encoder_num_heads"]
  tok = Tokenizer.from_pytorch(d / f"{CASE}.pth", num_heads=heads)
  images = npz["images_u8"].transpose(0, 2, 3, 1)  # NCHW uint8 -> NHWC
  return {"dir": d, "npz": npz, "meta": meta, "tok": tok, "images": images}


def _halting(meta, mode):
  if mode == "nohalt":
    return "off", None
  return "threshold", meta["modes"][mode]["dynamic_halting_threshold"]


def _assert_close(name, got, want, atol=1e-4, rtol=1e-4):
  got = np.asarray(got)
  assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
  if want.dtype in (np.int64, np.int32, bool):
    mismatch = np.sum(got != want)
    assert mismatch == 0, f"{name}: {mismatch} of {want.size} entries differ"
  else:
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_rollout_reproduces_reference(case, mode):
  """Every stored per-iteration array of the reference, for each halting mode.

  Breaks if any part of the forward pass deviates from the PyTorch code: base encoder, patch
  embedding, token order, rollout concatenation/LayerNorm order, attention semantics, quantizer
  argmin, decoder, halting rule or reconstruction path.
  """
  npz, meta, tok = case["npz"], case["meta"], case["tok"]
  halting, thr = _halting(meta, mode)
  out = tok.rollout(case["images"], halting=halting, halting_threshold=thr)
  out = {k: np.asarray(v) for k, v in out.items()}
  sub = np.asarray(meta["recon_sub_idx"])
  checked = 0
  if mode == "nohalt":
    _assert_close("base_features", out["base_features"].transpose(0, 3, 1, 2), npz["base_features"])
    _assert_close("gt_indices", out["gt_indices"], npz["gt_indices"])
    _assert_close(
      "img_tokens_normalized", out["img_tokens_normalized"], npz["img_tokens_normalized"]
    )
    _assert_close("encoder_input", out["encoder_input"], npz["encoder_input"])
    full = out["reconstructions"][7, 0].transpose(2, 0, 1)[None]
    _assert_close("recon_full", full, npz["nohalt.recon_full.it7.b0"], atol=1e-3, rtol=1e-3)
    checked += 5
  for i in range(8):
    n_valid = 32 * (i + 1)
    for name in ITER_ARRAYS:
      key = f"{mode}.{name}.it{i}"
      if key not in npz:
        continue
      got = out[name][i]
      if got.ndim >= 2 and name in (
        "latent_tokens",
        "factorized_latent",
        "quant_indices",
        "decoder_latent_input",
      ):
        got = got[:, :n_valid]
      _assert_close(key, got, npz[key])
      checked += 1
    key = f"{mode}.recon_sub.it{i}"
    if key in npz:
      got = out["reconstructions"][i][:, sub][:, :, sub].transpose(0, 3, 1, 2)
      _assert_close(key, got, npz[key], atol=1e-3, rtol=1e-3)
      checked += 1
  assert checked >= 24, f"only {checked} reference arrays were compared"


def test_unrolled_matches_scan(case):
  """The growing-sequence implementation equals the masked fixed-buffer scan.

  Breaks if the attention masks of the scan buffer leak padded slots into active tokens, or if
  the two implementations order LayerNorm / concatenation differently.
  """
  tok, meta = case["tok"], case["meta"]
  thr = meta["modes"]["halt_partial"]["dynamic_halting_threshold"]
  a = tok.rollout(
    case["images"], halting="threshold", halting_threshold=thr, impl="scan", reconstruct=False
  )
  b = tok.rollout(
    case["images"], halting="threshold", halting_threshold=thr, impl="unrolled", reconstruct=False
  )
  for k in ("latent_tokens", "logits", "quant_indices", "drop_mask", "decoded_code"):
    _assert_close(k, np.asarray(a[k]), np.asarray(b[k]), atol=2e-5, rtol=2e-5)


def test_ema_checkpoint_loads_same_weights(case):
  """`{'model','ema'}` checkpoints load the `ema` entry and convert to the same weights.

  Breaks if the container selection or the restricted unpickler's shared-storage handling fails.
  """
  tok2 = Tokenizer.from_pytorch(
    case["dir"] / f"{CASE}_ckpt_ema.pth", num_heads=case["tok"].config.alit.encoder_heads
  )
  assert tok2.meta["state_dict"] == "['ema']"
  import jax

  for a, b in zip(jax.tree.leaves(case["tok"].variables), jax.tree.leaves(tok2.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sampled_halting_is_keyed_and_bounded(case):
  """`halting="sample"` masks a subset of `p >= threshold`, reproducibly per key.

  Breaks if sampling ignores the key, uses host randomness, or masks tokens below the threshold.
  """
  tok, meta = case["tok"], case["meta"]
  thr = meta["modes"]["halt_partial"]["dynamic_halting_threshold"]
  a = tok.rollout(case["images"], halting="sample", halting_threshold=thr, rng=0, reconstruct=False)
  b = tok.rollout(case["images"], halting="sample", halting_threshold=thr, rng=0, reconstruct=False)
  c = tok.rollout(case["images"], halting="sample", halting_threshold=thr, rng=1, reconstruct=False)
  drop_a, drop_c = np.asarray(a["drop_mask"]), np.asarray(c["drop_mask"])
  np.testing.assert_array_equal(drop_a, np.asarray(b["drop_mask"]))
  assert not np.array_equal(drop_a, drop_c)
  p = np.asarray(a["pred_gt_prob"])
  assert not np.any(drop_a & (p < thr))
  # p is ~1e-2 here, so Bernoulli(p) masks few tokens, but iteration 0 has 2 x 256 candidates.
  assert drop_a.sum() > 0
  with pytest.raises(ValueError, match="rng"):
    tok.rollout(case["images"], halting="sample")
