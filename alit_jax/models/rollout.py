"""The recurrent ALIT rollout as pure functions (jit/grad/vmap friendly).

Two implementations give the same active values:

* `impl="scan"`: a `lax.scan` over iterations with a fixed token buffer
  `[cls, 256 image tokens, N*T latent slots]`; iteration i attends only to the first
  `257 + T(i+1)` keys (encoder) and the first `T(i+1)` latents (decoder), so every active token
  equals the reference's growing sequence. One trace of the body, static shapes, and the same
  buffer serves `adaptive_encode`'s `lax.while_loop` (early exit).
* `impl="unrolled"`: a Python loop over iterations with a growing sequence, like the reference;
  less arithmetic, 8 differently-shaped bodies to compile.

Outputs are stacked on a leading iteration axis and padded to N*T latent slots; iteration i's
valid latents are the first T(i+1).

Halting modes (reference quirks 1-4):
* `off`: no masking.
* `threshold`: VQGAN: mask image token j iff p_j >= threshold, p = softmax(logits)[gt index]
  (the reference with its Bernoulli draw replaced by 1).
* `sample`: VQGAN: mask iff Bernoulli(p_j) and p_j >= threshold, with a keyed PRNG (the
  reference's eval- and train-time behaviour, in distribution).
* VAE: the reference intends to mask tokens whose code L1 is below the threshold but, because of
  a copy-by-indexing bug, masks nothing (quirk 3). `vae_masking=False` (default) reproduces that;
  `vae_masking=True` applies the intended rule. `would_mask` records the rule either way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from alit_jax.models.alit import ALIT
from alit_jax.models.base_tokenizers import VAE, VQGAN

HaltingMode = Literal["off", "threshold", "sample"]
HALTING_MODES = ("off", "threshold", "sample")


@dataclasses.dataclass(frozen=True)
class Halting:
  """Static halting settings (hashable: usable as a static jit argument)."""

  mode: HaltingMode = "off"
  threshold: float = 0.55
  vae_masking: bool = False

  def __post_init__(self):
    if self.mode not in HALTING_MODES:
      raise ValueError(f"halting must be one of {HALTING_MODES}, got {self.mode!r}")


NO_HALTING = Halting()


def _apply(model: ALIT, variables: Any, method: Callable, *args, **kwargs):
  return model.apply(variables, *args, method=method, **kwargs)


# ----------------------------------------------------------------------------------------------
# Base tokenizer side
# ----------------------------------------------------------------------------------------------


def _in_chunks(fn: Callable, x: jax.Array, chunk: int | None):
  """`fn(x)` for a batch `x`, computed `chunk` images at a time (`lax.map`) when `chunk` is set.

  On CPU the base tokenizer's convolutions at 256x256 cost more per image in bigger batches
  (VQGAN decode, 2 cores: 0.83 s at batch 1, 9.18 s at batch 8; measured with
  `experiments/benchmarks/rollout.py`, see its results), so inference decodes one image at a time
  there. The results are the same up to float reassociation.
  """
  b = x.shape[0]
  if chunk is None or chunk >= b:
    return fn(x)
  return jax.lax.map(lambda xi: jax.tree.map(lambda o: o[0], fn(xi[None])), x, batch_size=chunk)


def base_encode(
  base: VQGAN | VAE, base_vars: Any, images: jax.Array, chunk: int | None = None
) -> dict[str, jax.Array]:
  """Runs the frozen base encoder.

  Args:
    base: the VQGAN or VAE module.
    base_vars: its variables.
    images: (B, H, W, 3) float32 in [0, 1].
    chunk: encode this many images at a time (None: the whole batch at once).

  Returns:
    `base_features` (B, g, g, E) (what ALIT consumes) and the distillation targets: VQGAN
    `gt_indices` (B, g*g) int32 and `codebook` (K, E); VAE `gt_code` (B, g*g, E) (the scaled
    posterior mode, equal to base_features) plus `posterior_mean`/`posterior_logvar`.
  """
  if isinstance(base, VQGAN):
    feats, idx = _in_chunks(lambda x: base.apply(base_vars, x, method=VQGAN.encode), images, chunk)
    codebook = base.apply(base_vars, method=VQGAN.codebook)
    return {"base_features": feats, "gt_indices": idx, "codebook": codebook}
  mean, logvar = _in_chunks(
    lambda x: base.apply(base_vars, x, method=VAE.encode_moments), images, chunk
  )
  code = mean * base.config.scale_factor
  b, g1, g2, e = code.shape
  return {
    "base_features": code,
    "gt_code": code.reshape(b, g1 * g2, e),
    "posterior_mean": mean,
    "posterior_logvar": logvar,
  }


def base_decode(
  base: VQGAN | VAE, base_vars: Any, code: jax.Array, chunk: int | None = None
) -> jax.Array:
  """(B, g*g, E) decoded code -> (B, H, W, 3) reconstruction (the full_finetuning branch, quirk 13).

  `chunk`: decode this many images at a time (None: the whole batch at once).
  """
  b, n, e = code.shape
  g = int(round(n**0.5))
  method = VQGAN.decode if isinstance(base, VQGAN) else VAE.decode
  return _in_chunks(
    lambda z: base.apply(base_vars, z, method=method), code.reshape(b, g, g, e), chunk
  )


# ----------------------------------------------------------------------------------------------
# One rollout iteration (shared by scan, unrolled and while_loop)
# ----------------------------------------------------------------------------------------------


def _code_and_halting(
  out: jax.Array, targets: dict[str, jax.Array], halting: Halting, key: jax.Array | None
) -> dict[str, jax.Array]:
  """Decoded code, halting statistic and drop mask from the decoder output."""
  res = {}
  if "codebook" in targets:
    logits = out
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    code = jnp.einsum(
      "bnk,ke->bne", probs, targets["codebook"], precision=jax.lax.Precision.HIGHEST
    )
    p = jnp.take_along_axis(probs, targets["gt_indices"][..., None], axis=-1)[..., 0]
    res.update(logits=logits, decoded_code=code, pred_gt_prob=p)
    if halting.mode == "off":
      drop = jnp.zeros(p.shape, bool)
    elif halting.mode == "threshold":
      drop = p >= halting.threshold
    else:
      if key is None:
        raise ValueError("halting='sample' needs an rng key")
      drop = jax.random.bernoulli(key, jax.lax.stop_gradient(p)) & (p >= halting.threshold)
  else:
    code = out
    l1 = jnp.mean(jnp.abs(code - targets["gt_code"]), axis=-1)
    would = l1 < halting.threshold
    res.update(decoded_code=code, code_l1=l1, would_mask=would)
    drop = (
      would if (halting.mode != "off" and halting.vae_masking) else jnp.zeros(would.shape, bool)
    )
  res["drop_mask"] = drop
  return res


def _iteration_outputs(
  model: ALIT,
  alit_vars: Any,
  x: jax.Array,
  n_valid: jax.Array | int,
  targets: dict[str, jax.Array],
  halting: Halting,
  key: jax.Array | None,
  masked: bool,
  noise_key: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Latent head, decoder, code and halting for encoder output `x` (B, S, W).

  `n_valid` latent slots are real; with `masked`, the rest of the buffer is masked out.
  `noise_key`: the latent channel's noise (`ALITConfig.latent_noise_std`).
  """
  c = model.config
  n_img = c.num_image_tokens
  lat = x[:, n_img + 1 :]
  b, length = lat.shape[:2]
  valid = None
  if masked:
    valid = jnp.broadcast_to(jnp.arange(length) < n_valid, (b, length))
  head = _apply(model, alit_vars, ALIT.latent_head, lat, valid, noise_key)
  out = _apply(model, alit_vars, ALIT.decode, head["decoder_input"], valid)
  res = _code_and_halting(out, targets, halting, key)
  res.update(latent_tokens=lat, decoder_latent_input=head["decoder_input"])
  res.update({k: v for k, v in head.items() if k != "decoder_input"})
  if masked:
    # Padded buffer slots hold stale values; blank them so both implementations agree.
    for k in _LATENT_KEYS:
      if k in res:
        v = res[k]
        m = valid if v.ndim == 2 else valid[..., None]
        res[k] = jnp.where(m, v, -1 if jnp.issubdtype(v.dtype, jnp.integer) else 0)
  if halting.mode != "off":
    x = _apply(model, alit_vars, ALIT.mask_image_tokens, x, res["drop_mask"])
  return x, res


