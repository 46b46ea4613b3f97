"""What the adversarial trainings reconstruct, and how: `ALITTask` (stage 2) and `VQGANTask`.

A task turns a batch of images into the input of the base decoder's last layer (`features`) or a
reconstruction (`reconstruct`), with its auxiliary loss and metrics; `gan_steps.generator_step`
and `gan_steps.discriminator_step` train either one.

* `ALITTask` (stage 2, the reference's `main_full_finetuning.py` + `engines/full_finetuning.py`):
  base encoder -> ALIT rollout -> at ONE rollout iteration the soft code
  `softmax(logits) @ codebook` (VQGAN; the codebook is not differentiated, as the reference's
  `.weight.data`) or the decoded code (VAE) -> the base decoder. ALIT and the base tokenizer
  (encoder and decoder) are trained; the VQGAN codebook gets no gradient in the reference (its
  parameter has no `.grad`, so AdamW skips it) and is frozen here.
* `VQGANTask` (`configs/vqgan_train.py`): a MaskGIT-style VQGAN trained from scratch with the
  taming `VectorQuantizer2` legacy loss `mean((sg(zq) - z)^2) + beta * mean((zq - sg(z))^2)` and
  a straight-through estimator.

Also the nested-dict and stacked-tree helpers both modules use (`tree_get`, `tree_set`, `take`,
`put`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from alit_jax.models import rollout as rollout_lib
from alit_jax.models.alit import ALIT
from alit_jax.models.base_tokenizers import VAE, VQGAN, nearest_code
from alit_jax.train.sharding import path_name
from alit_jax.train.steps import stream_key

LAST_LAYER = ("base", "decoder", "conv_out")
CODEBOOK = ("base", "quantize", "embedding", "embedding")


def tree_get(tree: Any, path: tuple[str, ...]) -> Any:
  """The entry of nested dict `tree` at `path`."""
  for p in path:
    tree = tree[p]
  return tree


def tree_set(tree: dict, path: tuple[str, ...], value: Any) -> dict:
  """A copy of nested dict `tree` with `path` replaced (the rest shared)."""
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = tree_set(tree[path[0]], path[1:], value)
  return out


def take(tree: Any, i: jax.Array) -> Any:
  """Entry `i` of a tree stacked on axis 0 (traced index)."""
  return jax.tree.map(lambda a: a[i], tree)


def put(tree: Any, i: jax.Array, sub: Any) -> Any:
  """`tree` with entry `i` (axis 0) replaced by `sub`."""
  return jax.tree.map(lambda a, s: a.at[i].set(s.astype(a.dtype)), tree, sub)


# ----------------------------------------------------------------------------------------------
# Tasks: what is reconstructed, and how.


@dataclasses.dataclass(frozen=True)
class ALITTask:
  """Stage-2 reconstruction: base encoder -> ALIT rollout -> code at one iteration -> decoder.

  Attributes:
    model: the ALIT module.
    base: the base tokenizer module (trained here).
    halting: dynamic halting (the reference samples it in training: mode "sample").
    vae_posterior: VAE base: "mode" (this package's tokenization) or "sample" (the reference's
      `posterior.sample()`, drawn from the `posterior` stream).
  """

  model: ALIT
  base: VQGAN | VAE
  halting: rollout_lib.Halting = rollout_lib.Halting("sample", 0.55)
  vae_posterior: str = "mode"

  def __post_init__(self):
    if self.vae_posterior not in ("mode", "sample"):
      raise ValueError(f"vae_posterior must be 'mode' or 'sample', got {self.vae_posterior!r}")

  @property
  def num_iters(self) -> int:
    return self.model.config.max_rollout_iters

  @property
  def dtype(self) -> Any:
    return self.base.dtype

  def frozen(self, params: Any) -> Any:
    """True for parameters the reference never updates (the VQGAN codebook)."""
    return jax.tree_util.tree_map_with_path(
      lambda p, _: path_name(p).startswith("base/quantize/"), params
    )

  def init_params(self, rng: jax.Array) -> Any:
    c = self.model.config
    images = jnp.zeros((1, c.image_size, c.image_size, 3), jnp.float32)
    feats = jnp.zeros((1, c.grid_size, c.grid_size, c.base_embed_dim), jnp.float32)
    k1, k2 = jax.random.split(rng)
    return {
      "alit": self.model.init(k1, images, feats)["params"],
      "base": self.base.init(k2, images)["params"],
    }

  def _code(
    self, params: Any, x: jax.Array, iteration: jax.Array, root: jax.Array, step: jax.Array
  ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Decoded code (B, g*g, E) at `iteration`, the ALIT quantizer loss there, metrics.

    Random draws (halting, VAE posterior) come from the named streams of `root` at `step`.
    """
    c = self.model.config
    base_vars = {"params": params["base"]}
    alit_vars = {"params": params["alit"]}
    if isinstance(self.base, VQGAN):
      feats, idx = self.base.apply(base_vars, x, method=VQGAN.encode)
      codebook = self.base.apply(base_vars, method=VQGAN.codebook)
      # The reference's soft code uses `embedding.weight.data`: no gradient into the codebook.
      targets = {"gt_indices": idx, "codebook": jax.lax.stop_gradient(codebook)}
    else:
      mean, logvar = self.base.apply(base_vars, x, method=VAE.encode_moments)
      z = mean
      if self.vae_posterior == "sample":
        noise = jax.random.normal(stream_key(root, "posterior", step), mean.shape, mean.dtype)
        z = mean + jnp.exp(0.5 * logvar) * noise
      feats = z * self.base.config.scale_factor
      b, g1, g2, e = feats.shape
      targets = {"gt_code": jax.lax.stop_gradient(feats.reshape(b, g1 * g2, e))}
    img_tokens = self.model.apply(alit_vars, x, feats, method=ALIT.embed_images)
    n = self.num_iters
    out = rollout_lib.alit_rollout(
      self.model,
      alit_vars,
      img_tokens,
      targets,
      halting=self.halting,
      rng=stream_key(root, "halting", step) if self.halting.mode == "sample" else None,
      impl="scan",
      decode_mask=jnp.arange(n) == iteration,
    )
    code = out["decoded_code"][iteration]
    metrics = {"masked_fraction": out["drop_mask"][iteration].astype(jnp.float32).mean()}
    aux = jnp.float32(0.0)
    if c.quantize_latent:
      aux = out["quantizer_loss"][iteration]
      metrics["quantization_loss"] = aux
    return code, aux, metrics

  def _decode(self, params: Any, code: jax.Array, features_only: bool) -> jax.Array:
    b, n, e = code.shape
    g = int(round(n**0.5))
    return self.base.apply(
      {"params": params["base"]},
      code.reshape(b, g, g, e),
      features_only,
      method=type(self.base).decode,
    )

  def features(
    self, params: Any, x: jax.Array, iteration: jax.Array, root: jax.Array, step: jax.Array
  ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(input of the decoder's conv_out (B, H, W, C), aux loss, metrics)."""
    code, aux, metrics = self._code(params, x, iteration, root, step)
    return self._decode(params, code, True), aux, metrics

  def reconstruct(
    self, params: Any, x: jax.Array, iteration: jax.Array, root: jax.Array, step: jax.Array
  ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """(reconstruction (B, H, W, 3), aux loss, metrics)."""
    code, aux, metrics = self._code(params, x, iteration, root, step)
    return self._decode(params, code, False), aux, metrics

  def reconstruct_all(self, params: Any, x: jax.Array, rng: jax.Array | None) -> jax.Array:
    """(N, B, H, W, 3) reconstructions at every iteration (image summaries)."""
    out = rollout_lib.full_rollout(
      self.model,
      self.base,
      {"alit": {"params": params["alit"]}, "base": {"params": params["base"]}},
      x,
      halting=self.halting,
      rng=rng if self.halting.mode == "sample" else None,
      impl="scan",
    )
    return out["reconstructions"]


@dataclasses.dataclass(frozen=True)
class VQGANTask:
  """A VQGAN base tokenizer trained from scratch (encoder, codebook, decoder).

  Attributes:
    base: the VQGAN module.
    beta: weight of the codebook term in the taming VectorQuantizer2 legacy loss.
    codebook_weight: weight of the whole VQ loss in the generator objective (taming's).
    restart_dead_codes_every: every this many steps (0: never), codes that no feature of the
      batch chose are moved onto randomly picked encoder features of the batch (in the params
      and the EMA). Not in taming: its small-uniform codebook init leaves most codes unused on
      small runs (the demo VQGAN used 11 of 256 codes, perplexity ~11, at step 150 without it).
  """

  base: VQGAN
  beta: float = 0.25
  codebook_weight: float = 1.0
  restart_dead_codes_every: int = 0

  num_iters = 1

  @property
  def dtype(self) -> Any:
    return self.base.dtype

  def frozen(self, params: Any) -> Any:
    return jax.tree.map(lambda _: False, params)

  def init_params(self, rng: jax.Array) -> Any:
    s = self.base.config.resolution
    return {"base": self.base.init(rng, jnp.zeros((1, s, s, 3), jnp.float32))["params"]}

  def quantize(self, params: Any, x: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
    """Straight-through quantized features (B, h, w, E), VQ loss, metrics."""
    base_vars = {"params": params["base"]}
    z = self.base.apply(base_vars, x, method=VQGAN.features)
    codebook = self.base.apply(base_vars, method=VQGAN.codebook)
    idx = nearest_code(z, codebook)
    zq = codebook[idx].astype(jnp.float32)
    z = z.astype(jnp.float32)
    sg = jax.lax.stop_gradient
    loss = vq_loss(z, zq, self.beta)
    zq_st = z + sg(zq - z)
    k = codebook.shape[0]
    hist = jnp.zeros((k,), jnp.float32).at[idx.reshape(-1)].add(1.0) / idx.size
    metrics = {
      "codebook_loss": loss,
      "perplexity": jnp.exp(-jnp.sum(hist * jnp.log(hist + 1e-10))),
      "codes_used": jnp.mean((hist > 0).astype(jnp.float32)),
    }
    return zq_st, self.codebook_weight * loss, metrics

  def restart_dead_codes(
    self, state: dict[str, Any], x: jax.Array, root: jax.Array, step: jax.Array
  ) -> dict[str, Any]:
    """`state` with the batch's unused codes moved onto random encoder features (see above).

    Args:
      state: train state after the update (`params`, `ema_params`).
      x: (B, H, W, 3) float images of the step.
      root: the run's root key; the picks use stream "codes" folded with `step`.
      step: the step just taken.
    """
    if not self.restart_dead_codes_every:
      return state

    def restart(st):
      params = st["params"]
      base_vars = {"params": params["base"]}
      z = self.base.apply(base_vars, x, method=VQGAN.features)
      codebook = self.base.apply(base_vars, method=VQGAN.codebook)
      z = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
      idx = nearest_code(z, codebook)
      dead = jnp.zeros((codebook.shape[0],), jnp.int32).at[idx].add(1) == 0
      pick = jax.random.randint(stream_key(root, "codes", step), dead.shape, 0, z.shape[0])
      out = dict(st)
      for name in ("params", "ema_params"):
        cb = tree_get(st[name], CODEBOOK)
        out[name] = tree_set(
          st[name], CODEBOOK, jnp.where(dead[:, None], z[pick].astype(cb.dtype), cb)
        )
      return out

    due = (step + 1) % self.restart_dead_codes_every == 0
    return jax.lax.cond(due, restart, lambda st: st, state)

  def features(self, params: Any, x: jax.Array, iteration: Any, root: Any, step: Any):
    zq, aux, metrics = self.quantize(params, x)
    h = self.base.apply({"params": params["base"]}, zq, True, method=VQGAN.decode)
    return h, aux, metrics

  def reconstruct(self, params: Any, x: jax.Array, iteration: Any, root: Any, step: Any):
    zq, aux, metrics = self.quantize(params, x)
    return self.base.apply({"params": params["base"]}, zq, method=VQGAN.decode), aux, metrics

  def reconstruct_all(self, params: Any, x: jax.Array, rng: jax.Array | None) -> jax.Array:
    return self.reconstruct(params, x, None, None, None)[0][None]


def vq_loss(z: jax.Array, zq: jax.Array, beta: float) -> jax.Array:
  """taming `VectorQuantizer2(legacy=True)`: mean((sg(zq) - z)^2) + beta * mean((zq - sg(z))^2).

  The first (commitment) term trains the encoder, the second the codebook; with the legacy form
  beta weights the codebook term.
  """
  sg = jax.lax.stop_gradient
  return jnp.mean(jnp.square(sg(zq) - z)) + beta * jnp.mean(jnp.square(zq - sg(z)))
