"""Stage-1 training: runlocal learning, resume, sharding, multi-process, bad data, NaN guard.

All trainer runs use the tiny runlocal model on a (4 data x 2 fsdp) mesh of the 8 simulated
devices and one of two step settings (the runlocal recipe, or `RANDOM`), so the train step is
compiled three times in this process (those two plus a 1-device one) and otherwise reused from
JAX's compilation cache. Most of the time is compilation.
"""

import functools
import hashlib
import io
import json
import logging
import os
import pathlib
import socket
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from alit_jax import Tokenizer
from alit_jax.data import build_folder, sources
from alit_jax.data import transforms as T
from alit_jax.models import configs as model_configs
from alit_jax.models.alit import ALIT
from alit_jax.models.base_tokenizers import build_base
from alit_jax.train import checkpoints, common, export, sharding, steps, trainer
from configs import alit_pretrain

REPO = pathlib.Path(__file__).resolve().parents[1]
MESH = {"data": 4, "fsdp": 2}
MIN_FSDP = 1024  # so the tiny model's 64x64 kernels are really split over fsdp
# Settings that make every random stream matter: halting masks are drawn (threshold 0) and the
# loss is taken at 2 random iterations of 3. Shared by the resume and sharding tests, so their
# (4 x 2 mesh) train step is compiled once.
RANDOM = {"loss.halting_threshold": 0.0, "loss.loss_iters": 2}


def _config(**overrides):
  """The runlocal config on a 4x2 mesh (fsdp on), with overrides ("a.b": value)."""
  c = alit_pretrain.get_config("runlocal")
  c.mesh.data, c.mesh.fsdp = MESH["data"], MESH["fsdp"]
  c.sharding.min_fsdp_size = MIN_FSDP
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _jsonl(workdir):
  return [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _events(workdir):
  """(tag, step, kind) of every summary in the TensorBoard event files (no TensorFlow)."""
  from tensorboardX.proto import event_pb2

  out = []
  for path in (pathlib.Path(workdir) / "tensorboard").glob("events.out.tfevents.*"):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos : pos + 8])
      ev = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
      pos += 12 + n + 4
      for v in ev.summary.value:
        out.append((v.tag, ev.step, v.WhichOneof("value")))
  return out


def _leaves(tree):
  return {
    sharding.path_name(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
  }


class _BatchTap:
  """Wraps `sharding.global_batch`: records a hash of every batch; can raise at call `crash_at`."""

  def __init__(self, monkeypatch, crash_at=None):
    self.hashes = []
    self.crash_at = crash_at
    self._orig = sharding.global_batch
    monkeypatch.setattr(sharding, "global_batch", self)

  def __call__(self, local, mesh):
    self.hashes.append(hashlib.sha1(np.ascontiguousarray(local).tobytes()).hexdigest())
    if self.crash_at is not None and len(self.hashes) == self.crash_at:
      raise KeyboardInterrupt("simulated crash")
    return self._orig(local, mesh)


@pytest.fixture(scope="module")
def run50(tmp_path_factory):
  """The runlocal recipe for its 50 steps (image summaries at steps 1, 25 and 50)."""
  workdir = tmp_path_factory.mktemp("run50")
  result = trainer.train_and_evaluate(_config(), workdir)
  return workdir, result


def test_runlocal_trains_50_steps_and_loss_falls(run50):
  """Acceptance 1: 50 steps of the tiny model on generated images; the loss falls clearly.

  Measured (seed 0, 8 images/step, 3 iterations): mean loss over steps 1-10 is about 24.8,
  over steps 41-50 about 20.6 (the VQGAN-code NLL of every iteration drops from ~4.1 to ~3.4
  nats). The test asks for a drop of at least 10%. Also checks the monitoring outputs: the JSON
  lines file, TensorBoard scalars (per-iteration losses, lr, grad norm, images/s) and the image
  summaries (input + every iteration). Fails if the optimizer, schedule, gradients or loss
  wiring break (no learning), or if monitoring stops writing.
  """
  workdir, result = run50
  rows = [r for r in _jsonl(workdir) if "train/loss" in r]
  assert [r["step"] for r in rows] == [10, 20, 30, 40, 50]
  first, last = rows[0]["train/loss"], rows[-1]["train/loss"]
  assert last < 0.9 * first, (first, last)
  for i in range(3):
    assert rows[-1][f"train/nll_loss_{i}"] < rows[0][f"train/nll_loss_{i}"] - 0.3
  assert all(np.isfinite(r["train/grad_norm"]) and r["train/images_per_sec"] > 0 for r in rows)
  assert rows[-1]["train/lr"] < 1e-5 < rows[0]["train/lr"]  # cosine decays to min_lr = 0
  assert result["step"] == 50 and int(result["state"]["step"]) == 50
  events = _events(workdir)
  tags = {(t, kind) for t, _, kind in events}
  assert ("train/loss", "simple_value") in tags and ("train/nll_loss_2", "simple_value") in tags
  assert ("steps_per_sec", "simple_value") in tags  # clu ReportProgress
  images = sorted(s for t, s, kind in events if t == "reconstructions/ema" and kind == "image")
  assert images == [1, 25, 50]
  assert checkpoints.latest_step(workdir) == 50
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
    25,
    50,
  ]


