"""The Colab notebooks execute top to bottom on the bundled demo model (issue 6).

Breaks if a notebook cell errors against the current API, or the demo model is not shipped.
"""

from __future__ import annotations

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

COLAB = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "colab"


@pytest.mark.parametrize("name", ["demo.ipynb", "token_attention.ipynb"])
def test_notebook_executes_on_the_demo_model(name, tmp_path, monkeypatch):
  from alit_jax.tokenizer import DEMO_DIR

  assert (DEMO_DIR / "config.json").is_file(), f"bundled demo model missing from {DEMO_DIR}"
  monkeypatch.setenv("ALIT_MODEL", "demo")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(COLAB / name, as_version=4)
  client = nbclient.NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()
  errors = [
    o
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
    if o.get("output_type") == "error"
  ]
  assert not errors, errors
  text = "".join(
    o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
  )
  assert "token counts" in text  # the set-up cell printed the loaded model