def _pad_latents(v: jax.Array, length: int) -> jax.Array:
  pad = length - v.shape[1]
  if pad == 0:
    return v
  widths = [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2)
  fill = -1 if jnp.issubdtype(v.dtype, jnp.integer) else 0
  return jnp.pad(v, widths, constant_values=fill)


_LATENT_KEYS = ("latent_tokens", "factorized_latent", "decoder_latent_input", "quant_indices")


def initial_buffer(model: ALIT, alit_vars: Any, img_tokens: jax.Array, full: bool) -> jax.Array:
  """`ln_pre([cls, img, latents_0 (, zero slots)])`: the sequence at iteration 0."""
  c = model.config
  lat0 = _apply(model, alit_vars, ALIT.fresh_latents, 0)
  if full:
    lat0 = jnp.concatenate(
      [lat0, jnp.zeros((c.max_latent_tokens - c.num_latent_tokens, lat0.shape[-1]), lat0.dtype)]
    )
  x = _apply(model, alit_vars, ALIT.encoder_sequence, img_tokens, lat0)
  return _apply(model, alit_vars, ALIT.ln_pre, x)


def _advance(model: ALIT, alit_vars: Any, x: jax.Array, i: jax.Array) -> jax.Array:
  """Writes iteration i+1's fresh latents into the buffer and applies `ln_recursive` (quirk 5)."""
  c = model.config
  t, n = c.num_latent_tokens, c.max_rollout_iters
  nxt = jnp.minimum(i + 1, n - 1)
  fresh = _apply(model, alit_vars, ALIT.fresh_latents, nxt)
  fresh = jnp.broadcast_to(fresh, (x.shape[0],) + fresh.shape).astype(x.dtype)
  start = c.num_image_tokens + 1 + t * nxt
  y = jax.lax.dynamic_update_slice(x, fresh, (0, start, 0))
  y = _apply(model, alit_vars, ALIT.ln_recursive, y)
  return jnp.where(i + 1 < n, y, x)