def test_workdir_loads_as_tokenizer_and_exports(run50, tmp_path):
  """`Tokenizer.from_pretrained(workdir)` gives the latest EMA weights with the frozen base.

  Fails if the workdir misses its model config or base copy, if the raw params are loaded
  instead of the EMA, or if the export command writes something from_pretrained cannot read.
  """
  workdir, result = run50
  tok = Tokenizer.from_pretrained(workdir)
  assert tok.config.alit == model_configs.tiny_config().alit
  assert tok.meta["step"] == 50 and tok.meta["weights"] == "ema_params"
  want = _leaves(result["state"]["ema_params"])
  got = _leaves(tok.variables["alit"]["params"])
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  raw = _leaves(result["state"]["params"])
  assert any(not np.array_equal(raw[k], want[k]) for k in want)  # EMA != params
  out = str(tmp_path / "exported")
  assert export.main([str(workdir), "--out", out, "--default-threshold", "l1=0.2"]) == 0
  tok2 = Tokenizer.from_pretrained(tmp_path / "exported")
  for k, v in _leaves(tok2.variables).items():
    np.testing.assert_array_equal(v, _leaves(tok.variables)[k])
  # The recorded default threshold is what encode uses when given none (0.07 otherwise).
  assert tok2.default_threshold("l1") == 0.2 and tok.default_threshold("l1") == 0.07
  x = np.random.default_rng(0).random((2, 64, 64, 3)).astype(np.float32)
  assert tok2.encode(x).threshold == 0.2
  with pytest.raises(SystemExit):
    export.main([str(workdir), "--out", str(tmp_path / "x"), "--default-threshold", "l9=1"])


def test_init_from_workdir_starts_from_its_ema(run50, tmp_path):
  """`config.init_from=WORKDIR` initialises params (and EMA) from that run's EMA weights.

  With a 1-step warm-up the first update has lr 0, so after it the params must still equal the
  source EMA exactly. Fails if init_from is ignored or loads the raw params.
  """
  workdir, result = run50
  c = _config(init_from=str(workdir), total_steps=1, warmup_steps=1, image_summary_every_steps=0)
  out = trainer.train_and_evaluate(c, tmp_path / "b")
  want = _leaves(result["state"]["ema_params"])
  for k, v in _leaves(out["state"]["params"]).items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)


def test_resume_after_crash_equals_uninterrupted_run(tmp_path, monkeypatch):
  """Acceptance 2: a run killed after step 6 and restarted matches an uninterrupted run at 8.

  Checkpoints every 4 steps; the crash comes while fetching the 7th batch, so the restart
  resumes from step 4 and recomputes 5-8. Halting masks and loss iterations are random here.
  Fails if the data iterator position, optimizer state, EMA, step counter or per-step
  randomness are not restored exactly (train state compared to 1e-6, batches by content hash).
  """
  kw = dict(
    total_steps=8,
    checkpoint_every_steps=4,
    log_every_steps=4,
    image_summary_every_steps=0,
    **RANDOM,
  )
  tap = _BatchTap(monkeypatch)
  full = trainer.train_and_evaluate(_config(**kw), tmp_path / "full")
  uninterrupted = list(tap.hashes)
  assert len(uninterrupted) == 8 and len(set(uninterrupted)) == 8

  crash = _BatchTap(monkeypatch, crash_at=7)
  with pytest.raises(KeyboardInterrupt):
    trainer.train_and_evaluate(_config(**kw), tmp_path / "crashed")
  assert crash.hashes == uninterrupted[:7]
  assert checkpoints.latest_step(tmp_path / "crashed") == 4

  again = _BatchTap(monkeypatch)
  resumed = trainer.train_and_evaluate(_config(**kw), tmp_path / "crashed")
  assert again.hashes == uninterrupted[4:8]  # same data order after the restart
  assert int(resumed["state"]["step"]) == 8
  a, b = _leaves(full["state"]), _leaves(resumed["state"])
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
  rows = {r["step"]: r for r in _jsonl(tmp_path / "full") if "train/loss" in r}
  assert 0 < rows[8]["train/masked_fraction_1"] < 1  # halting really masked tokens


