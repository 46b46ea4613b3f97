"""The analyses behind experiments/ (complexity, familiarity, linear probe, attention maps):
library functions on known cases, and every experiment script end to end on a tiny model."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fast_random_tokenizer, load_experiment
from scipy import stats

from alit_jax import criteria
from alit_jax.analysis import attention, complexity, familiarity, probe
from alit_jax.data import synthetic
from alit_jax.models.alit import ALIT
from alit_jax.models.configs import tiny_config

# ------------------------------------------------------------------------------------------------
# Library functions on known cases


def test_complexity_measures_known_values():
  """Compressed sizes and gradient magnitude order images by complexity and equal closed forms
  where they exist (a flat image has zero gradient, a ramp of step 2 has 2/255); a broken
  measure would make the complexity correlations meaningless."""
  flat = np.full((64, 64, 3), 120, np.uint8)
  ramp = np.broadcast_to((np.arange(64) * 2).astype(np.uint8)[None, :, None], (64, 64, 3)).copy()
  noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  assert complexity.mean_gradient_magnitude(flat) == 0.0
  assert complexity.mean_gradient_magnitude(ramp) == pytest.approx(2 / 255, rel=1e-9)
  # PNG's row filters code a linear ramp as cheaply as a flat image; JPEG does not.
  assert complexity.png_bits_per_pixel(flat) <= complexity.png_bits_per_pixel(ramp)
  assert complexity.png_bits_per_pixel(ramp) < complexity.png_bits_per_pixel(noise)
  jpeg = [complexity.jpeg_bits_per_pixel(im) for im in (flat, ramp, noise)]
  assert jpeg[0] < jpeg[1] < jpeg[2]
  assert complexity.png_bits_per_pixel(noise) > 23.0  # incompressible 24-bit pixels
  kinds = [synthetic.synthetic_image(k, 64, seed=0)[0] for k in range(len(synthetic.KINDS))]
  png = [complexity.png_bits_per_pixel(im) for im in kinds]
  assert png[0] < png[3] < png[5]  # flat < many_shapes < noise
  m = complexity.measures(ramp)
  assert set(m) == set(complexity.MEASURES)
  with pytest.raises(ValueError, match="uint8"):
    complexity.png_bits_per_pixel(flat.astype(np.float32))


def test_spearman_matches_scipy_and_handles_constants():
  """Spearman is scipy's rank correlation; constant inputs (every image at one token count)
  give None instead of a NaN that would break the JSON."""
  a = np.array([1.0, 5.0, 2.0, 8.0, 3.0, 3.0])
  b = np.array([10.0, 40.0, 30.0, 90.0, 5.0, 7.0])
  r = complexity.spearman(a, b)
  ref = stats.spearmanr(a, b)
  assert r["rho"] == pytest.approx(ref.statistic) and r["p"] == pytest.approx(ref.pvalue)
  assert complexity.spearman(a, a**3)["rho"] == pytest.approx(1.0)
  assert complexity.spearman(np.ones(6), b)["rho"] is None


def test_complexity_report_and_scatter(tmp_path):
  """The report correlates each selection's token counts with each measure (here tokens rank
  png_bpp exactly -> rho 1, and are reversed for gradient -> rho -1) and the plot is written."""
  rng = np.random.default_rng(0)
  png = rng.uniform(1, 10, 20)
  tokens = np.asarray([32, 64, 96, 128, 256])[
    np.searchsorted(np.quantile(png, [0.2, 0.4, 0.6, 0.8]), png)
  ]
  collected = {
    "data": "toy",
    "token_counts": [32, 64, 96, 128, 160, 192, 224, 256],
    "index": np.arange(20),
    "label": np.arange(20) % 3,
    "label_names": ["a", "b", "c"],
    "tokens": {"l1<0.07": tokens},
    "l1": np.tile(png[:, None], (1, 8)),
    "measures": {"png_bpp": png, "jpeg_bpp": png**2, "gradient": -png},
  }
  rep = complexity.complexity_report(collected)
  row = rep["tokens"]["l1<0.07"]
  assert row["png_bpp"]["rho"] == pytest.approx(stats.spearmanr(tokens, png).statistic)
  assert row["png_bpp"]["rho"] > 0.9 and row["gradient"]["rho"] < -0.9
  assert rep["l1_at_256"]["png_bpp"]["rho"] == pytest.approx(1.0)
  assert row["mean"] == pytest.approx(tokens.mean())
  complexity.plot_scatter(collected, rep, tmp_path / "s.png")
  assert (tmp_path / "s.png").stat().st_size > 1000


def test_familiarity_compare(tmp_path):
  """Per-dataset summaries and a Mann-Whitney test against the first (in-distribution) set:
  clearly separated token counts give a tiny p-value and the right mean difference."""
  counts = [32 * (i + 1) for i in range(8)]
  ind = np.array([32] * 15 + [64] * 5)
  ood = np.array([224] * 10 + [256] * 10)
  rep = familiarity.compare({"in": ind, "ood": ood, "same": ind.copy()}, counts)
  assert rep["datasets"]["in"]["mean"] == pytest.approx(40.0)
  assert rep["datasets"]["ood"]["histogram"] == {
    **{str(c): 0 for c in counts},
    "224": 10,
    "256": 10,
  }
  t = rep["tests"]["ood vs in"]
  assert t["mean_difference"] == pytest.approx(ood.mean() - ind.mean())
  assert t["p"] < 1e-6
  assert rep["tests"]["same vs in"]["p"] == pytest.approx(1.0)
  const = familiarity.compare({"a": np.full(4, 32), "b": np.full(4, 32)}, counts)
  assert const["tests"]["b vs a"]["p"] is None
  familiarity.plot_histograms({"in": ind, "ood": ood}, counts, tmp_path / "h.png")
  assert (tmp_path / "h.png").is_file()


def test_pool_latents_and_linear_probe_oracle():
  """Pooling averages exactly the valid latents of each iteration; probes separate separable
  data; with only the third iteration informative, test accuracy jumps there and the oracle
  token count per image is the first count whose probe is right."""
  lat = np.broadcast_to(np.arange(12, dtype=np.float32)[None, None, :, None], (3, 2, 12, 5))
  pooled = probe.pool_latents(lat, 4)
  np.testing.assert_allclose(pooled[:, 0, 0], [1.5, 3.5, 5.5])

  rng = np.random.default_rng(0)
  c, m, d = 4, 160, 8
  y = np.arange(m) % c
  informative = np.eye(c, d)[y] * 4.0
  feats = rng.normal(size=(3, m, d)).astype(np.float32)
  feats[2] += informative
  tr, te = slice(0, 80), slice(80, None)
  report, probes = probe.probe_per_length(
    feats[:, tr], y[tr], feats[:, te], y[te], c, [32, 64, 96], steps=300
  )
  acc = [r["test_accuracy"] for r in report["per_length"]]
  assert acc[2] >= 0.95 and max(acc[:2]) < 0.6
  assert report["chance"] == pytest.approx(0.25)
  correct = np.stack([probes[i].predict(feats[i, te]) == y[te] for i in range(3)])
  expect = np.asarray([32, 64, 96])[criteria.select_iterations(correct)]
  assert report["oracle"]["mean_tokens"] == pytest.approx(expect.mean())
  assert report["oracle"]["accuracy"] >= 0.95 and report["oracle"]["mean_tokens"] < 96
  # The same oracle as a criterion on (latents, valid) reproduces the per-iteration correctness.
  crit = probe.probe_oracle_criterion(probes, tokens_per_iteration=4)
  for i in range(3):
    latents = np.repeat(feats[i, te][:, None, :], 12, axis=1)  # pooled value = the features
    valid = np.broadcast_to(np.arange(12) < 4 * (i + 1), latents.shape[:2])
    meets = crit(None, None, labels=y[te], latents=latents, latent_valid=valid)
    np.testing.assert_array_equal(np.asarray(meets), correct[i])
  with pytest.raises(ValueError, match="labels"):
    probe.train_linear_probe(feats[0], y + 10, c)


@pytest.fixture(scope="module")
def tiny_tok():
  return fast_random_tokenizer(tiny_config(tokens=32, iterations=8))


def test_decoder_attention_indexing(tiny_tok):
  """The attention maps are the decoder's own weights at the right indices: for each iteration,
  running the decoder on only its T(i+1) latents (growing sequence, as the reference) gives
  weights whose query-rows 1..P and key-columns P+1+j equal `image_to_latent[i, j]` (and the
  transpose for `latent_to_image`); padded latents are zero; "mean" averages the layers."""
  tok = tiny_tok
  img = synthetic.synthetic_image(3, tok.image_size, seed=0)[0]
  att = attention.decoder_attention(tok, img, layer=-1)
  c = tok.config.alit
  p, g = c.num_image_tokens, c.grid_size
  assert att["image_to_latent"].shape == (8, 256, g, g) and att["layer"] == c.decoder_layers - 1
  dec = np.asarray(tok.rollout(img, reconstruct=False)["decoder_latent_input"][:, 0])
  for i in (0, 3, 7):
    n = 32 * (i + 1)
    _, ws = tok.model.apply(
      tok.variables["alit"], dec[i][None, :n], None, return_weights=True, method=ALIT.decode
    )
    w = np.asarray(ws[-1][0])
    assert w.shape == (p + 1 + n, p + 1 + n)
    np.testing.assert_allclose(w.sum(axis=-1), 1.0, rtol=1e-5)
    got = att["image_to_latent"][i, :n].reshape(n, p).T
    np.testing.assert_allclose(got, w[1 : p + 1, p + 1 :], atol=1e-6)
    got = att["latent_to_image"][i, :n].reshape(n, p)
    np.testing.assert_allclose(got, w[p + 1 :, 1 : p + 1], atol=1e-6)
    assert np.all(att["image_to_latent"][i, n:] == 0)
    np.testing.assert_array_equal(
      att["assignment"][i].reshape(-1), np.argmax(w[1 : p + 1, p + 1 :], axis=-1)
    )
  mean = attention.decoder_attention(tok, img, layer="mean")
  assert mean["layer"] == "mean"
  with pytest.raises(ValueError, match="out of range"):
    attention.decoder_attention(tok, img, layer=5)
  assert attention.default_layer(8) == 6 and attention.default_layer(2) == 1


# ------------------------------------------------------------------------------------------------
# The experiment scripts end to end on a tiny model


@pytest.fixture(scope="module")
def setup_dirs(tiny_tok, tmp_path_factory):
  root = tmp_path_factory.mktemp("exp")
  ckpt = root / "ckpt"
  tiny_tok.save_pretrained(ckpt)
  synthetic.write_image_folder(root / "imgs", 1, 72, seed=5)
  return ckpt, root / "imgs", root


def test_complexityload_experiment(setup_dirs, capsys):
  """experiments/complexity.py: per-dataset Spearman correlations, plot and CSV on two sources."""
  ckpt, imgs, root = setup_dirs
  out = root / "complexity"
  rc = load_experiment("complexity").main(
    [
      "--checkpoint",
      str(ckpt),
      "--data",
      str(imgs),
      "--data",
      "synthetic:num_examples=6,image_size=64",
      "--thresholds",
      "0.3,0.6",
      "--out",
      str(out),
      "--batch-size",
      "8",
      "--no-progress",
    ]
  )
  assert rc == 0
  res = json.loads((out / "complexity.json").read_text())
  assert len(res["datasets"]) == 2
  for rep in res["datasets"]:
    assert rep["num_images"] == 6
    assert set(rep["tokens"]) == {"l1<0.3", "l1<0.6"}
    assert set(rep["l1_at_32"]) == set(complexity.MEASURES)
    assert rep["measures"]["png_bpp"]["max"] > rep["measures"]["png_bpp"]["min"] > 0
  assert len(list(out.glob("complexity_*.png"))) == 2 and len(list(out.glob("*.csv"))) == 2
  assert "png_bpp rho" in capsys.readouterr().out


def test_familiarityload_experiment(setup_dirs):
  """experiments/familiarity.py: token-count summaries of two datasets and a test between them."""
  ckpt, imgs, root = setup_dirs
  out = root / "familiarity"
  rc = load_experiment("familiarity").main(
    [
      "--checkpoint",
      str(ckpt),
      "--data",
      str(imgs),
      "--data",
      "synthetic:num_examples=6,image_size=64",
      "--thresholds",
      "0.6",
      "--out",
      str(out),
      "--batch-size",
      "8",
      "--no-progress",
    ]
  )
  assert rc == 0
  res = json.loads((out / "familiarity.json").read_text())["selections"]["l1<0.6"]
  assert len(res["datasets"]) == 2 and len(res["tests"]) == 1
  for s in res["datasets"].values():
    assert 32 <= s["mean"] <= 256 and sum(s["histogram"].values()) == 6
  assert len(list(out.glob("familiarity_*.png"))) == 1


def test_linear_probeload_experiment(setup_dirs):
  """experiments/linear_probe.py: a probe per token count on synthetic images labelled by
  complexity kind; accuracies in [0, 1] and the oracle count in [32, 256]."""
  ckpt, _, root = setup_dirs
  out = root / "probe"
  rc = load_experiment("linear_probe").main(
    [
      "--checkpoint",
      str(ckpt),
      "--data",
      "synthetic:num_examples=24,image_size=64",
      "--steps",
      "50",
      "--out",
      str(out),
      "--batch-size",
      "8",
      "--no-progress",
    ]
  )
  assert rc == 0
  res = json.loads((out / "linear_probe.json").read_text())
  assert [r["tokens"] for r in res["per_length"]] == [32 * (i + 1) for i in range(8)]
  assert res["num_train"] == res["num_test"] == 24 and res["num_classes"] == 6
  assert all(0 <= r["test_accuracy"] <= 1 for r in res["per_length"])
  assert 32 <= res["oracle"]["mean_tokens"] <= 256
  assert (out / "linear_probe.png").is_file()


def test_attentionload_experiment(setup_dirs):
  """experiments/attention_maps.py: grids per iteration and per token, maps saved."""
  ckpt, imgs, root = setup_dirs
  out = root / "attention"
  rc = load_experiment("attention_maps").main(
    [
      "--checkpoint",
      str(ckpt),
      "--image",
      str(imgs / "many_shapes" / "00000.png"),
      "--iterations",
      "0",
      "--num-tokens",
      "3",
      "--out",
      str(out),
    ]
  )
  assert rc == 0
  assert (out / "attention_iterations.png").is_file() and (out / "attention_iter0.png").is_file()
  saved = np.load(out / "attention.npz")
  assert saved["image_to_latent"].shape[:2] == (8, 256)
  summary = json.loads((out / "attention.json").read_text())
  assert len(summary["iterations"]) == 8
  rc = load_experiment("attention_maps").main(
    [
      "--checkpoint",
      str(ckpt),
      "--data",
      str(imgs),
      "--index",
      "2",
      "--layer",
      "mean",
      "--iterations",
      "-1",
      "--out",
      str(out / "b"),
    ]
  )
  assert rc == 0 and (out / "b" / "attention_iter7.png").is_file()
  with pytest.raises(SystemExit):
    load_experiment("attention_maps").main(["--checkpoint", str(ckpt), "--out", str(out)])


def test_probe_fit_is_deterministic_and_jittable():
  """The probe's training is a pure function of (features, labels, seed)."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(30, 4)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32)
  a = probe.train_linear_probe(x, y, 2, steps=20, seed=3)
  b = probe.train_linear_probe(x, y, 2, steps=20, seed=3)
  np.testing.assert_array_equal(a.w, b.w)
  assert jnp.asarray(a.logits(x)).shape == (30, 2)
  assert np.mean(a.predict(x) == y) > 0.9


