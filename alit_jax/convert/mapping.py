"""PyTorch state-dict keys <-> Flax parameter trees.

The Flax modules of this package mirror the PyTorch module names, so a state-dict key maps to a
Flax path by one rule (the "conversion contract"):

* the key is split on ``.``; a purely numeric segment is joined to the one before it with ``_``
  (``encoder.transformer.0.ln_1.weight`` -> ``encoder/transformer_0/ln_1/...``,
  ``decoder.up.3.block.0`` -> ``decoder/up_3/block_0``, ``decoder.ffn.2`` -> ``decoder/ffn_2``);
* the leaf is chosen by looking at the target Flax module (the tree drives the conversion):
  ``weight`` becomes ``kernel`` (Dense: transposed from (out, in); Conv: OIHW -> HWIO), ``scale``
  (LayerNorm/GroupNorm/BatchNorm) or ``embedding`` (nn.Embed, unchanged); ``bias`` stays;
* ``attn.in_proj_weight`` / ``attn.in_proj_bias`` (``nn.MultiheadAttention``) become
  ``attn/in_proj/kernel`` / ``attn/in_proj/bias``;
* BatchNorm ``running_mean`` / ``running_var`` go to the ``batch_stats`` collection as
  ``mean`` / ``var``; ``num_batches_tracked`` is a counter with no Flax equivalent and is dropped;
* any other leaf (raw ``nn.Parameter`` such as ``encoder_positional_embedding``) keeps its name
  and its PyTorch shape.

Conversion is strict: :func:`state_dict_to_tree` raises :class:`ConversionError` listing every
missing (with the file's closest keys), unexpected and mis-shaped key, and every tensor whose
dtype kind does not fit (an integer or boolean tensor where the model holds floats, or the
reverse). Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

import numpy as np

Tree = dict[str, Any]

# Leaves that PyTorch keeps as buffers with no Flax counterpart.
DROPPED_LEAVES = ("num_batches_tracked",)


class ConversionError(ValueError):
  """A state dict does not match the Flax tree; the message lists every problem."""


@dataclasses.dataclass(frozen=True)
class LeafRule:
  """Where one PyTorch tensor goes in the Flax tree."""

  collection: str  # "params" or "batch_stats"
  path: tuple[str, ...]  # path inside the collection
  transform: str  # "none" | "linear" | "conv"


def split_torch_key(key: str) -> tuple[str, ...]:
  """Splits a state-dict key into Flax module segments (numeric segments merged)."""
  out: list[str] = []
  for seg in key.split("."):
    if seg.isdigit() and out:
      out[-1] = f"{out[-1]}_{seg}"
    else:
      out.append(seg)
  return tuple(out)


def _lookup(tree: Mapping[str, Any] | None, path: tuple[str, ...]) -> Any:
  node: Any = tree
  for seg in path:
    if not isinstance(node, Mapping) or seg not in node:
      return None
    node = node[seg]
  return node


def leaf_rule(
  key: str, params: Mapping[str, Any], batch_stats: Mapping[str, Any] | None
) -> LeafRule:
  """Maps one state-dict key to its Flax location, using the target tree to pick the leaf.

  Args:
    key: PyTorch state-dict key, without any prefix that was stripped by the caller.
    params: target ``params`` tree (arrays or ``jax.ShapeDtypeStruct``), used to decide whether a
      ``weight`` is a kernel, a norm scale or an embedding table.
    batch_stats: target ``batch_stats`` tree or None.

  Returns:
    The rule; its path may not exist in the tree (the caller reports it as unexpected).
  """
  segs = split_torch_key(key)
  *mod, leaf = segs
  mod = tuple(mod)
  if leaf == "in_proj_weight":
    return LeafRule("params", mod + ("in_proj", "kernel"), "linear")
  if leaf == "in_proj_bias":
    return LeafRule("params", mod + ("in_proj", "bias"), "none")
  if leaf in ("running_mean", "running_var"):
    return LeafRule(
      "batch_stats", mod + ({"running_mean": "mean", "running_var": "var"}[leaf],), "none"
    )
  if leaf == "weight":
    node = _lookup(params, mod)
    if isinstance(node, Mapping):
      if "kernel" in node:
        ndim = len(node["kernel"].shape)
        return LeafRule("params", mod + ("kernel",), "linear" if ndim == 2 else "conv")
      if "scale" in node:
        return LeafRule("params", mod + ("scale",), "none")
      if "embedding" in node:
        return LeafRule("params", mod + ("embedding",), "none")
    return LeafRule("params", segs, "none")
  return LeafRule("params", segs, "none")


def torch_to_flax_array(value: np.ndarray, transform: str) -> np.ndarray:
  """Applies a layout transform to a PyTorch tensor (as numpy)."""
  if transform == "linear":
    if value.ndim != 2:
      raise ConversionError(f"expected a 2-D Linear weight, got shape {value.shape}")
    return np.ascontiguousarray(value.T)
  if transform == "conv":
    if value.ndim == 4:  # (O, I, kh, kw) -> (kh, kw, I, O)
      return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if value.ndim == 3:  # Conv1d (O, I, k) -> (k, I, O)
      return np.ascontiguousarray(value.transpose(2, 1, 0))
    raise ConversionError(f"expected a conv weight, got shape {value.shape}")
  return value


def flax_to_torch_array(value: np.ndarray, transform: str) -> np.ndarray:
  """Inverse of :func:`torch_to_flax_array`."""
  value = np.asarray(value)
  if transform == "linear":
    return np.ascontiguousarray(value.T)
  if transform == "conv":
    if value.ndim == 4:
      return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    return np.ascontiguousarray(value.transpose(2, 1, 0))
  return value


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """Nested dict -> {path tuple: leaf}."""
  out: dict[tuple[str, ...], Any] = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> Tree:
  """{path tuple: leaf} -> nested dict."""
  out: Tree = {}
  for path, v in flat.items():
    node = out
    for seg in path[:-1]:
      node = node.setdefault(seg, {})
    node[path[-1]] = v
  return out


def _transformed_shape(shape: tuple[int, ...], transform: str) -> tuple[int, ...] | None:
  if transform == "linear":
    return (shape[1], shape[0]) if len(shape) == 2 else None
  if transform == "conv":
    if len(shape) == 4:
      return (shape[2], shape[3], shape[1], shape[0])
    if len(shape) == 3:
      return (shape[2], shape[1], shape[0])
    return None
  return tuple(shape)


def plan_conversion(
  key_shapes: Mapping[str, tuple[int, ...]],
  target: Mapping[str, Any],
  *,
  prefix: str = "",
  name: str = "checkpoint",
) -> dict[str, LeafRule]:
  """Matches state-dict keys (by shape only, nothing is allocated) against a Flax tree.

  Args:
    key_shapes: state-dict key -> PyTorch shape. Only keys starting with `prefix` are used.
    target: Flax variables (`{"params": ..., "batch_stats": ...}`) of arrays or
      `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`); it decides names and shapes.
    prefix: key prefix to strip, e.g. `"base_tokenizer.vqgan."`.
    name: what to call the source in error messages (usually the file path).

  Returns:
    key -> rule for every converted key (keys whose leaf is in DROPPED_LEAVES are skipped).

  Raises:
    ConversionError: listing every missing Flax leaf, unexpected key and shape mismatch.
  """
  params = target.get("params", {})
  batch_stats = target.get("batch_stats")
  expected = {(col,) + path: leaf for col in target for path, leaf in flatten(target[col]).items()}
  plan: dict[str, LeafRule] = {}
  filled: set[tuple[str, ...]] = set()
  unexpected: list[str] = []
  misshaped: list[str] = []
  for key, shape in key_shapes.items():
    if not key.startswith(prefix):
      continue
    sub = key[len(prefix) :]
    if sub.split(".")[-1] in DROPPED_LEAVES:
      continue
    rule = leaf_rule(sub, params, batch_stats)
    full = (rule.collection,) + rule.path
    if full not in expected:
      unexpected.append(f"{key} {tuple(shape)}")
      continue
    want = tuple(expected[full].shape)
    got = _transformed_shape(tuple(shape), rule.transform)
    if got != want:
      misshaped.append(
        f"{key}: checkpoint {tuple(shape)} -> {got}, model expects {want} at {'/'.join(full)}"
      )
      continue
    plan[key] = rule
    filled.add(full)
  missing_paths = sorted(p for p in expected if p not in filled)
  missing = ["/".join(p) for p in missing_paths]
  if missing or unexpected or misshaped:
    lines = [f"{name}: state dict does not match the model (key prefix {prefix!r})."]
    if missing:
      lines.append(f"missing ({len(missing)}): " + ", ".join(missing))
      hints = _closest_keys(missing_paths[:MAX_HINTS], expected, key_shapes, plan, prefix)
      lines += [f"  {h}" for h in hints]
    if unexpected:
      lines.append(f"unexpected ({len(unexpected)}): " + ", ".join(unexpected))
    if misshaped:
      lines.append(f"mis-shaped ({len(misshaped)}): " + "; ".join(misshaped))
    raise ConversionError("\n".join(lines))
  return plan


MAX_HINTS = 10  # missing leaves for which the closest keys of the file are named


def torch_key(collection: str, path: tuple[str, ...], ndim: int, *, prefix: str = "") -> str:
  """The PyTorch state-dict key of one Flax leaf (the inverse of `leaf_rule`)."""
  leaf = np.zeros((1,) * ndim, np.float32)
  tree: dict[str, Any] = leaf  # type: ignore[assignment]
  for seg in reversed(path):
    tree = {seg: tree}
  (key,) = tree_to_state_dict({collection: tree}, prefix=prefix)
  return key


def _closest_keys(
  missing: list[tuple[str, ...]],
  expected: Mapping[tuple[str, ...], Any],
  key_shapes: Mapping[str, tuple[int, ...]],
  plan: Mapping[str, LeafRule],
  prefix: str,
) -> list[str]:
  """'<torch key>: closest in the file: a, b' for each missing leaf (unused keys first)."""
  unused = [k for k in key_shapes if k not in plan]
  out = []
  for full in missing:
    want = torch_key(full[0], full[1:], len(expected[full].shape), prefix=prefix)
    near = difflib.get_close_matches(want, unused, n=3, cutoff=0.6)
    near += [k for k in difflib.get_close_matches(want, list(key_shapes), n=3) if k not in near]
    found = ", ".join(near[:3]) if near else "nothing similar"
    out.append(f"{want} (for {'/'.join(full)}): closest in the file: {found}")
  return out


def _dtype_problem(key: str, arr: np.ndarray, want: Any) -> str | None:
  """A message if `arr` cannot stand for a leaf of dtype `want` (float vs integer/bool)."""
  want = np.dtype(want)
  is_float = np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"
  want_float = np.issubdtype(want, np.floating) or want.name == "bfloat16"
  if is_float == want_float and (is_float or np.issubdtype(arr.dtype, np.integer)):
    return None
  return f"{key}: {arr.dtype} tensor where the model holds {want}"


def state_dict_to_tree(
  state_dict: Mapping[str, np.ndarray],
  target: Mapping[str, Any],
  *,
  prefix: str = "",
  name: str = "checkpoint",
  dtype: Any = np.float32,
) -> dict[str, Tree]:
  """Converts the keys of `state_dict` under `prefix` into a Flax variables tree.

  Args:
    state_dict: flat PyTorch state dict (numpy arrays). Only keys starting with `prefix` are
      considered; the caller is responsible for keys outside every prefix it converts.
    target: Flax variables of arrays or `jax.ShapeDtypeStruct`s; it decides names and shapes.
    prefix: key prefix to strip.
    name: what to call the source in error messages (usually the file path).
    dtype: floating dtype of the returned arrays (integer buffers keep their dtype).

  Returns:
    A variables dict with the same collections and structure as `target`.

  Raises:
    ConversionError: listing every missing Flax leaf, unexpected key and shape mismatch, or
      every tensor of the wrong dtype kind (e.g. int64 where the model holds float32).
  """
  plan = plan_conversion(
    {k: tuple(np.shape(v)) for k, v in state_dict.items()}, target, prefix=prefix, name=name
  )
  leaves = {(col,) + path: leaf for col in target for path, leaf in flatten(target[col]).items()}
  out: dict[str, dict[tuple[str, ...], np.ndarray]] = {}
  bad = []
  for key, rule in plan.items():
    arr = torch_to_flax_array(np.asarray(state_dict[key]), rule.transform)
    want = getattr(leaves[(rule.collection,) + rule.path], "dtype", np.float32)
    problem = _dtype_problem(key, arr, want)
    if problem:
      bad.append(problem)
      continue
    if np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16":
      arr = arr.astype(dtype)
    out.setdefault(rule.collection, {})[rule.path] = arr
  if bad:
    raise ConversionError(
      f"{name}: {len(bad)} tensors have the wrong dtype (refusing to cast them): " + "; ".join(bad)
    )
  return {col: unflatten(flat) for col, flat in out.items()}


def tree_to_state_dict(variables: Mapping[str, Any], *, prefix: str = "") -> dict[str, np.ndarray]:
  """Inverse of :func:`state_dict_to_tree` (for exporting and for round-trip tests)."""
  out: dict[str, np.ndarray] = {}
  for col, tree in variables.items():
    for path, leaf in flatten(tree).items():
      leafname = path[-1]
      mod = [_unsplit(seg, parent) for parent, seg in zip((None,) + path[:-2], path[:-1])]
      if col == "batch_stats":
        key = ".".join(mod + [{"mean": "running_mean", "var": "running_var"}[leafname]])
        transform = "none"
      elif leafname == "kernel" and path[-2] == "in_proj":
        key = ".".join(mod[:-1] + ["in_proj_weight"])
        transform = "linear"
      elif leafname == "bias" and len(path) >= 2 and path[-2] == "in_proj":
        key = ".".join(mod[:-1] + ["in_proj_bias"])
        transform = "none"
      elif leafname == "kernel":
        key = ".".join(mod + ["weight"])
        transform = "linear" if np.ndim(leaf) == 2 else "conv"
      elif leafname in ("scale", "embedding"):
        key = ".".join(mod + ["weight"])
        transform = "none"
      else:
        key = ".".join(mod + [leafname])
        transform = "none"
      out[prefix + key] = flax_to_torch_array(np.asarray(leaf), transform)
  return out


# PyTorch module names that themselves end in _<digits> (not list indices). The forward mapping
# (PyTorch -> Flax) needs no such table; only this inverse, used for export, does.
_LITERAL_NAMES = frozenset({"ln_1", "ln_2"})


def _unsplit(seg: str, parent: str | None) -> str:
  """Flax segment -> PyTorch segment(s); `mid.block_1`, `ln_1` etc. are real PyTorch names."""
  if parent == "mid" or seg in _LITERAL_NAMES:
    return seg
  head, sep, tail = seg.rpartition("_")
  if sep and tail.isdigit() and head:
    return f"{_unsplit(head, None)}.{tail}"
  return seg
