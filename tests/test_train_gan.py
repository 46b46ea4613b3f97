"""Stage-2 full fine-tuning and base-VQGAN training: steps, schedule, trainer runs, restores.

Trainer runs use the tiny runlocal models; the stage-2 runs share one step setting on a
(4 data x 2 fsdp) mesh, so their generator and discriminator steps are compiled once in this
process. Most of the time is compilation.
"""

import functools
import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from alit_jax import Tokenizer, checkpoint
from alit_jax.convert import __main__ as convert_cli
from alit_jax.convert import alit_checkpoint, mapping
from alit_jax.losses import gan as gan_lib
from alit_jax.losses import lpips as lpips_lib
from alit_jax.losses.discriminator import NLayerDiscriminator
from alit_jax.models import configs as model_configs
from alit_jax.models import rollout as rollout_lib
from alit_jax.models.alit import ALIT
from alit_jax.models.base_tokenizers import VQGAN, build_base, decoder_conv_out
from alit_jax.train import (
  checkpoints,
  common,
  export,
  gan_stage,
  gan_steps,
  gan_tasks,
  sharding,
  steps,
  trainer,
)
from configs import alit_finetune, alit_pretrain, vqgan_train

MESH = {"data": 4, "fsdp": 2}
MIN_FSDP = 1024


def _set(c, overrides):
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _ft_config(**overrides):
  """Stage-2 runlocal on a 4x2 mesh, halting masks drawn (threshold 0), 6 steps per epoch,
  GAN weight 0.2 in epoch 0 and 0.8 after, image summaries at steps 1 and 8."""
  c = alit_finetune.get_config("runlocal")
  c.input.data = "synthetic:num_examples=48,image_size=64"
  c.log_every_steps = 4
  c.image_summary_every_steps = 8
  c.checkpoint_every_steps = 4
  c.mesh.data, c.mesh.fsdp = MESH["data"], MESH["fsdp"]
  c.sharding.min_fsdp_size = MIN_FSDP
  c.loss.halting_threshold = 0.0
  c.gan.start_epochs = (0, 1)  # 8 steps per epoch: weight 0.2, then 0.8 from step 8
  return _set(c, overrides)


