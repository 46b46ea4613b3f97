"""Worker for test_robustness.py (not a test module): the robustness tests' run, killed for real.

    python tests/train_kill.py WORKDIR KILL_AT

Trains `config()` (also used in-process by the tests) and SIGKILLs itself when the KILL_AT-th
batch is fetched, i.e. after step KILL_AT - 1 was dispatched; checkpoints are synchronous, so
with KILL_AT = 5 the kill lands right after checkpoint 4 is complete.
"""

import os
import signal
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

# The tests' settings: every random stream matters (halting masks drawn, 2 random loss
# iterations of 3), a row per step, checkpoints at 4 and 8, written synchronously (so a kill
# right after one cannot interrupt it; the hparams rows of every run must be equal).
STEPS = dict(
  total_steps=8,
  checkpoint_every_steps=4,
  log_every_steps=1,
  image_summary_every_steps=0,
  async_checkpoints=False,
)


def config(**overrides):
  """The runlocal config on a 4 x 2 mesh of the 8 simulated devices, as tests/test_train.py."""
  from configs import alit_pretrain

  c = alit_pretrain.get_config("runlocal")
  c.mesh.data, c.mesh.fsdp = 4, 2
  c.sharding.min_fsdp_size = 1024
  c.loss.halting_threshold = 0.0
  c.loss.loss_iters = 2
  for key, value in dict(STEPS, **overrides).items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def main():
  workdir, kill_at = sys.argv[1], int(sys.argv[2])
  from absl import flags

  flags.FLAGS.mark_as_parsed()
  from alit_jax.train import sharding, trainer

  orig = sharding.global_batch
  calls = [0]

  def global_batch(local, mesh):
    calls[0] += 1
    if calls[0] == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    return orig(local, mesh)

  sharding.global_batch = global_batch
  trainer.train_and_evaluate(config(), workdir)


if __name__ == "__main__":
  main()
