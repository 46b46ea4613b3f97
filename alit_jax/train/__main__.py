r"""Command line: `python -m alit_jax.train --config=configs/FILE.py:ARGS --workdir=DIR`.

  python -m alit_jax.train --config=configs/alit_pretrain.py:variant=small,base=vqgan \
    --config.base_checkpoint=/ckpts/vqgan_jax --workdir=/runs/alit_small

Configs: `alit_pretrain.py` (stage 1), `alit_finetune.py` (stage 2: full fine-tuning with pixel,
LPIPS and GAN losses), `vqgan_train.py` (a base VQGAN from scratch); see their docstrings.

Multi-host: start one process per host with the same flags plus
  --coordinator_address=HOST0:PORT --num_processes=P --process_id=I
(or --distributed to let `jax.distributed.initialize()` read them from the cluster environment).
"""

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  if _COORDINATOR.value or _NUM_PROCESSES.value is not None or _PROCESS_ID.value is not None:
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()

  from alit_jax.train import trainer

  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