def _jsonl(workdir):
  return [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _leaves(tree):
  return {
    sharding.path_name(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def _reference_engine(spe, epochs, weight_of_epoch, n=8, disc_steps=8):
  """Per data step (kind, iteration), transcribed from the reference's train_one_epoch loop."""
  out = []
  for epoch in range(epochs):
    current = 0  # current_repeatition_iter, reset every epoch
    for d in range(spe):
      w = weight_of_epoch(epoch)
      idx = 1 - int((d + 1) % (disc_steps + 1) == 0)
      if w == 0:
        idx = 0
      out.append(("gen" if idx == 0 else "disc", current % n))
      if idx == 0:
        current += 1
  return out


# ----------------------------------------------------------------------------------------------
# Pure pieces: schedule, VQ loss, steps.


def test_schedule_matches_the_reference_engine():
  """Step kinds and rollout iterations over 5 epochs equal a transcription of the reference loop
  (8 discriminator steps then 1 generator step once the GAN weight is on; the iteration advances
  round-robin after each generator step and restarts every epoch), also when a fresh schedule is
  asked at arbitrary steps (a resumed run). "both" is a generator + discriminator step per batch.

  Fails if stage 2 trains the wrong iteration, alternates updates differently from
  engines/full_finetuning.py, or a resumed run continues with a different iteration.
  """
  spe = 31
  weight = lambda e: gan_lib.gan_weight_schedule(e, off_until=1, mid_until=2)  # noqa: E731
  want = _reference_engine(spe, 5, weight)
  sched = gan_steps.Schedule((0.0, 0.2, 0.8), (2 * spe, 3 * spe), spe, num_iters=8)
  got = []
  for s in range(5 * spe):
    p = sched.plan(s)
    got.append((p.kinds[0], p.iteration))
    assert p.gan_weight == weight(s // spe) and p.with_disc
  assert got == want
  assert {k for k, _ in got[: 2 * spe]} == {"gen"} and got[2 * spe + 8] == ("gen", 0)
  for s in (100, 3, 77, 150, 62):
    assert (
      gan_steps.Schedule((0.0, 0.2, 0.8), (2 * spe, 3 * spe), spe, num_iters=8).plan(s).iteration
      == want[s][1]
    )
  both = gan_steps.Schedule((0.0, 0.8), (5,), 4, num_iters=1, pattern="both")
  assert [both.plan(s).kinds for s in (0, 4, 5)] == [("gen",), ("gen",), ("gen", "disc")]
  assert not both.plan(4).with_disc and both.plan(5).with_disc
  with pytest.raises(ValueError, match="one more entry"):
    gan_steps.Schedule((0.0, 0.2), (1, 2), 4, 1)


def test_vq_loss_legacy_form_and_straight_through():
  """vq_loss = mean((sg(zq) - z)^2) + beta * mean((zq - sg(z))^2): value (1 + beta) * mse, the
  encoder gets only the commitment gradient, the codebook only beta times its own; the task's
  straight-through output equals zq with the identity gradient to the encoder.

  Fails if the codebook/commitment terms are swapped (the non-legacy form) or weighted wrong, or
  if gradients leak through the quantization.
  """
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
  zq = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
  mse = float(np.mean((np.asarray(z) - np.asarray(zq)) ** 2))
  np.testing.assert_allclose(gan_tasks.vq_loss(z, zq, 0.25), 1.25 * mse, rtol=1e-6)
  gz, gq = jax.grad(gan_tasks.vq_loss, argnums=(0, 1))(z, zq, 0.25)
  np.testing.assert_allclose(gz, 2 * (z - zq) / z.size, rtol=1e-5)
  np.testing.assert_allclose(gq, 0.25 * 2 * (zq - z) / z.size, rtol=1e-5)


def _tiny_vqgan_task(**kw):
  cfg = model_configs.VQGANConfig(
    ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, embed_dim=8, n_embed=16, resolution=32
  )
  return gan_tasks.VQGANTask(VQGAN(cfg), **kw)


def _random_lpips(seed=0):
  rng = np.random.default_rng(seed)

  def make(path, s):
    fan_in = int(np.prod(s.shape[:-1]))
    w = rng.normal(size=s.shape) * np.sqrt(2.0 / fan_in)
    return (
      np.abs(w).astype(np.float32) if "lin" in sharding.path_name(path) else w.astype(np.float32)
    )

  return jax.tree_util.tree_map_with_path(make, lpips_lib.lpips_target())


FAST = common.STEP_FAST_COMPILE
HP = dict(lr=1e-3, min_lr=0.0, warmup_steps=0, total_steps=10, ema_decay=0.9, steps_per_epoch=5)


def test_generator_step_equals_brute_force_autodiff():
  """The generator step's loss, adaptive weight and gradient equal plain autodiff of the
  reference objective L1 + d_weight * g + VQ loss, with d_weight from the gradients of nll and g
  w.r.t. the decoder's conv_out kernel; the quirk moves only the trained discriminator (of two),
  along d_weight * dg/dD (generator AdamW). Without the discriminator (before a late GAN start)
  the loss is L1 + VQ and D is untouched. (LPIPS in a step: the VQGAN trainer test.)

  Fails if the decoder split (features + conv_out), the combined cotangent, the adaptive weight
  (wrong layer, missing detach), the generator-optimizer quirk or the GAN-off path are wrong.
  """
  task = dataclasses_replace_iters(_tiny_vqgan_task(), 2)
  # No clipping, so Adam's first moment holds the raw gradient (mu = (1 - b1) g).
  spec = gan_steps.GanSpec(
    disc=NLayerDiscriminator(ndf=8, n_layers=2),
    lpips=None,
    optimizer=gan_steps.optim.OptimizerSpec(grad_clip_norm=1e9),
  )
  state = jax.jit(gan_steps.init_state, static_argnums=(3, 4, 5), compiler_options=FAST)(
    jax.random.key(0), None, None, task, spec, 32
  )
  frozen = {}
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 32, 32, 3)), jnp.float32)
  seed = jnp.uint32(3)
  new, m = jax.jit(gan_steps.generator_step, static_argnums=(6, 7, 8, 9), compiler_options=FAST)(
    state,
    frozen,
    x,
    steps.hparams(**HP),
    seed,
    gan_steps.plan_inputs(1, 0.5),
    task,
    spec,
    True,
    True,
  )
  d_params = gan_tasks.take(state["disc_params"], 1)
  d_stats = gan_tasks.take(state["disc_batch_stats"], 1)

  @functools.partial(jax.jit, compiler_options=FAST)
  def brute_force(params, dp):
    def parts(p, dp):
      r, aux, _ = task.reconstruct(p, x, None, None, None)
      logits, _ = spec.disc.apply(
        {"params": dp, "batch_stats": d_stats}, r, train=True, mutable=["batch_stats"]
      )
      return jnp.mean(jnp.abs(x - r)), -jnp.mean(logits), aux

    kernel = lambda g: g["base"]["decoder"]["conv_out"]["kernel"]  # noqa: E731
    g_nll = kernel(jax.grad(lambda p: parts(p, dp)[0])(params))
    g_g = kernel(jax.grad(lambda p: parts(p, dp)[1])(params))
    w = gan_lib.adaptive_weight(g_nll, g_g, 0.5)

    def total(p, dp):
      nll, g, aux = parts(p, dp)
      return nll + w * g + aux

    return w, jax.value_and_grad(total, argnums=(0, 1))(params, dp)

  d_weight, (want_loss, (want_grads, want_dgrads)) = brute_force(state["params"], d_params)
  np.testing.assert_allclose(m["d_weight"], [0.0, d_weight], rtol=1e-4)
  np.testing.assert_allclose(m["loss"], want_loss, rtol=1e-5)
  np.testing.assert_allclose(m["grad_norm"], optax.tree.norm(want_grads), rtol=1e-4)
  # The step's gradient, from Adam's first moment (first update: mu = (1 - b1) g).
  got = _leaves(new["opt_state"][0][1][0].mu)
  for k, v in _leaves(want_grads).items():
    scale = np.abs(v).max() + 1e-12
    np.testing.assert_allclose(got[k] / 0.1, v, rtol=0, atol=2e-4 * scale, err_msg=k)
  # Quirk: D_1 moved by the generator's AdamW along d_weight * dg/dD; D_0 untouched.
  got = _leaves(gan_tasks.take(new["gen_disc_opt_state"][0].mu, 1))
  for k, v in _leaves(want_dgrads).items():
    scale = np.abs(v).max() + 1e-12
    np.testing.assert_allclose(got[k] / 0.1, v, rtol=0, atol=2e-4 * scale, err_msg=k)
  old, upd = _leaves(state["disc_params"]), _leaves(new["disc_params"])
  for k in old:
    np.testing.assert_array_equal(upd[k][0], old[k][0], err_msg=k)
    assert not np.array_equal(upd[k][1], old[k][1]), k
  assert int(new["step"]) == 1
  # Before a late GAN start (taming-style, with_disc=False): nll + VQ only, D not evaluated.
  new, m = jax.jit(gan_steps.generator_step, static_argnums=(6, 7, 8, 9), compiler_options=FAST)(
    state,
    frozen,
    x,
    steps.hparams(**HP),
    seed,
    gan_steps.plan_inputs(0, 0.0),
    task,
    spec,
    False,
    True,
  )
  r, aux, _ = jax.jit(task.reconstruct, static_argnums=(2, 3, 4))(
    state["params"], x, None, None, None
  )
  np.testing.assert_allclose(m["loss"], jnp.mean(jnp.abs(x - r)) + aux, rtol=1e-5)
  assert not {"g_loss", "d_weight", "logits_fake_gen"} & set(m)
  for k, v in _leaves({"p": new["disc_params"], "s": new["disc_batch_stats"]}).items():
    ref = _leaves({"p": state["disc_params"], "s": state["disc_batch_stats"]})[k]
    np.testing.assert_array_equal(v, ref, err_msg=k)


def dataclasses_replace_iters(task, n):
  """A VQGANTask stand-in with `n` stacked discriminators (to test indexing by iteration)."""

  class Multi(gan_tasks.VQGANTask):
    num_iters = n

  return Multi(task.base, task.beta, task.codebook_weight)


def test_discriminator_step_learns_to_separate_real_from_fake():
  """The trainer's discriminator step (AdamW, clip, BatchNorm threading, stacked per-iteration
  discriminators) run 30 times on one fixed batch against a fixed generator's reconstructions:
  the hinge loss falls from ~1 to < 0.1 and mean real logits end above fake ones; the other
  discriminator and the generator params stay untouched (measured: 1.00 -> 0.02).

  Fails if discriminator gradients, its optimizer state indexing or the batch-statistics updates
  of the discriminator step are broken.
  """
  task = dataclasses_replace_iters(_tiny_vqgan_task(), 2)
  spec = gan_steps.GanSpec(disc=NLayerDiscriminator(ndf=16, n_layers=2), lpips=None)
  state = jax.jit(gan_steps.init_state, static_argnums=(3, 4, 5), compiler_options=FAST)(
    jax.random.key(0), None, None, task, spec, 32
  )
  rng = np.random.default_rng(0)
  yy, xx = np.meshgrid(np.linspace(0, 1, 32), np.linspace(0, 1, 32), indexing="ij")
  phases = rng.uniform(0, 2 * np.pi, size=(4, 3))
  real = 0.5 + 0.4 * np.sin(
    4 * xx[None, ..., None] + 3 * yy[None, ..., None] + phases[:, None, None]
  )
  x = jnp.asarray(real, jnp.float32)
  hp = steps.hparams(**dict(HP, lr=2e-3, warmup_steps=0, total_steps=1000))
  plan = gan_steps.plan_inputs(0, 0.8)
  step = jax.jit(
    gan_steps.discriminator_step,
    static_argnums=(6, 7, 8),
    donate_argnums=(0,),
    compiler_options=FAST,
  )
  before = _leaves(jax.device_get(state))
  losses = []
  for _ in range(30):
    state, m = step(state, {}, x, hp, jnp.uint32(0), plan, task, spec, True)
    losses.append(float(m["disc_loss"][0]))
  print(f"hinge {losses[0]:.3f} -> {losses[-1]:.3f}")
  assert losses[0] > 0.5 and losses[-1] < 0.1, losses
  assert float(m["logits_real"][0]) > float(m["logits_fake"][0]) + 1.0
  after = _leaves(state)
  for k, v in before.items():
    if k.startswith("disc_params/"):
      np.testing.assert_array_equal(after[k][1], v[1], err_msg=k)
      assert not np.array_equal(after[k][0], v[0]), k
    if k.startswith("params/"):
      np.testing.assert_array_equal(after[k], v, err_msg=k)
  assert int(state["disc_opt_state"][1][0].count[0]) == 30  # per-discriminator step count
  assert int(state["disc_opt_state"][1][0].count[1]) == 0


def test_alit_task_reconstructs_one_iteration_through_the_soft_code():
  """ALITTask at iteration i (halting off) reconstructs exactly as the full rollout's i-th
  reconstruction (soft code softmax(logits) @ codebook into the base decoder), and its
  features + conv_out equal that decoder output.

  Fails if stage 2 decodes the wrong iteration, decodes sampled/hard codes, or splits the
  decoder before the wrong layer.
  """
  mc = model_configs.tiny_config()
  model, base = ALIT(mc.alit), build_base(mc.base)
  task = gan_tasks.ALITTask(model, base, halting=rollout_lib.Halting("off"))
  params = jax.jit(task.init_params, compiler_options=FAST)(jax.random.key(0))
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 64, 64, 3)), jnp.float32)

  @functools.partial(jax.jit, compiler_options=FAST)
  def full(p):
    v = {"alit": {"params": p["alit"]}, "base": {"params": p["base"]}}
    return rollout_lib.full_rollout(model, base, v, x)["reconstructions"]

  @functools.partial(jax.jit, compiler_options=FAST)
  def at(p, i):
    h, aux, _ = task.features(p, x, i, jax.random.key(0), 0)
    return decoder_conv_out(p["base"]["decoder"]["conv_out"], h), aux

  want = full(params)
  for i in range(mc.alit.max_rollout_iters):
    recon, aux = at(params, i)
    np.testing.assert_allclose(recon, want[i], rtol=1e-5, atol=1e-5)
    assert float(aux) > 0  # the ALIT quantizer loss at that iteration
  frozen = task.frozen(params)
  assert frozen["base"]["quantize"]["embedding"]["embedding"] is True
  assert (
    not any(jax.tree.leaves(frozen["alit"])) and not frozen["base"]["decoder"]["conv_out"]["kernel"]
  )


