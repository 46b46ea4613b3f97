"""The bundled demo model adapts (issue 6, acceptance 1), measured by `experiments/demo_adaptivity.py`.

On held-out images (`demo:` validation split, seed 1: crops of the photos the demo never trained on
and procedural images drawn with another seed), at the model's own default L1 threshold. Skipped
when the package ships no demo model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import load_experiment

from alit_jax.tokenizer import DEMO_DIR

pytestmark = pytest.mark.skipif(
  not (DEMO_DIR / "config.json").is_file(),
  reason=f"no bundled demo model in {DEMO_DIR} (see README 'Demo model')",
)

# The model shipped on 2026-12-04 is a stand-in: phase 1 of the recipe (`configs/demo_alit.py:
# phase=warmup`, 1500 steps), whose iterations 1-7 were never trained, so extra tokens make its
# reconstructions worse (held-out mean L1 0.175 at 32 tokens, 0.233 at 256) and a flat colour
# comes back worse than a photo (0.223 vs 0.102-0.257). The tests of what an adaptive demo must
# do are kept and expected to fail until an adaptive model ships; strict, so that a model that
# passes them makes them fail until this flag is set to True (README 'Demo model', issue 15).
SHIPPED_DEMO_ADAPTS = False
known_not_adaptive = pytest.mark.xfail(
  not SHIPPED_DEMO_ADAPTS,
  reason="the shipped demo model is the 1-iteration warm-up, not yet adaptive (README)",
  strict=True,
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  mod = load_experiment("demo_adaptivity")
  out = tmp_path_factory.mktemp("adaptivity")
  assert mod.main(["--no-progress", "--out", str(out)]) == 0
  (rep,) = json.loads((out / "adaptivity.json").read_text())
  return rep


@known_not_adaptive
def test_demo_l1_falls_at_every_token_count(report):
  """Mean L1 over held-out images falls at each step from 32 to 256 tokens.

  Breaks if later iterations stop adding detail (a model that ignores its new tokens, as the
  first demo run did: L1 0.230 at every count).
  """
  mean_l1 = np.asarray(report["mean_l1"])
  assert report["num_images"] >= 128
  assert np.all(np.diff(mean_l1) < 0), mean_l1
  assert mean_l1[-1] < 0.8 * mean_l1[0], mean_l1


@known_not_adaptive
def test_demo_tokens_chosen_follow_image_complexity(report):
  """Spearman(tokens chosen at the default threshold, PNG bits per pixel) >= 0.5.

  Breaks if the demo stops adapting: every image given the same count (rho undefined) or counts
  unrelated to how complex the image is.
  """
  hist = report["tokens_histogram"]
  assert len(hist) >= 3, hist  # the threshold spreads the images over several lengths
  rho = report["spearman_tokens_vs"]["png_bpp"]["rho"]
  assert rho is not None and rho >= 0.5, report["spearman_tokens_vs"]


def _run_readme_first_command(tmp_path):
  """`python -m alit_jax.tokenize alit_jax/assets/samples` in a fresh process from a directory
  with no `../shared` beside it; returns (stdout, {image: tokens chosen}, work dir)."""
  import pathlib
  import subprocess
  import sys

  root = pathlib.Path(__file__).resolve().parents[1]
  readme = (root / "README.md").read_text()
  assert "python -m alit_jax.tokenize alit_jax/assets/samples\n" in readme.split("```")[1]
  samples = root / "alit_jax" / "assets" / "samples"
  work = tmp_path / "fresh"
  work.mkdir()
  assert not (work.parent / "shared").exists()
  res = subprocess.run(
    [sys.executable, "-m", "alit_jax.tokenize", str(samples), "--no-progress"],
    cwd=work,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert res.returncode == 0, res.stderr[-2000:]
  tokens = {}
  for line in res.stdout.splitlines():
    parts = line.split()
    if len(parts) >= 2 and parts[1].isdigit():
      tokens[parts[0]] = int(parts[1])
  return res.stdout, tokens, work


PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
  return _run_readme_first_command(tmp_path_factory.mktemp("readme"))


def test_readme_first_command_runs_alone(readme_run):
  """The README's main job runs on the bundled model with nothing beside the package.

  Breaks if the main job needs anything outside the installed package (the reference
  checkpoints in `../shared`, a download), or stops writing its table and summary.
  """
  stdout, tokens, work = readme_run
  assert "model: alit_demo (demo)" in stdout
  assert set(PHOTOS) | {"synthetic_flat", "synthetic_gradient"} <= set(tokens), stdout
  assert (work / "tokenize_out" / "summary.csv").read_text().count("\n") == len(tokens) + 1


@known_not_adaptive
def test_readme_first_command_gives_simple_samples_fewer_tokens(readme_run):
  """In the README's token table the flat and gradient samples get fewer tokens than every photo.

  Breaks if the demo model stops giving simple images fewer tokens (issue 15, acceptance 5).
  """
  _, tokens, _ = readme_run
  simple = max(tokens["synthetic_flat"], tokens["synthetic_gradient"])
  assert simple < min(tokens[p] for p in PHOTOS), tokens
