"""Official ALIT / base-tokenizer checkpoints -> architecture config + Flax variables.

The architecture is inferred from key shapes (widths, layer counts, codebooks, base tokenizer,
quantized / factorized latents). Only the attention head count cannot be read from shapes: it
defaults per named model (alit_small 8, alit_base 12, alit_semilarge 16; also alit_tiny 8) and
must be given otherwise.

State-dict layout of an ALIT checkpoint (reference `AdaptiveLengthImageTokenizer.state_dict()`):
* ALIT keys (`encoder.*`, `decoder.*`, embeddings, `quantize.*`, ...) -> `variables["alit"]`;
* `base_tokenizer.vqgan.*` / `base_tokenizer.vae.*` -> `variables["base"]`;
* `gan_losses.<i>.*` (full_finetuning checkpoints: per-iteration LPIPS + PatchGAN) -> kept
  apart as `gan_losses` for stage-2 fine-tuning.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alit_jax.convert import mapping
from alit_jax.models import init as init_lib
from alit_jax.models.alit import ALIT
from alit_jax.models.base_tokenizers import build_base
from alit_jax.models.configs import (
  DEFAULT_HEADS,
  HALTING_THRESHOLD,
  NAMED_ALIT,
  ALITConfig,
  ModelConfig,
  VAEConfig,
  VQGANConfig,
)

Shapes = Mapping[str, tuple[int, ...]]
BASE_PREFIX = {"vqgan": "base_tokenizer.vqgan.", "vae": "base_tokenizer.vae."}
GAN_PREFIX = "gan_losses."


def _shapes(sd: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  return {k: tuple(np.shape(v)) for k, v in sd.items()}


def _count(shapes: Shapes, pattern: str) -> int:
  rx = re.compile(pattern)
  return len({m.group(1) for k in shapes if (m := rx.match(k))})


# Keys only an ALIT state dict holds (any one of them marks the file as an ALIT checkpoint).
ALIT_KEYS = (
  "encoder_positional_embedding",
  "decoder_positional_embedding",
  "latent_tokens",
  "timestep_embedding",
  "encoder_mask_token",
  "decoder_mask_token",
  "patch_embed.weight",
  "pre_quantizer_mlp.weight",
)


def looks_like_alit(shapes: Shapes) -> bool:
  """True for an ALIT state dict: one of `ALIT_KEYS`, or an embedded `base_tokenizer.*`."""
  return any(k in shapes for k in ALIT_KEYS) or any(
    k.startswith(p) for k in shapes for p in BASE_PREFIX.values()
  )


def closest(key: str, keys, n: int = 3) -> str:
  """The keys of `keys` most like `key`, for error messages ("nothing similar" if none)."""
  near = difflib.get_close_matches(key, list(keys), n=n, cutoff=0.6)
  return ", ".join(near) if near else "nothing similar"


def _need(shapes: Shapes, key: str, name: str) -> tuple[int, ...]:
  if key not in shapes:
    raise mapping.ConversionError(
      f"{name}: expected key {key!r} is missing (closest keys in the file: {closest(key, shapes)})"
    )
  return shapes[key]


def _encoder_levels(shapes: Shapes, prefix: str, name: str) -> tuple[int, tuple[int, ...], int]:
  """(ch, ch_mult, num_res_blocks) of a taming/LDM encoder from its key shapes."""
  ch = _need(shapes, prefix + "encoder.conv_in.weight", name)[0]
  levels = _count(shapes, re.escape(prefix) + r"encoder\.down\.(\d+)\.")
  blocks = _count(shapes, re.escape(prefix) + r"encoder\.down\.0\.block\.(\d+)\.")
  ch_mult = tuple(
    _need(shapes, f"{prefix}encoder.down.{i}.block.0.conv1.weight", name)[0] // ch
    for i in range(levels)
  )
  return ch, ch_mult, blocks


def infer_vqgan_config(
  shapes: Shapes, prefix: str = "", *, resolution: int = 256, name: str = "checkpoint"
) -> VQGANConfig:
  """VQGAN architecture from `encoder.*`, `decoder.*`, `quantize.*` key shapes under `prefix`."""
  ch, ch_mult, blocks = _encoder_levels(shapes, prefix, name)
  n_embed, embed_dim = _need(shapes, prefix + "quantize.embedding.weight", name)
  z = _need(shapes, prefix + "encoder.conv_out.weight", name)[0]
  return VQGANConfig(
    ch=ch,
    ch_mult=ch_mult,
    num_res_blocks=blocks,
    z_channels=z,
    embed_dim=embed_dim,
    n_embed=n_embed,
    resolution=resolution,
  )


def infer_vae_config(
  shapes: Shapes, prefix: str = "", *, resolution: int = 256, name: str = "checkpoint"
) -> VAEConfig:
  """KL-VAE architecture from key shapes under `prefix`."""
  ch, ch_mult, blocks = _encoder_levels(shapes, prefix, name)
  embed_dim = _need(shapes, prefix + "post_quant_conv.weight", name)[0]
  levels = len(ch_mult)
  enc_attn = tuple(
    resolution // 2**i
    for i in range(levels)
    if any(k.startswith(f"{prefix}encoder.down.{i}.attn.") for k in shapes)
  )
  dec_attn = tuple(
    resolution // 2**i
    for i in range(levels)
    if any(k.startswith(f"{prefix}decoder.up.{i}.attn.") for k in shapes)
  )
  return VAEConfig(
    ch=ch,
    ch_mult=ch_mult,
    num_res_blocks=blocks,
    embed_dim=embed_dim,
    encoder_attn_resolutions=enc_attn,
    decoder_attn_resolutions=dec_attn,
    resolution=resolution,
  )


def infer_config(
  shapes: Shapes, *, num_heads: int | None = None, name: str = "checkpoint"
) -> ModelConfig:
  """Infers the full tokenizer architecture from an ALIT state dict's key shapes.

  Args:
    shapes: key -> shape of the (selected) state dict.
    num_heads: attention heads of encoder and decoder; None picks the reference factory's value
      for the inferred (width, layers), and fails if there is none.
    name: the checkpoint's name for error messages.

  Raises:
    ConversionError: if the keys do not look like an ALIT checkpoint or the head count is unknown.
  """
  if any(k.startswith(BASE_PREFIX["vqgan"]) for k in shapes):
    base_kind = "vqgan"
  elif any(k.startswith(BASE_PREFIX["vae"]) for k in shapes):
    base_kind = "vae"
  else:
    raise mapping.ConversionError(
      f"{name}: no base_tokenizer.vqgan.* or base_tokenizer.vae.* keys; an ALIT checkpoint holds "
      "its base tokenizer. For a standalone base tokenizer use `convert_base_checkpoint`."
    )
  n_pos, width = _need(shapes, "encoder_positional_embedding", name)
  dec_width = _need(shapes, "decoder_positional_embedding", name)[1]
  patch_out, _, patch, _ = _need(shapes, "patch_embed.weight", name)
  grid = int(round((n_pos - 1) ** 0.5))
  if grid * grid != n_pos - 1:
    raise mapping.ConversionError(
      f"{name}: encoder_positional_embedding has {n_pos} rows, not 1 + a square"
    )
  enc_layers = _count(shapes, r"encoder\.transformer\.(\d+)\.")
  dec_layers = _count(shapes, r"decoder\.transformer\.(\d+)\.")
  mlp_hidden = _need(shapes, "encoder.transformer.0.mlp.c_fc.weight", name)[0]
  t, _ = _need(shapes, "latent_tokens", name)
  n_iters = _need(shapes, "timestep_embedding", name)[0]
  quantize = "quantize.embedding.weight" in shapes
  factorize = "decoder.decoder_embed.weight" in shapes
  token_dim = _need(shapes, "pre_quantizer_mlp.weight", name)[0]
  codebook_size = shapes["quantize.embedding.weight"][0] if quantize else 4096
  out_dim = _need(shapes, "decoder.ffn.2.weight", name)[0]
  max_lat = _need(shapes, "decoder.latent_token_positional_embedding", name)[0]
  if max_lat != t * n_iters:
    # The decoder's latent positions are sliced per iteration; they must cover N*T tokens.
    raise mapping.ConversionError(
      f"{name}: decoder.latent_token_positional_embedding has {max_lat} rows but the rollout "
      f"produces {n_iters} x {t} = {t * n_iters} latent tokens"
    )
  image_size = grid * patch
  prefix = BASE_PREFIX[base_kind]
  if base_kind == "vqgan":
    base = infer_vqgan_config(shapes, prefix, resolution=image_size, name=name)
    embed = base.embed_dim
    if out_dim != base.n_embed:
      raise mapping.ConversionError(
        f"{name}: decoder.ffn.2 outputs {out_dim}, VQGAN has {base.n_embed} codes"
      )
  else:
    base = infer_vae_config(shapes, prefix, resolution=image_size, name=name)
    embed = base.embed_dim
  if width - patch_out != embed:
    raise mapping.ConversionError(
      f"{name}: patch_embed has {patch_out} channels, width {width}, but the base embed dim is {embed}"
    )
  heads = num_heads
  named = next((n for n, v in NAMED_ALIT.items() if v[:2] == (width, enc_layers)), None)
  if heads is None:
    heads = DEFAULT_HEADS.get((width, enc_layers))
    if heads is None:
      raise mapping.ConversionError(
        f"{name}: cannot infer the attention head count for width {width} with {enc_layers} layers "
        f"(not a reference factory size: {sorted(NAMED_ALIT.items())}); pass num_heads / --num-heads"
      )
  alit = ALITConfig(
    base=base_kind,
    base_embed_dim=embed,
    base_codebook_size=base.n_embed if base_kind == "vqgan" else 0,
    encoder_width=width,
    encoder_layers=enc_layers,
    encoder_heads=heads,
    decoder_width=dec_width,
    decoder_layers=dec_layers,
    decoder_heads=heads,
    mlp_ratio=mlp_hidden / width,
    quantize_latent=quantize,
    factorize_latent=factorize,
    codebook_size=codebook_size,
    token_dim=token_dim,
    num_latent_tokens=t,
    image_size=image_size,
    patch_size=patch,
    max_rollout_iters=n_iters,
    halting_threshold=HALTING_THRESHOLD[base_kind],
  )
  label = (
    f"{named}_{base_kind}"
    if named and heads == NAMED_ALIT[named][2]
    else f"alit_w{width}_l{enc_layers}_h{heads}_{base_kind}"
  )
  return ModelConfig(alit=alit, base=base, name=label)


def abstract_variables(config: ModelConfig) -> dict[str, Any]:
  """`jax.eval_shape` trees `{"alit": ..., "base": ...}` for a config (nothing is allocated)."""
  alit = ALIT(config.alit)
  base = build_base(config.base)
  key = jax.random.key(0)
  # The dummy inputs are built inside eval_shape: traced, never allocated.
  return {
    "alit": jax.eval_shape(lambda k: alit.init(k, *init_lib.dummy_inputs(config.alit)), key),
    "base": jax.eval_shape(
      lambda k: base.init(k, init_lib.dummy_images(config.alit.image_size)), key
    ),
  }


def split_state_dict(sd: Mapping[str, Any], base_kind: str) -> tuple[dict, dict, dict]:
  """(alit keys, base keys (prefixed), gan_losses keys)."""
  base_prefix = BASE_PREFIX[base_kind]
  alit, base, gan = {}, {}, {}
  for k, v in sd.items():
    if k.startswith(base_prefix):
      base[k] = v
    elif k.startswith(GAN_PREFIX):
      gan[k] = v
    else:
      alit[k] = v
  return alit, base, gan


def check_keys(shapes: Shapes, config: ModelConfig, *, name: str = "checkpoint") -> dict[str, int]:
  """Checks (shapes only) that every ALIT and base key maps onto the config's Flax trees.

  Returns:
    counts of converted keys per part (`alit`, `base`, `gan_losses` (kept apart, not checked here)).
  """
  target = abstract_variables(config)
  alit, base, gan = split_state_dict(shapes, config.alit.base)
  p1 = mapping.plan_conversion(alit, target["alit"], name=name)
  p2 = mapping.plan_conversion(
    base, target["base"], prefix=BASE_PREFIX[config.alit.base], name=name
  )
  return {"alit": len(p1), "base": len(p2), "gan_losses": len(gan)}


def convert_state_dict(
  sd: Mapping[str, np.ndarray], config: ModelConfig, *, name: str = "checkpoint"
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Strictly converts an ALIT state dict.

  Returns:
    (`{"alit": variables, "base": variables}` of numpy float32 arrays, `gan_losses` raw keys).
  """
  target = abstract_variables(config)
  alit, base, gan = split_state_dict(sd, config.alit.base)
  errors = []
  out = {}
  for part, part_sd, prefix in (("alit", alit, ""), ("base", base, BASE_PREFIX[config.alit.base])):
    try:
      out[part] = mapping.state_dict_to_tree(part_sd, target[part], prefix=prefix, name=name)
    except mapping.ConversionError as e:
      errors.append(str(e))
  if errors:
    raise mapping.ConversionError("\n".join(errors))
  return out, gan