# ----------------------------------------------------------------------------------------------
# Trainer runs.


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
def ft_run(tmp_path_factory):
  """Stage-2 runlocal for 8 steps (6 per epoch), alternating discriminator/generator steps."""
  workdir = tmp_path_factory.mktemp("ft")
  return workdir, trainer.train_and_evaluate(_ft_config(total_steps=8), workdir)


def test_finetune_runlocal_logs_generator_and_discriminator_losses(ft_run, tmp_path):
  """Acceptance 1 (stage 2): 8 steps of the tiny model with the GAN on; generator losses (nll,
  L1, g, adaptive weight, quantizer) and discriminator losses (hinge, logits) are logged per
  rollout iteration with the GAN weight; every discriminator and generator update counted per
  iteration equals the reference engine's pattern; the VQGAN codebook stays frozen while the
  base encoder/decoder train; the workdir exports and loads as a tokenizer (EMA of ALIT + base).

  Fails if the stage-2 loop, its logging, the round-robin/step pattern, the frozen codebook or
  the stage-2 export break.
  """
  workdir, result = ft_run
  rows = [r for r in _jsonl(workdir) if "train/loss" in r]
  assert [r["step"] for r in rows] == [4, 8]
  for r in rows:
    for k in ("loss", "grad_norm", "disc_grad_norm", "lr"):
      assert np.isfinite(r[f"train/{k}"]), (k, r)
  keys = set().union(*rows)
  for i in range(3):
    for k in ("nll_loss", "rec_loss", "g_loss", "d_weight", "quantization_loss", "disc_loss"):
      assert f"train/{k}_{i}" in keys, (k, i)
  assert "train/p_loss_0" not in keys  # no LPIPS weights given: perceptual term off
  assert rows[0]["train/gan_weight"] == pytest.approx(0.2)
  assert rows[-1]["train/gan_weight"] == pytest.approx(0.8)
  print({k: round(v, 4) for k, v in rows[-1].items() if k.startswith("train/")})
  # Per-discriminator update counts = the reference pattern over 8 steps (6 per epoch).
  ref = _reference_engine(6, 2, lambda e: 0.2, n=3, disc_steps=1)[:8]
  state = result["state"]
  disc_counts = np.asarray(state["disc_opt_state"][1][0].count)
  gen_counts = np.asarray(state["gen_disc_opt_state"][0].count)
  for i in range(3):
    assert disc_counts[i] == sum(k == "disc" and it == i for k, it in ref)
    assert gen_counts[i] == sum(k == "gen" and it == i for k, it in ref)
  assert int(state["opt_state"][0][1][0].count) == 4  # generator updates
  mc = model_configs.tiny_config()
  base0 = jax.device_get(common.init_random_base(mc.base, 64, np.uint32(0)))["params"]
  final = jax.device_get(state["params"]["base"])
  np.testing.assert_array_equal(
    final["quantize"]["embedding"]["embedding"], base0["quantize"]["embedding"]["embedding"]
  )
  assert not np.array_equal(
    final["encoder"]["conv_in"]["kernel"], base0["encoder"]["conv_in"]["kernel"]
  )
  assert not np.array_equal(
    final["decoder"]["conv_out"]["kernel"], base0["decoder"]["conv_out"]["kernel"]
  )
  # Export: the EMA of ALIT and of the trained base.
  assert export.main([str(workdir), "--out", str(tmp_path / "exported")]) == 0
  tok = Tokenizer.from_pretrained(tmp_path / "exported")
  want = _leaves(
    {
      "alit": {"params": state["ema_params"]["alit"]},
      "base": {"params": state["ema_params"]["base"]},
    }
  )
  got = _leaves(tok.variables)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert Tokenizer.from_pretrained(workdir).meta["step"] == 8


