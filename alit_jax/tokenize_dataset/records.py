"""What `tokenize_dataset` reads and writes: its sources, preprocessing, records and manifest.

The formats are described in the package docstring (`alit_jax.tokenize_dataset`); the shard
layout and commit protocol are `alit_jax.data.shards`'.
"""

from __future__ import annotations

import json
import math
import os
import pathlib

import grain
import numpy as np

from alit_jax.data import shards
from alit_jax.data.image_folder import ImageFileSource

FORMAT = "alit_jax.tokens/1"

# ------------------------------------------------------------------------------------------------
# Sources


def holds_built_dataset(path: pathlib.Path) -> bool:
  """dataset_info.json at PATH, PATH/*, or PATH/*/* (the layouts `find_dataset_dir` accepts)."""
  if (path / "dataset_info.json").is_file():
    return True
  for child in os.scandir(path):
    if not child.is_dir():
      continue
    if os.path.isfile(os.path.join(child.path, "dataset_info.json")):
      return True
    for grandchild in os.scandir(child.path):
      if grandchild.is_dir() and os.path.isfile(os.path.join(grandchild.path, "dataset_info.json")):
        return True
  return False


def open_source(data: str, split: str = "train", data_dir: str | None = None):
  """The random-access source for `--data` (see the package docstring)."""
  from alit_jax.data import sources

  path = pathlib.Path(os.path.expanduser(data))
  if path.is_dir():
    if holds_built_dataset(path):
      return sources.get_source(f"folder:{path}", split, data_dir)
    return ImageFileSource(path)
  return sources.get_source(data, split, data_dir)


# ------------------------------------------------------------------------------------------------
# Preprocessing (a grain stage)


class Prepare(grain.transforms.Map):
  """Decode + resize/crop one record; failures become {"error": reason} (never raise).

  Gives `shards.record_head`'s fields and "image": (S, S, 3) uint8 (zeros for padding and bad
  images).
  """

  def __init__(self, image_size: int, resize: bool, interpolation: str):
    self.image_size = int(image_size)
    self.resize = bool(resize)
    self.interpolation = interpolation

  def map(self, record: dict) -> dict:
    from alit_jax.data import transforms as T

    s = self.image_size
    out = shards.record_head(record)
    out["image"] = np.zeros((s, s, 3), np.uint8)
    if record["index"] < 0 or out["error"]:
      return out
    try:
      img = T.decode_image(record["image"])
      if self.resize:
        img = T.resize_shorter_side(img, s, self.interpolation)
      img = T.center_crop(img, s)
      arr = np.asarray(img, np.uint8)
      if arr.shape != (s, s, 3):
        raise ValueError(f"preprocessing gave shape {arr.shape}")
      out["image"] = arr
    except Exception as e:  # any decoder failure is a bad image, not a crashed job
      out["error"] = T.error_text(e)
    return out


# ------------------------------------------------------------------------------------------------
# Records and the job identity


def encode_record(
  *, index: int, id: str, label: int, tokens: np.ndarray, scores: np.ndarray, token_dtype: str
) -> bytes:
  """One record's bytes (the format in the package docstring).

  Args:
    index, id, label: the image's position in the source, id and label.
    tokens: (L,) quantizer indices or (L, D) continuous latents.
    scores: (L / T,) criterion scores of the iterations that chose L.
    token_dtype: the stored dtype (`token_dtype_for`).
  """
  import msgpack

  tokens = np.asarray(tokens)
  stored = np.dtype(token_dtype).newbyteorder("<")
  if np.issubdtype(stored, np.integer):
    info = np.iinfo(stored)
    if tokens.size and (tokens.min() < info.min or tokens.max() > info.max):
      raise ValueError(f"token values out of range for {token_dtype}")
  rec = {
    "index": int(index),
    "id": str(id),
    "label": int(label),
    "length": int(tokens.shape[0]),
    "tokens": np.ascontiguousarray(tokens, dtype=stored).tobytes(),
    "scores": np.ascontiguousarray(scores, dtype="<f4").tobytes(),
  }
  return msgpack.packb(rec, use_bin_type=True)


