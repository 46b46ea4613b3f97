"""Tests of the input pipeline (alit_jax.data): folder builder, sources, transforms, grain iterators.

Tiny images (16-40 px) and tmp folders only; no real dataset is needed.
"""

import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from alit_jax.data import build_folder, pipeline, sources, synthetic
from alit_jax.data import transforms as T


def _encode(arr: np.ndarray, fmt: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format=fmt)
  return buf.getvalue()


class _BytesSource:
  """Encoded PNGs of synthetic images; record `bad` holds garbage bytes (a corrupt record)."""

  label_names = ("a", "b")

  def __init__(self, n: int, bad: int = -1, size: int = 24):
    self.n, self.bad, self.size = n, bad, size

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    i = int(i)
    if i == self.bad:
      return {"image": b"\x89PNG\r\n\x1a\nnot really", "label": 1, "file_name": f"{i}"}
    img, _ = synthetic.synthetic_image(i, (self.size, self.size + 8), seed=3)
    return {"image": _encode(img, "PNG"), "label": i % 2, "file_name": f"{i}"}


def _take(it, n):
  return [next(it) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# build_folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """cats/: 3 PNG (one grayscale) + a .txt; dogs/: 3 JPEG + a truncated JPEG."""
  root = tmp_path_factory.mktemp("images") / "pets"
  (root / "cats").mkdir(parents=True)
  (root / "dogs" / "sub").mkdir(parents=True)
  rng = np.random.default_rng(0)
  files = {}
  for i in range(3):
    arr = rng.integers(0, 256, (20 + i, 28, 3), dtype=np.uint8)
    if i == 2:
      arr = arr[..., 0]  # grayscale: must be converted to RGB and re-encoded
    files[f"cats/c{i}.png"] = _encode(arr, "PNG")
    files[f"dogs/{'sub/' if i == 0 else ''}d{i}.jpg"] = _encode(
      rng.integers(0, 256, (24, 18 + i, 3), dtype=np.uint8), "JPEG"
    )
  good_jpeg = _encode(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "JPEG")
  files["dogs/broken.jpg"] = good_jpeg[: len(good_jpeg) // 3]
  files["cats/readme.txt"] = b"not an image"
  for rel, data in files.items():
    (root / rel).write_bytes(data)
  return root, files


def test_build_folder_dataset_counts_report_and_tfds_readback(image_folder, tmp_path):
  """build_folder writes a TFDS array_record dataset readable with tfds.data_source.

  Fails if: corrupt files crash the build or are silently dropped (not in the report by name),
  non-image files are read as images, labels/class names are wrong, or stored bytes are
  re-encoded (lossy JPEG round trips) when they are RGB JPEG/PNG already.
  """
  import tensorflow_datasets as tfds

  src, files = image_folder
  report = build_folder.build_folder_dataset(src, tmp_path, name="Pets Small", progress=False)
  assert report["name"] == "pets_small"
  assert report["class_names"] == ["cats", "dogs"]
  assert report["splits"] == {"train": 6}
  assert report["num_skipped"] == {"corrupt": 1, "not_an_image": 1, "outside_class_folder": 0}
  corrupt = [s for s in report["skipped"] if s["kind"] == "corrupt"]
  assert corrupt[0]["file"] == "dogs/broken.jpg" and corrupt[0]["reason"]
  assert report["reencoded"] == ["cats/c2.png"]
  on_disk = json.loads((tmp_path / "pets_small" / "1.0.0" / "build_report.json").read_text())
  assert on_disk["skipped"] == report["skipped"]

  ds = tfds.data_source("pets_small", data_dir=str(tmp_path), split="train")
  assert len(ds) == 6
  seen = {}
  for i in range(len(ds)):
    r = ds[i]
    name = r["file_name"].decode()
    assert r["image"].ndim == 3 and r["image"].shape[-1] == 3
    seen[name] = int(r["label"])
  good = [n for n in files if n.endswith((".png", ".jpg")) and n != "dogs/broken.jpg"]
  assert seen == {n: int(n.startswith("dogs")) for n in good}
  # Through our source: raw bytes, identical to the files for RGB JPEG/PNG.
  source = sources.get_source(f"folder:{tmp_path}/pets_small", "train")
  assert source.label_names == ("cats", "dogs")
  by_name = {source[i]["file_name"]: source[i] for i in range(len(source))}
  assert by_name["dogs/sub/d0.jpg"]["image"] == files["dogs/sub/d0.jpg"]
  assert by_name["cats/c0.png"]["image"] == files["cats/c0.png"]
  assert np.asarray(T.decode_image(by_name["cats/c2.png"]["image"])).shape == (22, 28, 3)


def test_build_folder_cli_val_fraction_and_existing(image_folder, tmp_path, capsys):
  """The CLI prints counts; --val-fraction splits per class with a seed; no silent overwrite.

  Fails if: the validation split is not stratified/deterministic, train and validation overlap,
  the command does not report the corrupt file, or rebuilding over an existing dataset silently
  reuses stale data.
  """
  src, _ = image_folder
  argv = [str(src), "--out", str(tmp_path), "--val-fraction", "0.5", "--seed", "3"]
  assert build_folder.main([*argv, "--no-progress"]) == 0
  out = capsys.readouterr().out
  assert "images: 6 (train=2, validation=4)" in out  # round(0.5 * 3) = 2 per class
  assert "dogs/broken.jpg" in out and "1 corrupt" in out
  tr = sources.get_source(f"folder:{tmp_path}", "train")
  va = sources.get_source(f"folder:{tmp_path}", "val")
  names_tr = {tr[i]["file_name"] for i in range(len(tr))}
  names_va = {va[i]["file_name"] for i in range(len(va))}
  assert not names_tr & names_va and len(names_tr | names_va) == 6
  assert sorted(va[i]["label"] for i in range(len(va))) == [0, 0, 1, 1]
  assert build_folder.main([*argv, "--no-progress"]) == 2  # exists, no --overwrite
  assert "already exists" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# sources


def test_imagenet100_filter_on_fake_imagenet_folder(tmp_path):
  """imagenet100 keeps only the reference's 100 wnids, labels = position in the sorted list.

  Builds a fake ImageNet (train/ and val/ split folders, 3 IN-100 wnids + 2 others). Fails if
  other classes leak in, labels are not remapped like ImageFolder over the IN-100 symlinks, the
  split folders are not recognised, or the cached index list gives a different result.
  """
  wnids = ["n01558993", "n04517823", "n02085620", "n01440764", "n09999999"]  # last two: not IN-100
  root = tmp_path / "fake_imagenet"
  rng = np.random.default_rng(1)
  for split, n in (("train", 3), ("val", 1)):
    for w in wnids:
      (root / split / w).mkdir(parents=True)
      for i in range(n):
        img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / split / w / f"{w}_{i}.JPEG", format="JPEG")
  data_dir = tmp_path / "tfds"
  # Named like the TFDS dataset so the default imagenet100 -> imagenet2012 lookup finds it.
  report = build_folder.build_folder_dataset(root, data_dir, name="imagenet2012", progress=False)
  assert report["splits"] == {"train": 15, "validation": 5}
  assert report["class_names"] == sorted(wnids)
  assert len(sources.get_source("imagenet2012", "train", data_dir=str(data_dir))) == 15

  sorted100 = sorted(sources.IMAGENET100_WNIDS)
  names = {}
  for split, n in (("train", 3), ("validation", 1)):
    src = sources.get_source("imagenet100", split, data_dir=str(data_dir))
    names[split] = _names(src)
    assert len(src) == 3 * n and src.num_classes == 100
    for i in range(len(src)):
      r = src[i]
      wnid = r["file_name"].split("/")[0]
      assert wnid in sources.IMAGENET100_WNIDS
      assert r["label"] == sorted100.index(wnid)
  cached = list((data_dir / "imagenet2012" / "1.0.0").glob("alit_subset_train_*.npy"))
  assert len(cached) == 1
  again = sources.get_source("imagenet100", "train", base=f"folder:{data_dir}/imagenet2012")
  np.testing.assert_array_equal(again.indices, np.load(cached[0]))
  assert _names(again) == names["train"]


def _names(src):
  return [src[i]["file_name"] for i in range(len(src))]


def test_get_source_errors_and_synthetic_spec(tmp_path):
  """Missing datasets raise FileNotFoundError saying how to prepare them; spec options parse.

  Fails if: a missing ImageNet triggers a download attempt or a cryptic error, or synthetic
  options / split seeds are ignored.
  """
  with pytest.raises(FileNotFoundError, match="tfds build imagenet2012") as e:
    sources.get_source("imagenet2012", "train", data_dir=str(tmp_path))
  assert "build_folder" in str(e.value)
  assert not any(tmp_path.iterdir())  # nothing created
  with pytest.raises(FileNotFoundError, match="build_folder"):
    sources.get_source(f"folder:{tmp_path}", "train")
  with pytest.raises(FileNotFoundError, match="not found"):
    sources.get_source("my_data", "train", data_dir=str(tmp_path))
  s = sources.get_source("synthetic:num_examples=10,image_size=12", "train")
  assert len(s) == 10 and s[3]["image"].shape == (12, 12, 3)
  v = sources.get_source("synthetic", "val", num_examples=10, image_size=12)
  assert not np.array_equal(s[3]["image"], v[3]["image"])
  with pytest.raises(ValueError, match="unknown synthetic options"):
    sources.get_source("synthetic:colour=1")


def test_synthetic_deterministic_and_complexity_ordered():
  """Synthetic images depend only on (seed, index); kinds are ordered by complexity.

  Fails if: regenerating an index gives a different image (workers/resume would see different
  data), the seed is ignored, or the complexity label does not track image complexity
  (PNG size: flat < few shapes < many shapes < texture < noise; gradient > flat).
  """
  a, b = synthetic.SyntheticSource(24, 32, seed=5), synthetic.SyntheticSource(24, 32, seed=5)
  b = pickle.loads(pickle.dumps(b))
  for i in (0, 7, 23):
    np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
    assert a[i]["complexity"] == a[i]["label"] == i % len(synthetic.KINDS)
  c = synthetic.SyntheticSource(24, 32, seed=6)
  assert not np.array_equal(a[2]["image"], c[2]["image"])
  sizes = {}
  for k, kind in enumerate(synthetic.KINDS):
    imgs = [synthetic.synthetic_image(i * 6 + k, 32, seed=0)[0] for i in range(6)]
    sizes[kind] = np.mean([len(synthetic.encode_png(im)) for im in imgs])
  assert sizes["flat"] < sizes["gradient"]
  order = ["flat", "few_shapes", "many_shapes", "texture", "noise"]
  assert [sizes[k] for k in order] == sorted(sizes[k] for k in order), sizes
  assert len(np.unique(a[0]["image"].reshape(-1, 3), axis=0)) == 1  # flat really is flat


# ------------------------------------------------------------------------------------------------
# transforms


def test_random_resized_crop_params_bounds_and_fallback():
  """Crop boxes follow torchvision's RandomResizedCrop sampling.

  Fails if: crops leave the image, the area fraction or aspect ratio leave scale/ratio (up to
  pixel rounding), or the fallback after 10 failed attempts is not the centred, ratio-clamped
  crop.
  """
  rng = np.random.default_rng(0)
  fractions, ratios = [], []
  for _ in range(300):
    # Aspect ratios inside `ratio`, so even the fallback (whole image) respects the bounds.
    h = int(rng.integers(40, 100))
    w = int(h * rng.uniform(0.8, 1.25))
    top, left, ch, cw = T.random_resized_crop_params(rng, h, w, (0.8, 1.0), (3 / 4, 4 / 3))
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
    fractions.append(ch * cw / (h * w))
    ratios.append(cw / ch)
  assert 0.8 * 0.95 <= min(fractions) < 0.83 and max(fractions) <= 1.0
  assert 0.75 - 0.04 <= min(ratios) < 0.8 and 1.28 < max(ratios) <= 4 / 3 + 0.04
  # Strips: no sample fits, so the fallback is the largest centred crop clamped to 4:3 / 3:4
  # (13 = round(10 * 4 / 3) = round(10 / (3 / 4))).
  assert T.random_resized_crop_params(rng, 10, 200) == (0, (200 - 13) // 2, 10, 13)
  assert T.random_resized_crop_params(rng, 200, 10) == ((200 - 13) // 2, 0, 13, 10)


def test_train_augment_size_flip_and_crop_content():
  """TrainAugment = crop(params) -> resize (PIL) -> optional flip, randomness from grain's rng.

  Fails if: the output size is wrong, the flip is not a horizontal mirror of the same crop, the
  crop/resize differs from PIL crop+resize with the sampled box, or a global RNG is used.
  """
  img = synthetic.synthetic_image(4, (30, 40), seed=0)[0]
  rec = {"image": img, "label": 1, "index": 0}
  no_flip = T.TrainAugment(16, flip_prob=0.0).random_map(rec, np.random.default_rng(7))
  flip = T.TrainAugment(16, flip_prob=1.0).random_map(rec, np.random.default_rng(7))
  assert no_flip["image"].shape == (16, 16, 3) and no_flip["image"].dtype == np.uint8
  np.testing.assert_array_equal(flip["image"], no_flip["image"][:, ::-1])
  top, left, h, w = T.random_resized_crop_params(np.random.default_rng(7), 30, 40)
  manual = (
    Image.fromarray(img).crop((left, top, left + w, top + h)).resize((16, 16), Image.BILINEAR)
  )
  np.testing.assert_array_equal(no_flip["image"], np.asarray(manual))
  np.random.seed(0)
  again = T.TrainAugment(16, flip_prob=0.0).random_map(rec, np.random.default_rng(7))
  np.testing.assert_array_equal(again["image"], no_flip["image"])


def test_eval_preprocess_matches_manual_pil_and_decode():
  """Eval view = bicubic shorter-side resize + center crop, exactly as done by hand with PIL.

  Fails if: the resize rounding/crop offsets differ from torchvision's Resize+CenterCrop, the
  crop-only mode does not zero-pad small images, grayscale is not converted to RGB, corrupt
  bytes crash instead of being flagged, or to_float differs from x / 255.
  """
  img = synthetic.synthetic_image(3, (40, 30), seed=0)[0]  # H=40, W=30
  out = T.EvalPreprocess(16).map({"image": img})["image"]
  resized = Image.fromarray(img).resize((16, 21), Image.BICUBIC)  # 16 * 40 / 30 = 21.3 -> 21
  manual = np.asarray(resized.crop((0, 2, 16, 18)))  # top = round(2.5) = 2
  np.testing.assert_array_equal(out, manual)
  small = np.full((6, 10, 3), 200, np.uint8)
  padded = T.EvalPreprocess(8, resize=False).map({"image": small})["image"]
  assert padded.shape == (8, 8, 3)
  assert (padded[:1] == 0).all() and (padded[-1:] == 0).all() and (padded[1:7] == 200).all()

  gray = _encode(np.arange(64, dtype=np.uint8).reshape(8, 8), "PNG")
  dec = T.DecodeImage().map({"image": gray, "index": 0})
  assert dec["valid"] and dec["image"].shape == (8, 8, 3)
  bad = T.DecodeImage().map({"image": b"\xff\xd8\xffjunk", "index": 1})
  assert not bad["valid"] and not T.IsValid().filter(bad)
  x = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(T.to_float(x), x.astype(np.float32) / np.float32(255))


# ------------------------------------------------------------------------------------------------
# pipeline


def _train_it(source, **kw):
  args = dict(global_batch_size=4, image_size=16, seed=0, process_index=0, process_count=1)
  args.update(kw)
  return pipeline.make_train_iterator(source, **args)


def test_train_iterator_shapes_determinism_epochs_and_corrupt_records():
  """Train batches: static shapes/dtypes, reproducible per seed, reshuffled every epoch.

  Fails if: dtypes/shapes change, the same seed gives different batches (no reproducible runs),
  a different seed does not, an epoch does not visit every decodable record exactly once, two
  epochs share an order (shuffle not reseeded), or a corrupt record crashes or leaks through.
  """
  src = _BytesSource(17, bad=5)  # 16 decodable records
  it1, it2, it3 = _train_it(src), _train_it(src), _train_it(src, seed=1)
  try:
    b1, b2, b3 = _take(it1, 8), _take(it2, 8), _take(it3, 8)
  finally:
    for it in (it1, it2, it3):
      it.close()
  assert b1[0]["image"].shape == (4, 16, 16, 3) and b1[0]["image"].dtype == np.uint8
  assert b1[0]["label"].dtype == np.int32 and b1[0]["index"].dtype == np.int64
  assert set(b1[0]) == {"image", "label", "index"}
  for x, y in zip(b1, b2):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not all(np.array_equal(x["index"], y["index"]) for x, y in zip(b1, b3))
  idx = np.concatenate([b["index"] for b in b1])
  # Epochs are 17 records long (one filtered): the first 16 outputs hold 16 distinct records.
  assert 5 not in idx
  assert len(set(idx[:16].tolist())) == 16
  assert not np.array_equal(idx[:12], idx[16:28])
  labels = np.concatenate([b["label"] for b in b1])
  np.testing.assert_array_equal(labels, idx % 2)


def test_train_iterator_process_sharding_and_resume():
  """Two simulated processes read disjoint halves of each epoch; state restore is exact.

  Fails if: processes overlap or miss records (data duplicated/dropped in multi-host training),
  the per-process batch is not global/process_count, or a restored iterator (state through
  JSON, as in an Orbax checkpoint) does not continue with identical batches.
  """
  src = synthetic.SyntheticSource(16, 20, seed=2)
  its = [_train_it(src, global_batch_size=8, process_index=p, process_count=2) for p in (0, 1)]
  try:
    per = [_take(it, 2) for it in its]  # 2 batches of 4 per process = one 16-record epoch
  finally:
    for it in its:
      it.close()
  assert per[0][0]["image"].shape == (4, 16, 16, 3)
  seen = [set(np.concatenate([b["index"] for b in p]).tolist()) for p in per]
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(16))

  it = _train_it(src, global_batch_size=4)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 5)
  it.close()
  resumed = _train_it(src, global_batch_size=4)
  resumed.set_state(state)
  got = _take(resumed, 5)
  resumed.close()
  for x, y in zip(expected, got):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_train_iterator_worker_process_matches_in_process():
  """worker_count=1 (a spawned grain worker) yields the same batches as the in-process pipeline.

  Fails if: transforms/sources are not picklable, the spawn start fails (e.g. absl flags),
  worker processes change the data order/augmentation (non-reproducible multiprocess runs), or
  the multiprocess iterator state cannot be JSON round-tripped and resumed.
  """
  src = synthetic.SyntheticSource(12, 20, seed=4)
  ref_it = _train_it(src)
  ref = _take(ref_it, 3)
  ref_it.close()
  mp_it = _train_it(src, worker_count=1, num_threads=1)
  try:
    got = _take(mp_it, 2)
    state = json.loads(json.dumps(mp_it.get_state()))
    got.append(next(mp_it))
  finally:
    mp_it.close()
  resumed = _train_it(src, worker_count=1, num_threads=1)
  try:
    resumed.set_state(state)
    after_resume = next(resumed)
  finally:
    resumed.close()
  for x, y in zip(ref + [ref[2]], got + [after_resume]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_eval_iterator_exactly_once_with_padding_and_mask():
  """Eval batches cover every record exactly once across processes, padded with mask False.

  Fails if: a record is skipped or duplicated (biased metrics), processes get different batch
  counts (SPMD hang), padding rows are not masked / not zero, corrupt records crash, or the
  image differs from the eval transform of the record.
  """
  src = _BytesSource(11, bad=4)
  runs = [
    pipeline.make_eval_iterator(src, batch_size=4, image_size=16, process_index=p, process_count=2)
    for p in (0, 1)
  ]
  assert [len(r) for r in runs] == [3, 3]  # ceil(ceil(11 / 2) / 2)
  masked, all_idx = [], []
  for r in runs:
    for b in r:
      assert b["image"].shape == (2, 16, 16, 3) and b["mask"].dtype == np.bool_
      all_idx.extend(b["index"].tolist())
      masked.extend(b["index"][b["mask"]].tolist())
      pad = b["index"] < 0
      assert not b["mask"][pad].any() and (b["image"][pad] == 0).all()
      assert (b["label"][~b["mask"]] == -1).all()
      for row in np.flatnonzero(b["mask"]):
        rec = src[int(b["index"][row])]
        want = T.EvalPreprocess(16).map({"image": np.asarray(T.decode_image(rec["image"]))})
        np.testing.assert_array_equal(b["image"][row], want["image"])
  assert sorted(i for i in all_idx if i >= 0) == list(range(11))
  assert sorted(masked) == [i for i in range(11) if i != 4]
