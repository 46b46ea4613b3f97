"""Helpers shared by the config files."""

from __future__ import annotations

from typing import Any

import ml_collections

_TRUE = ("1", "true", "t", "yes", "y", "on")
_FALSE = ("0", "false", "f", "no", "n", "off")


def _parse_value(key: str, text: str, default: Any) -> Any:
  text = text.strip()
  if isinstance(default, bool):
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise ValueError(f"config argument {key}={text!r}: expected a boolean (True/False)")
  try:
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
  except ValueError:
    raise ValueError(f"config argument {key}={text!r}: expected {type(default).__name__}") from None
  return text


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """Parses the `:arg` of `--config=FILE.py:arg` into a ConfigDict typed by `spec`.

  `arg` is a comma-separated list of `key=value` items; a bare `key` sets a boolean to True
  (e.g. `variant=small,base=vae,runlocal`). Values are parsed with the type of the default in
  `spec` (bool accepts True/False/1/0/yes/no).

  Args:
    arg: the string after the colon, or None/"" for all defaults.
    **spec: the known keys and their defaults.

  Returns:
    ConfigDict with every key of `spec`.

  Raises:
    ValueError: an unknown key, a bare key that is not boolean, or a value of the wrong type.
  """
  values = dict(spec)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, eq, text = item.partition("=")
    key = key.strip()
    if key not in spec:
      raise ValueError(f"unknown config argument {key!r}; known: {', '.join(sorted(spec))}")
    if not eq:
      if not isinstance(spec[key], bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      values[key] = True
    else:
      values[key] = _parse_value(key, text, spec[key])
  return ml_collections.ConfigDict(values)
