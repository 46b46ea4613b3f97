"""Image metrics, codebook statistics and FID against closed forms, skimage and scipy."""

import functools

import jax
import numpy as np
import pytest
import scipy.linalg

from alit_jax.metrics import fid, image

skimage_metrics = pytest.importorskip("skimage.metrics")
skimage_data = pytest.importorskip("skimage.data")


def _rand_images(seed, shape=(3, 32, 40, 3), lo=0.0, hi=1.0):
  return np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)


# --- L1 / MSE / PSNR -------------------------------------------------------------------------


def test_l1_mse_closed_forms():
  """If this fails, L1/MSE are not per-image means of |x-y| and (x-y)^2 (wrong reduction axes,
  or batch elements mixed)."""
  x = _rand_images(0, lo=0.2, hi=0.7)
  offsets = np.array([0.0, 0.125, -0.25], np.float32)
  y = x + offsets[:, None, None, None]
  np.testing.assert_allclose(image.l1(x, y), np.abs(offsets), atol=1e-6)
  np.testing.assert_allclose(image.mse(x, y), offsets**2, atol=1e-6)
  z = _rand_images(1)
  np.testing.assert_allclose(image.l1(x, z), np.abs(x - z).mean(axis=(1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(image.mse(x, z), ((x - z) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)
  assert image.mse(x, z).shape == (3,) and image.mse(x, z).dtype == np.float32


def test_psnr_known_noise_levels():
  """If this fails, PSNR is not 10 log10(range^2 / MSE) per image (wrong log base, missing
  square, or data_range ignored)."""
  x = _rand_images(2, shape=(2, 64, 64, 3), lo=0.1, hi=0.8)
  # A constant 0.1 offset is an MSE of 0.01, i.e. exactly 20 dB.
  np.testing.assert_allclose(image.psnr(x, x + 0.1), [20.0, 20.0], atol=1e-4)
  # Gaussian noise of std sigma: PSNR ~ -20 log10(sigma) (24576 samples: +-0.04 dB).
  for sigma in (0.01, 0.05):
    noisy = x + np.random.default_rng(3).normal(0, sigma, x.shape).astype(np.float32)
    np.testing.assert_allclose(image.psnr(x, noisy), -20 * np.log10(sigma), atol=0.15)
  # Scaling images and data_range together leaves PSNR unchanged.
  np.testing.assert_allclose(
    image.psnr(255 * x, 255 * (x + 0.1), data_range=255.0), [20.0, 20.0], atol=1e-3
  )


def test_psnr_identical_images_is_inf_not_nan():
  """If this fails, identical images give NaN (or a finite cap) instead of the documented +inf,
  and the other images of the batch must be unaffected."""
  x = _rand_images(4)
  y = x.copy()
  y[1] += 0.1
  p = np.asarray(jax.jit(image.psnr)(x, y))
  assert np.isposinf(p[0]) and np.isposinf(p[2])
  np.testing.assert_allclose(p[1], 20.0, atol=1e-3)


def test_metric_shape_errors():
  """If this fails, mismatched or non-NHWC inputs are scored silently (broadcasting)."""
  x = _rand_images(5)
  with pytest.raises(ValueError, match="same shape"):
    image.mse(x, x[:1])
  with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
    image.l1(x[0], x[0])
  with pytest.raises(ValueError, match="window"):
    image.ssim(x[:, :8, :8], x[:, :8, :8])


# --- SSIM --------------------------------------------------------------------------------------


def _skimage_ssim(x, y, data_range=1.0):
  return np.array(
    [
      skimage_metrics.structural_similarity(
        a.astype(np.float64),
        b.astype(np.float64),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=data_range,
        channel_axis=-1,
      )
      for a, b in zip(x, y)
    ]
  )


def test_ssim_identical_is_one():
  """If this fails, SSIM of an image with itself is not 1 (constants or normalisation wrong)."""
  x = _rand_images(6)
  np.testing.assert_allclose(image.ssim(x, x), np.ones(3), atol=1e-6)
  flat = np.full((1, 16, 16, 3), 0.7, np.float32)
  np.testing.assert_allclose(image.ssim(flat, flat), [1.0], atol=1e-6)


def test_ssim_matches_skimage_random():
  """If this fails, SSIM differs from skimage's Gaussian-window SSIM (window taps, border crop,
  population covariance, or channel averaging)."""
  x = _rand_images(7, shape=(3, 24, 37, 3))
  y = np.clip(x + np.random.default_rng(8).normal(0, 0.2, x.shape), 0, 1).astype(np.float32)
  np.testing.assert_allclose(jax.jit(image.ssim)(x, y), _skimage_ssim(x, y), atol=1e-5)
  z = _rand_images(9, shape=(3, 24, 37, 3))
  np.testing.assert_allclose(image.ssim(x, z), _skimage_ssim(x, z), atol=1e-5)


def test_ssim_matches_skimage_real_images():
  """If this fails, SSIM on natural images (smooth regions, edges, bright flat areas where
  float32 variance cancellation would show) differs from skimage."""
  astro = skimage_data.astronaut().astype(np.float32) / 255.0
  x = np.stack([astro[0:64, 0:64], astro[200:264, 180:244], astro[400:464, 300:364]])
  rng = np.random.default_rng(10)
  y = np.stack(
    [
      np.clip(x[0] + rng.normal(0, 0.03, x[0].shape), 0, 1),  # mild noise
      np.roll(x[1], 2, axis=1),  # misalignment
      0.5 * x[2] + 0.4,  # contrast / brightness change
    ]
  ).astype(np.float32)
  ours = np.asarray(image.ssim(x, y))
  ref = _skimage_ssim(x, y)
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  assert ref.min() < 0.9  # the pairs are genuinely different
  np.testing.assert_allclose(
    image.ssim(255 * x, 255 * y, data_range=255.0),
    _skimage_ssim(255 * x, 255 * y, 255.0),
    atol=1e-5,
  )


def test_ssim_float32_accuracy_on_bright_low_contrast_images():
  """If this fails, SSIM loses float32 precision where E[x^2] - E[x]^2 cancels (bright, nearly
  flat images: the per-image shift before the variance terms is gone; without it the error is
  ~2.5e-6 here, with it ~6e-8)."""
  rng = np.random.default_rng(15)
  x = (0.97 + 0.01 * rng.random((2, 48, 48, 3))).astype(np.float32)
  y = (x + 0.003 * rng.normal(size=x.shape)).astype(np.float32)
  np.testing.assert_allclose(image.ssim(x, y), _skimage_ssim(x, y), atol=5e-7)


# --- Codebook usage -------------------------------------------------------------------------


def test_codebook_usage_hand_made_histograms():
  """If this fails, usage/perplexity do not follow their definitions (fraction of codes used,
  exp of the natural-log entropy of the code histogram)."""
  # Uniform over k = 4 of K = 16 codes: usage 1/4, perplexity 4.
  idx = np.array([[0, 5, 9, 15], [15, 9, 5, 0]])
  out = image.codebook_usage(idx, 16)
  np.testing.assert_allclose(out["usage"], 0.25)
  np.testing.assert_allclose(out["perplexity"], 4.0, rtol=1e-6)
  # A single code: perplexity 1.
  out = image.codebook_usage(np.full((3, 7), 2), 8)
  np.testing.assert_allclose(out["usage"], 1 / 8)
  np.testing.assert_allclose(out["perplexity"], 1.0, rtol=1e-6)
  # Counts (2, 1, 1, 0): p = (1/2, 1/4, 1/4), entropy 1.5 ln 2, perplexity 2 ** 1.5.
  out = image.codebook_usage(np.array([0, 0, 1, 2]), 4)
  np.testing.assert_allclose(out["usage"], 0.75)
  np.testing.assert_allclose(out["perplexity"], 2**1.5, rtol=1e-6)


def test_codebook_usage_mask_and_jit():
  """If this fails, masked tokens (beyond the adaptive length) or out-of-range indices are
  counted, or the function cannot be jitted with a static codebook size."""
  idx = np.array([[1, 1, 3, 7], [2, 2, 2, -1]])
  mask = np.array([[True, True, False, False], [True, True, False, True]])
  fn = jax.jit(functools.partial(image.codebook_usage, codebook_size=4))
  out = fn(idx, valid_mask=mask)
  # Counted: 1, 1, 2, 2 (the -1 is out of range) -> two codes used equally.
  np.testing.assert_allclose(out["usage"], 0.5)
  np.testing.assert_allclose(out["perplexity"], 2.0, rtol=1e-6)
  counts = image.code_histogram(idx, 8)  # 7 is in range here, -1 never is
  np.testing.assert_array_equal(counts, [0, 2, 3, 1, 0, 0, 0, 1])
  # Histograms add up over batches.
  total = counts + image.code_histogram(np.array([4, 5, 6, 0]), 8)
  np.testing.assert_allclose(image.usage_from_histogram(total)["usage"], 1.0)
  empty = image.codebook_usage(idx, 4, valid_mask=np.zeros_like(mask))
  assert float(empty["usage"]) == 0.0 and np.isnan(empty["perplexity"])
  with pytest.raises(ValueError, match="integers"):
    image.codebook_usage(idx.astype(np.float32), 4)


# --- FID ---------------------------------------------------------------------------------------


def _random_spd(rng, d, scale=1.0):
  a = rng.normal(0, scale, (d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def _fid_via_eigh(mu1, s1, mu2, s2):
  """Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), computed from symmetric eigendecompositions."""
  w, v = np.linalg.eigh(s1)
  r1 = (v * np.sqrt(w)) @ v.T
  inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner)))


def test_fid_diagonal_gaussians_closed_form():
  """If this fails, the Frechet distance formula is wrong (missing mean term, trace term or the
  factor 2 on the cross term)."""
  mu1 = np.array([0.0, 1.0, -2.0, 0.5])
  mu2 = np.array([1.0, 1.0, 0.0, 0.0])
  a = np.array([1.0, 4.0, 0.25, 2.0])
  b = np.array([9.0, 1.0, 0.25, 0.5])
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
  got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert isinstance(got, float)
  np.testing.assert_allclose(got, expected, rtol=1e-10)
  np.testing.assert_allclose(expected, (1 + 0 + 4 + 0.25) + (4 + 1 + 0 + 0.5), rtol=1e-12)


def test_fid_matches_direct_scipy_computation():
  """If this fails, the general (non-commuting covariances) case disagrees with an independent
  eigendecomposition computation and with the plain scipy sqrtm formula."""
  rng = np.random.default_rng(11)
  d = 32
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d, 2.0)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(got, _fid_via_eigh(mu1, s1, mu2, s2), rtol=1e-8)
  direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
  np.testing.assert_allclose(got, direct, rtol=1e-10)


def test_fid_identical_stats_is_zero_also_when_singular():
  """If this fails, FID of a set with itself is not 0, including the rank-deficient case
  (fewer samples than dimensions) that pytorch-fid handles with its eps offset."""
  rng = np.random.default_rng(12)
  for n, d in ((200, 16), (20, 64)):
    mu, sigma = fid.feature_stats(rng.normal(size=(n, d)) + 3.0)
    val = fid.frechet_distance(mu, sigma, mu, sigma)
    assert np.isfinite(val) and abs(val) < 1e-5 * np.trace(sigma), (n, d, val)


def test_fid_imaginary_component_raises():
  """If this fails, a covariance product with a negative eigenvalue (not a valid pair of
  covariances) yields a silently wrong real FID instead of pytorch-fid's error."""
  with pytest.raises(ValueError, match="imaginary component"):
    fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match="inconsistent shapes"):
    fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_feature_stats_and_streaming_accumulator():
  """If this fails, statistics differ from pytorch-fid's (np.mean / np.cov with n - 1), or the
  streaming accumulator loses precision or samples across uneven batches."""
  rng = np.random.default_rng(13)
  feats = (rng.normal(size=(203, 24)) * rng.uniform(0.1, 3, 24) + 1e3).astype(np.float32)
  mu, sigma = fid.feature_stats(feats)
  assert mu.dtype == np.float64 and sigma.shape == (24, 24)
  np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0), rtol=1e-14)
  np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-12)
  acc = fid.FeatureStats()
  for lo, hi in ((0, 7), (7, 7), (7, 100), (100, 101), (101, 203)):
    acc.add(feats[lo:hi])
  assert acc.n == 203
  smu, ssigma = acc.stats()
  np.testing.assert_allclose(smu, mu, rtol=1e-13)
  np.testing.assert_allclose(ssigma, sigma, rtol=1e-9, atol=1e-12 * np.abs(sigma).max())
  assert np.array_equal(ssigma, ssigma.T)
  np.testing.assert_allclose(fid.frechet_distance(smu, ssigma, mu, sigma), 0.0, atol=1e-7)
  with pytest.raises(ValueError, match="feature size"):
    acc.add(np.zeros((2, 5)))
  with pytest.raises(ValueError, match="at least 2"):
    fid.FeatureStats().add(feats[:1]).stats()


def test_fid_from_features_and_stats_file(tmp_path):
  """If this fails, FID from raw features disagrees with the stats path, or saved statistics
  (pytorch-fid's .npz layout with mu / sigma) do not round-trip."""
  rng = np.random.default_rng(14)
  f1 = rng.normal(size=(3000, 8))
  f2 = rng.normal(0.5, 1.5, size=(3000, 8))
  val = fid.fid_from_features(f1, f2)
  np.testing.assert_allclose(
    val, _fid_via_eigh(*fid.feature_stats(f1), *fid.feature_stats(f2)), rtol=1e-8
  )
  # Population value: 8 * 0.25 + 8 * (1 + 2.25 - 2 * 1.5) = 4 (the estimate is biased upwards
  # by O(D / N)).
  assert 3.7 < val < 4.4
  path = tmp_path / "stats.npz"
  fid.save_stats(path, *fid.feature_stats(f1))
  mu, sigma = fid.load_stats(path)
  np.testing.assert_array_equal(mu, f1.mean(0))
  np.savez(tmp_path / "bad.npz", mean=mu)
  with pytest.raises(ValueError, match="bad.npz"):
    fid.load_stats(tmp_path / "bad.npz")