def test_finetune_resume_equals_uninterrupted_run(ft_run, tmp_path, monkeypatch, caplog):
  """A stage-2 run killed during step 6 and restarted (from its step-3 checkpoint) ends at step
  6 with the state of an uninterrupted run: params, EMA, both optimizers, the discriminators,
  their BatchNorm statistics and optimizer states (compared to 1e-6), over an epoch boundary
  (4 steps per epoch: the round-robin restarts, the GAN weight goes 0.2 -> 0.8, the EMA is
  reset) with random halting masks. Without LPIPS weights the log says the perceptual term is off.

  Fails if any stage-2 state entry, the data position, the schedule's step kind/iteration or
  per-step randomness is not restored exactly.
  """
  del ft_run  # compiled steps are shared with it
  kw = {"total_steps": 6, "checkpoint_every_steps": 3, "log_every_steps": 2}
  kw["image_summary_every_steps"] = 0
  kw["input.data"] = "synthetic:num_examples=32,image_size=64"
  tap = _BatchTap(monkeypatch)
  full = trainer.train_and_evaluate(_ft_config(**kw), tmp_path / "full")
  uninterrupted = list(tap.hashes)
  crash = _BatchTap(monkeypatch, crash_at=6)
  with pytest.raises(KeyboardInterrupt):
    trainer.train_and_evaluate(_ft_config(**kw), tmp_path / "crashed")
  assert crash.hashes == uninterrupted[:6]
  assert checkpoints.latest_step(tmp_path / "crashed") == 3
  again = _BatchTap(monkeypatch)
  resumed = trainer.train_and_evaluate(_ft_config(**kw), tmp_path / "crashed")
  assert again.hashes == uninterrupted[3:6]
  a, b = _leaves(full["state"]), _leaves(resumed["state"])
  assert a.keys() == b.keys() and any(k.startswith("disc_batch_stats/") for k in a)
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
  rows = {r["step"]: r for r in _jsonl(tmp_path / "full") if "train/loss" in r}
  assert 0 < rows[6]["train/masked_fraction_0"] <= 1  # halting really masked tokens
  assert rows[4]["train/gan_weight"] == pytest.approx(0.2)
  assert rows[6]["train/gan_weight"] == pytest.approx(0.8)
  assert "WITHOUT the perceptual term (perceptual weight 0)" in caplog.text


