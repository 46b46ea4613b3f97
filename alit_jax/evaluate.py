r"""Reconstruction quality at every token count and under adaptive token selection.

  python -m alit_jax.evaluate --checkpoint CKPT --data SRC --out OUT [--max-images N]
      [--num-heads H] [--criterion l1] [--thresholds 0.05,0.07,0.1]
      [--lpips-vgg vgg16-397923af.pth --lpips-heads vgg.pth]
      [--inception pt_inception-2015-12-05-6726825d.pth] [--batch-size 16]

CKPT: a directory from `python -m alit_jax.convert` / `save_pretrained` / training, `demo`, or an
official PyTorch checkpoint (.pth/.safetensors/.npz; `--num-heads` if not the factory default).

SRC (see `resolve_source`):
  * a folder of image files (read directly, labels from first-level subfolders like ImageFolder;
    no dataset is built): resized (shorter side, bicubic, antialiased) and center cropped, the
    reference's `evaluate_rfid.py --testing_custom_images` transform;
  * a folder built by `python -m alit_jax.data.build_folder` or `folder:PATH`: the same transform;
  * a TFDS dataset prepared as array_record, `NAME` (with `--split`, default validation) or
    `NAME/SPLIT`, e.g. `imagenet2012/validation`: center crop only, the reference's transform
    for ImageNet/COCO (`CenterCrop(256)`; smaller images are zero padded); `--data-dir` as TFDS;
  * `synthetic:num_examples=64,image_size=256` (procedural images of graded complexity).
`--resize yes|no` overrides the transform.

For every token count (32, 64, ..., 256) and for every adaptive selection (criterion, threshold):
L1, MSE, PSNR, SSIM, LPIPS (with LPIPS weights), rFID (with Inception weights), 1D codebook usage
and perplexity (ALIT's quantizer, quantized models) and 2D usage and perplexity (the VQGAN codes
the decoder predicts, `argmax` of its logits; VQGAN models). Adaptive rows add the mean and
median token count. Writes OUT/results.json, per_length.csv, adaptive.csv, per_image.csv,
per_image.npz, metrics_vs_tokens.png, token_histogram.png and grid.png. Files that cannot be
decoded are skipped, listed in results.json (`skipped`: index, file, reason) and counted in the
printed table.

How this follows the reference (`evaluate_rfid.py`), and where it departs:
  * Metrics are computed on 8-bit reconstructions: `floor(clip(x, 0, 1) * 255) / 255`, which is
    what the reference's saved PNGs hold (`astype(uint8)` truncates) and what its L1/MSE and
    pytorch-fid rFID read back (`--quantize round|none` for other conventions). PSNR uses
    data range 1; SSIM is skimage's Gaussian SSIM; LPIPS is the standard metric on [-1, 1]
    images (the reference's training loss feeds [0, 1]).
  * Adaptive selection is per image (`criteria.select_iterations`, the rule of
    `Tokenizer.encode`): the fewest tokens whose *unquantized, unclipped* reconstruction meets the
    criterion, else 256. The reference's `encode` picks one length per batch (quirk 16).
  * Halting is off by default; the reference's model evaluates with Bernoulli-sampled halting
    (`--halting sample --seed S` for that).
  * rFID needs at least 2 images (and is noisy below a few thousand); the reference's numbers
    use the full validation set.

Batches are data parallel over the local devices (a 1-D `Mesh` with a `NamedSharding` on the
batch axis; the batch size is rounded up to a multiple of the device count). In a multi-process
job every process evaluates the whole set: run it as a single process.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import os
import pathlib
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from alit_jax import criteria as criteria_lib
from alit_jax.metrics import fid as fid_lib
from alit_jax.metrics import image as image_metrics
from alit_jax.models import rollout as rollout_lib

Quantize = Literal["floor", "round", "none"]
METRICS = ("l1", "mse", "psnr", "ssim", "lpips", "rfid")
USAGE = ("usage_1d", "perplexity_1d", "usage_2d", "perplexity_2d")


# ------------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(checkpoint: str | os.PathLike, num_heads: int | None = None, **kwargs):
  """A `Tokenizer` from any checkpoint form the command lines accept (see `Tokenizer.load`)."""
  from alit_jax.tokenizer import Tokenizer

  return Tokenizer.load(checkpoint, num_heads=num_heads, **kwargs)


def resolve_source(
  data: Any, *, split: str = "validation", data_dir: str | None = None
) -> tuple[Any, str, bool]:
  """A random-access source, a description and the default `resize` for `data`.

  Args:
    data: a folder of images, a build_folder dataset folder, a spec understood by
      `alit_jax.data.sources.get_source` (`folder:PATH`, `synthetic:...`, a TFDS name), a TFDS
      `NAME/SPLIT`, an (N, H, W, 3) array of images, or a source object (`len` + `[i]` records).
    split: split for TFDS names and synthetic specs.
    data_dir: TFDS data_dir.

  Returns:
    (source, description, resize): `resize` is True for folders, arrays and synthetic images
    (resize the shorter side, then center crop) and False for TFDS datasets (center crop only,
    as the reference evaluates ImageNet).
  """
  from alit_jax.data import image_folder, sources

  if isinstance(data, np.ndarray) or isinstance(data, jax.Array):
    return image_folder.ArraySource(np.asarray(data)), f"array{tuple(data.shape)}", True
  if not isinstance(data, str | os.PathLike):
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
      return data, repr(data), True
    raise TypeError(f"data must be a path, a spec, an array or a source, got {type(data).__name__}")
  text = os.fspath(data)
  path = pathlib.Path(text).expanduser()
  if path.is_dir():
    if sources.find_dataset_dir(path) is not None:
      return sources.get_source(f"folder:{path}", split, data_dir), f"folder:{path}/{split}", True
    return image_folder.ImageFolderSource(path), str(path), True
  name = text.partition(":")[0].strip().lower()
  if name in ("folder", "synthetic"):
    return sources.get_source(text, split, data_dir), f"{text}/{split}", True
  m = re.fullmatch(r"([A-Za-z0-9_.-]+)/([A-Za-z0-9_\[\]:%+-]+)", text)
  if m:
    name, split = m.group(1), m.group(2)
    return sources.get_source(name, split, data_dir), f"{name}/{split}", False
  if os.sep in text or text.startswith("."):
    raise FileNotFoundError(f"{text}: no such folder of images")
  return sources.get_source(text, split, data_dir), f"{text}/{split}", False


# ------------------------------------------------------------------------------------------------
# Selections and the metric accumulator


@dataclasses.dataclass(frozen=True)
class Selection:
  """One adaptive token selection: a criterion and its threshold."""

  criterion: criteria_lib.Criterion
  threshold: float | None

  @property
  def key(self) -> str:
    c = self.criterion
    if self.threshold is None:
      return c.name
    return f"{c.name}{'>' if c.higher_is_better else '<'}{self.threshold:g}"


def make_selections(
  criteria: str | Any | Sequence[Any] = ("l1",),
  thresholds: Sequence[float] | Mapping[str, Sequence[float]] | None = (0.05, 0.07, 0.1),
) -> list[Selection]:
  """Selections from criteria and thresholds.

  Args:
    criteria: one or several criteria (registry names, `Criterion`s or callables).
    thresholds: thresholds applied to every criterion, or a mapping criterion name -> thresholds;
      None (or a criterion missing from the mapping) uses the criterion's default threshold.
      Boolean (oracle) criteria ignore thresholds and give one selection.
  """
  if isinstance(criteria, str | criteria_lib.Criterion) or callable(criteria):
    criteria = [criteria]
  out = []
  for c in criteria:
    crit = criteria_lib.get(c)
    if isinstance(thresholds, Mapping):
      ts = thresholds.get(crit.name)
    else:
      ts = thresholds
    if ts is None:
      ts = [crit.default_threshold]
    for t in ts:
      out.append(Selection(crit, None if t is None else float(t)))
  keys = [s.key for s in out]
  if len(set(keys)) != len(keys):
    raise ValueError(f"duplicate selections: {keys}")
  return out


_LEVELS = np.arange(256, dtype=np.float32) / np.float32(255.0)


def quantize_images(x: jax.Array, mode: Quantize = "floor") -> jax.Array:
  """Reconstructions as the evaluated 8-bit images.

  Args:
    x: float images (unclipped).
    mode: "floor": `floor(clip(x*255, 0, 255)) / 255` (the reference's `astype(uint8)` when it
      saves PNGs); "round": nearest 8-bit value; "none": clip to [0, 1] only.
  """
  if mode not in ("floor", "round", "none"):
    raise ValueError(f"quantize must be 'floor', 'round' or 'none', got {mode!r}")
  x = jnp.asarray(x, jnp.float32)
  if mode == "none":
    return jnp.clip(x, 0.0, 1.0)
  y = jnp.clip(x * 255.0, 0.0, 255.0)
  levels = (jnp.floor(y) if mode == "floor" else jnp.round(y)).astype(jnp.int32)
  # A table of k / 255 made by numpy: XLA's float32 division is not correctly rounded on CPU
  # (1 ulp off for half of the levels), and these must equal ToTensor's values bit for bit.
  return jnp.take(jnp.asarray(_LEVELS), levels)


@functools.partial(jax.jit, static_argnames=("quantize",))
def _length_metrics(x, recon, quantize):
  """(B,H,W,3) inputs, (N,B,H,W,3) reconstructions -> quantized recon and (N,B) metrics."""
  q = quantize_images(recon, quantize)

  def one(r):
    return {
      "l1": image_metrics.l1(x, r),
      "mse": image_metrics.mse(x, r),
      "psnr": image_metrics.psnr(x, r),
      "ssim": image_metrics.ssim(x, r),
    }

  return q, jax.lax.map(one, q)


def _histogram(indices: np.ndarray, size: int) -> np.ndarray:
  flat = np.asarray(indices).reshape(-1)
  flat = flat[(flat >= 0) & (flat < size)]
  return np.bincount(flat, minlength=size).astype(np.float64)


def _usage(counts: np.ndarray | None) -> tuple[float | None, float | None]:
  if counts is None:
    return None, None
  u = image_metrics.usage_from_histogram(counts)
  return float(u["usage"]), float(u["perplexity"])


def _finite_mean(v: np.ndarray) -> float | None:
  v = np.asarray(v, np.float64)
  v = v[np.isfinite(v)]
  return float(v.mean()) if v.size else None


class MetricAccumulator:
  """Streams batches of inputs and per-length reconstructions into dataset-level metrics.

  Per image it keeps the per-length metrics and criterion scores; per length (and per
  selection) it accumulates code histograms and Inception feature statistics, so nothing of
  size (images x pixels) is kept.

  Args:
    token_counts: the N token counts, e.g. [32, ..., 256].
    selections: adaptive selections (their criteria's scores are passed to `add`).
    codebook_size_1d: ALIT quantizer codebook size (None: continuous latents, no 1D usage).
    codebook_size_2d: base VQGAN codebook size (None: no 2D codebook, e.g. the VAE).
    lpips_fn: `(images, reconstructions) -> (B,)` LPIPS on [0, 1] images, or None.
    feature_fn: `(images) -> (B, D)` Inception (or any) features for rFID, or None.
    quantize: see `quantize_images`.
  """

  def __init__(
    self,
    token_counts: Sequence[int],
    selections: Sequence[Selection] = (),
    *,
    codebook_size_1d: int | None = None,
    codebook_size_2d: int | None = None,
    lpips_fn: Callable[[Any, Any], Any] | None = None,
    feature_fn: Callable[[Any], Any] | None = None,
    quantize: Quantize = "floor",
  ):
    self.token_counts = [int(t) for t in token_counts]
    self.selections = list(selections)
    self.k1 = codebook_size_1d
    self.k2 = codebook_size_2d
    self.lpips_fn = lpips_fn
    self.feature_fn = feature_fn
    self.quantize = quantize
    n = len(self.token_counts)
    self._per_image: dict[str, list[np.ndarray]] = {}
    self.hist_1d = None if self.k1 is None else np.zeros((n, self.k1))
    self.hist_2d = None if self.k2 is None else np.zeros((n, self.k2))
    self.hist_2d_base = None if self.k2 is None else np.zeros((self.k2,))
    self.sel_hist_1d = {s.key: None if self.k1 is None else np.zeros(self.k1) for s in selections}
    self.sel_hist_2d = {s.key: None if self.k2 is None else np.zeros(self.k2) for s in selections}
    self.fid_real = fid_lib.FeatureStats()
    self.fid_length = [fid_lib.FeatureStats() for _ in range(n)]
    self.fid_sel = {s.key: fid_lib.FeatureStats() for s in selections}
    self.num_images = 0

  def _keep(self, name: str, value: np.ndarray) -> None:
    self._per_image.setdefault(name, []).append(np.asarray(value))

  def add(
    self,
    images: Any,
    reconstructions: Any,
    *,
    mask: Any = None,
    scores: Mapping[str, Any] | None = None,
    indices_1d: Any = None,
    codes_2d: Any = None,
    base_codes_2d: Any = None,
    index: Any = None,
    label: Any = None,
    return_reconstructions: bool = False,
  ) -> dict[str, np.ndarray]:
    """Adds one batch.

    Args:
      images: (B, H, W, 3) float inputs in [0, 1] (exact 8-bit values).
      reconstructions: (N, B, H, W, 3) float reconstructions at every token count (unclipped).
      mask: (B,) bool, False for padding rows (default all True).
      scores: criterion name -> (N, B) scores (or bool meets) of every selection's criterion.
      indices_1d: (N, B, L) int ALIT quantizer indices, -1 beyond each length.
      codes_2d: (N, B, P) int VQGAN codes predicted at every length.
      base_codes_2d: (B, P) int the base tokenizer's own codes.
      index, label: (B,) per-image bookkeeping kept in `per_image()`.
      return_reconstructions: also return the evaluated (quantized) reconstructions.

    Returns:
      The batch's per-image results (valid rows only): metrics (N, b), `selected_<key>` (b,)
      iteration indices, and, if asked, `reconstructions` (N, b, H, W, 3) as evaluated.
    """
    n = len(self.token_counts)
    x = jnp.asarray(images, jnp.float32)
    recon = jnp.asarray(reconstructions)
    if recon.ndim != 5 or recon.shape[0] != n or recon.shape[1:] != x.shape:
      raise ValueError(
        f"reconstructions must be ({n}, *images.shape) = ({n}, {x.shape}), got {recon.shape}"
      )
    b = x.shape[0]
    m = np.ones((b,), bool) if mask is None else np.asarray(mask, bool)
    q, metrics = _length_metrics(x, recon, self.quantize)
    metrics = {k: np.asarray(v)[:, m] for k, v in metrics.items()}
    if self.lpips_fn is not None:
      metrics["lpips"] = np.stack([np.asarray(self.lpips_fn(x, q[i])) for i in range(n)])[:, m]
    feats = None
    if self.feature_fn is not None:
      real = np.asarray(self.feature_fn(x))[m]
      feats = np.stack([np.asarray(self.feature_fn(q[i]))[m] for i in range(n)])
      self.fid_real.add(real)
      for i in range(n):
        self.fid_length[i].add(feats[i])
    rows = np.arange(int(m.sum()))
    out = dict(metrics)
    for k, v in metrics.items():
      self._keep(k, v.T)
    i1 = None if indices_1d is None else np.asarray(indices_1d)[:, m]
    c2 = None if codes_2d is None else np.asarray(codes_2d)[:, m]
    if i1 is not None and self.k1 is not None:
      for i in range(n):
        self.hist_1d[i] += _histogram(i1[i], self.k1)
    if c2 is not None and self.k2 is not None:
      for i in range(n):
        self.hist_2d[i] += _histogram(c2[i], self.k2)
    if base_codes_2d is not None and self.k2 is not None:
      self.hist_2d_base += _histogram(np.asarray(base_codes_2d)[m], self.k2)
    scores = dict(scores or {})
    for name, s in scores.items():
      s = np.asarray(s)[:, m]
      self._keep(f"score_{name}", s.T)
    for sel in self.selections:
      if sel.criterion.name not in scores:
        raise ValueError(f"add: scores of criterion {sel.criterion.name!r} are missing")
      s = np.asarray(scores[sel.criterion.name])[:, m]
      it = criteria_lib.select_iterations(
        s, sel.threshold, higher_is_better=sel.criterion.higher_is_better
      )
      self._keep(f"selected_{sel.key}", it)
      out[f"selected_{sel.key}"] = it
      if i1 is not None and self.k1 is not None:
        self.sel_hist_1d[sel.key] += _histogram(i1[it, rows], self.k1)
      if c2 is not None and self.k2 is not None:
        self.sel_hist_2d[sel.key] += _histogram(c2[it, rows], self.k2)
      if feats is not None:
        self.fid_sel[sel.key].add(feats[it, rows])
    if index is not None:
      self._keep("index", np.asarray(index)[m])
    if label is not None:
      self._keep("label", np.asarray(label)[m])
    self.num_images += int(m.sum())
    if return_reconstructions:
      out["reconstructions"] = np.asarray(q)[:, m]
    return out

  def per_image(self) -> dict[str, np.ndarray]:
    """Per-image arrays: metrics (M, N), `score_<criterion>` (M, N), `selected_<key>` (M,)
    iteration indices, `tokens_<key>` (M,) token counts, `index`/`label` (M,)."""
    out = {k: np.concatenate(v) for k, v in self._per_image.items()}
    counts = np.asarray(self.token_counts)
    for sel in self.selections:
      k = f"selected_{sel.key}"
      if k in out:
        out[f"tokens_{sel.key}"] = counts[out[k]]
    return out

  def _fid(self, stats: fid_lib.FeatureStats) -> float | None:
    if self.feature_fn is None or stats.n < 2:
      return None
    return fid_lib.frechet_distance(*self.fid_real.stats(), *stats.stats())

  def _row(self, per_image: dict, gather: Callable[[np.ndarray], np.ndarray]) -> dict:
    row: dict[str, Any] = {}
    for k in ("l1", "mse", "ssim", "lpips"):
      row[k] = float(np.mean(gather(per_image[k]))) if k in per_image else None
    psnr = gather(per_image["psnr"])
    row["psnr"] = _finite_mean(psnr)
    row["psnr_inf_images"] = int(np.sum(~np.isfinite(psnr)))
    return row

  def results(self) -> dict[str, Any]:
    """Dataset-level results (JSON-serializable): `per_length` and `adaptive` rows."""
    if self.num_images == 0:
      raise ValueError("no images were evaluated (empty source, or every image failed to decode)")
    per_image = self.per_image()
    per_length = []
    for i, t in enumerate(self.token_counts):
      row = {"tokens": t, **self._row(per_image, lambda v, i=i: v[:, i])}
      row["rfid"] = self._fid(self.fid_length[i])
      row["usage_1d"], row["perplexity_1d"] = _usage(
        None if self.hist_1d is None else self.hist_1d[i]
      )
      row["usage_2d"], row["perplexity_2d"] = _usage(
        None if self.hist_2d is None else self.hist_2d[i]
      )
      per_length.append(row)
    adaptive = []
    counts = np.asarray(self.token_counts)
    for sel in self.selections:
      it = per_image[f"selected_{sel.key}"]
      rows = np.arange(len(it))
      tokens = counts[it]
      row = {
        "selection": sel.key,
        "criterion": sel.criterion.name,
        "threshold": sel.threshold,
        "mean_tokens": float(tokens.mean()),
        "median_tokens": float(np.median(tokens)),
        "token_histogram": {str(t): int(np.sum(tokens == t)) for t in self.token_counts},
        **self._row(per_image, lambda v, it=it, rows=rows: v[rows, it]),
      }
      row["rfid"] = self._fid(self.fid_sel[sel.key])
      row["usage_1d"], row["perplexity_1d"] = _usage(self.sel_hist_1d[sel.key])
      row["usage_2d"], row["perplexity_2d"] = _usage(self.sel_hist_2d[sel.key])
      adaptive.append(row)
    base_usage, base_ppl = _usage(self.hist_2d_base)
    return {
      "num_images": self.num_images,
      "token_counts": self.token_counts,
      "quantize": self.quantize,
      "per_length": per_length,
      "adaptive": adaptive,
      "base_2d": {"usage": base_usage, "perplexity": base_ppl},
      "codebook_size_1d": self.k1,
      "codebook_size_2d": self.k2,
    }


# ------------------------------------------------------------------------------------------------
# The model side


@functools.partial(
  jax.jit,
  static_argnames=("model", "base", "halting", "impl", "want_latents", "reconstruct", "base_chunk"),
)
def _rollout_step(
  variables, x, rng, *, model, base, halting, impl, want_latents, reconstruct, base_chunk=None
):
  out = rollout_lib.full_rollout(
    model,
    base,
    variables,
    x,
    halting=halting,
    rng=rng,
    impl=impl,
    reconstruct=reconstruct,
    base_chunk=base_chunk,
  )
  res = {"x": x}
  if reconstruct:
    res["reconstructions"] = out["reconstructions"]
  if "logits" in out:
    res["codes_2d"] = jnp.argmax(out["logits"], axis=-1).astype(jnp.int32)
    res["base_codes_2d"] = out["gt_indices"]
  if "quant_indices" in out:
    res["indices_1d"] = out["quant_indices"]
  if want_latents:
    res["latent_tokens"] = out["latent_tokens"]
    res["factorized_latent"] = out["factorized_latent"]
  return res


class _Devices:
  """Data parallelism over the local devices (plain arrays on one device)."""

  def __init__(self, num_devices: int | None = None):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.local_devices()
    if num_devices is not None:
      if not 1 <= num_devices <= len(devices):
        raise ValueError(f"num_devices must be in [1, {len(devices)}], got {num_devices}")
      devices = devices[:num_devices]
    self.count = len(devices)
    self.device = devices[0]
    self.mesh = Mesh(np.array(devices), ("data",)) if self.count > 1 else None
    if self.mesh is not None:
      self.batch = NamedSharding(self.mesh, PartitionSpec("data"))
      self.replicated = NamedSharding(self.mesh, PartitionSpec())

  def round_batch(self, batch_size: int) -> int:
    return int(math.ceil(batch_size / self.count) * self.count)

  def put_batch(self, x: np.ndarray) -> jax.Array:
    if self.mesh is None:
      return jax.device_put(x, self.device)
    return jax.device_put(x, self.batch)

  def replicate(self, tree: Any) -> Any:
    if tree is None:
      return tree
    return jax.device_put(tree, self.device if self.mesh is None else self.replicated)


def tokenizer_precision(tokenizer):
  """A context with the tokenizer's `matmul_precision` (a no-op when it has none)."""
  import contextlib

  p = getattr(tokenizer, "matmul_precision", None)
  return contextlib.nullcontext() if p is None else jax.default_matmul_precision(p)


def criterion_scores(
  selection_criteria: Sequence[criteria_lib.Criterion],
  x: jax.Array,
  reconstructions: jax.Array,
  *,
  labels: Any = None,
  latent_tokens: Any = None,
  tokens_per_iteration: int = 32,
) -> dict[str, np.ndarray]:
  """(N, B) scores of each criterion at every iteration, with the extra inputs it requires.

  Args:
    selection_criteria: criteria to score.
    x: (B, H, W, 3) inputs; reconstructions: (N, B, H, W, 3) (unclipped).
    labels: (B,) labels for criteria that require them.
    latent_tokens: (N, B, L, W) latent tokens (for criteria that require "latents").
    tokens_per_iteration: T; iteration i's valid latents are the first T(i+1).
  """
  out = {}
  n = reconstructions.shape[0]
  for crit in selection_criteria:
    if crit.name in out:
      continue
    per = []
    for i in range(n):
      extra = {}
      if "labels" in crit.requires:
        if labels is None:
          raise ValueError(f"criterion {crit.name!r} needs labels; the data source has none")
        extra["labels"] = jnp.asarray(labels)
      if "latents" in crit.requires or "latent_valid" in crit.requires:
        if latent_tokens is None:
          raise ValueError(f"criterion {crit.name!r} needs latents")
        lat = latent_tokens[i]
        valid = jnp.broadcast_to(
          jnp.arange(lat.shape[1]) < tokens_per_iteration * (i + 1), lat.shape[:2]
        )
        if "latents" in crit.requires:
          extra["latents"] = lat
        if "latent_valid" in crit.requires:
          extra["latent_valid"] = valid
      per.append(np.asarray(crit(x, reconstructions[i], **extra)))
    out[crit.name] = np.stack(per)
  return out


def iterate_rollouts(
  tokenizer,
  source,
  *,
  batch_size: int = 16,
  resize: bool = True,
  halting: str = "off",
  halting_threshold: float | None = None,
  seed: int = 0,
  want_latents: bool = False,
  reconstruct: bool = True,
  num_devices: int | None = None,
  progress: bool = True,
  desc: str = "evaluate",
):
  """Yields, per batch, the inputs and the model's outputs at every token count.

  Batches are padded to a fixed size (rows with `mask` False) and sharded over the local devices
  (the first `num_devices` of them if given).

  Yields:
    dicts with `x` (B, S, S, 3) float32 inputs (on the devices), `images` (B, S, S, 3) uint8 (host), `mask`,
    `label`, `index` (B,) (host), `reconstructions` (N, B, S, S, 3), VQGAN `codes_2d` (N, B, P) and
    `base_codes_2d` (B, P), quantized models' `indices_1d` (N, B, L), and with `want_latents`
    `latent_tokens` (N, B, L, W) (encoder outputs, before ln_post) and `factorized_latent`
    (N, B, L, D) (what is quantized / decoded); padded latent slots hold 0. `reconstruct=False`
    skips the base decoder (no `reconstructions`).
  """
  from tqdm.auto import tqdm

  from alit_jax.data import pipeline, transforms

  devices = _Devices(num_devices)
  bs = devices.round_batch(batch_size)
  batches = pipeline.make_eval_iterator(
    source,
    batch_size=bs,
    image_size=tokenizer.image_size,
    process_index=0,
    process_count=1,
    resize=resize,
  )
  variables = devices.replicate(tokenizer.variables)
  halt = rollout_lib.Halting(
    halting,
    float(
      tokenizer.config.alit.halting_threshold if halting_threshold is None else halting_threshold
    ),
    getattr(tokenizer, "vae_masking", False),
  )
  key = jax.random.key(seed)
  for step, batch in enumerate(tqdm(batches, total=len(batches), desc=desc, disable=not progress)):
    rng = jax.random.fold_in(key, step) if halting == "sample" else None
    with tokenizer_precision(tokenizer):
      out = _rollout_step(
        variables,
        # Converted on the host (numpy division, as torchvision's ToTensor): XLA's float32
        # division is not correctly rounded on CPU.
        devices.put_batch(transforms.to_float(batch["image"])),
        rng,
        model=tokenizer.model,
        base=tokenizer.base,
        halting=halt,
        impl=tokenizer.impl,
        want_latents=want_latents,
        reconstruct=reconstruct,
        # One image at a time through the base on CPU (the tokenizer's choice), but never across
        # a sharded batch axis.
        base_chunk=getattr(tokenizer, "base_chunk", None) if devices.mesh is None else None,
      )
    out.update(
      images=batch["image"], mask=batch["mask"], label=batch["label"], index=batch["index"]
    )
    yield out


def _feature_fn(inception: Any, devices: _Devices) -> Callable | None:
  if inception is None or callable(inception):
    return inception
  from alit_jax.metrics.inception import inception_features

  variables = devices.replicate(inception)
  return lambda images: inception_features(variables, images)


def _lpips_fn(lpips: Any, devices: _Devices) -> Callable | None:
  if lpips is None or callable(lpips):
    return lpips
  return criteria_lib.lpips_criterion(devices.replicate(lpips)).fn


def evaluate(
  tokenizer,
  source_or_images: Any,
  *,
  max_images: int | None = None,
  batch_size: int = 16,
  criteria: Any = ("l1",),
  thresholds: Sequence[float] | Mapping[str, Sequence[float]] | None = (0.05, 0.07, 0.1),
  lpips: Any = None,
  inception: Any = None,
  out_dir: str | os.PathLike | None = None,
  split: str = "validation",
  data_dir: str | None = None,
  resize: bool | None = None,
  quantize: Quantize = "floor",
  halting: str = "off",
  halting_threshold: float | None = None,
  seed: int = 0,
  grid_images: int = 8,
  num_devices: int | None = None,
  progress: bool = True,
) -> dict[str, Any]:
  """Reconstruction metrics at every token count and under adaptive selection.

  Args:
    tokenizer: a `Tokenizer`.
    source_or_images: anything `resolve_source` accepts (folder, spec, array, source).
    max_images: evaluate the first N images only.
    batch_size: images per step (rounded up to a multiple of the local device count).
    criteria: selection criteria (names, `Criterion`s or callables), see `make_selections`.
    thresholds: thresholds for every criterion, or a mapping name -> thresholds.
    lpips: LPIPS variables (`losses.lpips.load_lpips`) or a callable `(x, y) -> (B,)` on [0, 1]
      images; None skips LPIPS.
    inception: Inception variables (`metrics.inception.load_inception`) or a callable
      `(images) -> (B, D)`; None skips rFID.
    out_dir: write results, CSVs, plots and grids there (None: only return the results).
    split, data_dir: for TFDS sources.
    resize: resize the shorter side before the center crop (None: `resolve_source`'s default).
    quantize: how reconstructions become evaluated images (see `quantize_images`).
    halting, halting_threshold, seed: dynamic halting during the rollout ("off", "threshold",
      "sample"; `seed` keys the Bernoulli draws).
    grid_images: images shown in grid.png.
    num_devices: use the first N local devices (default all).
    progress: show a progress bar.

  Returns:
    `MetricAccumulator.results()` plus `data`, `checkpoint` (tokenizer meta), `skipped` (the
    records that could not be decoded: `skipped_file` dicts, path and reason), `num_skipped`
    and `per_image` (numpy arrays, not written to results.json).
  """
  source, description, default_resize = resolve_source(
    source_or_images, split=split, data_dir=data_dir
  )
  if max_images is not None:
    from alit_jax.data.image_folder import PrefixSource

    source = PrefixSource(source, max_images)
  if len(source) == 0:
    raise ValueError(f"{description}: no images to evaluate")
  selections = make_selections(criteria, thresholds)
  cfg = tokenizer.config
  devices = _Devices(num_devices)
  acc = MetricAccumulator(
    tokenizer.token_counts,
    selections,
    codebook_size_1d=cfg.alit.codebook_size if cfg.alit.quantize_latent else None,
    codebook_size_2d=cfg.alit.base_codebook_size if cfg.alit.base == "vqgan" else None,
    lpips_fn=_lpips_fn(lpips, devices),
    feature_fn=_feature_fn(inception, devices),
    quantize=quantize,
  )
  want_latents = any("latents" in s.criterion.requires for s in selections)
  grid_in, grid_rec, grid_tok = [], [], {s.key: [] for s in selections}
  skipped_indices: list[int] = []
  for out in iterate_rollouts(
    tokenizer,
    source,
    batch_size=batch_size,
    resize=default_resize if resize is None else resize,
    halting=halting,
    halting_threshold=halting_threshold,
    seed=seed,
    want_latents=want_latents,
    num_devices=num_devices,
    progress=progress,
  ):
    scores = criterion_scores(
      [s.criterion for s in selections],
      out["x"],
      out["reconstructions"],
      labels=out["label"],
      latent_tokens=out.get("latent_tokens"),
      tokens_per_iteration=tokenizer.tokens_per_iteration,
    )
    index, mask = np.asarray(out["index"]), np.asarray(out["mask"])
    skipped_indices += [int(i) for i in index[(index >= 0) & ~mask]]  # unreadable, not padding
    have = sum(len(g) for g in grid_in)
    res = acc.add(
      out["x"],
      out["reconstructions"],
      mask=out["mask"],
      scores=scores,
      indices_1d=out.get("indices_1d"),
      codes_2d=out.get("codes_2d"),
      base_codes_2d=out.get("base_codes_2d"),
      index=out["index"],
      label=out["label"],
      return_reconstructions=have < grid_images,
    )
    if have < grid_images:
      take = grid_images - have
      grid_in.append(out["images"][out["mask"]][:take])
      grid_rec.append(res["reconstructions"][:, :take])
      for s in selections:
        grid_tok[s.key].append(res[f"selected_{s.key}"][:take])
  results = acc.results()
  results["data"] = description
  results["checkpoint"] = {k: str(v) for k, v in getattr(tokenizer, "meta", {}).items()}
  results["model"] = getattr(cfg, "name", "")
  results["halting"] = halting
  results["skipped"] = [skipped_file(source, i) for i in sorted(skipped_indices)]
  results["num_skipped"] = len(results["skipped"])
  results["per_image"] = acc.per_image()
  names = getattr(source, "file_names", None)
  if names is not None and "index" in results["per_image"]:
    results["per_image"]["file_name"] = np.asarray(
      [names[i] for i in results["per_image"]["index"]]
    )
  if out_dir is not None:
    grid = None
    if grid_in:
      grid = (
        np.concatenate(grid_in),
        np.concatenate(grid_rec, axis=1),
        {k: np.concatenate(v) for k, v in grid_tok.items()},
      )
    write_outputs(results, out_dir, grid=grid)
  return results


def skipped_file(source: Any, index: int) -> dict[str, Any]:
  """{"index", "file", "reason"} of a record the pipeline skipped (it could not be decoded).

  The reason is found again by decoding the record once more (the pipeline only keeps a mask);
  its text is stable across runs (no object addresses).
  """
  from alit_jax.data import transforms

  record = source[index]
  name = record.get("file_name") or str(index)
  if isinstance(name, bytes):
    name = name.decode("utf-8", "replace")
  try:
    transforms.decode_image(record["image"])
    reason = "could not be preprocessed"
  except ValueError as e:
    reason = str(e)
  path = getattr(source, "root", None)
  if reason == "empty image data" and path is not None:
    try:  # ImageFolderSource turns a read error into empty data: say what the error was
      (pathlib.Path(path) / name).read_bytes()
    except OSError as e:
      reason = f"cannot read: {type(e).__name__}: {e.strerror or e}"
  return {"index": int(index), "file": str(name), "reason": reason}


# ------------------------------------------------------------------------------------------------
# Outputs


ROW_COLUMNS = ("l1", "mse", "psnr", "psnr_inf_images", "ssim", "lpips", "rfid") + USAGE


def _json_default(o):
  if isinstance(o, np.integer):
    return int(o)
  if isinstance(o, np.floating):
    return float(o)
  raise TypeError(f"not JSON serializable: {type(o).__name__}")


def _clean(v):
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


def write_outputs(
  results: Mapping[str, Any], out_dir: str | os.PathLike, *, grid: tuple | None = None
) -> pathlib.Path:
  """Writes results.json, per_length.csv, adaptive.csv, per_image.csv/.npz, plots and grid."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  serial = {k: v for k, v in results.items() if k != "per_image"}
  (out / "results.json").write_text(
    json.dumps(_nan_to_none(serial), indent=2, default=_json_default, allow_nan=False)
  )
  with open(out / "per_length.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(("tokens",) + ROW_COLUMNS)
    for row in results["per_length"]:
      w.writerow([row["tokens"]] + [_clean(row.get(c)) for c in ROW_COLUMNS])
  with open(out / "adaptive.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(("criterion", "threshold", "mean_tokens", "median_tokens") + ROW_COLUMNS)
    for row in results["adaptive"]:
      w.writerow(
        [row["criterion"], row["threshold"], row["mean_tokens"], row["median_tokens"]]
        + [_clean(row.get(c)) for c in ROW_COLUMNS]
      )
  per_image = results.get("per_image")
  if per_image:
    np.savez(out / "per_image.npz", **per_image)
    _write_per_image_csv(out / "per_image.csv", per_image, results["token_counts"])
  plot_metrics(results, out / "metrics_vs_tokens.png")
  if results["adaptive"]:
    plot_token_histograms(results, out / "token_histogram.png")
  if grid is not None:
    save_grid(*grid, results["token_counts"], out / "grid.png")
  return out


def _nan_to_none(tree):
  if isinstance(tree, float):
    return tree if math.isfinite(tree) else None
  if isinstance(tree, Mapping):
    return {k: _nan_to_none(v) for k, v in tree.items()}
  if isinstance(tree, list | tuple):
    return [_nan_to_none(v) for v in tree]
  return tree


def _write_per_image_csv(path: pathlib.Path, per_image: Mapping[str, np.ndarray], counts) -> None:
  m = len(next(iter(per_image.values())))
  cols: list[tuple[str, Callable[[int], Any]]] = []
  for k in ("index", "file_name", "label"):
    if k in per_image:
      cols.append((k, lambda r, k=k: per_image[k][r]))
  for k, v in per_image.items():
    if k in ("index", "file_name", "label") or k.startswith("selected_"):
      continue
    if v.ndim == 2:
      for i, t in enumerate(counts):
        cols.append((f"{k}@{t}", lambda r, v=v, i=i: v[r, i]))
    else:
      cols.append((k, lambda r, v=v: v[r]))
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow([c for c, _ in cols])
    for r in range(m):
      w.writerow([fn(r) for _, fn in cols])


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


PLOT_LABELS = {
  "l1": "L1",
  "mse": "MSE",
  "psnr": "PSNR (dB)",
  "ssim": "SSIM",
  "lpips": "LPIPS",
  "rfid": "rFID",
  "usage_1d": "1D codebook usage",
  "perplexity_1d": "1D perplexity",
  "usage_2d": "2D codebook usage",
  "perplexity_2d": "2D perplexity",
}


def plot_metrics(results: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Every available metric against the token count; adaptive selections as labelled points."""
  plt = _pyplot()
  rows = results["per_length"]
  keys = [k for k in PLOT_LABELS if any(r.get(k) is not None for r in rows)]
  cols = min(4, len(keys))
  nrows = math.ceil(len(keys) / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False)
  tokens = [r["tokens"] for r in rows]
  for ax, k in zip(axes.flat, keys):
    ys = [np.nan if r.get(k) is None else r[k] for r in rows]
    ax.plot(tokens, ys, "o-", color="C0", label="fixed length")
    for j, a in enumerate(results.get("adaptive", [])):
      if a.get(k) is not None:
        ax.plot(a["mean_tokens"], a[k], "s", color=f"C{j + 1}", label=a["selection"])
    ax.set_xlabel("tokens")
    ax.set_title(PLOT_LABELS[k])
    ax.set_xticks(tokens)
    ax.tick_params(axis="x", labelsize=7)
  for ax in list(axes.flat)[len(keys) :]:
    ax.axis("off")
  handles, labels = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8)
  fig.suptitle(
    f"{results.get('model', '')} on {results.get('data', '')} ({results['num_images']} images)",
    fontsize=9,
  )
  fig.tight_layout(rect=(0, 0.06, 1, 0.96))
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_token_histograms(results: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Histogram of chosen token counts for every adaptive selection."""
  plt = _pyplot()
  sel = results["adaptive"]
  counts = results["token_counts"]
  fig, ax = plt.subplots(figsize=(7, 3.5))
  width = 0.8 * (counts[1] - counts[0] if len(counts) > 1 else 1) / max(1, len(sel))
  for j, a in enumerate(sel):
    h = [a["token_histogram"][str(t)] for t in counts]
    off = (j - (len(sel) - 1) / 2) * width
    ax.bar(
      np.asarray(counts) + off,
      h,
      width=width,
      label=f"{a['selection']} (mean {a['mean_tokens']:.1f})",
    )
  ax.set_xticks(counts)
  ax.set_xlabel("tokens per image")
  ax.set_ylabel("images")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def save_grid(
  inputs: np.ndarray,
  reconstructions: np.ndarray,
  selected: Mapping[str, np.ndarray],
  token_counts: Sequence[int],
  path: str | os.PathLike,
) -> None:
  """Rows: images; columns: input, reconstruction at each token count (the first selection's
  choice framed in red).

  Args:
    inputs: (M, H, W, 3) uint8; reconstructions: (N, M, H, W, 3) float in [0, 1].
    selected: selection key -> (M,) chosen iteration.
  """
  plt = _pyplot()
  m, n = inputs.shape[0], reconstructions.shape[0]
  first = next(iter(selected.items()), None)
  fig, axes = plt.subplots(m, n + 1, figsize=(1.3 * (n + 1), 1.3 * m + 0.4), squeeze=False)
  for r in range(m):
    axes[r, 0].imshow(inputs[r])
    for i in range(n):
      ax = axes[r, i + 1]
      ax.imshow(np.clip(reconstructions[i, r], 0, 1))
      if first is not None and int(first[1][r]) == i:
        for s in ax.spines.values():
          s.set_edgecolor("red")
          s.set_linewidth(2.5)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  axes[0, 0].set_title("input", fontsize=8)
  for i, t in enumerate(token_counts):
    axes[0, i + 1].set_title(str(t), fontsize=8)
  if first is not None:
    fig.suptitle(f"red frame: tokens chosen by {first[0]}", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def format_table(results: Mapping[str, Any]) -> str:
  """A plain-text summary of the per-length and adaptive rows."""
  cols = [
    c
    for c in ("l1", "mse", "psnr", "ssim", "lpips", "rfid") + USAGE
    if any(r.get(c) is not None for r in results["per_length"])
  ]
  head = f"{'tokens':>14} " + " ".join(f"{c:>13}" for c in cols)
  title = f"{results['num_images']} images from {results.get('data', '')}"
  if results.get("num_skipped"):
    title += f", {results['num_skipped']} files skipped (unreadable; listed in results.json)"
  lines = [title, head]

  def fmt(v):
    return f"{'-':>13}" if v is None else f"{v:13.5g}"

  for r in results["per_length"]:
    lines.append(f"{r['tokens']:>14} " + " ".join(fmt(r.get(c)) for c in cols))
  for a in results["adaptive"]:
    lines.append(
      f"{a['selection']:>14} "
      + " ".join(fmt(a.get(c)) for c in cols)
      + f"   mean tokens {a['mean_tokens']:.1f}, median {a['median_tokens']:.0f}"
    )
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Command line


def parse_thresholds(text: str | None) -> list[float] | dict[str, list[float]] | None:
  """'0.05,0.07' -> [0.05, 0.07]; 'l1=0.05,0.07;psnr=25' -> {'l1': [...], 'psnr': [25.0]}."""
  if text is None or not text.strip():
    return None
  try:
    if "=" in text:
      out = {}
      for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, vals = part.partition("=")
        out[name.strip()] = [float(v) for v in vals.split(",") if v.strip()]
      return out
    return [float(v) for v in text.split(",") if v.strip()]
  except ValueError as e:
    raise ValueError(
      f"bad --thresholds {text!r}: expected '0.05,0.07' or 'l1=0.05,0.07;psnr=25' ({e})"
    ) from e


def add_checkpoint_args(p: argparse.ArgumentParser, *, default: str | None = None) -> None:
  """--checkpoint / --num-heads, shared by the experiments (required unless `default`)."""
  p.add_argument(
    "--checkpoint",
    required=default is None,
    default=default,
    help="'demo', a pretrained dir (convert/save_pretrained/training workdir) or a PyTorch .pth"
    + (f" (default: {default})" if default else ""),
  )
  p.add_argument("--num-heads", type=int, default=None, help="heads of a .pth checkpoint")


def add_data_args(
  p: argparse.ArgumentParser,
  *,
  multiple: bool = False,
  default_data: str | None = None,
  batch_size: int = 16,
) -> None:
  """--data / --split / --data-dir / --max-images / --batch-size / --resize.

  `--data` is required unless `default_data` is given (then a repeatable `--data` replaces it,
  and the parsed value is None when not given).
  """
  if multiple:
    p.add_argument(
      "--data",
      action="append",
      required=default_data is None,
      default=None,
      help="image source (repeatable)" + (f"; default: {default_data}" if default_data else ""),
    )
  else:
    p.add_argument(
      "--data",
      required=default_data is None,
      default=default_data,
      help="folder of images, folder:PATH, TFDS NAME[/SPLIT] or synthetic:...",
    )
  p.add_argument("--split", default="validation", help="split of TFDS / synthetic sources")
  p.add_argument("--data-dir", default=None, help="TFDS data_dir")
  p.add_argument("--max-images", type=int, default=None)
  p.add_argument("--batch-size", type=int, default=batch_size)
  p.add_argument(
    "--resize",
    choices=("auto", "yes", "no"),
    default="auto",
    help="resize the shorter side before the center crop (auto: folders yes, TFDS no)",
  )


def resize_arg(value: str) -> bool | None:
  return {"auto": None, "yes": True, "no": False}[value]


def _inception_help() -> str:
  from alit_jax.metrics import inception

  return (
    "rFID skipped: no Inception weights. Download "
    f"{inception.FID_WEIGHTS_FILE} ({inception.FID_WEIGHTS_URL}) and pass --inception PATH "
    f"(or set ${inception.WEIGHTS_ENV})."
  )


LPIPS_HELP = (
  "LPIPS skipped: pass --lpips-vgg vgg16-397923af.pth (torchvision's ImageNet VGG16) and "
  "--lpips-heads vgg.pth (LPIPS v0.1 heads, in the `lpips` package under weights/v0.1/)."
)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m alit_jax.evaluate",
    description="ALIT reconstruction metrics at every token count and under adaptive selection.",
  )
  add_checkpoint_args(p)
  add_data_args(p)
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument(
    "--criterion", default="l1", help="selection criteria, comma separated (l1, mse, psnr, lpips)"
  )
  p.add_argument(
    "--thresholds",
    default="0.05,0.07,0.1",
    help="'0.05,0.07,0.1' for every criterion, or 'l1=0.05,0.07;psnr=25,30'",
  )
  p.add_argument("--lpips-vgg", default=None)
  p.add_argument("--lpips-heads", default=None)
  p.add_argument(
    "--inception",
    default=None,
    help="pt_inception-2015-12-05-6726825d.pth (default: $ALIT_INCEPTION_WEIGHTS)",
  )
  p.add_argument("--quantize", choices=("floor", "round", "none"), default="floor")
  p.add_argument("--halting", choices=("off", "threshold", "sample"), default="off")
  p.add_argument("--halting-threshold", type=float, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--grid-images", type=int, default=8)
  p.add_argument("--num-devices", type=int, default=None, help="default: all local devices")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)

  from alit_jax.metrics import inception as inception_lib

  if (args.lpips_vgg is None) != (args.lpips_heads is None):
    p.error("--lpips-vgg and --lpips-heads go together")
  tok = load_tokenizer(args.checkpoint, args.num_heads)
  lpips_vars = None
  if args.lpips_vgg is not None:
    from alit_jax.losses.lpips import load_lpips

    lpips_vars = load_lpips(args.lpips_vgg, args.lpips_heads)
  else:
    print(LPIPS_HELP, file=sys.stderr)
  crit_names = [c.strip() for c in args.criterion.split(",") if c.strip()]
  if "lpips" in crit_names:
    if lpips_vars is None:
      p.error("--criterion lpips needs --lpips-vgg and --lpips-heads")
    criteria_lib.register(criteria_lib.lpips_criterion(lpips_vars))
  inception_vars = None
  path = args.inception or os.environ.get(inception_lib.WEIGHTS_ENV)
  if path:
    inception_vars = inception_lib.load_inception(path)
  else:
    print(_inception_help(), file=sys.stderr)
  results = evaluate(
    tok,
    args.data,
    max_images=args.max_images,
    batch_size=args.batch_size,
    criteria=crit_names,
    thresholds=parse_thresholds(args.thresholds),
    lpips=lpips_vars,
    inception=inception_vars,
    out_dir=args.out,
    split=args.split,
    data_dir=args.data_dir,
    resize=resize_arg(args.resize),
    quantize=args.quantize,
    halting=args.halting,
    halting_threshold=args.halting_threshold,
    seed=args.seed,
    grid_images=args.grid_images,
    num_devices=args.num_devices,
    progress=not args.no_progress,
  )
  print(format_table(results))
  print(f"wrote {args.out}/results.json, per_length.csv, adaptive.csv, per_image.csv, plots")
  return 0


if __name__ == "__main__":
  sys.exit(main())
