"""`python -m alit_jax.tokenize` (issue 6): outputs, the token table, and unreadable files."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from helpers import fast_random_tokenizer
from PIL import Image

from alit_jax import tokenize
from alit_jax.data import synthetic
from alit_jax.models.configs import tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("model")
  fast_random_tokenizer(tiny_config(tokens=32, iterations=8)).save_pretrained(d / "tok")
  return d / "tok"


def test_cli_writes_tokens_pictures_and_skips_unreadable_files(model_dir, tmp_path, capsys):
  """A folder with three good images, a corrupt PNG and a truncated JPEG: the good ones are
  tokenized (npz tokens of the chosen length, picture strip, table row), the bad ones are named
  in the output and in summary.csv (with the reason) and skipped, and the run still succeeds.

  Breaks if one bad file aborts the run, if bad files go unreported, or if the saved tokens,
  lengths and scores disagree with the criterion and threshold.
  """
  src = tmp_path / "imgs"
  src.mkdir()
  for i in range(3):
    img, _ = synthetic.synthetic_image(i, 72, seed=5)
    Image.fromarray(img).save(src / f"good_{i}.png")
  (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
  (src / "truncated.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 10)
  out = tmp_path / "out"
  rc = tokenize.main(
    [str(src), "--model", str(model_dir), "--threshold", "0.3", "--out", str(out), "--no-progress"]
    + ["--grid", str(tmp_path / "grid.png")]
  )
  text = capsys.readouterr().out
  assert rc == 0
  assert "corrupt.png" in text and "truncated.jpg" in text and "skipped 2" in text
  counts = list(range(32, 257, 32))
  for i in range(3):
    z = np.load(out / f"good_{i}.npz")
    scores, length = z["scores"], int(z["length"])
    assert z["tokens"].shape[0] == length and list(z["token_counts"]) == counts
    met = np.flatnonzero(scores < 0.3)
    assert length == (counts[met[0]] if met.size else 256)
    strip = Image.open(out / f"good_{i}.png")
    assert strip.width > 9 * 64 and strip.height >= 64
    row = next(line for line in text.splitlines() if line.startswith(f"good_{i} "))
    assert int(row.split()[1]) == length
  summary = list(csv.DictReader((out / "summary.csv").open()))
  assert [r["name"] for r in summary] == ["good_0", "good_1", "good_2", "corrupt", "truncated"]
  assert all(r["error"] == "" for r in summary[:3]) and all(r["error"] for r in summary[3:])
  assert Image.open(tmp_path / "grid.png").height == 3 * strip.height


def test_cli_reports_missing_paths_and_models(model_dir, tmp_path, capsys):
  """Nothing to tokenize, or a model path that does not exist, is an error message and exit 1.

  Breaks if such mistakes end in a traceback or a silent success.
  """
  assert tokenize.main([str(tmp_path), "--model", str(model_dir), "--no-progress"]) == 1
  assert "no images found" in capsys.readouterr().err
  img, _ = synthetic.synthetic_image(0, 64, seed=1)
  Image.fromarray(img).save(tmp_path / "a.png")
  assert tokenize.main([str(tmp_path), "--model", str(tmp_path / "nope")]) == 1
  assert "nope" in capsys.readouterr().err


def test_cli_with_only_unreadable_files_fails_and_says_so(model_dir, tmp_path, capsys):
  """Every input unreadable: exit 1, no "wrote OUT/" line, the reasons in summary.csv.

  Breaks if a run that tokenized nothing reports success or claims to have written outputs.
  """
  src = tmp_path / "bad"
  src.mkdir()
  (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
  out = tmp_path / "out"
  rc = tokenize.main([str(src), "--model", str(model_dir), "--out", str(out), "--no-progress"])
  text = capsys.readouterr().out
  assert rc == 1
  assert "wrote" not in text and "nothing tokenized" in text
  (row,) = csv.DictReader((out / "summary.csv").open())
  assert row["name"] == "corrupt" and row["error"]
