"""Issue 18, training: resume past a corrupt checkpoint, exact metrics across crashes, clean stops.

Every run is the tiny runlocal model on the (4 data x 2 fsdp) mesh of the 8 simulated devices
with the settings of `tests/train_kill.py` (8 steps, checkpoints at 4 and 8, a metrics row per
step, random halting masks and loss iterations), so the train step compiles once in this process;
one uninterrupted run is the reference for all of them. The SIGKILL and command-line tests run
real subprocesses (they compile again).
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
import train_kill

from alit_jax.train import checkpoints, sharding, trainer, writers

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMING = ("steps_per_sec", "uptime", "train/images_per_sec")  # wall-clock values, never equal


def _leaves(tree):
  return {
    sharding.path_name(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def _rows(workdir):
  """metrics.jsonl without the wall-clock values (rows left with only a step are dropped)."""
  out = []
  for line in (pathlib.Path(workdir) / writers.METRICS_FILE).read_text().splitlines():
    row = {k: v for k, v in json.loads(line).items() if k not in TIMING}
    if set(row) != {"step"}:
      out.append(row)
  return out


def _assert_same_metrics(workdir, ref_workdir):
  """Row for row: the same hparams, the same steps in the same order, values to 1e-5."""
  got, want = _rows(workdir), _rows(ref_workdir)
  assert [r.get("step", "hparams") for r in got] == [r.get("step", "hparams") for r in want]
  for a, b in zip(got, want):
    assert a.keys() == b.keys(), (a.get("step"), a.keys() ^ b.keys())
    for k in a:
      if k == "hparams":
        assert a[k] == b[k]
      else:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=f"{k} {a['step']}")


def _assert_same_state(result, ref):
  a, b = _leaves(result["state"]), _leaves(ref["state"])
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
  """The uninterrupted run: (workdir, result)."""
  workdir = tmp_path_factory.mktemp("full")
  return workdir, trainer.train_and_evaluate(train_kill.config(), workdir)


def _truncate_metadata(step_dir):
  (step_dir / "state" / "_METADATA").write_bytes(b"")


def _truncate_ocdbt_data(step_dir):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  biggest = max(files, key=lambda p: p.stat().st_size)
  os.truncate(biggest, biggest.stat().st_size // 2)


def _truncate_data_json(step_dir):
  path = step_dir / "data" / "process_0-of-1.json"
  os.truncate(path, path.stat().st_size // 2)


@pytest.mark.parametrize(
  "corrupt",
  [_truncate_metadata, _truncate_ocdbt_data, _truncate_data_json],
  ids=lambda f: f.__name__,
)
def test_resume_skips_a_corrupt_newest_checkpoint(full, tmp_path, corrupt, caplog):
  """Acceptance 2: with checkpoint 8 damaged (an empty `_METADATA`, a truncated OCDBT data file,
  a truncated grain iterator JSON), a rerun names it and why, moves it to `8.corrupt-<time>`,
  resumes from checkpoint 4 and ends with the uninterrupted run's state and metrics.

  Fails if a damaged newest checkpoint blocks resume (the issue's raw TensorStore / JSON
  tracebacks), if the broken files are deleted instead of kept, or if the resumed run differs.
  """
  ref_dir, ref = full
  workdir = tmp_path / "wd"
  shutil.copytree(ref_dir, workdir)
  corrupt(workdir / "checkpoints" / "8")
  caplog.set_level("WARNING")
  result = trainer.train_and_evaluate(train_kill.config(), workdir)
  aside = [p for p in (workdir / "checkpoints").iterdir() if p.name.startswith("8.corrupt-")]
  assert len(aside) == 1 and (aside[0] / "state").is_dir(), list(aside)
  assert (
    "checkpoint 8 does not restore" in caplog.text and "resumed from checkpoint 4" in caplog.text
  )
  assert str(aside[0]) in caplog.text
  _assert_same_state(result, ref)
  _assert_same_metrics(workdir, ref_dir)
  assert checkpoints.latest_step(workdir) == 8


def test_no_checkpoint_restores_is_one_clear_error(full, tmp_path):
  """If every checkpoint is damaged, the error is one line naming each and why, and nothing is
  moved (a changed config fails the same way, and must not cost the user their checkpoints)."""
  ref_dir, _ = full
  workdir = tmp_path / "wd"
  shutil.copytree(ref_dir, workdir)
  for step in (4, 8):
    _truncate_metadata(workdir / "checkpoints" / str(step))
  with pytest.raises(checkpoints.NoUsableCheckpointError) as e:
    trainer.train_and_evaluate(train_kill.config(), workdir)
  msg = str(e.value)
  assert "\n" not in msg and "step 8:" in msg and "step 4:" in msg
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "8"]


def test_metrics_exact_after_a_crash_past_a_checkpoint(full, tmp_path, monkeypatch):
  """A crash while step 7 is fetched (rows up to step 5 written and flushed on the way out,
  checkpoint 4 the latest): the rerun drops rows 5.. and rewrites them once, so metrics.jsonl
  equals the uninterrupted run's row for row (hparams once, every step once).

  Fails if rows past the restored step are appended twice, or the hparams row goes missing or
  doubles.
  """
  ref_dir, ref = full
  workdir = tmp_path / "wd"
  orig = sharding.global_batch
  calls = []

  def crash_at_7(local, mesh):
    calls.append(1)
    if len(calls) == 7:
      raise KeyboardInterrupt("simulated crash")
    return orig(local, mesh)

  monkeypatch.setattr(sharding, "global_batch", crash_at_7)
  with pytest.raises(KeyboardInterrupt):
    trainer.train_and_evaluate(train_kill.config(), workdir)
  monkeypatch.setattr(sharding, "global_batch", orig)
  assert checkpoints.latest_step(workdir) == 4
  assert [r["step"] for r in _rows(workdir) if "step" in r][-1] == 5  # a row past checkpoint 4
  result = trainer.train_and_evaluate(train_kill.config(), workdir)
  _assert_same_state(result, ref)
  _assert_same_metrics(workdir, ref_dir)


def test_metrics_survive_sigkill_after_a_checkpoint(full, tmp_path):
  """Acceptance 3: a training process SIGKILLed right after checkpoint 4 has its rows up to
  step 4 on disk (flushed at the checkpoint), and after the resume metrics.jsonl equals the
  uninterrupted run's row for row (steps, and values to 1e-5; wall-clock rows aside).

  Fails if metrics are only buffered (the issue: an empty file after the kill, and the resumed
  run never rewrote the hparams row or the early steps).
  """
  ref_dir, ref = full
  workdir = tmp_path / "wd"
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.run(
    [sys.executable, str(REPO / "tests" / "train_kill.py"), str(workdir), "5"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=400,
  )
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert checkpoints.latest_step(workdir) == 4
  rows = _rows(workdir)
  assert "hparams" in rows[0] and [r["step"] for r in rows[1:]] == [1, 2, 3, 4]
  result = trainer.train_and_evaluate(train_kill.config(), workdir)
  _assert_same_state(result, ref)
  _assert_same_metrics(workdir, ref_dir)


def test_rewind_jsonl_keeps_rows_up_to_the_step():
  """`rewind_jsonl` keeps hparams and rows <= step, drops later rows and a torn last line; at
  step 0 it empties the file (a fresh start writes everything again)."""
  import tempfile

  with tempfile.TemporaryDirectory() as d:
    path = pathlib.Path(d) / "m.jsonl"
    lines = ['{"hparams": {"a": 1}}', '{"step": 1, "x": 1}', '{"step": 2, "x": 2}', '{"step": 3']
    path.write_text("\n".join(lines))
    assert writers.rewind_jsonl(path, 1)
    assert path.read_text().splitlines() == lines[:2]
    assert not writers.rewind_jsonl(path, 0) and path.read_text() == ""
    assert not writers.rewind_jsonl(pathlib.Path(d) / "absent.jsonl", 3)


def _cli(workdir, *flags, timeout=400):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device: the runlocal mesh takes them all
  cmd = [
    sys.executable,
    "-m",
    "alit_jax.train",
    "--config=configs/alit_pretrain.py:runlocal",
    f"--workdir={workdir}",
    *flags,
  ]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_nan_run_exits_1_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path):
  """Acceptance 6: a diverging run (lr 1e30) from the command line exits 1 with a single-line
  `error:` message (no traceback) that names the intact checkpoint, which restores finite.

  Fails if the stop is printed as an absl traceback, exits 0, or says both "no checkpoint was
  written" and "resume from that checkpoint".
  """
  from alit_jax.train import export

  proc = _cli(
    tmp_path,
    "--config.lr=1e30",
    "--config.warmup_steps=0",
    "--config.total_steps=6",
    "--config.checkpoint_every_steps=1",
    "--config.log_every_steps=1",
    "--config.image_summary_every_steps=0",
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
  assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-3000:]
  saved = checkpoints.latest_step(tmp_path)
  assert saved is not None and f"last good checkpoint (step {saved})" in errors[0]
  assert "no checkpoint" not in errors[0]
  _, variables, _ = export.load_workdir(tmp_path, ema=False)
  assert all(np.isfinite(v).all() for v in _leaves(variables).values())


def test_non_finite_message_wording_with_and_without_a_checkpoint():
  """The stop message is one line and says the right thing in both cases."""
  m = {"loss": np.float32(np.nan), "grad_norm": np.float32(np.inf)}
  none = trainer.non_finite_message(3, m, None, "/w/checkpoints")
  some = trainer.non_finite_message(9, m, 8, "/w/checkpoints")
  assert "\n" not in none and "\n" not in some
  assert "no checkpoint was written" in none and "starts from step 0" in none
  assert "resume" not in none and "intact" not in none
  assert "last good checkpoint (step 8) in /w/checkpoints is intact" in some
  assert "resumes from it" in some and "no checkpoint" not in some


def test_dead_config_override_is_refused(tmp_path):
  """`--config.blr` under runlocal (which sets an absolute `lr`) is refused with the reason and
  nothing is written; `--config.lr=None` is accepted as a way to unset lr.

  Fails if a flag the config makes dead is silently ignored, or `--config.lr=None` cannot be
  given.
  """
  from alit_jax.train import __main__ as cli

  proc = _cli(tmp_path / "wd", "--config.blr=0.1", timeout=120)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "--config.blr has no effect: config.lr=0.001 is set" in proc.stderr
  assert "--config.lr=None" in proc.stderr and not (tmp_path / "wd").exists()

  from configs import alit_pretrain

  c = alit_pretrain.get_config("runlocal")
  c.lock()
  cli.set_none(c, "lr")
  assert c.lr is None and cli.dead_overrides(c, ["blr", "lr"]) == []
  c.loss.halting = "off"
  assert "halting_threshold" in cli.dead_overrides(c, ["loss.halting_threshold"])[0]
  assert cli.NONE_OVERRIDE.match("--config.lr=None").group(1) == "lr"


def test_export_overwrite_refuses_the_workdir_and_foreign_dirs(full, tmp_path, capsys):
  """`train.export --overwrite` refuses an --out that holds the workdir, or a directory it did
  not write, with one line and deleting nothing; over its own earlier export it succeeds.

  Fails if an export can replace (delete) the training workdir or a user's folder.
  """
  from alit_jax import Tokenizer, outputs
  from alit_jax.train import export

  ref_dir, _ = full
  before = sorted(p.relative_to(ref_dir) for p in ref_dir.rglob("*"))
  for out in (ref_dir, ref_dir.parent):
    assert export.main([str(ref_dir), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "contains the input" in err and len(err.strip().splitlines()) == 1, err
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "keep.txt").write_text("x")
  assert export.main([str(ref_dir), "--out", str(foreign), "--overwrite"]) == 2
  assert "not written by alit-jax" in capsys.readouterr().err
  assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
  out = tmp_path / "exported"
  assert export.main([str(ref_dir), "--out", str(out)]) == 0
  assert export.main([str(ref_dir), "--out", str(out), "--overwrite", "--params"]) == 0
  assert (out / outputs.MARKER).is_file()
  assert Tokenizer.from_pretrained(out).meta["weights"] == "params"
  assert sorted(p.relative_to(ref_dir) for p in ref_dir.rglob("*")) == before
