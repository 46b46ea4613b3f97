"""Shared helpers of the experiment scripts (run them from the repository root)."""

from __future__ import annotations

import json
import math
import pathlib
import re
import sys

# Running `python experiments/x.py` puts experiments/ first on sys.path; the package lives one up.
ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))


def slug(text: str) -> str:
  """A file-name-safe short name for a data description."""
  s = re.sub(r"[^A-Za-z0-9]+", "_", str(text)).strip("_")
  return s[-60:] or "data"


def _clean(tree):
  if isinstance(tree, float):
    return tree if math.isfinite(tree) else None
  if isinstance(tree, dict):
    return {str(k): _clean(v) for k, v in tree.items()}
  if isinstance(tree, list | tuple):
    return [_clean(v) for v in tree]
  if hasattr(tree, "tolist"):
    return _clean(tree.tolist())
  return tree


def write_json(path, obj) -> None:
  pathlib.Path(path).write_text(json.dumps(_clean(obj), indent=2, allow_nan=False))


def fmt(v, spec: str = ".3f") -> str:
  return "n/a" if v is None else format(v, spec)
