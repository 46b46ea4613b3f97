"""Tiny random models of every latent setting and both base tokenizers.

These cover what the single stored reference case cannot: continuous and unfactorized latents,
the VAE base, other head counts. The unrolled growing-sequence rollout is the reference's
algorithm written out directly; the scan must agree with it everywhere.
"""

import dataclasses

import jax
import numpy as np
import pytest
from helpers import fast_random_tokenizer

from alit_jax import Tokenizer
from alit_jax.convert import alit_checkpoint, mapping
from alit_jax.models.configs import tiny_config

VARIANTS = {
  "vqgan_quantized": dict(base="vqgan"),
  "vqgan_continuous": dict(base="vqgan", quantize_latent=False),
  "vqgan_unfactorized": dict(base="vqgan", quantize_latent=False, factorize_latent=False, heads=4),
  "vae_quantized": dict(base="vae"),
  "vae_continuous": dict(base="vae", quantize_latent=False, heads=1),
}


def _images(n=2, size=64, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  imgs = []
  for _ in range(n):
    f = rng.uniform(1, 6, size=(3, 2))
    img = np.stack(
      [0.5 + 0.5 * np.sin(2 * np.pi * (f[c, 0] * xx + f[c, 1] * yy)) for c in range(3)], -1
    )
    imgs.append(img)
  return np.clip(np.stack(imgs), 0, 1).astype(np.float32)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
  """(name, tokenizer, scan trace, unrolled trace) with threshold halting; computed once."""
  cfg = tiny_config(**VARIANTS[request.param])
  tok = fast_random_tokenizer(cfg, seed=1)  # numpy-drawn weights: no init compile
  x = _images()
  thr = 0.02 if cfg.alit.base == "vqgan" else 10.0
  scan = tok.rollout(x, halting="threshold", halting_threshold=thr, impl="scan")
  unrolled = tok.rollout(
    x, halting="threshold", halting_threshold=thr, impl="unrolled", reconstruct=False
  )
  if cfg.alit.base == "vqgan":  # halting really masks some image tokens, not all
    frac = np.asarray(scan["drop_mask"]).mean()
    assert 0.02 < frac < 0.9, frac
  return request.param, tok, scan, unrolled


def test_scan_equals_unrolled(variant):
  """Fixed buffer + masks == growing sequence, for every latent setting and base.

  Breaks if a padded latent slot leaks into attention, the decoder's latent mask or positional
  slice is wrong, or the continuous / unfactorized / VAE paths differ between implementations.
  """
  name, _, a, b = variant
  assert set(a) == set(b) | {"reconstructions"}
  for k in b:
    va, vb = np.asarray(a[k]), np.asarray(b[k])
    if va.dtype == bool or np.issubdtype(va.dtype, np.integer):
      np.testing.assert_array_equal(va, vb, err_msg=f"{name}:{k}")
    else:
      np.testing.assert_allclose(va, vb, atol=5e-5, rtol=5e-5, err_msg=f"{name}:{k}")


def test_trace_layout(variant):
  """Trace names, shapes and padding follow the documented contract.

  Breaks if a consumer (evaluation, tokenize_dataset, the parity checks) would index the trace
  wrongly: iteration axis first, 32(i+1)-style valid prefix, blanked padding, NHWC images.
  """
  name, tok, out, _ = variant
  c = tok.config.alit
  n, t = c.max_rollout_iters, c.num_latent_tokens
  assert out["reconstructions"].shape == (n, 2, 64, 64, 3)
  assert out["latent_tokens"].shape == (n, 2, n * t, c.encoder_width)
  assert out["decoded_code"].shape == (n, 2, c.num_image_tokens, c.base_embed_dim)
  assert out["base_features"].shape == (2, c.grid_size, c.grid_size, c.base_embed_dim)
  lat = np.asarray(out["latent_tokens"])
  for i in range(n):
    assert np.all(lat[i, :, t * (i + 1) :] == 0)
    assert np.all(np.abs(lat[i, :, : t * (i + 1)]).sum(-1) > 0)
  if c.quantize_latent:
    q = np.asarray(out["quant_indices"])
    assert q.min() >= -1 and q.max() < c.codebook_size
    assert np.all(q[0, :, t:] == -1)
  if c.base == "vqgan":
    assert out["logits"].shape == (n, 2, c.num_image_tokens, tok.config.base.n_embed)
    assert "gt_indices" in out
  else:
    assert "gt_code" in out and "code_l1" in out and "logits" not in out


def test_vae_halting_is_a_noop_by_default():
  """VAE halting masks nothing unless `vae_masking=True` (reference quirk 3).

  Breaks if the VAE path applies the intended masking by default (diverging from the released
  models' behaviour) or ignores it when asked.
  """
  cfg = tiny_config(**VARIANTS["vae_quantized"])
  x = _images()
  tok = fast_random_tokenizer(cfg, seed=1)
  noop = tok.rollout(x, halting="threshold", halting_threshold=10.0, reconstruct=False)
  assert not np.asarray(noop["drop_mask"]).any()
  assert np.asarray(noop["would_mask"]).all()
  tok2 = Tokenizer(tok.config, tok.variables, vae_masking=True)
  masked = tok2.rollout(x, halting="threshold", halting_threshold=10.0, reconstruct=False)
  np.testing.assert_array_equal(np.asarray(masked["drop_mask"]), np.asarray(masked["would_mask"]))
  assert np.asarray(masked["drop_mask"]).all()
  np.testing.assert_array_equal(
    np.asarray(masked["latent_tokens"][0]), np.asarray(noop["latent_tokens"][0])
  )
  assert not np.allclose(
    np.asarray(masked["latent_tokens"][1]), np.asarray(noop["latent_tokens"][1])
  )


def test_state_dict_round_trip_and_inference(variant):
  """Exporting to PyTorch names and re-importing recovers the config and every weight.

  Breaks if config inference from key shapes misreads a setting (quantized / factorized, base,
  widths, layer counts, VAE attention levels) or the name mapping is not invertible.
  """
  name, tok, _, _ = variant
  sd = {}
  sd.update(mapping.tree_to_state_dict(tok.variables["alit"]))
  prefix = alit_checkpoint.BASE_PREFIX[tok.config.alit.base]
  sd.update(mapping.tree_to_state_dict(tok.variables["base"], prefix=prefix))
  cfg = alit_checkpoint.infer_config(
    {k: v.shape for k, v in sd.items()}, num_heads=tok.config.alit.encoder_heads
  )
  want = tok.config.alit
  if not want.quantize_latent:  # the codebook size of an unquantized model is not in its keys
    want = dataclasses.replace(want, codebook_size=cfg.alit.codebook_size)
  assert cfg.alit == want
  assert cfg.base == tok.config.base
  variables, gan = alit_checkpoint.convert_state_dict(sd, cfg)
  assert not gan
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(tok.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vqgan_small_model_options():
  """`norm_groups` and `signed_input` (used by the demo VQGAN) reach the network, and their
  defaults are the reference's (GroupNorm(32), the encoder fed x in [0, 1]).

  Breaks if an option is silently ignored or the defaults drift from the reference.
  """
  from alit_jax.models.base_tokenizers import VQGAN
  from alit_jax.models.configs import VQGANConfig

  ref_cfg = VQGANConfig()
  assert ref_cfg.norm_groups == 32 and not ref_cfg.signed_input
  base = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, embed_dim=8, n_embed=16)
  x = np.random.default_rng(0).random((1, 32, 32, 3)).astype(np.float32)
  ref = VQGAN(VQGANConfig(resolution=32, **base))
  v = ref.init(jax.random.key(0), x, method=VQGAN.features)  # the encoder only
  feats = lambda m, a: np.asarray(m.apply(v, a, method=VQGAN.features))  # noqa: E731
  signed = VQGAN(VQGANConfig(resolution=32, signed_input=True, **base))
  np.testing.assert_allclose(feats(signed, x), feats(ref, 2 * x - 1), rtol=1e-6, atol=1e-6)
  grouped = VQGAN(VQGANConfig(resolution=32, norm_groups=8, **base))
  assert np.abs(feats(grouped, x) - feats(ref, x)).max() > 1e-3


def test_locality_bias_layout_and_both_rollouts():
  """`latent_locality` (not in the reference) biases slot <-> grid attention, nothing else.

  Breaks if the bias rows/columns are off by the class token, a slot's nearest grid cell is not
  in its own tile, later iterations' slots do not reuse the first iteration's tiles, the bias
  is sliced differently by the scan (fixed 1+n+L buffer) and the unrolled (growing) rollout, or
  the option silently does nothing.
  """
  from alit_jax.models.alit import locality_bias

  plain_cfg = tiny_config(base="vqgan")
  cfg = dataclasses.replace(
    plain_cfg, alit=dataclasses.replace(plain_cfg.alit, latent_locality=1.0)
  )
  a = cfg.alit
  n, t, g = a.num_image_tokens, a.num_latent_tokens, a.grid_size
  bias = locality_bias(a)
  assert bias.shape == (1 + n + a.max_latent_tokens,) * 2
  np.testing.assert_array_equal(bias[0], 0)  # class token
  np.testing.assert_array_equal(bias[1 : n + 1, 1 : n + 1], 0)  # grid <-> grid
  np.testing.assert_array_equal(bias[n + 1 :, n + 1 :], 0)  # slot <-> slot
  np.testing.assert_array_equal(bias[1 : n + 1, n + 1 :], bias[n + 1 :, 1 : n + 1].T)
  slot_to_grid = bias[n + 1 :, 1 : n + 1]
  assert (slot_to_grid <= 0).all() and slot_to_grid.min() < -1
  np.testing.assert_array_equal(slot_to_grid[:t], slot_to_grid[t : 2 * t])
  best = slot_to_grid[:t].argmax(1)  # each slot's nearest cell: distinct tiles, all covered
  rows = max(r for r in range(1, int(np.sqrt(t)) + 1) if t % r == 0)
  tile = (best // g) * rows // g * (t // rows) + (best % g) * (t // rows) // g
  np.testing.assert_array_equal(tile, np.arange(t))

  x = _images()
  tok = fast_random_tokenizer(cfg, seed=1)
  scan = tok.rollout(x, halting="off", impl="scan", reconstruct=False)
  unrolled = tok.rollout(x, halting="off", impl="unrolled", reconstruct=False)
  np.testing.assert_allclose(scan["logits"], unrolled["logits"], atol=5e-5, rtol=5e-5)
  off = Tokenizer(plain_cfg, tok.variables)
  plain = off.rollout(x, halting="off", impl="scan", reconstruct=False)
  assert np.abs(np.asarray(plain["logits"]) - np.asarray(scan["logits"])).max() > 1e-3
