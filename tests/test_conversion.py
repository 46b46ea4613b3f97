"""Checkpoint conversion: full-size key listings, strictness, CLI, pretrained dirs, base checkpoints."""

import csv
import functools
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from alit_jax import Tokenizer, checkpoint
from alit_jax.convert import __main__ as convert_cli
from alit_jax.convert import alit_checkpoint, mapping
from alit_jax.models.configs import NAMED_ALIT, tiny_config

CASE = "vqgan_tiny_quantized"


def _read_tsv(path: pathlib.Path) -> dict[str, tuple[int, ...]]:
  out = {}
  with open(path) as f:
    for row in csv.DictReader(f, delimiter="\t"):
      out[row["key"]] = tuple(json.loads(row["shape"]))
  return out


LISTINGS = [
  "alit_tiny_vqgan",
  "alit_small_vqgan",
  "alit_base_vqgan",
  "alit_semilarge_vqgan",
  "alit_small_vae",
]


@pytest.mark.parametrize("listing", LISTINGS)
@pytest.mark.parametrize("stage", ["", "_full_finetuning"])
def test_full_size_key_listings_map(reference_dir, listing, stage):
  """Every key of the released full-size models maps onto our Flax trees (shapes only).

  Breaks if a released checkpoint would fail to load: a module renamed, a missing parameter, a
  wrong layout transform, the head-count defaults, or the `gan_losses.*` split.
  """
  shapes = _read_tsv(reference_dir / "keys" / f"{listing}{stage}.tsv")
  config = alit_checkpoint.infer_config(shapes, name=listing)
  model_name, base = listing.rsplit("_", 1)
  width, layers, heads = NAMED_ALIT[model_name]
  a = config.alit
  assert (a.encoder_width, a.encoder_layers, a.encoder_heads, a.base) == (
    width,
    layers,
    heads,
    base,
  )
  assert a.quantize_latent and a.factorize_latent
  assert (a.num_latent_tokens, a.max_rollout_iters, a.image_size) == (32, 8, 256)
  counts = alit_checkpoint.check_keys(shapes, config, name=listing)
  n_gan = sum(k.startswith("gan_losses.") for k in shapes)
  assert counts["alit"] + counts["base"] + n_gan == len(shapes)
  assert n_gan == (440 if stage else 0)
  summary = json.loads((reference_dir / "keys" / "keys_summary.json").read_text())
  assert len(shapes) == summary["configs"][listing]["num_keys" + stage]


@pytest.mark.parametrize(
  "drop",
  [
    ("quantize.embedding.weight",),
    ("quantize.embedding.weight", "decoder.decoder_embed.weight", "decoder.decoder_embed.bias"),
  ],
)
def test_other_latent_settings_are_inferred(reference_dir, drop):
  """Continuous and unfactorized checkpoints (keys_summary's key changes) are recognised.

  Breaks if quantize/factorize inference is keyed on the wrong parameter.
  """
  shapes = _read_tsv(reference_dir / "keys" / "alit_small_vqgan.tsv")
  for k in drop:
    del shapes[k]
  config = alit_checkpoint.infer_config(shapes)
  assert not config.alit.quantize_latent
  assert config.alit.factorize_latent == (len(drop) == 1)
  alit_checkpoint.check_keys(shapes, config)


def test_standalone_base_tokenizer_listings(reference_dir):
  """The VQGAN `.ckpt` and the KL-16 VAE `.ckpt` (base keys without the ALIT prefix) convert.

  Breaks if standalone base checkpoints (needed to train stage 1) cannot be read.
  """
  for listing, prefix, kind in [
    ("alit_small_vqgan", "base_tokenizer.vqgan.", "vqgan"),
    ("alit_small_vae", "base_tokenizer.vae.", "vae"),
  ]:
    shapes = _read_tsv(reference_dir / "keys" / f"{listing}.tsv")
    base = {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}
    cfg = alit_checkpoint.infer_base_config(base)
    assert cfg.kind == kind
    if kind == "vqgan":
      assert (cfg.ch, cfg.ch_mult, cfg.z_channels, cfg.n_embed) == (128, (1, 1, 2, 2, 4), 256, 1024)
    else:
      assert (cfg.embed_dim, cfg.encoder_attn_resolutions, cfg.decoder_attn_resolutions) == (
        16,
        (16,),
        (),
      )
    from alit_jax.models.base_tokenizers import build_base

    target = jax.eval_shape(
      build_base(cfg).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 256, 256, 3), np.float32)
    )
    assert len(mapping.plan_conversion(base, target)) == len(base)


