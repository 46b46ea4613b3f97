"""`Tokenizer`: the public API.

```python
from alit_jax import Tokenizer
tok = Tokenizer.from_pytorch("ckpt.pth", num_heads=None)    # any official checkpoint
tok = Tokenizer.from_pretrained("DIR")                      # Orbax dir from convert or training
trace = tok.rollout(images, halting="off", halting_threshold=None, rng=None)
enc = tok.encode(images, criterion="l1", threshold=0.07)    # per-image minimum length
imgs = tok.decode(enc.tokens, enc.lengths)
tok = Tokenizer.from_pretrained("DIR", mesh=local_mesh())  # batches split over local devices
```

Images are float NHWC in [0, 1] (also uint8, and single (H, W, 3) images).

Differences from the reference's `encode` (documented deviations):
* the length is chosen **per image** (the reference picks one length for the whole batch from the
  batch-mean L1, quirk 16);
* an image that never meets the criterion gets all 256 tokens (the reference returns the
  lowest-loss length it saw, despite its comment saying "return max tokens");
* halting defaults to `off`, as in `rollout`; the reference evaluates with its model default
  (Bernoulli-sampled halting at 0.55): pass `halting="sample", rng=...` for that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import pathlib
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alit_jax import checkpoint, criteria
from alit_jax import images as images_lib
from alit_jax.models import rollout as rollout_lib
from alit_jax.models.alit import ALIT
from alit_jax.models.base_tokenizers import VAE, VQGAN, build_base
from alit_jax.models.configs import ModelConfig

DEMO_DIR = pathlib.Path(__file__).resolve().parent / "assets" / "demo"
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".npz")
# Chosen by `experiments/benchmarks/rollout.py` (results/rollout_cpu.json, 2 CPU cores): the
# unrolled rollout was faster at every measured size (alit_small: 12.9 vs 14.5 s at batch 1,
# 105 vs 125 s at batch 8; the scan attends over the full 513-token buffer at every iteration)
# and compiles 5-12 s longer, which it earns back within one batch-8 or ~7 batch-1 alit_small
# calls. No GPU/TPU measurement yet.
DEFAULT_IMPL: Literal["scan", "unrolled"] = "unrolled"


@dataclasses.dataclass
class Encoding:
  """Result of `Tokenizer.encode`.

  Attributes:
    tokens: (B, L) int32 quantizer indices, -1 beyond each length (quantized models), or
      (B, L, D) float32 continuous latents, 0 beyond each length. L = 256.
    lengths: (B,) int32 chosen token counts (multiples of 32).
    reconstructions: (B, H, W, 3) float32 reconstruction at the chosen length (unclipped).
    scores: (N, B) criterion score of every iteration run (NaN for iterations skipped by early exit).
    iterations_run: how many rollout iterations the batch needed.
    criterion: the criterion's name; threshold: the threshold used.
  """

  tokens: jax.Array
  lengths: jax.Array
  reconstructions: jax.Array
  scores: jax.Array
  iterations_run: int
  criterion: str
  threshold: float | None


@functools.partial(
  jax.jit, static_argnames=("model", "base", "halting", "impl", "reconstruct", "base_chunk")
)
def _rollout_fn(variables, images, rng, *, model, base, halting, impl, reconstruct, base_chunk):
  return rollout_lib.full_rollout(
    model,
    base,
    variables,
    images,
    halting=halting,
    rng=rng,
    impl=impl,
    reconstruct=reconstruct,
    base_chunk=base_chunk,
  )


@functools.partial(
  jax.jit,
  static_argnames=("model", "base", "criterion", "halting", "early_exit", "base_chunk"),
)
def _encode_fn(
  variables, images, threshold, rng, *, model, base, criterion, halting, early_exit, base_chunk
):
  return rollout_lib.adaptive_encode(
    model,
    variables["alit"],
    base,
    variables["base"],
    images,
    criterion.fn,
    threshold,
    higher_is_better=criterion.higher_is_better,
    halting=halting,
    rng=rng,
    early_exit=early_exit,
    base_chunk=base_chunk,
  )


@functools.partial(jax.jit, static_argnames=("model", "base", "base_chunk"))
def _decode_fn(variables, tokens, lengths, *, model, base, base_chunk):
  return rollout_lib.decode_tokens(
    model, variables["alit"], base, variables["base"], tokens, lengths, base_chunk=base_chunk
  )


def local_mesh(axis_name: str = "data") -> Mesh:
  """A 1-D data-parallel mesh over this process's devices (`jax.local_devices()`).

  Local devices only, so processes of a multi-host job run independent computations (no
  collectives across hosts), as dataset tokenization wants.
  """
  return Mesh(np.array(jax.local_devices()), (axis_name,))


class Tokenizer:
  """An ALIT tokenizer: base tokenizer + recurrent latent distillation, with its weights.

  Attributes:
    config: the architecture.
    variables: `{"alit": {"params": ...}, "base": {"params": ...}}`.
    image_size: input resolution.
    meta: provenance (source checkpoint etc.).
    gan_losses: stage-2 loss networks from a full_finetuning checkpoint, if any.
    mesh: data-parallel mesh (None: jax's default device).
  """

  def __init__(
    self,
    config: ModelConfig,
    variables: Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
    impl: Literal["scan", "unrolled"] = DEFAULT_IMPL,
    vae_masking: bool = False,
    matmul_precision: str | None = None,
    meta: dict[str, Any] | None = None,
    gan_losses: Any = None,
    mesh: Mesh | None = None,
    base_chunk: int | None | Literal["auto"] = "auto",
  ):
    """Builds a tokenizer from a config and variables.

    Args:
      config: architecture.
      variables: `{"alit": ..., "base": ...}` (numpy or jax arrays).
      dtype: compute dtype (params stay float32). float32 reproduces the reference.
      impl: default rollout implementation ("scan" or "unrolled").
      vae_masking: VAE halting masks tokens as the reference intends (it masks none; quirk 3).
      matmul_precision: `jax.default_matmul_precision` for the computations; defaults to
        "highest" for float32 (GPU/TPU would otherwise use TF32/bf16 passes) and None otherwise.
      meta: provenance stored with `save_pretrained`.
      gan_losses: stage-2 loss networks, if any.
      mesh: a device mesh for data parallelism (e.g. `local_mesh()`): the weights are replicated
        on it and every batch is split along its first axis over all mesh axes. `encode` and
        `decode` pad a batch that does not divide into the mesh by repeating its last image (so
        early exit is unaffected) and drop the padding from the outputs; `rollout` replicates
        such a batch instead.
      base_chunk: run the base tokenizer's encoder and decoder on this many images at a time
        (None: the whole batch). "auto": 1 on CPU without a mesh (there a bigger batch costs
        more per image: see `rollout_lib._in_chunks`), else None.
    """
    self.config = config
    self.mesh = mesh
    self.variables = jax.tree.map(jnp.asarray, dict(variables))
    if mesh is not None:
      self.variables = jax.device_put(self.variables, NamedSharding(mesh, P()))
    self.dtype = dtype
    self.impl = impl
    if base_chunk == "auto":
      base_chunk = 1 if mesh is None and jax.default_backend() == "cpu" else None
    if base_chunk is not None and (not isinstance(base_chunk, int) or base_chunk < 1):
      raise ValueError(f"base_chunk must be a positive int, None or 'auto', got {base_chunk!r}")
    self.base_chunk = base_chunk
    self.vae_masking = vae_masking
    if matmul_precision is None and jnp.dtype(dtype) == jnp.float32:
      matmul_precision = "highest"
    self.matmul_precision = matmul_precision
    self.meta = dict(meta or {})
    self.gan_losses = gan_losses
    self.model = ALIT(config.alit, dtype=dtype)
    self.base: VQGAN | VAE = build_base(config.base, dtype=dtype)

  # ---------------------------------------------------------------------------------------------
  # Construction
  # ---------------------------------------------------------------------------------------------

  @classmethod
  def from_pytorch(
    cls,
    path: str | os.PathLike,
    num_heads: int | None = None,
    *,
    load_gan_losses: bool = False,
    **kwargs,
  ) -> Tokenizer:
    """Loads an official PyTorch ALIT checkpoint (no torch needed).

    Args:
      path: `.pth` (plain state dict, `{'model','ema'}` (ema used), `{'state_dict'}`),
        `.safetensors` or `.npz`.
      num_heads: attention heads; None uses the reference factory value for the inferred size.
      load_gan_losses: also convert a full_finetuning checkpoint's `gan_losses.*` (8 PatchGAN
        discriminators + LPIPS, ~140M values) into `self.gan_losses`; otherwise only their key
        count is recorded in `meta` (inference does not need them).
      **kwargs: passed to `Tokenizer.__init__`.
    """
    from alit_jax.convert import alit_checkpoint, pth

    sd, where = pth.load_state_dict(path)
    name = os.fspath(path)
    config = alit_checkpoint.infer_config(
      {k: tuple(np.shape(v)) for k, v in sd.items()}, num_heads=num_heads, name=name
    )
    variables, gan = alit_checkpoint.convert_state_dict(sd, config, name=name)
    meta = {"source": os.path.abspath(name), "state_dict": where, "gan_losses_keys": len(gan)}
    gan_tree = None
    if gan and load_gan_losses:
      gan_tree = alit_checkpoint.convert_gan_losses(gan, config.alit.max_rollout_iters, name=name)
    return cls(config, variables, meta=meta, gan_losses=gan_tree, **kwargs)

  @classmethod
  def random(cls, config: ModelConfig, seed: int = 0, **kwargs) -> Tokenizer:
    """A tokenizer with freshly initialised weights (reference initialisation scales)."""
    from alit_jax.models import init as init_lib

    return cls(config, init_lib.init_variables(config, jax.random.key(seed)), **kwargs)

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike = "demo", **kwargs) -> Tokenizer:
    """Loads a directory written by `python -m alit_jax.convert`, `save_pretrained` or training.

    Args:
      path: the directory, a training workdir (its latest EMA weights), or "demo" for the small
        model bundled with the package.
    """
    if os.fspath(path) == "demo":
      if not (DEMO_DIR / checkpoint.CONFIG_FILE).is_file():
        raise FileNotFoundError(f"the bundled demo model is missing from {DEMO_DIR}")
      path = DEMO_DIR
    path = pathlib.Path(path)
    if not path.exists():
      raise FileNotFoundError(f"{path}: no such directory")
    if not (path / checkpoint.CONFIG_FILE).is_file():
      from alit_jax.train import export

      if export.is_workdir(path):
        config, variables, meta = export.load_workdir(path)
        return cls(config, variables, meta=meta, **kwargs)
    config, variables, meta = checkpoint.load_pretrained(path)
    return cls(config, variables, meta=meta, **kwargs)

  @classmethod
  def load(cls, checkpoint: str | os.PathLike, num_heads: int | None = None, **kwargs) -> Tokenizer:
    """A tokenizer from any checkpoint form the command lines accept.

    Args:
      checkpoint: "demo", a pretrained directory (convert / save_pretrained / training workdir),
        or an official PyTorch checkpoint file (.pth, .pt, .ckpt, .bin, .safetensors, .npz).
      num_heads: attention heads of a PyTorch checkpoint (None: the reference factory's value).
      **kwargs: passed to the constructor.
    """
    text = os.fspath(checkpoint)
    if text == "demo":
      return cls.from_pretrained("demo", **kwargs)
    path = pathlib.Path(text).expanduser()
    if path.is_dir():
      return cls.from_pretrained(path, **kwargs)
    if path.is_file():
      if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ValueError(
          f"{path}: not a checkpoint file (expected one of {', '.join(CHECKPOINT_SUFFIXES)}) "
          "or a pretrained directory"
        )
      return cls.from_pytorch(path, num_heads=num_heads, **kwargs)
    raise FileNotFoundError(
      f"{path}: no such checkpoint; pass 'demo', a directory written by `python -m "
      "alit_jax.convert` / `save_pretrained` / training, or a PyTorch .pth file"
    )

  def save_pretrained(self, path: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
    """Writes config.json + Orbax params (atomically)."""
    return checkpoint.save_pretrained(
      path, self.config, self.variables, meta=self.meta, overwrite=overwrite
    )

  # ---------------------------------------------------------------------------------------------
  # Properties and helpers
  # ---------------------------------------------------------------------------------------------

  @property
  def image_size(self) -> int:
    return self.config.alit.image_size

  @property
  def num_iterations(self) -> int:
    return self.config.alit.max_rollout_iters

  @property
  def tokens_per_iteration(self) -> int:
    return self.config.alit.num_latent_tokens

  @property
  def token_counts(self) -> list[int]:
    """[32, 64, ..., 256]."""
    t = self.tokens_per_iteration
    return [t * (i + 1) for i in range(self.num_iterations)]

  def _precision(self):
    if self.matmul_precision is None:
      return contextlib.nullcontext()
    return jax.default_matmul_precision(self.matmul_precision)

  def _halting(self, halting: str, threshold: float | None) -> rollout_lib.Halting:
    if threshold is None:
      threshold = self.config.alit.halting_threshold
    return rollout_lib.Halting(halting, float(threshold), self.vae_masking)

  def _images(self, images: Any) -> jax.Array:
    return jnp.asarray(images_lib.as_batch(images, self.image_size))

  def _batch(self, images: Any, *, pad: bool) -> tuple[jax.Array, int]:
    """Validated float32 batch on the mesh (or default device), and its unpadded size.

    Well-formed uint8 batches travel as uint8 and are divided by 255 on device (a quarter of
    the transfer, same values); everything else goes through `images.as_batch` on the host.
    """
    s = self.image_size
    if not isinstance(images, jax.Array):
      images = np.asarray(images)
    if images.dtype == np.uint8 and images.ndim in (3, 4) and images.shape[-3:] == (s, s, 3):
      if images.ndim == 3:
        images = images[None]
      if images.shape[0] > 0:
        (x,), b = self._on_mesh(images, pad=pad)
        return images_lib.as_batch(x, s), b
    (x,), b = self._on_mesh(images_lib.as_batch(images, s), pad=pad)
    return x, b

  def _on_mesh(self, *arrays: Any, pad: bool) -> tuple[list[jax.Array], int]:
    """Places batch arrays (same leading size B) on `self.mesh`, split along axis 0.

    Returns the placed arrays and B. With `pad`, a B that does not divide into the mesh is padded
    by repeating the last row; otherwise such arrays are replicated.
    """
    b = int(np.shape(arrays[0])[0])
    if self.mesh is None:
      return [jnp.asarray(a) for a in arrays], b
    n = self.mesh.size
    if b % n and not pad:
      rep = NamedSharding(self.mesh, P())
      return [jax.device_put(a, rep) for a in arrays], b
    out = []
    for a in arrays:
      if b % n:
        xp = jnp if isinstance(a, jax.Array) else np
        a = xp.concatenate([a, xp.repeat(a[-1:], n - b % n, axis=0)], axis=0)
      out.append(jax.device_put(a, NamedSharding(self.mesh, P(self.mesh.axis_names))))
    return out, b

  @staticmethod
  def _rng(rng: Any, halting: str) -> jax.Array | None:
    if halting != "sample":
      return None
    if rng is None:
      raise ValueError(
        "halting='sample' draws Bernoulli masks: pass rng (a jax PRNG key or an int seed)"
      )
    if isinstance(rng, int | np.integer):
      return jax.random.key(int(rng))
    return rng

  # ---------------------------------------------------------------------------------------------
  # API
  # ---------------------------------------------------------------------------------------------

  def rollout(
    self,
    images: Any,
    halting: Literal["off", "threshold", "sample"] = "off",
    halting_threshold: float | None = None,
    rng: Any = None,
    *,
    impl: Literal["scan", "unrolled"] | None = None,
    reconstruct: bool = True,
  ) -> dict[str, jax.Array]:
    """All rollout iterations, with the reference's vector names.

    Args:
      images: (B, S, S, 3) float in [0, 1] or uint8, or one (S, S, 3) image.
      halting: "off", "threshold" (mask iff p >= threshold) or "sample" (Bernoulli, keyed).
      halting_threshold: defaults to the model's (0.55 VQGAN, 0.025 VAE).
      rng: PRNG key or int seed for "sample".
      impl: "scan" or "unrolled"; identical results. None: the tokenizer's `impl` (default
        `DEFAULT_IMPL`, "unrolled").
      reconstruct: decode images at every iteration.

    Returns:
      A dict of arrays. Shared: `base_features` (B, g, g, E) NHWC (VQGAN pre-quantization
      features / VAE scaled posterior mode), `img_tokens_normalized` (B, 256, W), `encoder_input`
      (B, 289, W), VQGAN `gt_indices` (B, 256), VAE `gt_code` (B, 256, E) and
      `posterior_mean`/`posterior_logvar`. Per iteration, stacked on axis 0 (N=8): `latent_tokens`
      (N, B, 256, W), `factorized_latent` (N, B, 256, D), `decoder_latent_input`, `quant_indices`
      (N, B, 256) (quantized models), VQGAN `logits` (N, B, 256, K) and `pred_gt_prob` (N, B, 256),
      `decoded_code` (N, B, 256, E), VAE `code_l1` and `would_mask` (N, B, 256), `drop_mask`
      (N, B, 256) bool, quantizer losses (N,), and `reconstructions` (N, B, H, W, 3) NHWC,
      unclipped. Iteration i's valid latent slots are the first 32(i+1); later slots hold 0
      (indices -1).
    """
    x, _ = self._batch(images, pad=False)
    h = self._halting(halting, halting_threshold)
    with self._precision():
      return _rollout_fn(
        self.variables,
        x,
        self._rng(rng, halting),
        model=self.model,
        base=self.base,
        halting=h,
        impl=impl or self.impl,
        reconstruct=reconstruct,
        base_chunk=self.base_chunk,
      )

  def default_threshold(self, criterion: str | criteria.Criterion = "l1") -> float | None:
    """The threshold used when none is given: the model's own (`meta["default_thresholds"]`,
    written by `python -m alit_jax.train.export --default-threshold l1=T`) or the criterion's."""
    crit = criteria.get(criterion)
    own = self.meta.get("default_thresholds", {})
    if crit.name in own:
      return float(own[crit.name])
    return crit.default_threshold

  def encode(
    self,
    images: Any,
    criterion: str | criteria.Criterion | Any = "l1",
    threshold: float | None = None,
    *,
    halting: Literal["off", "threshold", "sample"] = "off",
    halting_threshold: float | None = None,
    rng: Any = None,
    early_exit: bool = True,
  ) -> Encoding:
    """Per image, the fewest tokens whose reconstruction meets the criterion.

    Args:
      images: as for `rollout`.
      criterion: "l1", "mse", "psnr", a `criteria.Criterion`, or a callable
        `(images, reconstructions) -> (B,)` score (lower is better) or bool "meets" array.
      threshold: score threshold (l1/mse: score < threshold; psnr: score > threshold); None uses
        `self.default_threshold(criterion)` (the criterion's default, l1 0.07, unless the model
        records its own, as the demo model does for its 64x64 images);
        the criterion's default.
      halting, halting_threshold, rng: dynamic halting during the rollout (see `rollout`).
      early_exit: stop iterating once every image in the batch meets the criterion.

    Returns:
      An `Encoding`.
    """
    x, b = self._batch(images, pad=True)
    crit = criteria.get(criterion)
    if threshold is None:
      threshold = self.default_threshold(crit)
    if threshold is None:
      threshold = 0.0
    h = self._halting(halting, halting_threshold)
    with self._precision():
      out = _encode_fn(
        self.variables,
        x,
        jnp.float32(threshold),
        self._rng(rng, halting),
        model=self.model,
        base=self.base,
        criterion=crit,
        halting=h,
        early_exit=early_exit,
        base_chunk=self.base_chunk,
      )
    if out["lengths"].shape[0] != b:  # drop the mesh padding
      out = {k: v[:, :b] if k == "scores" else v if v.ndim == 0 else v[:b] for k, v in out.items()}
    return Encoding(
      tokens=out["tokens"],
      lengths=out["lengths"],
      reconstructions=out["reconstructions"],
      scores=out["scores"],
      iterations_run=int(out["iterations_run"]),
      criterion=crit.name,
      threshold=float(threshold),
    )

  def decode(self, tokens: Any, lengths: Any = None) -> jax.Array:
    """Images from 1D tokens.

    Args:
      tokens: (B, L) int quantizer indices or (B, L, D) continuous latents (one image: (L,) or
        (L, D)), L <= 256; entries at or beyond each length are ignored.
      lengths: (B,) token counts (defaults to L for every image).

    Returns:
      (B, H, W, 3) float32 reconstructions (unclipped).
    """
    c = self.config.alit
    tokens = jnp.asarray(tokens)
    quantized = c.quantize_latent
    if tokens.ndim == (1 if quantized else 2):
      tokens = tokens[None]
      if lengths is not None:
        lengths = jnp.reshape(jnp.asarray(lengths), (1,))
    if quantized:
      if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
          f"quantized model: tokens must be (B, L) integers, got {tokens.dtype} {tokens.shape}"
        )
    elif tokens.ndim != 3 or tokens.shape[-1] != c.latent_dim:
      raise ValueError(
        f"continuous model: tokens must be (B, L, {c.latent_dim}), got {tokens.shape}"
      )
    b, length = tokens.shape[:2]
    if length > c.max_latent_tokens or length == 0:
      raise ValueError(f"token sequences must have 1..{c.max_latent_tokens} tokens, got {length}")
    if lengths is None:
      lengths = jnp.full((b,), length, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    if lengths.shape != (b,):
      raise ValueError(f"lengths must have shape ({b},), got {lengths.shape}")
    if quantized:
      valid = np.arange(length)[None] < np.asarray(lengths)[:, None]
      tv = np.asarray(tokens)
      if np.any(valid & ((tv < 0) | (tv >= c.codebook_size))):
        raise ValueError(f"token indices must lie in [0, {c.codebook_size}) within each length")
    if length < c.max_latent_tokens:
      pad = c.max_latent_tokens - length
      widths = [(0, 0), (0, pad)] + [(0, 0)] * (tokens.ndim - 2)
      tokens = jnp.pad(tokens, widths)
    (tokens, lengths), b = self._on_mesh(tokens, lengths, pad=True)
    with self._precision():
      out = _decode_fn(
        self.variables,
        tokens,
        lengths,
        model=self.model,
        base=self.base,
        base_chunk=self.base_chunk,
      )
    return out["reconstructions"][:b]
