"""Training checkpoints (Orbax `CheckpointManager`) and the layout of a training workdir.

    WORKDIR/model_config.json     {"model": ModelConfig, "meta": {"stage": ...}} (architecture, as
                                  trained; a base-VQGAN training: {"base": ..., "meta": ...})
    WORKDIR/base_tokenizer/       stage 1: the frozen base tokenizer (`checkpoint.load_base`)
    WORKDIR/lpips/                stages 2 / vqgan: the frozen LPIPS variables, when used
    WORKDIR/train_config.json     the training ConfigDict
    WORKDIR/checkpoints/<step>/   Orbax: `state` (step, params, opt_state, ema_params, and the
                                  discriminators and their optimizer states in stage 2) and
                                  `data` (grain iterator state, one JSON file per process)
    WORKDIR/tensorboard/, WORKDIR/metrics.jsonl

Saves are asynchronous (the device-to-host copy happens before `save` returns, so the state
can be donated right after) and atomic (Orbax writes to a temporary directory and renames it
when complete), so a crash mid-save leaves the previous checkpoints intact.

Resume (`TrainCheckpointer.restore_latest`) takes the newest checkpoint that restores cleanly. A
newer one that does not (truncated or missing files, unreadable JSON) is named with the reason
and moved aside to `checkpoints/<step>.corrupt-<UTC time>` (kept for inspection, never deleted,
and invisible to Orbax); if none restores, nothing is moved and `NoUsableCheckpointError` says
why for each.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from alit_jax.models.configs import ModelConfig

CHECKPOINTS = "checkpoints"
MODEL_CONFIG = "model_config.json"
BASE_DIR = "base_tokenizer"
TRAIN_CONFIG = "train_config.json"
STATE_ITEM = "state"
DATA_ITEM = "data"


def is_workdir(path: str | os.PathLike) -> bool:
  """True if `path` looks like a training workdir (model config + checkpoints folder)."""
  p = pathlib.Path(path)
  return (p / MODEL_CONFIG).is_file() and (p / CHECKPOINTS).is_dir()


def read_workdir_description(workdir: str | os.PathLike) -> dict[str, Any]:
  """The raw `model_config.json`: {"model": ..., "meta": ...} or, for a base-tokenizer training
  (`configs/vqgan_train.py`), {"base": ..., "meta": {"stage": "vqgan"}}."""
  path = pathlib.Path(workdir) / MODEL_CONFIG
  if not path.is_file():
    raise FileNotFoundError(f"{workdir}: no {MODEL_CONFIG}; not a training workdir")
  return json.loads(path.read_text())


def workdir_stage(workdir: str | os.PathLike) -> str:
  """The stage that wrote a workdir ("latent_distillation", "full_finetuning" or "vqgan")."""
  return read_workdir_description(workdir).get("meta", {}).get("stage", "latent_distillation")


def read_model_config(workdir: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
  d = read_workdir_description(workdir)
  if "model" not in d:
    stage = d.get("meta", {}).get("stage", "?")
    raise ValueError(
      f"{workdir}: a base-tokenizer training workdir (stage {stage!r}), not an ALIT one; export "
      "it with `python -m alit_jax.train.export WORKDIR --out DIR` and use DIR as a base "
      "tokenizer (config.base_checkpoint)"
    )
  return ModelConfig.from_dict(d["model"]), d.get("meta", {})


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  os.replace(tmp, path)


def _type_registry() -> Any:
  """Orbax's standard type handlers, but jax.Arrays saved without replica parallelism.

  Replica-parallel saving (Orbax's default off GPU) slices every replicated array eagerly per
  replica on the first save, which compiles one small XLA program per (shape, device): tens of
  seconds for a model with many parameter shapes. Writing each shard once from its first
  replica is as fast here and has no such start-up cost.
  """
  th = ocp.type_handlers
  types_ = (int, float, bytes, np.number, np.ndarray, str)
  default = th.get_type_handler(jax.Array)
  array = th.ArrayHandler(
    use_replica_parallel=False,
    array_metadata_store=getattr(default, "_array_metadata_store", None),
  )
  return th.create_type_handler_registry(
    *[(t, th.get_type_handler(t)) for t in types_], (jax.Array, array)
  )


class NoUsableCheckpointError(RuntimeError):
  """No checkpoint of a workdir restores (the message names each one and why)."""


def _reason(e: BaseException) -> str:
  """One line for a failed restore: the innermost cause's type and the first line of its message.

  (Orbax wraps TensorStore's `OUT_OF_RANGE: ... Requested byte range ...` in an exception whose
  own message is a page of TensorStore spec.)
  """
  chain, seen = [], set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    chain.append(e)
    e = e.__cause__ or e.__context__
  e = next((x for x in reversed(chain) if str(x).strip()), chain[0])
  lines = [x.strip() for x in str(e).splitlines() if x.strip()]
  text = lines[0] if lines else ""
  if len(text) > 300:
    text = text[:297] + "..."
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _all_processes_ok(ok: bool) -> bool:
  """True iff `ok` on every process (a checkpoint counts as good only if all could read it)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.asarray([ok], np.int32))
  return bool(np.all(flags))


