"""The public `Tokenizer` API: input checks, per-image adaptive `encode`, `decode`, save/load."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alit_jax import Tokenizer
from alit_jax.models.configs import tiny_config


def _images(n=3, size=64, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  out = []
  for k in range(n):
    f = rng.uniform(1, 2 + 4 * k, size=(3, 2))
    out.append(
      np.stack(
        [0.5 + 0.5 * np.sin(2 * np.pi * (f[c, 0] * xx + f[c, 1] * yy)) for c in range(3)], -1
      )
    )
  return np.clip(np.stack(out), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.random(tiny_config(), seed=5)


@pytest.fixture(scope="module")
def trace(tok):
  return {k: np.asarray(v) for k, v in tok.rollout(_images()).items()}


def _l1_per_iteration(trace, images):
  return np.abs(trace["reconstructions"] - images[None]).mean(axis=(2, 3, 4))  # (N, B)


@pytest.mark.parametrize(
  "bad, match",
  [
    (np.zeros((2, 64, 64), np.float32), "3 channels"),
    (np.zeros((64, 64), np.float32), r"\(B, H, W, 3\)"),
    (np.zeros((1, 3, 64, 64), np.float32), "NCHW"),
    (np.zeros((1, 32, 32, 3), np.float32), "64x64"),
    (np.zeros((1, 64, 64, 3), np.int32), "dtype"),
    (np.full((1, 64, 64, 3), np.nan, np.float32), "NaN"),
    (np.full((1, 64, 64, 3), 255.0, np.float32), r"\[0, 1\]"),
    (np.zeros((0, 64, 64, 3), np.float32), "empty"),
  ],
)
def test_bad_images_raise_clear_errors(tok, bad, match):
  """Wrong rank, channels, size, dtype, NaN or range raise ValueError naming the problem.

  Breaks if bad input is silently accepted (e.g. 0-255 floats or NCHW arrays producing garbage).
  """
  with pytest.raises(ValueError, match=match):
    tok.rollout(bad, reconstruct=False)


def test_uint8_and_single_images_are_accepted(tok, trace):
  """uint8 (divided by 255) and a single (H, W, 3) image give the same results as floats.

  Breaks if the input conversion differs from the documented one.
  """
  x = _images()
  u8 = np.round(x * 255).astype(np.uint8)
  a = tok.rollout(u8[:1], reconstruct=False)
  b = tok.rollout(u8[0].astype(np.float32) / 255.0, reconstruct=False)
  np.testing.assert_array_equal(np.asarray(a["latent_tokens"]), np.asarray(b["latent_tokens"]))
  assert a["latent_tokens"].shape[1] == 1


def test_encode_picks_the_first_length_that_meets_the_threshold(tok, trace):
  """Per-image lengths, tokens and scores agree with the full rollout.

  Breaks if encode picks one length per batch (the reference's behaviour), is off by an
  iteration, returns tokens of a different iteration, or reports wrong scores.
  """
  x = _images()
  l1 = _l1_per_iteration(trace, x)  # (N, B)
  t = tok.tokens_per_iteration
  n = tok.num_iterations
  # Halfway between the two middle scores: a threshold equal to a score would make the test
  # depend on float rounding (`trace` comes from the unrolled rollout, encode from the buffer).
  s = np.sort(l1.ravel())
  thr = float((s[s.size // 2 - 1] + s[s.size // 2]) / 2)
  assert np.abs(l1 - thr).min() > 1e-6
  enc = tok.encode(x, criterion="l1", threshold=thr)
  meets = l1 < thr
  expected_iter = np.where(meets.any(0), meets.argmax(0), n - 1)
  np.testing.assert_array_equal(np.asarray(enc.lengths), t * (expected_iter + 1))
  assert enc.iterations_run == expected_iter.max() + 1
  scores = np.asarray(enc.scores)
  np.testing.assert_allclose(
    scores[: enc.iterations_run], l1[: enc.iterations_run], rtol=1e-5, atol=1e-6
  )
  assert np.all(np.isnan(scores[enc.iterations_run :]))
  tokens = np.asarray(enc.tokens)
  for b, it in enumerate(expected_iter):
    length = t * (it + 1)
    np.testing.assert_array_equal(tokens[b, :length], trace["quant_indices"][it, b, :length])
    assert np.all(tokens[b, length:] == -1)
    # Two rollout paths in float32: rounding differs with the CPU's vector width (seen on AVX2:
    # 1.07e-5 at a pixel of magnitude 1.62); another iteration's picture differs by far more.
    np.testing.assert_allclose(
      np.asarray(enc.reconstructions[b]), trace["reconstructions"][it, b], rtol=1e-5, atol=1e-5
    )


def test_encode_extremes_and_early_exit(tok):
  """A loose threshold stops after one iteration; an impossible one falls back to all tokens.

  Breaks if the while_loop does not exit early, or if an unmet criterion returns a short code.
  """
  x = _images()
  loose = tok.encode(x, threshold=1e9)
  assert loose.iterations_run == 1
  assert np.all(np.asarray(loose.lengths) == tok.tokens_per_iteration)
  strict = tok.encode(x, threshold=0.0)
  assert strict.iterations_run == tok.num_iterations
  assert np.all(np.asarray(strict.lengths) == tok.token_counts[-1])
  full = tok.encode(x, threshold=1e9, early_exit=False)
  assert full.iterations_run == tok.num_iterations
  np.testing.assert_array_equal(np.asarray(full.lengths), np.asarray(loose.lengths))


def test_encode_with_callables(tok, trace):
  """Boolean oracle criteria and higher-is-better criteria work.

  Breaks if user criteria are ignored or their direction is inverted.
  """
  x = _images()
  target_iter = np.array([0, 1, 2])

  def oracle(images, recon):
    # "Meets" exactly at the iteration whose reconstruction equals the trace at target_iter.
    want = jnp.asarray(trace["reconstructions"][target_iter, np.arange(3)])
    return jnp.abs(recon - want).max(axis=(1, 2, 3)) < 1e-4

  enc = tok.encode(x, criterion=oracle)
  np.testing.assert_array_equal(
    np.asarray(enc.lengths), tok.tokens_per_iteration * (target_iter + 1)
  )
  enc_psnr = tok.encode(x, criterion="psnr", threshold=-1e9)
  assert np.all(np.asarray(enc_psnr.lengths) == tok.tokens_per_iteration)


def test_decode_reproduces_the_rollout(tok, trace):
  """Decoding the tokens of iteration i reproduces iteration i's reconstruction, for mixed
  per-image lengths in one batch.

  Breaks if the decoder's latent mask, positional slice or the token lookup differ from the
  rollout path, or if padding tokens leak into the result.
  """
  n, t = tok.num_iterations, tok.tokens_per_iteration
  its = np.array([0, n - 1, 1])
  tokens = np.stack([trace["quant_indices"][it, b] for b, it in enumerate(its)])
  tokens[0, t:] = 7  # garbage beyond the length must be ignored
  lengths = t * (its + 1)
  imgs = np.asarray(tok.decode(tokens, lengths))
  for b, it in enumerate(its):
    np.testing.assert_allclose(imgs[b], trace["reconstructions"][it, b], atol=2e-5)
  short = np.asarray(tok.decode(tokens[2, : 2 * t]))
  np.testing.assert_allclose(short[0], trace["reconstructions"][1, 2], atol=2e-5)
  with pytest.raises(ValueError, match="indices"):
    tok.decode(np.full((1, t), tok.config.alit.codebook_size), [t])
  with pytest.raises(ValueError, match="integers"):
    tok.decode(np.zeros((1, t), np.float32))


def test_save_and_load_pretrained(tok, tmp_path):
  """`save_pretrained` + `from_pretrained` round-trip config and weights; overwrite is explicit.

  Breaks if the Orbax layout or config JSON loses information, or an existing dir is clobbered.
  """
  d = tok.save_pretrained(tmp_path / "tok")
  back = Tokenizer.from_pretrained(d)
  assert back.config == tok.config
  for a, b in zip(jax.tree.leaves(tok.variables), jax.tree.leaves(back.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(FileExistsError):
    tok.save_pretrained(d)
  tok.save_pretrained(d, overwrite=True)
  with pytest.raises(FileNotFoundError, match="config.json"):
    Tokenizer.from_pretrained(tmp_path)


def test_base_chunk_does_not_change_results(tok, trace):
  """Running the base tokenizer one image at a time (the CPU default), in chunks, or on the whole
  batch gives the same rollout, encode and decode, up to float reassociation.

  Breaks if `_in_chunks` mis-orders images or drops the remainder of a batch that does not divide
  by the chunk (3 images in chunks of 2 here), or if `base_chunk` is not passed on everywhere.
  """
  assert tok.base_chunk == (1 if jax.default_backend() == "cpu" else None)
  x = _images()
  whole = Tokenizer(tok.config, tok.variables, base_chunk=None).rollout(x)  # `trace`: chunks of 1
  np.testing.assert_array_equal(np.asarray(whole["gt_indices"]), trace["gt_indices"])
  np.testing.assert_allclose(
    np.asarray(whole["reconstructions"]), trace["reconstructions"], atol=2e-5
  )
  pairs = Tokenizer(tok.config, tok.variables, base_chunk=2)
  enc = pairs.encode(x, threshold=0.0)  # never met: every image ends at the last iteration
  np.testing.assert_array_equal(np.asarray(enc.tokens), trace["quant_indices"][-1])
  np.testing.assert_allclose(
    np.asarray(enc.reconstructions), trace["reconstructions"][-1], atol=2e-5
  )
  np.testing.assert_allclose(
    np.asarray(pairs.decode(enc.tokens)), trace["reconstructions"][-1], atol=2e-5
  )
  with pytest.raises(ValueError, match="base_chunk"):
    Tokenizer(tok.config, tok.variables, base_chunk=0)
