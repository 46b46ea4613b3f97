"""The model side of evaluation: rollouts at every token count over the local devices, criterion
scores, and `evaluate`, which streams them into a `MetricAccumulator`.

Batches are data parallel over the local devices (a 1-D `Mesh` with a `NamedSharding` on the
batch axis; the batch size is rounded up to a multiple of the device count).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alit_jax import criteria as criteria_lib
from alit_jax.eval.metrics import MetricAccumulator, Quantize, make_selections
from alit_jax.eval.outputs import write_outputs
from alit_jax.eval.sources import resolve_source, skipped_file
from alit_jax.models import rollout as rollout_lib


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


def _open_source(
  source_or_images: Any, *, max_images: int | None, split: str, data_dir: str | None
) -> tuple[Any, str, bool]:
  """`resolve_source`, cut to the first `max_images`; an empty source is an error."""
  source, description, default_resize = resolve_source(
    source_or_images, split=split, data_dir=data_dir
  )
  if max_images is not None:
    from alit_jax.data.image_folder import PrefixSource

    source = PrefixSource(source, max_images)
  if len(source) == 0:
    raise ValueError(f"{description}: no images to evaluate")
  return source, description, default_resize


def _accumulator(
  tokenizer, selections, lpips: Any, inception: Any, quantize: Quantize, num_devices: int | None
) -> MetricAccumulator:
  """The tokenizer's `MetricAccumulator` (its codebooks; LPIPS / Inception on the devices)."""
  cfg = tokenizer.config
  devices = _Devices(num_devices)
  return MetricAccumulator(
    tokenizer.token_counts,
    selections,
    codebook_size_1d=cfg.alit.codebook_size if cfg.alit.quantize_latent else None,
    codebook_size_2d=cfg.alit.base_codebook_size if cfg.alit.base == "vqgan" else None,
    lpips_fn=_lpips_fn(lpips, devices),
    feature_fn=_feature_fn(inception, devices),
    quantize=quantize,
  )


class _GridRows:
  """The first `size` valid images of the evaluation, their reconstructions and selections."""

  def __init__(self, size: int, selections: Sequence[Any]):
    self.size = size
    self.inputs: list[np.ndarray] = []
    self.reconstructions: list[np.ndarray] = []
    self.selected: dict[str, list[np.ndarray]] = {s.key: [] for s in selections}

  def missing(self) -> int:
    """How many more images the grid takes (0: full)."""
    return max(0, self.size - sum(len(g) for g in self.inputs))

  def add(self, images: np.ndarray, mask: np.ndarray, res: Mapping[str, np.ndarray]) -> None:
    """Takes what is missing from one batch (`res`: `MetricAccumulator.add`'s output)."""
    take = self.missing()
    self.inputs.append(images[mask][:take])
    self.reconstructions.append(res["reconstructions"][:, :take])
    for k, v in self.selected.items():
      v.append(res[f"selected_{k}"][:take])

  def arrays(self) -> tuple | None:
    """(inputs, reconstructions, selected) for `save_grid`, or None if no image was taken."""
    if not self.inputs:
      return None
    return (
      np.concatenate(self.inputs),
      np.concatenate(self.reconstructions, axis=1),
      {k: np.concatenate(v) for k, v in self.selected.items()},
    )


def _add_batch(acc: MetricAccumulator, out: Mapping[str, Any], tokenizer, grid: _GridRows):
  """Scores one `iterate_rollouts` batch and adds it to `acc` (and to `grid` while it has room).

  Returns:
    The indices of the batch's records that could not be decoded (padding rows excluded).
  """
  scores = criterion_scores(
    [s.criterion for s in acc.selections],
    out["x"],
    out["reconstructions"],
    labels=out["label"],
    latent_tokens=out.get("latent_tokens"),
    tokens_per_iteration=tokenizer.tokens_per_iteration,
  )
  index, mask = np.asarray(out["index"]), np.asarray(out["mask"])
  skipped = [int(i) for i in index[(index >= 0) & ~mask]]  # unreadable, not padding
  want_grid = grid.missing() > 0
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
    return_reconstructions=want_grid,
  )
  if want_grid:
    grid.add(out["images"], out["mask"], res)
  return skipped


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
  source, description, default_resize = _open_source(
    source_or_images, max_images=max_images, split=split, data_dir=data_dir
  )
  selections = make_selections(criteria, thresholds)
  acc = _accumulator(tokenizer, selections, lpips, inception, quantize, num_devices)
  want_latents = any("latents" in s.criterion.requires for s in selections)
  grid = _GridRows(grid_images, selections)
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
    skipped_indices += _add_batch(acc, out, tokenizer, grid)
  results = acc.results()
  results["data"] = description
  results["checkpoint"] = {k: str(v) for k, v in getattr(tokenizer, "meta", {}).items()}
  results["model"] = getattr(tokenizer.config, "name", "")
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
    write_outputs(results, out_dir, grid=grid.arrays())
  return results