def _key_mask(model: ALIT, i: jax.Array) -> jax.Array:
  c = model.config
  s = c.num_image_tokens + 1 + c.max_latent_tokens
  return jnp.arange(s) < c.num_image_tokens + 1 + c.num_latent_tokens * (i + 1)


def alit_rollout(
  model: ALIT,
  alit_vars: Any,
  img_tokens: jax.Array,
  targets: dict[str, jax.Array],
  *,
  halting: Halting = Halting(),
  rng: jax.Array | None = None,
  impl: Literal["scan", "unrolled"] = "scan",
  decode_mask: jax.Array | None = None,
  noise_rng: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """Runs all `max_rollout_iters` iterations of ALIT.

  Args:
    model: the ALIT module.
    alit_vars: its variables (`{"params": ...}`).
    img_tokens: (B, 256, W) from `ALIT.embed_images`.
    targets: from `base_encode` (VQGAN `gt_indices` + `codebook`, or VAE `gt_code`).
    halting: halting settings.
    rng: PRNG key, needed for `halting.mode == "sample"` (folded with the iteration index).
    impl: "scan" (fixed buffer + masks) or "unrolled" (growing sequence).
    decode_mask: optional bool (N,): iterations at which the latents are decoded (and halting
      applied). The reference's training with `sample_grad_iters` decodes only at the sampled
      iterations; elsewhere the encoder just carries on. Outputs of skipped iterations are zeros.
      The unrolled variant needs a concrete (non-traced) mask.
    noise_rng: PRNG key of the latent channel noise (folded with the iteration index), used when
      `latent_noise_std` > 0; None: no noise (inference).

  Returns:
    Per-iteration arrays stacked on axis 0 (N = max_rollout_iters, L = N*T latent slots):
    `latent_tokens` (N, B, L, W) before ln_post, `factorized_latent` (N, B, L, D),
    `decoder_latent_input` (N, B, L, D), `quant_indices` (N, B, L) (quantized); padded latent
    slots hold 0 (indices -1) in both implementations. VQGAN `logits` (N, B, 256, K) and
    `pred_gt_prob` (N, B, 256), `decoded_code` (N, B, 256, E), VAE `code_l1` and `would_mask`
    (N, B, 256), `drop_mask` (N, B, 256) bool, and quantizer losses (N,) (means over valid tokens).
    Also `encoder_input` (B, S0, W): the iteration-0 sequence.
  """
  c = model.config
  n, t = c.max_rollout_iters, c.num_latent_tokens
  keys = None
  if halting.mode == "sample":
    if rng is None:
      raise ValueError("halting='sample' needs rng")
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n))
  noise_keys = None
  if noise_rng is not None and c.latent_noise_std > 0:
    noise_keys = jax.vmap(lambda i: jax.random.fold_in(noise_rng, i))(jnp.arange(n))

  if impl == "scan":
    x0 = initial_buffer(model, alit_vars, img_tokens, full=True)

    def decode_step(x, i, key, noise_key):
      return _iteration_outputs(
        model, alit_vars, x, t * (i + 1), targets, halting, key, True, noise_key
      )

    def body(x, inp):
      i, key, noise_key = inp
      key = key if keys is not None else None
      noise_key = noise_key if noise_keys is not None else None
      x = _apply(model, alit_vars, ALIT.encode, x, _key_mask(model, i))
      if decode_mask is None:
        x, res = decode_step(x, i, key, noise_key)
      else:
        shapes = jax.eval_shape(decode_step, x, i, key, noise_key)[1]

        def skip(x, i, key, noise_key):
          return x, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        x, res = jax.lax.cond(decode_mask[i], decode_step, skip, x, i, key, noise_key)
      x = _advance(model, alit_vars, x, i)
      return x, res

    xs = (
      jnp.arange(n),
      keys if keys is not None else jnp.zeros((n,), jnp.int32),
      noise_keys if noise_keys is not None else jnp.zeros((n,), jnp.int32),
    )
    _, stacked = jax.lax.scan(body, x0, xs)
    stacked["encoder_input"] = x0[:, : c.num_image_tokens + 1 + t]
    return stacked

  if impl != "unrolled":
    raise ValueError(f"impl must be 'scan' or 'unrolled', got {impl!r}")
  x = initial_buffer(model, alit_vars, img_tokens, full=False)
  encoder_input = x
  per_iter = []
  if decode_mask is not None:
    decode_mask = [bool(v) for v in decode_mask]
  for i in range(n):
    x = _apply(model, alit_vars, ALIT.encode, x)
    key = None if keys is None else keys[i]
    noise_key = None if noise_keys is None else noise_keys[i]
    x_enc = x
    x, res = _iteration_outputs(
      model, alit_vars, x, t * (i + 1), targets, halting, key, False, noise_key
    )
    if decode_mask is not None and not decode_mask[i]:
      x, res = x_enc, jax.tree.map(jnp.zeros_like, res)
    for k in _LATENT_KEYS:
      if k in res:
        res[k] = _pad_latents(res[k], n * t)
    per_iter.append(res)
    if i + 1 < n:
      fresh = _apply(model, alit_vars, ALIT.fresh_latents, i + 1)
      fresh = jnp.broadcast_to(fresh, (x.shape[0],) + fresh.shape)
      x = _apply(model, alit_vars, ALIT.ln_recursive, jnp.concatenate([x, fresh], axis=1))
  stacked = jax.tree.map(lambda *v: jnp.stack(v), *per_iter)
  stacked["encoder_input"] = encoder_input
  return stacked


