"""The Colab notebooks execute top to bottom (issue 6).

They run on the bundled demo model when the package ships one, else on the converted tiny
reference checkpoint from `../shared/reference` (random weights; skipped when absent).

Breaks if a notebook cell errors against the current API.
"""

from __future__ import annotations

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

COLAB = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "colab"


@pytest.fixture(scope="module")
def model(request, tmp_path_factory):
  from alit_jax.tokenizer import DEMO_DIR, Tokenizer

  if (DEMO_DIR / "config.json").is_file():
    return "demo"
  ref = request.getfixturevalue("reference_dir") / "vqgan_tiny_quantized"
  out = tmp_path_factory.mktemp("nbmodel") / "tiny_reference"
  Tokenizer.from_pytorch(ref / "vqgan_tiny_quantized_ckpt_ema.pth", num_heads=4).save_pretrained(
    out
  )
  return str(out)


@pytest.mark.parametrize("name", ["demo.ipynb", "token_attention.ipynb"])
def test_notebook_executes(name, model, tmp_path, monkeypatch):
  monkeypatch.setenv("ALIT_MODEL", model)
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(COLAB / name, as_version=4)
  client = nbclient.NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  errors = [o for o in outputs if o.get("output_type") == "error"]
  assert not errors, errors
  assert "token counts" in "".join(o.get("text", "") for o in outputs)  # set-up cell ran
