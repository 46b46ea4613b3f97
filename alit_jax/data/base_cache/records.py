"""The base cache's record format and job identity (formats: the package docstring)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from alit_jax.data import shards

FORMAT = "alit_jax.base_cache/1"
# Batch keys (besides "image") that `steps.train_step_cached` takes from the cache.
BASE_KEYS = ("base_features", "gt_indices")


def view_rng(seed: int, index: int, view: int) -> np.random.Generator:
  """The generator of view `view` of source image `index` (crop box, then flip)."""
  return np.random.default_rng([int(seed), int(index), int(view)])


# ------------------------------------------------------------------------------------------------
# Records


def indices_dtype(codebook_size: int) -> str:
  """The stored dtype of `gt_indices`: int16 up to 32768 codes, else int32."""
  return "int16" if codebook_size <= 2**15 else "int32"


def encode_record(
  *,
  index: int,
  view: int,
  id: str,
  label: int,
  image: np.ndarray,
  base_features: np.ndarray,
  gt_indices: np.ndarray | None,
  gt_dtype: str = "int16",
) -> bytes:
  """One record's bytes (the format in the module docstring).

  Args:
    index, view, id, label: the image's position in the source, the view number, id, label.
    image: (H, W, 3) uint8 augmented view.
    base_features: (g, g, E) float32 base encoder output of that view.
    gt_indices: (g*g,) nearest-code indices (VQGAN), or None (VAE).
    gt_dtype: stored dtype of the indices (`indices_dtype`).
  """
  import msgpack

  rec = {
    "index": int(index),
    "view": int(view),
    "id": str(id),
    "label": int(label),
    "image": np.ascontiguousarray(image, dtype=np.uint8).tobytes(),
    "base_features": np.ascontiguousarray(base_features, dtype="<f4").tobytes(),
  }
  if gt_indices is not None:
    rec["gt_indices"] = np.ascontiguousarray(gt_indices, dtype=np.dtype(gt_dtype).newbyteorder("<"))
    rec["gt_indices"] = rec["gt_indices"].tobytes()
  return msgpack.packb(rec, use_bin_type=True)


def decode_record(raw: bytes, layout: dict) -> dict:
  """One serialised record -> {"image", "base_features", "gt_indices" (VQGAN), "index", "view",
  "id", "label"}; `layout` is job.json's "record" entry (shapes and dtypes)."""
  import msgpack

  r = msgpack.unpackb(raw, raw=False)
  out = {
    "image": np.frombuffer(r["image"], np.uint8).reshape(layout["image"]),
    "base_features": np.frombuffer(r["base_features"], "<f4")
    .reshape(layout["base_features"])
    .astype(np.float32),
    "index": int(r["index"]),
    "view": int(r["view"]),
    "id": r["id"],
    "label": int(r["label"]),
  }
  if "gt_indices" in layout:
    dt = np.dtype(layout["gt_indices_dtype"]).newbyteorder("<")
    out["gt_indices"] = np.frombuffer(r["gt_indices"], dt).astype(np.int32)
  return out


# ------------------------------------------------------------------------------------------------
# Identity


@dataclasses.dataclass(frozen=True)
class Augment:
  """The view augmentation (`transforms.TrainAugment`'s settings) and the view seed."""

  scale: tuple[float, float]
  ratio: tuple[float, float]
  flip_prob: float
  interpolation: str

  @classmethod
  def from_config(cls, inp) -> Augment:
    return cls(
      tuple(float(x) for x in inp.scale),
      tuple(float(x) for x in inp.ratio),
      float(inp.flip_prob),
      str(inp.interpolation),
    )

  def to_json(self) -> dict:
    return {
      "scale": list(self.scale),
      "ratio": list(self.ratio),
      "flip_prob": self.flip_prob,
      "interpolation": self.interpolation,
    }


def base_json(base_cfg: Any) -> dict:
  """The base tokenizer's config as stored (JSON types: tuples become lists)."""
  return json.loads(json.dumps({"kind": base_cfg.kind, **dataclasses.asdict(base_cfg)}))


def cache_identity(
  *,
  base_cfg: Any,
  base_sha256: str,
  base_path: str,
  image_size: int,
  compute_dtype: str,
  matmul_precision: str,
  augment: Augment,
  views: int,
  seed: int,
  data: str,
  split: str,
  data_dir: str | None,
  source,
  num_images: int,
  shard_size: int,
) -> dict:
  """The job.json dict: everything the cached arrays depend on (plus provenance).

  `checkpoint.path`, `data.spec` and `data.data_dir` are provenance (a moved checkpoint or
  dataset is the same job; `data.fingerprint` and the parameter hash identify them).
  """
  g = image_size // base_cfg.downsample
  record = {
    "image": [image_size, image_size, 3],
    "base_features": [g, g, int(base_cfg.embed_dim)],
  }
  if base_cfg.kind == "vqgan":
    record["gt_indices"] = [g * g]
    record["gt_indices_dtype"] = indices_dtype(int(base_cfg.n_embed))
  return {
    "format": FORMAT,
    "checkpoint": {"path": base_path, "params_sha256": base_sha256},
    "base": base_json(base_cfg),
    "image_size": int(image_size),
    "compute_dtype": str(compute_dtype),
    "matmul_precision": str(matmul_precision),
    "augment": augment.to_json(),
    "views": int(views),
    "seed": int(seed),
    "data": {
      "spec": data,
      "split": split,
      "data_dir": data_dir,
      "source_records": len(source),
      "fingerprint": shards.source_fingerprint(source),
    },
    "num_images": int(num_images),
    "shard_size": int(shard_size),
    "num_shards": max(1, math.ceil(num_images / shard_size)),
    "record": record,
  }
