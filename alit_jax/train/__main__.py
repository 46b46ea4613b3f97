r"""Command line: `python -m alit_jax.train --config=configs/FILE.py:ARGS --workdir=DIR`.

  python -m alit_jax.train --config=configs/alit_pretrain.py:variant=small,base=vqgan \
    --config.base_checkpoint=/ckpts/vqgan_jax --workdir=/runs/alit_small

Configs: `alit_pretrain.py` (stage 1), `alit_finetune.py` (stage 2: full fine-tuning with pixel,
LPIPS and GAN losses), `vqgan_train.py` (a base VQGAN from scratch); see their docstrings.

`--config.KEY=None` unsets an optional value (e.g. `--config.lr=None` to use `config.blr`). An
override that the config makes dead (`--config.blr` while `config.lr` is set, a halting
threshold with halting off) is refused with the reason rather than silently ignored.

Stops that are not bugs (a non-finite loss, a workdir whose checkpoints do not restore) end with
one `error:` line on stderr and exit code 1, no traceback.

Multi-host: start one process per host with the same flags plus
  --coordinator_address=HOST0:PORT --num_processes=P --process_id=I
(or --distributed to let `jax.distributed.initialize()` read them from the cluster environment).
"""

from __future__ import annotations

import re
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Training config file (configs/alit_pretrain.py:ARGS).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "jax.distributed coordinator HOST:PORT (multi-process runs)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed", False, "Call jax.distributed.initialize() with the cluster's auto-detection."
)
flags.mark_flags_as_required(["config", "workdir"])

# `--config.KEY=None` items, taken out of argv before absl parses it (a typed flag cannot be None).
NONE_OVERRIDE = re.compile(r"^--config\.([A-Za-z0-9_.]+)=(?i:none)$")
_unset: list[str] = []


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, after removing the `--config.KEY=None` items (applied in `main`)."""
  rest = []
  for arg in argv:
    m = NONE_OVERRIDE.match(arg)
    if m:
      _unset.append(m.group(1))
    else:
      rest.append(arg)
  try:
    return flags.FLAGS(rest)
  except flags.Error as e:
    print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
    print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
    sys.exit(1)


def set_none(config, key: str) -> None:
  """Sets dotted `key` of `config` to None (`--config.KEY=None`); UsageError if it is absent."""
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise app.UsageError(f"--config.{key}=None: the config has no {key!r}")
  with config.unlocked():
    node[leaf] = None


def given_overrides() -> list[str]:
  """The config keys given as `--config.KEY=...` on this command line."""
  fl = flags.FLAGS
  keys = [n[len("config.") :] for n in fl if n.startswith("config.") and fl[n].present]
  return sorted(set(keys) | set(_unset))


def _get(config, key: str):
  node = config
  for p in key.split("."):
    if node is None or p not in node:
      return None
    node = node[p]
  return node


def dead_overrides(config, given: list[str]) -> list[str]:
  """Messages for the given overrides that the (final) config makes dead.

  Args:
    config: the config after every override.
    given: the keys given on the command line (`given_overrides`).
  """
  out = []
  if "blr" in given and _get(config, "lr") is not None:
    out.append(
      f"--config.blr has no effect: config.lr={_get(config, 'lr')} is set (the absolute peak lr "
      "wins); give --config.lr instead, or add --config.lr=None to use blr * batch / 256"
    )
  if "loss.halting_threshold" in given and _get(config, "loss.halting") == "off":
    out.append(
      "--config.loss.halting_threshold has no effect with config.loss.halting='off'; set "
      "--config.loss.halting=threshold or sample too"
    )
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  for key in _unset:
    set_none(config, key)
  dead = dead_overrides(config, given_overrides())
  if dead:
    print("error: " + "; ".join(dead), file=sys.stderr)
    return 2
  import jax

  if _COORDINATOR.value or _NUM_PROCESSES.value is not None or _PROCESS_ID.value is not None:
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()

  from alit_jax.train import checkpoints, trainer

  try:
    trainer.train_and_evaluate(config, _WORKDIR.value)
  except (trainer.NonFiniteLossError, checkpoints.NoUsableCheckpointError) as e:
    from absl import logging

    logging.flush()
    sys.stderr.flush()
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