# ----------------------------------------------------------------------------------------------
# Adaptive-length encoding with early exit
# ----------------------------------------------------------------------------------------------


def adaptive_encode(
  model: ALIT,
  alit_vars: Any,
  base: VQGAN | VAE,
  base_vars: Any,
  images: jax.Array,
  criterion: Callable[[jax.Array, jax.Array], jax.Array],
  threshold: float,
  *,
  higher_is_better: bool = False,
  halting: Halting = Halting(),
  rng: jax.Array | None = None,
  early_exit: bool = True,
  base_chunk: int | None = None,
) -> dict[str, jax.Array]:
  """Per image, the fewest tokens whose reconstruction meets the criterion.

  Runs the rollout in a `lax.while_loop` over the fixed buffer and stops as soon as every image
  in the batch meets the criterion (or after the last iteration). An image that never meets it
  gets all N*T tokens. The reference's `encode` instead picks one length for the whole batch from
  the batch-mean L1 (quirk 16).

  Args:
    model, alit_vars, base, base_vars: the modules and their variables.
    images: (B, H, W, 3) float32 in [0, 1].
    criterion: `(images, reconstructions) -> (B,)` score, or a bool (B,) "meets" array.
    threshold: a score meets it when `score < threshold` (`>` if `higher_is_better`); ignored
      for boolean criteria.
    higher_is_better: direction of the score.
    halting: dynamic halting during the rollout.
    rng: PRNG key for `halting.mode == "sample"`.
    early_exit: stop once every image is done (False: always run every iteration).
    base_chunk: run the base encoder/decoder this many images at a time (None: whole batch).

  Returns:
    `tokens` (B, L) int32 quantizer indices (-1 beyond the length) or (B, L, D) continuous
    latents (0 beyond); `lengths` (B,) int32; `reconstructions` (B, H, W, 3) at the chosen length;
    `scores` (N, B) per iteration (NaN where not computed); `iterations_run` () int32.
  """
  c = model.config
  n, t = c.max_rollout_iters, c.num_latent_tokens
  lmax = n * t
  b = images.shape[0]
  enc = base_encode(base, base_vars, images, base_chunk)
  targets = {k: v for k, v in enc.items() if k in ("gt_indices", "codebook", "gt_code")}
  img_tokens = _apply(model, alit_vars, ALIT.embed_images, images, enc["base_features"])
  x0 = initial_buffer(model, alit_vars, img_tokens, full=True)
  if c.quantize_latent:
    tokens0 = jnp.full((b, lmax), -1, jnp.int32)
  else:
    tokens0 = jnp.zeros((b, lmax, c.latent_dim), jnp.float32)
  if halting.mode == "sample" and rng is None:
    raise ValueError("halting='sample' needs rng")
  state = {
    "i": jnp.asarray(0, jnp.int32),
    "x": x0,
    "done": jnp.zeros((b,), bool),
    "lengths": jnp.full((b,), lmax, jnp.int32),
    "tokens": tokens0,
    "reconstructions": jnp.zeros(images.shape, jnp.float32),
    "scores": jnp.full((n, b), jnp.nan, jnp.float32),
  }

  def cond(s):
    more = s["i"] < n
    return (more & ~jnp.all(s["done"])) if early_exit else more

  def body(s):
    i = s["i"]
    key = jax.random.fold_in(rng, i) if halting.mode == "sample" else None
    x = _apply(model, alit_vars, ALIT.encode, s["x"], _key_mask(model, i))
    x, res = _iteration_outputs(
      model, alit_vars, x, t * (i + 1), targets, halting, key, masked=True
    )
    recon = base_decode(base, base_vars, res["decoded_code"], base_chunk)
    score = criterion(images, recon)
    if score.dtype == jnp.bool_:
      meets = score
      score = score.astype(jnp.float32)
    else:
      score = score.astype(jnp.float32)
      meets = score > threshold if higher_is_better else score < threshold
    last = i == n - 1
    take = ~s["done"] & (meets | last)
    slot_valid = jnp.arange(lmax) < t * (i + 1)
    if c.quantize_latent:
      cur = jnp.where(slot_valid[None], res["quant_indices"], -1)
      tokens = jnp.where(take[:, None], cur, s["tokens"])
    else:
      cur = jnp.where(slot_valid[None, :, None], res["factorized_latent"], 0.0)
      tokens = jnp.where(take[:, None, None], cur, s["tokens"])
    x = _advance(model, alit_vars, x, i)
    return {
      "i": i + 1,
      "x": x,
      "done": s["done"] | take,
      "lengths": jnp.where(take, t * (i + 1), s["lengths"]),
      "tokens": tokens,
      "reconstructions": jnp.where(take[:, None, None, None], recon, s["reconstructions"]),
      "scores": s["scores"].at[i].set(score),
    }

  s = jax.lax.while_loop(cond, body, state)
  return {
    "tokens": s["tokens"],
    "lengths": s["lengths"],
    "reconstructions": s["reconstructions"],
    "scores": s["scores"],
    "iterations_run": s["i"],
  }