def token_dtype_for(tokenizer, token_dtype: str = "auto") -> str:
  """The stored token dtype: int16/int32 for quantized models, float32/float16 otherwise."""
  c = tokenizer.config.alit
  if c.quantize_latent:
    auto = "int16" if c.codebook_size <= 2**15 else "int32"
    if token_dtype == "auto":
      return auto
    if token_dtype not in ("int16", "int32"):
      raise ValueError(f"quantized tokens are stored as int16/int32, not {token_dtype!r}")
    if token_dtype == "int16" and auto == "int32":
      raise ValueError(f"codebook of {c.codebook_size} entries does not fit int16")
    return token_dtype
  if token_dtype == "auto":
    return "float32"
  if token_dtype not in ("float32", "float16"):
    raise ValueError(f"continuous tokens are stored as float32/float16, not {token_dtype!r}")
  return token_dtype


def job_identity(
  tokenizer,
  source,
  *,
  checkpoint: str | None,
  data: str,
  split: str,
  data_dir: str | None,
  criterion: str,
  threshold: float,
  shard_size: int,
  token_dtype: str,
  resize: bool,
  interpolation: str,
) -> dict:
  """The job.json dict: what determines the output (plus provenance)."""
  c = tokenizer.config.alit
  n = len(source)
  return {
    "format": FORMAT,
    "checkpoint": {
      "path": checkpoint or tokenizer.meta.get("source", "<in memory>"),
      "params_sha256": shards.params_sha256(tokenizer.variables),
    },
    "model": json.loads(tokenizer.config.to_json()),
    "quantized": bool(c.quantize_latent),
    "codebook_size": int(c.codebook_size) if c.quantize_latent else 0,
    "latent_dim": int(c.latent_dim),
    "tokens_per_iteration": int(c.num_latent_tokens),
    "num_iterations": int(c.max_rollout_iters),
    "token_counts": [int(x) for x in tokenizer.token_counts],
    "token_dtype": token_dtype,
    "criterion": criterion,
    "threshold": float(threshold),
    "halting": "off",
    "image_size": int(tokenizer.image_size),
    "preprocess": {"resize": bool(resize), "interpolation": interpolation, "center_crop": True},
    "data": {
      "spec": data,
      "split": split,
      "data_dir": data_dir,
      "num_records": n,
      "fingerprint": shards.source_fingerprint(source),
    },
    "shard_size": int(shard_size),
    "num_shards": max(1, math.ceil(n / shard_size)),
  }


# ------------------------------------------------------------------------------------------------
# Manifest


def build_manifest(out: str | os.PathLike) -> dict:
  """Aggregates job.json and every shard's JSON (all must be committed).

  Returns:
    {"format", "complete": True, "job": job.json, "num_shards", "shards": [{file, start, stop,
    num_records, num_bad}], "num_records" (tokenized images), "num_bad", "bad_images": [{index,
    id, reason}], "token_length_histogram" {count: images}, "total_tokens",
    "mean_tokens_per_image", "record_format"}.

  Raises:
    FileNotFoundError: a shard is not committed yet.
  """
  job, committed = shards.committed_shards(pathlib.Path(out))
  listed, bad, hist, total = [], [], {}, 0
  for file, meta in committed:
    listed.append(
      {
        "file": file,
        "start": meta["start"],
        "stop": meta["stop"],
        "num_records": meta["num_records"],
        "num_bad": len(meta["bad"]),
      }
    )
    bad += meta["bad"]
    for k, v in meta["length_histogram"].items():
      hist[k] = hist.get(k, 0) + v
    total += meta["total_tokens"]
  n = sum(s["num_records"] for s in listed)
  return {
    "format": FORMAT,
    "complete": True,
    "job": job,
    "num_shards": job["num_shards"],
    "shards": listed,
    "num_records": n,
    "num_bad": len(bad),
    "bad_images": bad,
    "token_length_histogram": {k: hist[k] for k in sorted(hist, key=int)},
    "total_tokens": total,
    "mean_tokens_per_image": total / n if n else 0.0,
    "record_format": {
      "container": "array_record (group_size 1), one record per tokenized image, source order",
      "encoding": "msgpack map",
      "fields": {
        "index": "int: position of the image in the source",
        "id": "str: file path / file_name, or the index when the source has none",
        "label": "int: class label, -1 if none",
        "length": "int: token count L",
        "tokens": f"bytes: L{' x latent_dim' if not job['quantized'] else ''} little-endian "
        f"{job['token_dtype']}",
        "scores": f"bytes: float32 {job['criterion']} score of iterations 1..L/T",
      },
    },
  }
