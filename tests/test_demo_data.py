"""The `demo:` source that trains the bundled demo model (offline photo crops + procedural images).

Breaks if held-out photos leak into training, records stop being reproducible, or a machine
missing a photo package silently trains the recipe on fewer photos.
"""

from __future__ import annotations

import numpy as np
import pytest

from alit_jax.data import demo_data, sources

pytest.importorskip("skimage")


def test_records_are_deterministic_and_held_out_photos_stay_out_of_training():
  train = sources.get_source("demo:num_examples=200,image_size=32", "train")
  val = sources.get_source("demo:num_examples=200,image_size=32", "validation")
  a, b = train[7], train[7]
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["image"].shape == (32, 32, 3) and a["image"].dtype == np.uint8
  train_photos = {r["file_name"].rsplit("_", 1)[-1] for r in (train[i] for i in range(200))}
  val_photos = {r["file_name"].rsplit("_", 1)[-1] for r in (val[i] for i in range(200))}
  train_photos.discard("synthetic")
  val_photos.discard("synthetic")
  assert val_photos and val_photos <= set(demo_data.HELD_OUT_PHOTOS)
  assert train_photos and not train_photos & set(demo_data.HELD_OUT_PHOTOS)
  labels = {train[i]["label"] for i in range(200)}
  assert 0 in labels and len(labels) > 3  # photos and several procedural kinds


def test_all_photos_refuses_a_machine_missing_photos(monkeypatch):
  pool = dict(demo_data.photo_pool())
  pool.pop("grace_hopper", None)
  monkeypatch.setattr(demo_data, "photo_pool", lambda: pool)
  with pytest.raises(ValueError, match=r"grace_hopper.*pip install"):
    sources.get_source("demo:num_examples=4,all_photos=1", "train")
  assert len(sources.get_source("demo:num_examples=4", "train")) == 4  # lenient by default
  with pytest.raises(ValueError, match="unknown demo options"):
    sources.get_source("demo:num_examples=4,colour=1", "train")