def test_make_sample_data(tmp_path):
  """experiments/make_sample_data.py writes the README's sample folders without a download
  (synthetic kinds, and the scikit-image photos resized and cropped to --size)."""
  pytest.importorskip("skimage")
  rc = load_experiment("make_sample_data").main(
    ["--out", str(tmp_path), "--per-kind", "1", "--size", "32"]
  )
  assert rc == 0
  assert len(list((tmp_path / "synthetic").rglob("*.png"))) == len(synthetic.KINDS)
  photos = list((tmp_path / "photos").glob("*.png"))
  assert photos
  from PIL import Image

  assert all(Image.open(p).size == (32, 32) for p in photos)


def test_demo_adaptivity_script_reports_what_it_measures(tmp_path, capsys):
  """`experiments/demo_adaptivity.py` (issue 6's acceptance measurement): its mean L1 per token
  count, tokens chosen and Spearman(tokens, PNG bpp) equal an independent recomputation from the
  model's rollout on the same images.

  Breaks if the script reports numbers that are not the ones it claims (wrong axis, threshold
  rule or complexity measure).
  """
  from PIL import Image
  from scipy import stats

  tok = fast_random_tokenizer(tiny_config(tokens=32, iterations=8))
  tok.save_pretrained(tmp_path / "tok")
  folder = tmp_path / "imgs"
  folder.mkdir()
  imgs = [synthetic.synthetic_image(i, 64, seed=4)[0] for i in range(12)]
  for i, im in enumerate(imgs):
    Image.fromarray(im).save(folder / f"{i:02d}.png")
  x = np.stack(imgs).astype(np.float32) / np.float32(255.0)
  l1 = np.abs(np.asarray(tok.rollout(x)["reconstructions"]) - x[None]).mean(axis=(2, 3, 4)).T
  threshold = float(np.median(l1))
  mod = load_experiment("demo_adaptivity")
  args = ["--checkpoint", str(tmp_path / "tok"), "--data", str(folder), "--no-progress"]
  rc = mod.main(args + ["--threshold", str(threshold), "--out", str(tmp_path / "out")])
  assert rc == 0
  (rep,) = json.loads((tmp_path / "out" / "adaptivity.json").read_text())
  np.testing.assert_allclose(rep["mean_l1"], l1.mean(0), rtol=1e-5, atol=1e-6)
  counts = np.arange(32, 257, 32)
  chosen = np.array(
    [counts[np.flatnonzero(r < threshold)[0]] if (r < threshold).any() else 256 for r in l1]
  )
  assert rep["mean_tokens"] == pytest.approx(chosen.mean())
  png = [complexity.png_bits_per_pixel(im) for im in imgs]
  want = stats.spearmanr(chosen, png).statistic if np.ptp(chosen) else None
  got = rep["spearman_tokens_vs"]["png_bpp"]["rho"]
  assert (got is None and want is None) or got == pytest.approx(want)
  assert "Spearman(tokens chosen, complexity)" in capsys.readouterr().out