def decode_tokens(
  model: ALIT,
  alit_vars: Any,
  base: VQGAN | VAE,
  base_vars: Any,
  tokens: jax.Array,
  lengths: jax.Array,
  codebook: jax.Array | None = None,
  base_chunk: int | None = None,
) -> dict[str, jax.Array]:
  """Images from 1D tokens of per-image lengths.

  Args:
    tokens: (B, L) int quantizer indices or (B, L, D) continuous latents, L <= N*T; entries at or
      beyond an image's length are ignored.
    lengths: (B,) int token counts (any value 1..L; trained lengths are multiples of T).
    codebook: VQGAN codebook (K, E) (read from `base_vars` when None).
    base_chunk: run the base decoder this many images at a time (None: whole batch).

  Returns:
    `reconstructions` (B, H, W, 3), `decoded_code` (B, 256, E), and VQGAN `logits`.
  """
  b, length = tokens.shape[:2]
  valid = jnp.arange(length)[None] < lengths[:, None]
  if model.config.quantize_latent:
    tokens = jnp.where(valid, tokens, 0)
  dec_in = _apply(model, alit_vars, ALIT.tokens_to_decoder_input, tokens)
  out = _apply(model, alit_vars, ALIT.decode, dec_in, valid)
  res = {}
  if isinstance(base, VQGAN):
    if codebook is None:
      codebook = base.apply(base_vars, method=VQGAN.codebook)
    probs = jax.nn.softmax(out, axis=-1)
    code = jnp.einsum("bnk,ke->bne", probs, codebook, precision=jax.lax.Precision.HIGHEST)
    res["logits"] = out
  else:
    code = out
  res["decoded_code"] = code
  res["reconstructions"] = base_decode(base, base_vars, code, base_chunk)
  return res