@functools.cache
def _tiny(base="vqgan", seed=0):
  return Tokenizer.random(tiny_config(base=base), seed=seed)


def _tiny_state_dict(base="vqgan", seed=0):
  tok = _tiny(base, seed)
  sd = mapping.tree_to_state_dict(tok.variables["alit"])
  sd.update(
    mapping.tree_to_state_dict(tok.variables["base"], prefix=alit_checkpoint.BASE_PREFIX[base])
  )
  return tok, sd


def test_strict_errors_list_every_problem():
  """Missing, unexpected and mis-shaped keys are all reported, with their names.

  Breaks if conversion silently drops, ignores or reshapes weights.
  """
  tok, sd = _tiny_state_dict()
  config = tok.config
  bad = dict(sd)
  del bad["decoder.ffn.0.bias"]
  del bad["base_tokenizer.vqgan.encoder.conv_in.weight"]
  bad["encoder.extra_thing.weight"] = np.zeros((3, 3), np.float32)
  bad["decoder.ln_post.weight"] = np.zeros((5,), np.float32)
  with pytest.raises(mapping.ConversionError) as e:
    alit_checkpoint.convert_state_dict(bad, config, name="bad.pth")
  msg = str(e.value)
  for needle in [
    "bad.pth",
    "missing",
    "decoder/ffn_0/bias",
    "encoder/conv_in/kernel",
    "unexpected",
    "encoder.extra_thing.weight",
    "mis-shaped",
    "decoder.ln_post.weight",
  ]:
    assert needle in msg, needle


def test_head_count_required_for_unknown_sizes():
  """A non-reference width/depth needs num_heads; the error says so.

  Breaks if a wrong head count could be guessed silently (outputs would be wrong, not an error).
  """
  tok, sd = _tiny_state_dict()
  shapes = {k: v.shape for k, v in sd.items()}
  with pytest.raises(mapping.ConversionError, match="num_heads"):
    alit_checkpoint.infer_config(shapes)
  assert alit_checkpoint.infer_config(shapes, num_heads=2).alit.encoder_heads == 2


def test_cli_converts_without_torch_and_refuses_bad_checkpoints(tmp_path, reference_dir, capsys):
  """`python -m alit_jax.convert` writes a dir that `from_pretrained` loads to identical outputs;
  a broken checkpoint is refused and leaves an existing output untouched.

  Breaks if the CLI writes partial output, overwrites without --overwrite, or if the Orbax
  round trip changes weights or the config.
  """
  src = reference_dir / CASE / f"{CASE}_ckpt_ema.pth"
  out = tmp_path / "converted"
  assert convert_cli.main([str(src), "--out", str(out), "--num-heads", "4"]) == 0
  printed = capsys.readouterr().out
  assert "found ALIT" in printed and "['ema']" in printed and "heads=4" in printed
  a = Tokenizer.from_pytorch(src, num_heads=4)
  b = Tokenizer.from_pretrained(out)
  assert a.config == b.config
  for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert b.meta["state_dict"] == "['ema']"
  before = sorted(p.relative_to(out) for p in out.rglob("*"))
  # Refuses to overwrite.
  assert convert_cli.main([str(src), "--out", str(out), "--num-heads", "4"]) == 1
  assert "exists" in capsys.readouterr().err
  # A truncated checkpoint is refused before anything is written, even with --overwrite.
  broken = tmp_path / "broken.pth"
  broken.write_bytes(src.read_bytes()[:100_000])
  assert convert_cli.main([str(broken), "--out", str(out), "--num-heads", "4", "--overwrite"]) == 1
  assert "broken.pth" in capsys.readouterr().err
  assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
  assert Tokenizer.from_pretrained(out).config == a.config
  assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_checkpoint_with_missing_key_is_refused_by_cli(tmp_path, capsys):
  """A state dict that does not match is refused with the key listed and nothing written.

  Breaks if strictness is lost on the CLI path (e.g. a partially converted model saved).
  """
  tok, sd = _tiny_state_dict()
  del sd["encoder_mask_token"]
  path = tmp_path / "m.npz"
  np.savez(path, **sd)
  out = tmp_path / "out"
  assert convert_cli.main([str(path), "--out", str(out), "--num-heads", "2"]) == 1
  err = capsys.readouterr().err
  assert "encoder_mask_token" in err
  assert not out.exists()