def _numpy_variables(tree, rng):
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.1, tree)


def test_converted_full_finetuning_checkpoint_restores_gan_losses(tmp_path):
  """Acceptance 3: a converted full_finetuning-style checkpoint (ALIT + base + 8-style per-
  iteration `gan_losses.<i>.discriminator/perceptual_loss` keys, random values) used as
  `init_from` puts each converted discriminator (params and BatchNorm running stats) at its
  iteration in the stage-2 state, its LPIPS into the frozen loss (copied to WORKDIR/lpips, so the
  perceptual term is on), and the ALIT and base weights into the params and EMA. A discriminator
  size that does not fit is refused naming config.gan.disc_ndf.

  Fails if converted discriminators or LPIPS are dropped, permuted across iterations, or mixed
  into the wrong state entries.
  """
  mc = model_configs.tiny_config()
  n = mc.alit.max_rollout_iters
  rng = np.random.default_rng(0)
  variables = _numpy_variables(alit_checkpoint.abstract_variables(mc), rng)
  sd = mapping.tree_to_state_dict(variables["alit"])
  sd.update(
    mapping.tree_to_state_dict(variables["base"], prefix=alit_checkpoint.BASE_PREFIX["vqgan"])
  )
  lp_sd = mapping.tree_to_state_dict(_numpy_variables(lpips_lib.lpips_target(), rng))
  lp_sd["scaling_layer.shift"] = np.asarray(lpips_lib.LPIPS_SHIFT, np.float32).reshape(1, 3, 1, 1)
  lp_sd["scaling_layer.scale"] = np.asarray(lpips_lib.LPIPS_SCALE, np.float32).reshape(1, 3, 1, 1)
  zeros = lambda t: jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), t)  # noqa: E731
  disc_keys = mapping.tree_to_state_dict(zeros(gan_lib.discriminator_target()))
  for i in range(n):
    for k, v in disc_keys.items():
      sd[f"gan_losses.{i}.discriminator.{k}"] = rng.normal(size=v.shape).astype(np.float32) + (
        1.0 + i if k.endswith("var") else 0.0
      )
    for k, v in lp_sd.items():
      sd[f"gan_losses.{i}.perceptual_loss.{k}"] = v
  np.savez(tmp_path / "ff.npz", **sd)
  convert_cli.convert(
    str(tmp_path / "ff.npz"), str(tmp_path / "ff"), num_heads=2, log=lambda *_: None
  )

  c = _ft_config(init_from=str(tmp_path / "ff"), total_steps=0)
  c.gan.disc_ndf = 64  # the reference's discriminators
  out = trainer.train_and_evaluate(c, tmp_path / "wd")
  state = jax.device_get(out["state"])
  for i in range(n):
    got = mapping.tree_to_state_dict(
      {
        "params": gan_tasks.take(state["disc_params"], i),
        "batch_stats": gan_tasks.take(state["disc_batch_stats"], i),
      }
    )
    assert set(got) == {k for k in disc_keys if "num_batches" not in k}
    for k in got:
      np.testing.assert_array_equal(
        got[k], sd[f"gan_losses.{i}.discriminator.{k}"], err_msg=f"{i} {k}"
      )
  assert float(state["disc_batch_stats"]["main_3"]["var"][2].mean()) > 2.5  # iteration 2's
  lpips_copy = checkpoint.load_gan_losses(tmp_path / "ff")["lpips"]
  with ocp.StandardCheckpointer() as ckptr:
    saved = ckptr.restore((tmp_path / "wd" / gan_stage.LPIPS_DIR).absolute())
  for k, v in _leaves(lpips_copy).items():
    np.testing.assert_array_equal(_leaves(saved)[k], v, err_msg=k)
  np.testing.assert_array_equal(
    _leaves(saved)["params/lin3/model_1/kernel"].reshape(-1),
    sd["gan_losses.0.perceptual_loss.lin3.model.1.weight"].reshape(-1),
  )
  for part in ("alit", "base"):
    want = _leaves(variables[part]["params"] if "params" in variables[part] else variables[part])
    for which in ("params", "ema_params"):
      got = _leaves(state[which][part])
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{which} {part} {k}")
  # A discriminator size that does not fit the converted ones is refused clearly.
  c.gan.disc_ndf = 16
  with pytest.raises(ValueError, match="disc_ndf"):
    trainer.train_and_evaluate(c, tmp_path / "wd2")


