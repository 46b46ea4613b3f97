"""Worker for test_train.py::test_two_processes_train_together (not a test module).

    python tests/multiprocess_train.py PROCESS_ID PORT WORKDIR OUT.npz

Runs the real command line (`alit_jax.train.__main__`, absl flags, jax.distributed) as one of two
processes with 2 CPU devices each, and writes this process's own copy of the final params.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import numpy as np  # noqa: E402
from absl import app  # noqa: E402


def main():
  pid, port, workdir, out = sys.argv[1:5]
  from alit_jax.train import __main__ as cli
  from alit_jax.train import sharding, trainer

  run = trainer.train_and_evaluate

  def run_and_dump(config, wd):
    result = run(config, wd)
    leaves = {
      sharding.path_name(k): np.asarray(v.addressable_data(0))
      for k, v in __import__("jax").tree_util.tree_leaves_with_path(result["state"]["params"])
    }
    np.savez(out, step=result["step"], **leaves)
    return result

  trainer.train_and_evaluate = run_and_dump
  argv = [
    "alit_jax.train",
    "--config=configs/alit_pretrain.py:runlocal",
    f"--workdir={workdir}",
    "--config.total_steps=3",
    "--config.warmup_steps=0",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=2",
    "--config.image_summary_every_steps=0",
    "--config.loss.halting=threshold",
    f"--coordinator_address=127.0.0.1:{port}",
    "--num_processes=2",
    f"--process_id={pid}",
  ]
  sys.argv = argv  # config_flags reads its overrides from sys.argv
  app.run(cli.main)


if __name__ == "__main__":
  main()