def test_gan_losses_become_a_separate_tree(tmp_path):
  """A full_finetuning-style checkpoint keeps its discriminators + LPIPS for stage 2.

  Breaks if `gan_losses.*` are silently dropped or mixed into the tokenizer weights.
  """
  from alit_jax.losses import gan as gan_lib
  from alit_jax.losses import lpips as lpips_lib

  tok, sd = _tiny_state_dict()
  n = tok.config.alit.max_rollout_iters
  rng = np.random.default_rng(0)
  zeros = lambda t: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), t)  # noqa: E731
  disc = zeros(gan_lib.discriminator_target())
  lp = zeros(lpips_lib.lpips_target())
  lp_sd = {
    k: rng.normal(size=v.shape).astype(np.float32)
    for k, v in mapping.tree_to_state_dict(lp).items()
  }
  lp_sd["scaling_layer.shift"] = np.asarray(lpips_lib.LPIPS_SHIFT, np.float32).reshape(1, 3, 1, 1)
  lp_sd["scaling_layer.scale"] = np.asarray(lpips_lib.LPIPS_SCALE, np.float32).reshape(1, 3, 1, 1)
  for i in range(n):
    for k, v in mapping.tree_to_state_dict(disc).items():
      sd[f"gan_losses.{i}.discriminator.{k}"] = rng.normal(size=v.shape).astype(np.float32) + (
        i if k.endswith("var") else 0
      )
    for k, v in lp_sd.items():
      sd[f"gan_losses.{i}.perceptual_loss.{k}"] = v
  path = tmp_path / "ff.npz"
  np.savez(path, **sd)
  out = tmp_path / "ff"
  convert_cli.convert(str(path), str(out), num_heads=2, log=lambda *_: None)
  g = checkpoint.load_gan_losses(out)
  assert sorted(g["discriminators"]) == [str(i) for i in range(n)]
  k = "gan_losses.1.discriminator.main.3.running_var"
  got = mapping.tree_to_state_dict(g["discriminators"]["1"])["main.3.running_var"]
  np.testing.assert_array_equal(got, sd[k])
  t = Tokenizer.from_pytorch(path, num_heads=2, load_gan_losses=True)
  assert t.meta["gan_losses_keys"] == len([k for k in sd if k.startswith("gan_losses.")])
  assert set(t.gan_losses) == {"discriminators", "lpips"}
  assert Tokenizer.from_pytorch(path, num_heads=2).gan_losses is None


def _listing(root):
  return sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*"))