def infer_base_config(shapes: Shapes, *, name: str = "checkpoint") -> VQGANConfig | VAEConfig:
  """Standalone base tokenizer (VQGAN `.ckpt` state_dict, or KL-16 VAE `.ckpt` `model`)."""
  if "quantize.embedding.weight" in shapes:
    return infer_vqgan_config(shapes, name=name)
  if "post_quant_conv.weight" in shapes:
    return infer_vae_config(shapes, name=name)
  raise mapping.ConversionError(
    f"{name}: neither a VQGAN (quantize.embedding.weight) nor a KL-VAE (post_quant_conv.weight) state dict"
  )


def convert_base_checkpoint(
  sd: Mapping[str, np.ndarray], *, name: str = "checkpoint"
) -> tuple[VQGANConfig | VAEConfig, dict[str, Any]]:
  """Strictly converts a standalone base tokenizer state dict; returns (config, variables)."""
  config = infer_base_config(_shapes(sd), name=name)
  base = build_base(config)
  s = config.resolution
  target = jax.eval_shape(
    base.init, jax.random.key(0), jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
  )
  return config, mapping.state_dict_to_tree(sd, target, name=name)


def convert_gan_losses(
  gan_sd: Mapping[str, np.ndarray], num_iters: int, *, name: str = "checkpoint"
) -> dict[str, Any]:
  """Converts `gan_losses.<i>.*` (full_finetuning checkpoints) for stage-2 fine-tuning.

  Returns:
    `{"discriminators": {"0": vars, ..., str(N-1): vars}, "lpips": vars}`. The reference holds one
    frozen LPIPS per iteration; they are identical in the released checkpoints, so one copy is kept
    (a ConversionError is raised if they differ, rather than silently keeping one).
  """
  from alit_jax.losses import gan as gan_lib

  discs, lpipss = gan_lib.convert_gan_losses(gan_sd, num_iters=num_iters, name=name)
  first = jax.tree.leaves(lpipss[0])
  for i, other in enumerate(lpipss[1:], 1):
    if any(not np.array_equal(a, b) for a, b in zip(first, jax.tree.leaves(other))):
      raise mapping.ConversionError(
        f"{name}: gan_losses.{i}.perceptual_loss differs from gan_losses.0's"
      )
  return {"discriminators": {str(i): d for i, d in enumerate(discs)}, "lpips": lpipss[0]}