class TrainCheckpointer:
  """`CheckpointManager` for the train state and the data-iterator state."""

  def __init__(
    self,
    workdir: str | os.PathLike,
    *,
    max_to_keep: int | None = 2,
    keep_period: int | None = None,
    async_save: bool = True,
  ):
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      keep_period=keep_period,
      save_interval_steps=1,
      create=True,
      enable_async_checkpointing=async_save,
    )
    import grain.checkpoint as grain_checkpoint

    self._grain = grain_checkpoint
    self.directory = pathlib.Path(workdir).absolute() / CHECKPOINTS
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        STATE_ITEM: ocp.PyTreeCheckpointHandler(type_handler_registry=_type_registry()),
        DATA_ITEM: grain_checkpoint.CheckpointHandler(),
      },
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any) -> None:
    """Saves `state` and the iterator position (the iterator must not have run ahead)."""
    args = {STATE_ITEM: ocp.args.PyTreeSave(state)}
    if data_iterator is not None:
      args[DATA_ITEM] = self._grain.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """Restores the state onto the shardings of `abstract_state` and rewinds the iterator."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    args = {STATE_ITEM: ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args)}
    if data_iterator is not None:
      args[DATA_ITEM] = self._grain.CheckpointRestore(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**args))[STATE_ITEM]

  def _restore_item(self, step: int, item: str, args: Any) -> Any:
    """Restores one item; errors name the item's folder (a bare JSONDecodeError names none)."""
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]
    except Exception as e:
      raise RuntimeError(f"{self.directory / str(step) / item}: {_reason(e)}") from e

  def restore_latest(
    self, abstract_state: Any, data_iterator: Any, *, log: Callable[[str], None] = print
  ) -> tuple[int | None, Any]:
    """Restores the newest checkpoint that restores cleanly (see the module docstring).

    Args:
      abstract_state: the target tree (`jax.ShapeDtypeStruct`s with shardings).
      data_iterator: the grain iterator to rewind (or None).
      log: receives one line per broken checkpoint.

    Returns:
      (step, state), or (None, None) when the workdir has no checkpoint.

    Raises:
      NoUsableCheckpointError: there are checkpoints but none restores.
    """
    broken: list[tuple[int, str]] = []
    for step in sorted(self.all_steps(), reverse=True):
      reason, state = None, None
      try:
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        state = self._restore_item(
          step, STATE_ITEM, ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args)
        )
        if data_iterator is not None:
          self._restore_item(step, DATA_ITEM, self._grain.CheckpointRestore(data_iterator))
      except Exception as e:  # any unreadable file: try the checkpoint before it
        reason = str(e)
      if _all_processes_ok(reason is None):
        for bad, why in broken:
          aside = self._set_aside(bad)
          log(
            f"checkpoint {bad} does not restore ({why}); moved it to {aside} and resumed from "
            f"checkpoint {step}"
          )
        if broken:
          self.manager.reload()
        return step, state
      broken.append((step, reason or "another process could not read it"))
    if broken:
      raise NoUsableCheckpointError(
        f"no checkpoint in {self.directory} restores ("
        + "; ".join(f"step {s}: {why}" for s, why in broken)
        + "); nothing was moved. If the files are damaged, move them away to start afresh; if "
        "the config changed, use a new workdir"
      )
    return None, None

  def _set_aside(self, step: int) -> pathlib.Path:
    """Renames checkpoint `step` to `<step>.corrupt-<UTC time>` (process 0), returns the path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = self.directory / f"{step}.corrupt-{stamp}"
    if jax.process_index() == 0:
      n = 1
      while aside.exists():
        n += 1
        aside = self.directory / f"{step}.corrupt-{stamp}-{n}"
      (self.directory / str(step)).rename(aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"alit_set_aside_{step}")
    return aside

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def latest_step(workdir: str | os.PathLike) -> int | None:
  """The newest complete checkpoint step of a workdir (None if there is none)."""
  directory = pathlib.Path(workdir).absolute() / CHECKPOINTS
  if not directory.is_dir():
    return None
  with ocp.CheckpointManager(
    directory, options=ocp.CheckpointManagerOptions(read_only=True)
  ) as mgr:
    return mgr.latest_step()


def restore_items(
  workdir: str | os.PathLike, targets: dict[str, Any], *, step: int | None = None
) -> tuple[int, dict[str, Any]]:
  """Reads some entries of a checkpoint's train state (e.g. `ema_params`, `disc_params`).

  Args:
    workdir: training workdir.
    targets: {state key: tree of arrays or `jax.ShapeDtypeStruct`s (with shardings)}.
    step: checkpoint step (default: the latest).

  Returns:
    (step, {state key: restored tree}).
  """
  if step is None:
    step = latest_step(workdir)
    if step is None:
      raise FileNotFoundError(f"{workdir}: no complete checkpoint in {CHECKPOINTS}/")
  path = pathlib.Path(workdir).absolute() / CHECKPOINTS / str(step) / STATE_ITEM
  if not path.is_dir():
    raise FileNotFoundError(f"{path}: no such checkpoint")

  def as_abstract(x):
    sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  abstract = {k: jax.tree.map(as_abstract, t) for k, t in targets.items()}
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
  with ocp.PyTreeCheckpointer() as ckptr:
    out = ckptr.restore(
      path,
      args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True),
    )
  return step, {k: out[k] for k in targets}


def restore_params(
  workdir: str | os.PathLike, target: Any, *, step: int | None = None, which: str = "ema_params"
) -> tuple[int, Any]:
  """Reads only `params` or `ema_params` of a checkpoint (the optimizer state is not loaded).

  Args:
    workdir: training workdir.
    target: tree of arrays or `jax.ShapeDtypeStruct`s (with shardings) to restore onto.
    step: checkpoint step (default: the latest).
    which: "ema_params" or "params".

  Returns:
    (step, params).
  """
  if which not in ("ema_params", "params"):
    raise ValueError(f"which must be 'ema_params' or 'params', got {which!r}")
  step, out = restore_items(workdir, {which: target}, step=step)
  return step, out[which]