def test_vqgan_train_then_alit_on_its_export(tmp_path):
  """Acceptance 1 (VQGAN) and the demo path: the tiny vqgan_train config (64x64, 2 downsamplings
  -> 16x16 grid, LPIPS read from weight files by path) trains 4 steps with L1 + LPIPS + VQ and
  generator + discriminator losses logged each step (a generator and a discriminator update per
  batch; the late GAN start is checked at step level); the export is a base tokenizer directory that
  `load_base` reads, and `alit_pretrain` (64x64 images, patch 4) trains 2 steps on it, with ALIT's
  base-dependent sizes taken from that VQGAN.

  Fails if VQGAN training, its late GAN start, base export, or ALIT on a non-256 / patch-4 base
  breaks.
  """
  # LPIPS from weight files by path, in the published layouts (torchvision VGG16 + lpips heads).
  lp_sd = mapping.tree_to_state_dict(_random_lpips())
  vgg = {"features." + k.split(".", 2)[2]: v for k, v in lp_sd.items() if k.startswith("net.")}
  np.savez(tmp_path / "vgg16.npz", **vgg)
  np.savez(tmp_path / "heads.npz", **{k: v for k, v in lp_sd.items() if k.startswith("lin")})
  c = vqgan_train.get_config("runlocal")
  _set(c, {"total_steps": 4, "gan.weights": (0.8,), "gan.start_steps": (), "log_every_steps": 1})
  c.lpips.vgg16_path = str(tmp_path / "vgg16.npz")
  c.lpips.heads_path = str(tmp_path / "heads.npz")
  c.checkpoint_every_steps = 4
  c.image_summary_every_steps = 4
  out = trainer.train_and_evaluate(c, tmp_path / "vq")
  rows = [r for r in _jsonl(tmp_path / "vq") if "train/loss" in r]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  for r in rows:
    assert r["train/codebook_loss"] > 0 and r["train/rec_loss"] > 0 and r["train/p_loss"] > 0
    assert r["train/nll_loss"] == pytest.approx(r["train/rec_loss"] + r["train/p_loss"], rel=1e-5)
    assert r["train/gan_weight"] == pytest.approx(0.8)
    for k in ("disc_loss", "g_loss", "d_weight", "logits_real", "logits_fake", "disc_grad_norm"):
      assert np.isfinite(r[f"train/{k}"]), k
  print([{k: round(v, 4) for k, v in r.items() if k.startswith("train/")} for r in rows[::3]])
  state = out["state"]
  assert int(state["step"]) == 4 and int(state["disc_opt_state"][1][0].count[0]) == 4
  assert export.main([str(tmp_path / "vq"), "--out", str(tmp_path / "vqgan_demo")]) == 0
  base_cfg, base_vars = checkpoint.load_base(tmp_path / "vqgan_demo")
  assert base_cfg.downsample == 4 and base_cfg.n_embed == 64 and base_cfg.embed_dim == 16
  for k, v in _leaves(base_vars["params"]).items():
    np.testing.assert_array_equal(v, _leaves(out["state"]["ema_params"]["base"])[k], err_msg=k)
  with pytest.raises(ValueError, match="base-tokenizer training workdir"):
    Tokenizer.from_pretrained(tmp_path / "vq")

  a = alit_pretrain.get_config("runlocal")
  _set(
    a,
    {
      "random_base": False,
      "base_checkpoint": str(tmp_path / "vqgan_demo"),
      "model.patch_size": 4,
      "total_steps": 2,
      "log_every_steps": 1,
      "image_summary_every_steps": 0,
      "checkpoint_every_steps": 2,
      "fast_compile": True,
    },
  )
  res = trainer.train_and_evaluate(a, tmp_path / "alit")
  rows = [r for r in _jsonl(tmp_path / "alit") if "train/loss" in r]
  assert len(rows) == 2 and all(np.isfinite(r["train/loss"]) for r in rows)
  mc, _ = checkpoints.read_model_config(tmp_path / "alit")
  assert (mc.alit.image_size, mc.alit.patch_size, mc.alit.grid_size) == (64, 4, 16)
  assert (mc.alit.base_embed_dim, mc.alit.base_codebook_size) == (16, 64)
  assert mc.base == base_cfg and int(res["state"]["step"]) == 2