def full_rollout(
  model: ALIT,
  base: VQGAN | VAE,
  variables: dict[str, Any],
  images: jax.Array,
  *,
  halting: Halting = Halting(),
  rng: jax.Array | None = None,
  impl: Literal["scan", "unrolled"] = "scan",
  reconstruct: bool = True,
  base_chunk: int | None = None,
) -> dict[str, jax.Array]:
  """Base encoder + ALIT rollout + base decoder at every iteration (the reference's eval forward).

  Args:
    model, base: ALIT and base-tokenizer modules.
    variables: `{"alit": alit_vars, "base": base_vars}`.
    images: (B, H, W, 3) float32 in [0, 1].
    halting, rng, impl: see `alit_rollout`.
    reconstruct: also decode images at every iteration (the most expensive part).
    base_chunk: run the base encoder/decoder this many images at a time (None: whole batch).

  Returns:
    `alit_rollout`'s arrays plus `base_features` (B, g, g, E), `img_tokens_normalized`
    (B, 256, W), the targets (`gt_indices` / `gt_code`), and `reconstructions` (N, B, H, W, 3).
  """
  enc = base_encode(base, variables["base"], images, base_chunk)
  targets = {k: v for k, v in enc.items() if k in ("gt_indices", "codebook", "gt_code")}
  img_tokens = _apply(model, variables["alit"], ALIT.embed_images, images, enc["base_features"])
  out = alit_rollout(
    model, variables["alit"], img_tokens, targets, halting=halting, rng=rng, impl=impl
  )
  out.update({k: v for k, v in enc.items() if k != "codebook"})
  out["img_tokens_normalized"] = img_tokens
  if reconstruct:
    out["reconstructions"] = jax.lax.map(
      lambda code: base_decode(base, variables["base"], code, base_chunk), out["decoded_code"]
    )
  return out
