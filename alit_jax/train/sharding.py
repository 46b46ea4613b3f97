"""Device mesh, parameter sharding by name rules, and global batches from per-process data.

The mesh has two axes, `data` and `fsdp`. The batch is split over both (every device gets
global_batch / num_devices examples); parameters (and their optimizer moments and EMA) are
split over `fsdp` by rules matched against their path names, so `fsdp=1` is plain data
parallelism and `data=1` fully sharded data parallelism. XLA inserts the all-gathers and
reduce-scatters (GSPMD).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp") mesh; one size may be -1 (all remaining devices).

  Devices are laid out in `jax.devices()` order (process-major), so each process's devices hold
  a contiguous block of the batch.

  Raises:
    ValueError: unknown axes, more than one -1, or sizes that do not multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(axes) - set(AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh has axes {AXES}")
  sizes = [int(axes.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if known <= 0 or len(devices) % known:
      raise ValueError(f"mesh {dict(zip(AXES, sizes))} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices) or min(sizes) < 1:
    raise ValueError(
      f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, have {len(devices)}"
    )
  return Mesh(np.asarray(devices, dtype=object).reshape(sizes), AXES)


def path_name(path) -> str:
  """'a/b/0/c' for a jax key path (dict keys, attribute names, sequence indices)."""
  parts = []
  for p in path:
    key = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
    parts.append(str(key))
  return "/".join(parts)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  """Shards the largest dimension divisible by `fsdp_size`; replicates small or odd tensors."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  order = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in order:
    if shape[d] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[d] = "fsdp"
      return P(*spec)
  return P()


def _rule_spec(rule: Any, shape: tuple[int, ...], mesh: Mesh, min_size: int) -> P:
  if rule == "fsdp":
    return fsdp_spec(shape, mesh.shape["fsdp"], min_size)
  if rule == "replicate":
    return P()
  if isinstance(rule, list | tuple):
    spec = tuple(rule)
    if len(spec) != len(shape):
      raise ValueError(f"PartitionSpec {spec} does not fit a tensor of shape {shape}")
    return P(*spec)
  raise ValueError(f"unknown sharding rule {rule!r}; use 'fsdp', 'replicate' or a spec tuple")


def tree_shardings(
  tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = ((".*", "fsdp"),), min_size: int = 0
) -> Any:
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs).

  Each leaf's path name (e.g. `opt_state/1/0/mu/encoder/.../in_proj/kernel`) is matched with
  `re.search` against the rules in order; the first match decides. Scalars and unmatched leaves
  are replicated. Because the fsdp rule only looks at the shape, a parameter, its Adam moments
  and its EMA all get the same sharding.

  Args:
    tree: pytree of arrays or ShapeDtypeStructs.
    mesh: the mesh.
    rules: (regex, rule) pairs; rule is "fsdp", "replicate" or a PartitionSpec tuple.
    min_size: tensors with fewer elements stay replicated under "fsdp".
  """
  compiled = [(re.compile(rx), rule) for rx, rule in rules]

  def one(path, leaf):
    shape = tuple(getattr(leaf, "shape", ()))
    if not shape:
      return NamedSharding(mesh, P())
    name = path_name(path)
    for rx, rule in compiled:
      if rx.search(name):
        return NamedSharding(mesh, _rule_spec(rule, shape, mesh, min_size))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
  """The global array from this process's rows (processes hold consecutive batch blocks)."""
  sharding = batch_sharding(mesh)
  global_shape = (local.shape[0] * jax.process_count(),) + tuple(local.shape[1:])
  return jax.make_array_from_process_local_data(sharding, local, global_shape)


def host_value(x: jax.Array) -> np.ndarray:
  """numpy value of a replicated (or fully addressable) array, also in multi-process runs."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  return np.asarray(x.addressable_data(0))


def put_global(tree: Any, shardings: Any) -> Any:
  """Host values (identical on every process) -> global arrays with the given shardings."""

  def one(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

  return jax.tree.map(one, tree, shardings)