def test_overwrite_replaces_only_directories_alit_jax_wrote(tmp_path, capsys, monkeypatch):
  """Issue 18 acceptance 1: `convert --overwrite` into a folder holding the input, or a foreign
  file, is refused with one line and deletes nothing; into a folder it wrote before it succeeds,
  and the swap is atomic (the new directory is complete at the output path before the old one is
  removed). Permissions follow the umask (not mkdtemp's 0700).

  Breaks if --overwrite can delete a user's files or the input checkpoint, if a refused run
  leaves anything behind, or if the output dir is left at mode 0700.
  """
  from alit_jax import outputs

  old_umask = os.umask(0o022)
  try:
    _, sd = _tiny_state_dict()
    u = tmp_path / "u"
    u.mkdir()
    np.savez(u / "model.npz", **sd)
    (u / "notes.txt").write_text("mine")
    before = _listing(u)
    args = ["--num-heads", "2", "--overwrite"]
    assert convert_cli.main([str(u / "model.npz"), "--out", str(u), *args]) == 1
    err = capsys.readouterr().err
    assert "contains the input" in err and len(err.strip().splitlines()) == 1, err
    assert _listing(u) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "photo.jpg").write_bytes(b"x")
    assert convert_cli.main([str(u / "model.npz"), "--out", str(foreign), *args]) == 1
    err = capsys.readouterr().err
    assert "not written by alit-jax" in err and len(err.strip().splitlines()) == 1, err
    assert _listing(foreign) == [("photo.jpg", 1)]

    out = tmp_path / "out"
    out.mkdir()  # an empty directory may be written without --overwrite
    assert convert_cli.main([str(u / "model.npz"), "--out", str(out), "--num-heads", "2"]) == 0
    assert (out / outputs.MARKER).is_file()
    assert {p.stat().st_mode & 0o777 for p in [out, out / "params"]} == {0o755}
    first = Tokenizer.from_pretrained(out)

    removed = []
    real_rmtree = outputs.shutil.rmtree

    def rmtree(path, *a, **kw):
      # At this moment the output path must already hold the complete new directory.
      removed.append(pathlib.Path(path))
      assert (out / "config.json").is_file() and (out / outputs.MARKER).is_file()
      assert Tokenizer.from_pretrained(out).config == first.config
      real_rmtree(path, *a, **kw)

    monkeypatch.setattr(outputs.shutil, "rmtree", rmtree)
    assert convert_cli.main([str(u / "model.npz"), "--out", str(out), *args]) == 0
    assert removed and all(p != out for p in removed)
    for x, y in zip(
      jax.tree.leaves(first.variables), jax.tree.leaves(Tokenizer.from_pretrained(out).variables)
    ):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "out", "u"]  # no leftovers
    assert _listing(u) == before
  finally:
    os.umask(old_umask)


def test_converter_refuses_wrong_dtypes_and_names_closest_keys(tmp_path, capsys):
  """Issue 18, converter: an int64 tensor where the model holds floats is refused (not cast); the
  log names the state-dict root of a top-level dict; a renamed ALIT key is reported as that key,
  with the file's closest keys, not blamed on the base tokenizer.

  Breaks if integer data is silently cast into weights, if the log reads "from ," or if a rename
  sends the file down the standalone-base path (a "missing encoder.conv_in.weight" error).
  """
  _, sd = _tiny_state_dict()
  out = tmp_path / "out"

  def run(state_dict, name):
    path = tmp_path / f"{name}.npz"
    np.savez(path, **state_dict)
    rc = convert_cli.main([str(path), "--out", str(out), "--num-heads", "2"])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err

  bad = dict(sd, decoder_mask_token=np.zeros(sd["decoder_mask_token"].shape, np.int64))
  rc, printed, err = run(bad, "int")
  assert rc == 1 and "decoder_mask_token: int64 tensor where the model holds float32" in err
  assert "tensors from the top-level state dict" in printed and not out.exists()

  renamed = dict(sd)
  renamed["encoder_positional_embeddings"] = renamed.pop("encoder_positional_embedding")
  rc, _, err = run(renamed, "renamed")
  assert rc == 1 and "'encoder_positional_embedding' is missing" in err, err
  assert "closest keys in the file: encoder_positional_embeddings" in err
  assert "conv_in" not in err

  typo = dict(sd)
  typo["decoder.ffn.0.biass"] = typo.pop("decoder.ffn.0.bias")
  rc, _, err = run(typo, "typo")
  assert rc == 1 and "decoder/ffn_0/bias" in err
  assert "decoder.ffn.0.bias (for params/decoder/ffn_0/bias): closest in the file: " in err
  assert "closest in the file: decoder.ffn.0.biass" in err
  assert not out.exists()