def test_sharded_step_matches_single_device():
  """Acceptance 3: the train step on 8 devices (mesh 4x2, params fsdp-split) equals 1 device.

  Two steps from the same state and batches with random halting masks and loss iterations.
  The first update has lr 0 (one warm-up step), so the Adam moments (linear in the gradients
  and their squares) compare the gradients of both steps tightly; the params after the second
  update (lr 1e-3) agree to 1e-5, since Adam turns float noise in near-zero gradients into
  updates of up to lr. Fails if sharding changes the math: a mean over the wrong axis, per-device
  random draws, a missing gradient reduction, or fsdp-split params gathered wrong.
  """
  mc = model_configs.tiny_config()
  model, base = ALIT(mc.alit), build_base(mc.base)
  c = _config(**RANDOM)
  spec = trainer.stage1_spec(c, mc)
  # The trainer's (cached) initialisers: no extra compilation.
  mesh8 = sharding.make_mesh(MESH)
  rules = tuple(tuple(r) for r in c.sharding.rules)
  create = functools.partial(steps.create_train_state, model=model, spec=spec)
  abstract = jax.eval_shape(create, jax.random.key(0))
  init = jax.jit(
    steps.create_train_state,
    static_argnums=(1, 2),
    out_shardings=sharding.tree_shardings(abstract, mesh8, rules, MIN_FSDP),
    compiler_options=common.FAST_COMPILE,
  )
  state0 = jax.device_get(init(jax.random.key(1), model, spec))
  base_vars = jax.device_get(common.init_random_base(mc.base, 64, np.uint32(2)))
  rng = np.random.default_rng(0)
  batches = [rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8) for _ in range(2)]
  hp_host = dict(
    lr=1e-3, min_lr=0.0, warmup_steps=1, total_steps=10, ema_decay=0.9, steps_per_epoch=5
  )

  def run(mesh):
    state_sh = sharding.tree_shardings(state0, mesh, rules, MIN_FSDP)
    base_sh = sharding.tree_shardings(base_vars, mesh, rules, MIN_FSDP)
    repl = sharding.replicated(mesh)
    f = jax.jit(
      steps.train_step,
      static_argnums=(5, 6, 7),
      in_shardings=(state_sh, base_sh, sharding.batch_sharding(mesh), repl, repl),
      out_shardings=(state_sh, repl),
      donate_argnums=(0,),
    )
    state = sharding.put_global(state0, state_sh)
    bv = sharding.put_global(base_vars, base_sh)
    hp = sharding.put_global(steps.hparams(**hp_host), jax.tree.map(lambda _: repl, hp_host))
    seed = sharding.put_global(np.uint32(3), repl)
    states, ms = [], []
    for x in batches:
      state, m = f(state, bv, sharding.global_batch(x, mesh), hp, seed, model, base, spec)
      states.append(_leaves(jax.device_get(state)))
      ms.append(jax.device_get(m))
    return states, ms, {s.spec for s in jax.tree.leaves(state_sh)}

  s8, m8, specs8 = run(mesh8)
  s1, m1, _ = run(sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1]))
  assert any("fsdp" in tuple(s) for s in specs8)  # some params are really split
  for a, b in zip(m8, m1):
    assert a["masked_fraction"].sum() > 0  # halting masks were drawn
    np.testing.assert_array_equal(a["masked_fraction"], b["masked_fraction"])
    np.testing.assert_array_equal(a["loss_iters"], b["loss_iters"])
    for k in ("loss", "grad_norm", "nll_loss", "code_loss", "quantization_loss"):
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=k)
  for a, b in zip(s8, s1):
    for k in a:
      if "/mu/" in k or "/nu/" in k:  # Adam moments: (1-b1) g and (1-b2) g^2 on step 1
        scale = max(np.abs(b[k]).max(), 1e-30)
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5 * scale, err_msg=k)
  for k in s1[0]:
    if k.startswith("params/"):
      np.testing.assert_array_equal(s8[0][k], s1[0][k], err_msg=k)  # lr 0: unchanged
      np.testing.assert_allclose(s8[1][k], s1[1][k], rtol=0, atol=1e-5, err_msg=k)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_train_together(tmp_path):
  """Acceptance 4: two jax.distributed processes on localhost (2 CPU devices each) train 3 steps.

  Runs the real command line in both. Fails if the processes diverge (different data shards
  assembled wrongly, non-replicated updates), if multi-process checkpointing breaks, or if
  non-zero processes write logs.
  """
  port = _free_port()
  workdir = tmp_path / "wd"
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        str(REPO / "tests" / "multiprocess_train.py"),
        str(i),
        str(port),
        str(workdir),
        str(tmp_path / f"p{i}.npz"),
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=400)
      outs.append(out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-5000:]
  a, b = np.load(tmp_path / "p0.npz"), np.load(tmp_path / "p1.npz")
  assert int(a["step"]) == int(b["step"]) == 3
  assert sorted(a.files) == sorted(b.files)
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # The shared checkpoint holds the same params; only process 0 wrote metrics.
  _, variables, meta = export.load_workdir(workdir, ema=False)
  assert meta["step"] == 3
  for k, v in _leaves(variables["alit"]["params"]).items():
    np.testing.assert_array_equal(v, a[k], err_msg=k)
  steps_logged = [r["step"] for r in _jsonl(workdir) if "train/loss" in r]
  assert steps_logged == [1, 2, 3]


