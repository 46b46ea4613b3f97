"""Training configs, the config-argument parser, durations, lr schedule and weight-decay mask.

No compilation: models are only built abstractly (`jax.eval_shape`).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from alit_jax.models import configs as model_configs
from alit_jax.models.alit import ALIT
from alit_jax.train import common as train_common
from alit_jax.train import optim, steps, trainer
from configs import alit_pretrain, common

VARIANT_ARGS = [
  f"variant={v},base={b},quantized={q}"
  for v in alit_pretrain.VARIANTS
  for b in ("vqgan", "vae")
  for q in (True, False)
]


@pytest.mark.parametrize("arg", VARIANT_ARGS + ["", "runlocal", "base=vae,runlocal"])
def test_every_config_builds_its_model_and_step_settings(arg):
  """Each variant/base/latent combination yields the reference architecture and a step spec.

  Fails if a config field is missing or misnamed, a variant maps to the wrong width/depth/heads,
  the latent flags are ignored, or the halting threshold does not follow the base tokenizer.
  """
  c = alit_pretrain.get_config(arg)
  mc = train_common.build_model_config(c.model)
  spec = trainer.stage1_spec(c, mc)
  a = mc.alit
  if "runlocal" in arg:
    assert c.model.name == "test" and c.random_base and c.input.data.startswith("synthetic")
    assert "total_epochs" not in c and c.total_steps > 0
    assert a.image_size == c.model.test.image_size and a.encoder_width == c.model.test.width
  else:
    v = dict(x.split("=") for x in arg.split(",")) if arg else {}
    name = "alit_" + v.get("variant", "small")
    assert c.model.name == name
    width, layers, heads = model_configs.NAMED_ALIT[name]
    assert (a.encoder_width, a.encoder_layers, a.encoder_heads) == (width, layers, heads)
    assert (a.decoder_width, a.decoder_layers, a.decoder_heads) == (width, layers, heads)
    assert a.quantize_latent == (v.get("quantized", "True") == "True")
    assert c.total_epochs == 200 and c.warmup_epochs == 20 and c.blr == 1.5e-4
    assert not c.random_base and c.base_checkpoint == ""
  assert spec.halting.threshold == model_configs.HALTING_THRESHOLD[a.base]
  assert spec.halting.mode == "sample" and spec.optimizer == optim.OptimizerSpec()
  # The whole model can be traced (every parameter shape is consistent).
  shapes = jax.eval_shape(lambda k: steps.init_params(ALIT(a), k), jax.random.key(0))
  assert "timestep_embedding" in shapes and ("quantize" in shapes) == a.quantize_latent


# Trainable parameters of the PyTorch reference (`AdaptiveLengthImageTokenizer` with a frozen
# VQGAN base, counted with `sum(p.numel() for p in model.parameters() if p.requires_grad)` on
# the reference code at commit 8c0b4ec), for quantized and continuous (factorized) latents.
REFERENCE_TRAINABLE = {
  ("alit_tiny", True): 52_837_132,
  ("alit_tiny", False): 52_787_980,
  ("alit_small", True): 207_532_812,
  ("alit_small", False): 207_483_660,
  ("alit_base", True): 174_173_964,
  ("alit_base", False): 174_124_812,
}


@pytest.mark.parametrize("name,quantized", sorted(REFERENCE_TRAINABLE))
def test_trainable_parameter_counts_match_reference(name, quantized):
  """The params the optimizer sees are exactly the reference's trainable parameters.

  Fails if a layer is missing, duplicated or mis-shaped, or if frozen base parameters leak into
  the trained tree (or the quantizer codebook is left out of it).
  """
  a = model_configs.named_config(name, "vqgan", quantize_latent=quantized).alit
  shapes = jax.eval_shape(lambda k: steps.init_params(ALIT(a), k), jax.random.key(0))
  assert (
    sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    == REFERENCE_TRAINABLE[(name, quantized)]
  )


def test_sampled_loss_iterations_need_the_scan_rollout():
  """loss_iters > 0 with the unrolled rollout is refused with a clear message, allowed with scan.

  Fails if the trainer would only fail deep inside tracing (concrete mask needed).
  """
  c = alit_pretrain.get_config("variant=tiny")
  c.loss.loss_iters = 2
  mc = train_common.build_model_config(c.model)
  with pytest.raises(ValueError, match="rollout_impl='scan'"):
    trainer.stage1_spec(c, mc)
  c.rollout_impl = "scan"
  assert trainer.stage1_spec(c, mc).loss_iters == 2


def test_parse_arg_types_and_errors():
  """`file.py:arg` parsing is typed by the defaults and rejects unknown keys.

  Fails if a typo in the command line is silently ignored or a value keeps the wrong type.
  """
  c = common.parse_arg(
    "n=3,x=0.5,flag,name=foo,off=False", n=1, x=1.0, flag=False, name="a", off=True
  )
  assert (c.n, c.x, c.flag, c.name, c.off) == (3, 0.5, True, "foo", False)
  assert isinstance(c.x, float) and isinstance(c.n, int)
  with pytest.raises(ValueError, match="unknown config argument 'bogus'"):
    common.parse_arg("bogus=1", n=1)
  with pytest.raises(ValueError, match="expected int"):
    common.parse_arg("n=abc", n=1)
  with pytest.raises(ValueError, match="needs a value"):
    common.parse_arg("n", n=1)
  with pytest.raises(ValueError, match="boolean"):
    common.parse_arg("flag=maybe", flag=False)
  with pytest.raises(ValueError, match="variant"):
    alit_pretrain.get_config("variant=huge")


def test_steps_from_config_is_the_one_conversion():
  """`<name>_steps` / `<name>_epochs` become steps; both set is an error.

  Fails if epochs are converted with the wrong steps-per-epoch, rounded down to 0, or if an
  ambiguous config is accepted.
  """
  c = ml_collections.ConfigDict(
    dict(total_epochs=200, warmup_epochs=20, log_every_steps=50, keep_every_epochs=0.01)
  )
  assert optim.steps_from_config("total", c, 494) == 98800
  assert optim.steps_from_config("warmup", c, 494) == 9880
  assert optim.steps_from_config("log_every", c, 494) == 50
  assert optim.steps_from_config("keep_every", c, 10) == 1  # rounds to >= 1
  assert optim.steps_from_config("checkpoint_every", c, 494, default=7) == 7
  c.total_steps = 5
  with pytest.raises(ValueError, match="only one"):
    optim.steps_from_config("total", c, 494)


def _reference_lr(epoch, lr, min_lr, warmup_epochs, epochs):
  """utils/lr_sched.py adjust_learning_rate, transcribed."""
  if epoch < warmup_epochs:
    return lr * epoch / warmup_epochs
  return min_lr + (lr - min_lr) * 0.5 * (
    1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs))
  )


def test_lr_schedule_matches_reference_per_iteration_epochs():
  """lr(step) equals the reference at fractional epoch step/steps_per_epoch.

  Fails if warm-up does not start at 0, the cosine is a full cycle, min_lr is ignored or the
  schedule is evaluated per epoch instead of per iteration.
  """
  spe, epochs, warm = 7, 5, 2
  hp = steps.hparams(
    lr=0.3,
    min_lr=0.01,
    warmup_steps=warm * spe,
    total_steps=epochs * spe,
    ema_decay=0.9,
    steps_per_epoch=spe,
  )
  got = np.array([float(optim.lr_schedule(s, hp)) for s in range(epochs * spe)])
  want = np.array([_reference_lr(s / spe, 0.3, 0.01, warm, epochs) for s in range(epochs * spe)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert got[0] == 0.0 and got.max() == pytest.approx(0.3)
  c = alit_pretrain.get_config("")
  assert optim.peak_lr(c, 256) == pytest.approx(1.5e-4)
  assert optim.peak_lr(c, 1024) == pytest.approx(6e-4)


def test_weight_decay_mask_follows_timm_add_weight_decay():
  """Decay exactly the parameters timm's add_weight_decay decays (ndim >= 2, not bias).

  Fails if embeddings (2-D/3-D, decayed in the reference) are exempted, or if biases / norm
  scales (1-D) are decayed.
  """
  a = model_configs.tiny_config().alit
  params = jax.eval_shape(lambda k: steps.init_params(ALIT(a), k), jax.random.key(0))
  mask = optim.decay_mask(params)
  for name in (
    "latent_tokens",
    "timestep_embedding",
    "encoder_mask_token",
    "encoder_positional_embedding",
    "encoder_class_embedding",
  ):
    assert mask[name] is True, name
  assert mask["quantize"]["embedding"]["embedding"] is True
  assert mask["pre_quantizer_mlp"] == {"kernel": True, "bias": False}
  assert mask["encoder_ln_pre"] == {"scale": False, "bias": False}
  assert mask["patch_embed"] == {"kernel": True, "bias": False}
  flat = jax.tree_util.tree_leaves_with_path(mask)
  shapes = dict(jax.tree_util.tree_leaves_with_path(params))
  for path, m in flat:
    assert m == (len(shapes[path].shape) >= 2), path


def test_ema_update_and_epoch_reset():
  """EMA = d*ema + (1-d)*new; at an epoch start the EMA first becomes the pre-step params.

  Fails if the reference's per-epoch `update_ema(decay=0)` re-copy is missing or the decay is
  applied the wrong way round.
  """
  ema, old, new = jnp.array([1.0]), jnp.array([5.0]), jnp.array([9.0])
  out = optim.ema_update({"w": ema}, {"w": old}, {"w": new}, jnp.float32(0.75), False)
  np.testing.assert_allclose(out["w"], 0.75 * 1.0 + 0.25 * 9.0)
  out = optim.ema_update({"w": ema}, {"w": old}, {"w": new}, jnp.float32(0.75), True)
  np.testing.assert_allclose(out["w"], 0.75 * 5.0 + 0.25 * 9.0)


def test_real_config_without_base_checkpoint_says_how_to_convert(tmp_path):
  """A real config refuses to start without a converted base tokenizer and names the command.

  Fails if training would silently start from a random base, or if the message does not tell
  the user how to convert the reference's VQGAN/VAE checkpoint.
  """
  c = alit_pretrain.get_config("variant=tiny")
  with pytest.raises(ValueError, match="python -m alit_jax.convert"):
    trainer.train_and_evaluate(c, tmp_path / "a")
  c.base_checkpoint = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="python -m alit_jax.convert"):
    trainer.train_and_evaluate(c, tmp_path / "b")
