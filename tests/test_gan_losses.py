"""PatchGAN discriminator, adversarial-loss functions, schedule and `gan_losses.*` conversion."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alit_jax.convert import mapping
from alit_jax.losses import discriminator as dsc
from alit_jax.losses import gan
from alit_jax.losses import lpips as lp

try:
  import torch
except ImportError:  # only the plain-torch comparisons need it
  torch = None

requires_torch = pytest.mark.skipif(
  torch is None, reason="torch not installed: plain-torch discriminator checks skipped"
)


# ----------------------------------------------------------------------------------------------
# Loss functions and schedule.


def test_hinge_vanilla_generator_losses_by_hand():
  """hinge / vanilla / generator losses equal values computed by hand.

  Failing means the discriminator or generator objective differs from the reference's
  (e.g. a missing 0.5 factor or a wrong sign).
  """
  real = jnp.asarray([[2.0, 0.5], [-1.0, 1.0]])
  fake = jnp.asarray([[-2.0, 0.0], [0.5, -1.5]])
  # relu(1 - real) = [0, .5, 2, 0] -> mean .625; relu(1 + fake) = [0, 1, 1.5, 0] -> mean .625
  np.testing.assert_allclose(gan.hinge_d_loss(real, fake), 0.5 * (0.625 + 0.625), rtol=1e-6)
  sp = lambda v: np.log1p(np.exp(v))
  want = 0.5 * (np.mean(sp(-np.asarray(real))) + np.mean(sp(np.asarray(fake))))
  np.testing.assert_allclose(gan.vanilla_d_loss(real, fake), want, rtol=1e-6)
  np.testing.assert_allclose(gan.generator_loss(fake), 0.75, rtol=1e-6)
  assert gan.hinge_d_loss(real.astype(jnp.bfloat16), fake).dtype == jnp.float32
  x = jnp.zeros((1, 2, 2, 3))
  y = jnp.full((1, 2, 2, 3), 0.5)
  np.testing.assert_allclose(gan.nll_loss(x, y, jnp.asarray([0.1, 0.3]), 1.0), 0.5 + 0.2)


def test_adaptive_weight_by_hand():
  """adaptive_weight = clamp(|g_nll| / (|g_gan| + 1e-4), 0, 1e4) * disc_weight, with no gradient.

  Failing means the generator's GAN term is weighted differently from the reference's
  calculate_adaptive_weight, or gradients leak through the weight.
  """
  nll_g = jnp.asarray([[3.0], [4.0]])  # norm 5
  g_g = jnp.asarray([0.6, 0.8])  # norm 1
  np.testing.assert_allclose(gan.adaptive_weight(nll_g, g_g, 0.2), 5 / 1.0001 * 0.2, rtol=1e-6)
  # Precomputed norms, and pytrees (one global norm), give the same.
  np.testing.assert_allclose(gan.adaptive_weight(5.0, 1.0, 0.2), 5 / 1.0001 * 0.2, rtol=1e-6)
  tree = {"a": jnp.asarray([3.0]), "b": jnp.asarray([[4.0]])}
  np.testing.assert_allclose(gan.adaptive_weight(tree, g_g, 0.8), 5 / 1.0001 * 0.8, rtol=1e-6)
  # Clamp: a vanishing GAN gradient gives 5 / 1e-4 = 5e4 -> 1e4.
  np.testing.assert_allclose(gan.adaptive_weight(nll_g, jnp.zeros(2), 0.2), 1e4 * 0.2, rtol=1e-6)
  np.testing.assert_allclose(gan.adaptive_weight(nll_g, jnp.zeros(2), 1.0, 50.0), 50.0)
  grads = jax.grad(lambda a, b: gan.adaptive_weight(a, b, 0.2), argnums=(0, 1))(nll_g, g_g)
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)


def test_schedule_at_boundary_epochs():
  """GAN weight 0 through epoch 20, 0.2 through 100, 0.8 after; step kinds 8 disc : 1 gen.

  Failing means stage-2 training turns the GAN on at the wrong epoch, with the wrong weight, or
  alternates generator and discriminator updates differently from engines/full_finetuning.py.
  """
  epochs = [0, 20, 21, 100, 101, 399]
  want = [0.0, 0.0, 0.2, 0.2, 0.8, 0.8]
  assert [gan.gan_weight_schedule(e) for e in epochs] == want
  got = jax.jit(gan.gan_weight_schedule)(jnp.asarray(epochs))
  np.testing.assert_allclose(got, want, rtol=1e-7)
  custom = dict(off_until=5, mid_until=10, mid_weight=0.5, final_weight=1.0)
  assert [gan.gan_weight_schedule(e, **custom) for e in (5, 6, 10, 11)] == [0.0, 0.5, 0.5, 1.0]
  assert [gan.disc_factor(w) for w in (0.0, 0.2, 0.8)] == [0.0, 1.0, 1.0]
  np.testing.assert_array_equal(gan.disc_factor(jnp.asarray([0.0, 0.8])), [0.0, 1.0])
  kinds = [gan.gan_optimizer_idx(s, 0.2) for s in range(18)]
  assert kinds == [1] * 8 + [0] + [1] * 8 + [0]
  assert {gan.gan_optimizer_idx(s, 0.0) for s in range(18)} == {0}


# ----------------------------------------------------------------------------------------------
# Discriminator.


def _disc_vars(seed=0, ndf=64):
  """Random discriminator variables from numpy with weights_init's distributions (a Flax init
  costs seconds of XLA compile on CPU)."""
  rng = np.random.default_rng(seed)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  target = jax.eval_shape(
    lambda a: dsc.NLayerDiscriminator(ndf=ndf).init(jax.random.key(0), a, train=False), x
  )

  def make(path, s):
    name = path[-1].key
    if name == "kernel":
      return (0.02 * rng.standard_normal(s.shape)).astype(np.float32)
    if name == "scale":
      return (1 + 0.02 * rng.standard_normal(s.shape)).astype(np.float32)
    return np.ones(s.shape, np.float32) if name == "var" else np.zeros(s.shape, np.float32)

  return jax.tree_util.tree_map_with_path(make, target)


def test_discriminator_structure_and_init():
  """Parameter names/shapes mirror `discriminator.main.N.*`; init follows weights_init.

  Failing means reference discriminator checkpoints cannot be loaded or fresh training starts
  from a differently initialised discriminator.
  """
  model = dsc.NLayerDiscriminator()
  v = gan.discriminator_target()
  p = v["params"]
  assert sorted(p) == [
    "main_0",
    "main_11",
    "main_2",
    "main_3",
    "main_5",
    "main_6",
    "main_8",
    "main_9",
  ]
  assert p["main_0"]["kernel"].shape == (4, 4, 3, 64) and p["main_0"]["bias"].shape == (64,)
  assert "bias" not in p["main_2"] and p["main_8"]["kernel"].shape == (4, 4, 256, 512)
  assert sorted(v["batch_stats"]) == ["main_3", "main_6", "main_9"]
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, x)
  assert out.shape == (2, 30, 30, 1)  # the reference's 30x30 patch map at 256 px
  # An rbg key compiles much faster on CPU than the default threefry.
  x = jnp.zeros((2, 32, 32, 3))
  v = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0, impl="rbg"))
  p = v["params"]
  assert abs(float(np.std(p["main_8"]["kernel"])) - 0.02) < 0.001
  assert abs(float(np.mean(p["main_8"]["kernel"]))) < 0.001
  assert abs(float(np.mean(p["main_9"]["scale"])) - 1.0) < 0.005
  assert 0.01 < float(np.std(p["main_9"]["scale"])) < 0.03
  np.testing.assert_array_equal(p["main_9"]["bias"], 0.0)
  # torch's default conv bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 512 * 16.
  bound = 1 / np.sqrt(512 * 16)
  assert float(np.abs(p["main_11"]["bias"]).max()) <= bound
  assert float(np.abs(p["main_0"]["bias"]).max()) <= 1 / np.sqrt(48)
  assert float(np.abs(p["main_0"]["bias"]).max()) > 0.5 / np.sqrt(48)
  np.testing.assert_array_equal(v["batch_stats"]["main_9"]["var"], 1.0)
  np.testing.assert_array_equal(v["batch_stats"]["main_9"]["mean"], 0.0)


def _torch_patchgan():
  """PatchGAN (ndf 64, 3 layers, BatchNorm) in plain torch.nn, indices as in the reference."""
  nn = torch.nn
  return nn.Sequential(
    nn.Conv2d(3, 64, 4, 2, 1),
    nn.LeakyReLU(0.2),
    nn.Conv2d(64, 128, 4, 2, 1, bias=False),
    nn.BatchNorm2d(128),
    nn.LeakyReLU(0.2),
    nn.Conv2d(128, 256, 4, 2, 1, bias=False),
    nn.BatchNorm2d(256),
    nn.LeakyReLU(0.2),
    nn.Conv2d(256, 512, 4, 1, 1, bias=False),
    nn.BatchNorm2d(512),
    nn.LeakyReLU(0.2),
    nn.Conv2d(512, 1, 4, 1, 1),
  )


@pytest.mark.torch
@requires_torch
def test_discriminator_matches_torch_train_and_eval():
  """Flax discriminator = plain-torch PatchGAN in train mode (logits and running-stat updates over
  two calls, as the reference's real-then-fake discriminator step) and in eval mode.

  Failing means the GAN logits or BatchNorm semantics (momentum 0.1, eps 1e-5, biased variance for
  normalising, unbiased variance for the running buffer) differ from torch.nn.BatchNorm2d, or the
  `main.N` key mapping is wrong.
  """
  torch.manual_seed(0)
  tm = _torch_patchgan()
  with torch.no_grad():  # non-trivial affine / running buffers
    for m in tm:
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
        m.running_mean.uniform_(-0.1, 0.1)
        m.running_var.uniform_(0.5, 2.0)
  sd = {f"main.{k}": v.numpy().copy() for k, v in tm.state_dict().items()}
  v = mapping.state_dict_to_tree(sd, gan.discriminator_target(), prefix="")
  rng = np.random.default_rng(0)
  real = rng.uniform(size=(3, 32, 32, 3)).astype(np.float32)
  fake = rng.uniform(size=(3, 32, 32, 3)).astype(np.float32)
  model = dsc.NLayerDiscriminator()
  step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  tm.train()
  stats = v["batch_stats"]
  for x in (real, fake):
    out, upd = step({"params": v["params"], "batch_stats": stats}, x)
    stats = upd["batch_stats"]
    with torch.no_grad():
      ref = tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  for idx in (3, 6, 9):
    np.testing.assert_allclose(stats[f"main_{idx}"]["mean"], tm[idx].running_mean, atol=1e-6)
    np.testing.assert_allclose(stats[f"main_{idx}"]["var"], tm[idx].running_var, rtol=1e-5)
  tm.eval()
  out = model.apply({"params": v["params"], "batch_stats": stats}, real, train=False)
  with torch.no_grad():
    ref = tm(torch.from_numpy(real.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_discriminator_learns_to_separate_real_from_fake():
  """40 Adam steps (lr 2e-4) of hinge loss on fixed 32x32 batches (4 smooth "real" images vs 4
  noise "fake" images), ndf 16 to keep it fast on CPU: the loss falls from ~1.0 to < 0.1 and
  mean real logits end above mean fake logits (measured: 0.95 -> 0.000,
  mean logits real +2.5, fake -2.8).

  Failing means gradients do not flow through the discriminator / BatchNorm in train mode, or the
  batch_stats threading of a training loop is broken.
  """
  rng = np.random.default_rng(0)
  yy, xx = np.meshgrid(np.linspace(0, 1, 32), np.linspace(0, 1, 32), indexing="ij")
  phases = rng.uniform(0, 2 * np.pi, size=(4, 3))
  real = 0.5 + 0.4 * np.sin(
    4 * xx[None, ..., None] + 3 * yy[None, ..., None] + phases[:, None, None]
  )
  real = jnp.asarray(real, jnp.float32)
  fake = jnp.asarray(rng.uniform(size=(4, 32, 32, 3)), jnp.float32)
  model = dsc.NLayerDiscriminator(ndf=16)
  v = _disc_vars(seed=1, ndf=16)
  opt = optax.adam(2e-4)
  params, stats = v["params"], v["batch_stats"]
  opt_state = opt.init(params)

  def loss_fn(params, stats):
    lr_, upd = model.apply(
      {"params": params, "batch_stats": stats}, real, train=True, mutable=["batch_stats"]
    )
    lf_, upd = model.apply(
      {"params": params, "batch_stats": upd["batch_stats"]},
      fake,
      train=True,
      mutable=["batch_stats"],
    )
    return gan.hinge_d_loss(lr_, lf_), (upd["batch_stats"], lr_.mean(), lf_.mean())

  @jax.jit
  def step(params, stats, opt_state):
    (loss, (stats, mr, mf)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
    updates, opt_state = opt.update(g, opt_state)
    return optax.apply_updates(params, updates), stats, opt_state, loss, mr, mf

  losses = []
  for _ in range(40):
    params, stats, opt_state, loss, mr, mf = step(params, stats, opt_state)
    losses.append(float(loss))
  print(f"hinge {losses[0]:.3f} -> {losses[-1]:.3f}, real {float(mr):.2f}, fake {float(mf):.2f}")
  assert losses[0] > 0.5, losses[0]
  assert losses[-1] < 0.1 and losses[-1] < 0.2 * losses[0], losses
  assert float(mr) > float(mf) + 1.0, (float(mr), float(mf))


# ----------------------------------------------------------------------------------------------
# Conversion of `gan_losses.*`.


def _read_listing(reference_dir):
  path = reference_dir / "keys" / "gan_losses_full_finetuning_extra.tsv"
  if not path.is_file():
    pytest.skip(f"{path} not found")
  rows = []
  for line in path.read_text().splitlines()[1:]:
    key, shape, dtype, _ = line.split("\t")
    rows.append((key, tuple(int(s) for s in re.findall(r"\d+", shape)), dtype))
  return rows


def _synthetic(rows, iteration_keys, seed):
  """Random arrays of the listed shapes for the given keys; standard ScalingLayer buffers."""
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape, dtype in rows:
    if key not in iteration_keys:
      continue
    leaf = key.rsplit(".", 2)
    if leaf[-2:] == ["scaling_layer", "shift"]:
      sd[key] = np.asarray(lp.LPIPS_SHIFT, np.float32).reshape(shape)
    elif leaf[-2:] == ["scaling_layer", "scale"]:
      sd[key] = np.asarray(lp.LPIPS_SCALE, np.float32).reshape(shape)
    elif dtype == "int64":
      sd[key] = np.asarray(7, np.int64).reshape(shape)
    else:
      sd[key] = rng.standard_normal(shape, dtype=np.float32)
  return sd


def test_reference_listing_converts(reference_dir):
  """The `gan_losses.*` listing of a stage-2 ALIT checkpoint (8 x PatchGAN + LPIPS, 140M params)
  converts with no missing/unexpected keys.

  All 8 iterations are checked to list identical keys/shapes; iterations 0 and 1 are converted in
  full from random arrays (values checked, distinct per iteration) to keep memory ~0.3 GB.
  Failing means real stage-2 checkpoints' GAN/LPIPS weights cannot be loaded or land in the wrong
  place.
  """
  rows = _read_listing(reference_dir)
  per_iter = {}
  for key, shape, dtype in rows:
    m = re.match(r"gan_losses\.(\d+)\.(.*)", key)
    per_iter.setdefault(int(m.group(1)), []).append((m.group(2), shape, dtype))
  assert sorted(per_iter) == list(range(8))
  for i in range(1, 8):
    assert per_iter[i] == per_iter[0], f"iteration {i} differs from iteration 0"
  assert sum(np.prod(s) for _, s, _ in per_iter[0]) * 8 > 139e6

  keys01 = {k for k, _, _ in rows if k.startswith(("gan_losses.0.", "gan_losses.1."))}
  sd = _synthetic(rows, keys01, seed=0)
  discs, lpipss = gan.convert_gan_losses(sd, num_iters=2, name="synthetic")
  assert len(discs) == len(lpipss) == 2
  for i in range(2):
    p = f"gan_losses.{i}."
    np.testing.assert_array_equal(
      discs[i]["params"]["main_8"]["kernel"],
      sd[p + "discriminator.main.8.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
      discs[i]["batch_stats"]["main_6"]["var"], sd[p + "discriminator.main.6.running_var"]
    )
    np.testing.assert_array_equal(
      lpipss[i]["params"]["net"]["slice4_19"]["bias"], sd[p + "perceptual_loss.net.slice4.19.bias"]
    )
    np.testing.assert_array_equal(
      lpipss[i]["params"]["lin3"]["model_1"]["kernel"].reshape(-1),
      sd[p + "perceptual_loss.lin3.model.1.weight"].reshape(-1),
    )
    # Round trip: everything but the dropped counters and the constant ScalingLayer comes back.
    back = mapping.tree_to_state_dict(discs[i], prefix=p + "discriminator.")
    back.update(mapping.tree_to_state_dict(lpipss[i], prefix=p + "perceptual_loss."))
    want = {k for k in sd if k.startswith(p) and "num_batches" not in k and "scaling" not in k}
    assert set(back) == want
  # The converted variables run.
  x = jnp.zeros((1, 32, 32, 3))
  assert dsc.NLayerDiscriminator().apply(discs[1], x, train=False).shape == (1, 2, 2, 1)


def test_conversion_is_strict(reference_dir):
  """An extra or missing `gan_losses.*` key, or a missing iteration, raises with the key names.

  Failing means a truncated or foreign checkpoint would load silently.
  """
  rows = _read_listing(reference_dir)
  sd = _synthetic(rows, {k for k, _, _ in rows if k.startswith("gan_losses.0.")}, seed=1)
  sd["other.module.weight"] = np.zeros(3, np.float32)  # outside gan_losses: ignored
  discs, lpipss = gan.convert_gan_losses(sd, num_iters=None)
  assert len(discs) == len(lpipss) == 1

  extra = dict(sd)
  extra["gan_losses.0.discriminator.main.12.weight"] = np.zeros((1, 1, 4, 4), np.float32)
  extra["gan_losses.0.extra_head.weight"] = np.zeros(3, np.float32)
  with pytest.raises(mapping.ConversionError) as e:
    gan.convert_gan_losses(extra, num_iters=1, name="extra.pth")
  msg = str(e.value)
  assert "extra.pth" in msg and "gan_losses.0.discriminator.main.12.weight" in msg
  assert "gan_losses.0.extra_head.weight" in msg

  missing = {k: v for k, v in sd.items() if k != "gan_losses.0.perceptual_loss.net.slice3.12.bias"}
  del missing["gan_losses.0.discriminator.main.9.running_var"]
  with pytest.raises(mapping.ConversionError) as e:
    gan.convert_gan_losses(missing, num_iters=1)
  assert "net/slice3_12/bias" in str(e.value) and "main_9/var" in str(e.value)

  stray = {**sd, "gan_losses.1.discriminator.main.0.bias": np.zeros(64, np.float32)}
  with pytest.raises(mapping.ConversionError, match=r"gan_losses\.1\.\* \(expected iterations"):
    gan.convert_gan_losses(stray, num_iters=1)
  with pytest.raises(mapping.ConversionError, match="missing"):
    gan.convert_gan_losses(sd, num_iters=2)  # iteration 1 absent