def test_configs_build_specs_and_reference_schedule():
  """Every alit_finetune variant and both vqgan_train variants build their model, GAN spec and
  schedule without compiling; the stage-2 defaults are the reference's (AdamW 0.9/0.95 wd 0.01
  clip 3 for the discriminators, GAN weight 0 through epoch 20, 0.2 through 100, 0.8 after,
  8 discriminator steps per generator step, batch 96, blr 1e-4).

  Fails if a config field is missing or the defaults drift from the reference recipe.
  """
  for arg in ("", "variant=tiny,base=vae", "variant=base,quantized=False", "runlocal"):
    c = alit_finetune.get_config(arg)
    mc = common.build_model_config(c.model)
    spec = gan_stage.spec_from_config(c, lpips_on=False)
    assert spec.disc_optimizer == gan_steps.optim.OptimizerSpec(weight_decay=0.01)
    assert spec.optimizer == gan_steps.optim.OptimizerSpec() and spec.perceptual_weight == 0.0
    sched = gan_stage.gan_schedule(c, 100, mc.alit.max_rollout_iters)
    if arg != "runlocal":
      assert c.stage == "full_finetuning" and c.blr == 1e-4 and c.input.global_batch_size == 96
      assert [sched.gan_weight(e * 100) for e in (0, 20, 21, 100, 101)] == [0, 0, 0.2, 0.2, 0.8]
      assert sched.period == 9 and spec.generator_updates_discriminator
      assert (spec.disc.ndf, spec.disc.n_layers) == (64, 3)
  for arg in ("variant=demo", "variant=maskgit"):
    c = vqgan_train.get_config(arg)
    cfg = gan_stage.vqgan_model_config(c.model)
    assert cfg.resolution // cfg.downsample == 16
    assert gan_stage.gan_schedule(c, 10, 1).plan(0).kinds == ("gen",)
  c = vqgan_train.get_config("variant=demo")
  c.model.ch = 48
  with pytest.raises(ValueError, match="multiples of 32, which the VQGAN.s GroupNorm.32."):
    gan_stage.vqgan_model_config(c.model)