def _png(arr, **kw):
  buf = io.BytesIO()
  Image.fromarray(arr, **kw).save(buf, format="PNG")
  return buf.getvalue()


def test_bad_images_in_folder_are_handled_and_named(tmp_path, caplog):
  """Acceptance 5: corrupt, truncated, empty, grayscale, RGBA, 16-bit, palette, CMYK and tiny
  images in a folder: the readable ones are converted, the others skipped and named in the log;
  training on the folder runs to the end.

  Fails if a bad file stops the build or the run, if skipped files are not named, or if a
  16-bit image is clipped to white instead of scaled to 8 bits.
  """
  rng = np.random.default_rng(0)
  root = tmp_path / "imgs"
  (root / "a").mkdir(parents=True)
  (root / "b").mkdir()
  for i in range(6):
    im = Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8))
    im.save(root / "a" / f"rgb{i}.jpg", quality=90)
  gray16 = (np.linspace(0, 40000, 48 * 48).reshape(48, 48)).astype(np.uint16)
  (root / "b" / "gray16.png").write_bytes(_png(gray16))
  (root / "b" / "gray.png").write_bytes(_png(rng.integers(0, 256, (30, 30), dtype=np.uint8)))
  (root / "b" / "rgba.png").write_bytes(_png(rng.integers(0, 256, (30, 20, 4), dtype=np.uint8)))
  Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).convert("P").save(
    root / "b" / "palette.png"
  )
  Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).convert("CMYK").save(
    root / "b" / "cmyk.jpg"
  )
  (root / "b" / "tiny.png").write_bytes(_png(np.full((1, 1, 3), 200, np.uint8)))
  (root / "b" / "tiny2x3.png").write_bytes(_png(np.full((2, 3, 3), 90, np.uint8)))
  good = (root / "a" / "rgb0.jpg").read_bytes()
  (root / "b" / "truncated.jpg").write_bytes(good[: len(good) // 2])
  (root / "b" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(100))
  (root / "b" / "empty.jpg").write_bytes(b"")

  report = build_folder.build_folder_dataset(root, tmp_path / "data", name="bad", progress=False)
  corrupt = sorted(s["file"] for s in report["skipped"] if s["kind"] == "corrupt")
  assert corrupt == ["b/empty.jpg", "b/garbage.png", "b/truncated.jpg"]
  assert report["splits"] == {"train": 13}
  src = sources.get_source(f"folder:{tmp_path / 'data'}", "train")
  by_name = {src[i]["file_name"]: src[i]["image"] for i in range(len(src))}
  g16 = np.asarray(T.decode_image(by_name["b/gray16.png"]))
  expected = np.round(gray16 * (255.0 / 65535.0))
  assert np.abs(g16[..., 0].astype(float) - expected).max() <= 1 and g16.mean() < 120
  assert np.asarray(T.decode_image(by_name["b/tiny.png"])).shape == (1, 1, 3)

  caplog.set_level(logging.WARNING)
  c = _config(total_steps=3, log_every_steps=1, image_summary_every_steps=0)
  c.input.data = f"folder:{tmp_path / 'data'}/bad"
  out = trainer.train_and_evaluate(c, tmp_path / "wd")
  assert out["step"] == 3 and np.isfinite(out["metrics"]["loss"])
  for name in corrupt:
    assert name in caplog.text, name


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  """A diverging run (lr 1e30) stops with a clear error and never saves a non-finite state.

  Fails if training continues past a NaN/Inf loss, if the error does not say which step broke
  and which checkpoint is intact, or if a checkpoint with non-finite values is written.
  """
  c = _config(
    lr=1e30,
    warmup_steps=0,
    total_steps=6,
    checkpoint_every_steps=1,
    log_every_steps=1,
    image_summary_every_steps=0,
  )
  with pytest.raises(trainer.NonFiniteLossError, match=r"at step (\d+).*last good checkpoint"):
    trainer.train_and_evaluate(c, tmp_path)
  saved = checkpoints.latest_step(tmp_path)
  assert saved is not None and saved < 6
  _, variables, _ = export.load_workdir(tmp_path, ema=False)
  assert all(np.isfinite(v).all() for v in _leaves(variables).values())
  rows = [r for r in _jsonl(tmp_path) if "train/loss" in r]
  assert all(np.isfinite(r["train/loss"]) for r in rows) and rows[-1]["step"] == saved


def test_curriculum_rollout_iters_trains_only_the_first_iterations():
  """`loss.rollout_iters=k` runs the first k iterations and equals them in the full rollout.

  With halting off, iterations 0..k-1 do not depend on later ones, so the truncated step's loss
  terms must equal the full rollout's (its forward loss, computed on the same params); the later
  iterations report zeros and are unmarked in `loss_iters`, and their timestep embeddings get no
  gradient (AdamW's weight decay alone moves them). Fails if the truncated model slices the
  wrong parameter rows, or if its metrics lose the (N,) shape the trainer's windows expect.
  """
  from alit_jax.models import rollout as rollout_lib
  from alit_jax.train import losses

  mc = model_configs.tiny_config()  # 3 iterations
  model, base = ALIT(mc.alit), build_base(mc.base)
  n, k = mc.alit.max_rollout_iters, 2
  base_vars = common.init_random_base(mc.base, 64, np.uint32(2))
  images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  hp = steps.hparams(
    lr=1e-3, min_lr=0.0, warmup_steps=0, total_steps=10, ema_decay=0.9, steps_per_epoch=5
  )
  off = rollout_lib.Halting("off")
  spec = steps.Stage1Spec(halting=off, rollout_iters=k)
  state = steps.create_train_state(jax.random.key(1), model, spec)
  params = jax.device_get(state["params"])
  x = steps.to_float(images)
  _, mf = jax.jit(
    lambda p: losses.stage1_loss(
      model, {"params": p}, x, rollout_lib.base_encode(base, base_vars, x), halting=off
    )
  )(params)
  f = jax.jit(steps.train_step, static_argnums=(5, 6, 7))
  new, ms = f(state, base_vars, images, hp, np.uint32(3), model, base, spec)
  ms = jax.device_get(ms)
  np.testing.assert_array_equal(ms["loss_iters"], np.arange(n) < k)
  for key in ("nll_loss", "code_loss", "quantization_loss"):
    assert ms[key].shape == (n,), key
    np.testing.assert_allclose(ms[key][:k], mf[key][:k], rtol=1e-5, err_msg=key)
    assert np.all(ms[key][k:] == 0) and np.all(mf[key][k:] > 0), key
  before = params["timestep_embedding"]
  after = np.asarray(new["params"]["timestep_embedding"])
  decayed = before * (1 - float(ms["lr"]) * 0.05)  # AdamW weight decay 0.05
  np.testing.assert_allclose(after[k:], decayed[k:], rtol=1e-6, atol=1e-9)
  assert np.abs(after[:k] - decayed[:k]).max() > 1e-5  # the trained rows moved


def test_metric_window_counts_boolean_iteration_masks():
  """A boolean `*_iters` mask counts steps per iteration (summing bools would OR them).

  Fails if per-iteration means over a logging window turn into sums (the curriculum's first
  runs logged NLL 271 for a mean of 5.4 this way).
  """
  w = trainer.MetricsWindow()
  for v in (4.0, 6.0):
    w.add_step([{"nll_loss": np.array([v, 0.0]), "loss_iters": np.array([True, False])}])
  out = w.summary(1.0, 1)
  assert out["nll_loss_0"] == pytest.approx(5.0)
  assert out["nll_loss_1"] == 0.0