def test_init_from_stage1_and_stage2_workdirs(ft_run, tmp_path):
  """`init_from` a stage-1 workdir takes its EMA ALIT weights and its base tokenizer copy (fresh
  discriminators); from a stage-2 workdir, its EMA ALIT + base weights and its discriminators
  with their BatchNorm statistics. A different config.model is refused.

  Fails if stage 2 starts from the raw params instead of the EMA, from the wrong base, or drops
  a previous stage-2 run's discriminators.
  """
  mc = model_configs.tiny_config()
  rng = np.random.default_rng(1)
  variables = _numpy_variables(alit_checkpoint.abstract_variables(mc), rng)
  s1 = tmp_path / "s1"
  s1.mkdir()
  checkpoints.write_json_atomic(
    s1 / checkpoints.MODEL_CONFIG,
    {"model": json.loads(mc.to_json()), "meta": {"stage": "latent_distillation"}},
  )
  checkpoint.save_base(s1 / checkpoints.BASE_DIR, mc.base, variables["base"])
  raw = jax.tree.map(np.zeros_like, variables["alit"]["params"])
  ckpt = checkpoints.TrainCheckpointer(s1, async_save=False)
  ckpt.save(5, {"params": raw, "ema_params": variables["alit"]["params"]}, None)
  ckpt.close()
  out = trainer.train_and_evaluate(_ft_config(init_from=str(s1), total_steps=0), tmp_path / "a")
  want = _leaves({"alit": variables["alit"]["params"], "base": variables["base"]["params"]})
  for k, v in _leaves(out["state"]["params"]).items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)

  workdir, result = ft_run
  out = trainer.train_and_evaluate(
    _ft_config(init_from=str(workdir), total_steps=0), tmp_path / "b"
  )
  want = _leaves(result["state"]["ema_params"])
  for k, v in _leaves(out["state"]["params"]).items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)
  for part in ("disc_params", "disc_batch_stats"):
    want = _leaves(result["state"][part])
    for k, v in _leaves(out["state"][part]).items():
      np.testing.assert_array_equal(v, want[k], err_msg=f"{part} {k}")
  with pytest.raises(ValueError, match="differs from config.model"):
    trainer.train_and_evaluate(
      _ft_config(init_from=str(workdir), total_steps=0, **{"model.test.width": 32}), tmp_path / "c"
    )


def test_dead_code_restart_moves_only_unused_codes():
  """`vq.restart_dead_codes_every_steps`: on a due step, codes no feature of the batch chose move
  onto encoder features of that batch, in both params and EMA; used codes and off-steps are
  untouched.

  Fails if restarts overwrite live codes, miss the EMA (the exported weights), or fire off
  schedule.
  """
  cfg = gan_stage.vqgan_model_config(vqgan_train.get_config("runlocal").model)
  task = gan_tasks.VQGANTask(VQGAN(cfg, jnp.float32), restart_dead_codes_every=3)
  params = task.init_params(jax.random.key(0))
  x = jnp.asarray(np.random.default_rng(0).random((2, 64, 64, 3)), jnp.float32)
  z = task.base.apply({"params": params["base"]}, x, method=lambda m, v: m.encoder(v))
  z = np.asarray(z).reshape(-1, z.shape[-1])
  cb = np.asarray(gan_tasks.tree_get(params, gan_tasks.CODEBOOK)).copy()
  cb[0] = z.mean(0)  # the only live code: every other one is far from all features
  cb[1:] = 1e3 + np.arange(1, cb.shape[0])[:, None]
  params = gan_tasks.tree_set(params, gan_tasks.CODEBOOK, jnp.asarray(cb))
  state = {"params": params, "ema_params": params}
  root = jax.random.key(1)
  off = task.restart_dead_codes(state, x, root, jnp.int32(0))
  np.testing.assert_array_equal(gan_tasks.tree_get(off["params"], gan_tasks.CODEBOOK), cb)
  on = task.restart_dead_codes(state, x, root, jnp.int32(2))
  for name in ("params", "ema_params"):
    new = np.asarray(gan_tasks.tree_get(on[name], gan_tasks.CODEBOOK))
    np.testing.assert_array_equal(new[0], cb[0])
    dist = ((new[1:, None, :] - z[None]) ** 2).sum(-1).min(1)
    np.testing.assert_allclose(dist, 0.0, atol=1e-8)
    assert len({tuple(r) for r in new[1:]}) > 1  # random picks, not one feature copied
