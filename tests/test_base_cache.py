"""Stage 1 on cached base codes (`alit_jax.data.base_cache`): round trip, step equality, the
trainer's cache source, refused mismatches and bad images.

Everything runs on the runlocal config (tiny ALIT, random tiny VQGAN, generated 64x64 images):
the cache fixture encodes 24 images x 2 views once per module.
"""

import io
import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

from alit_jax.data import base_cache, sources
from alit_jax.data import transforms as T
from alit_jax.models import rollout as rollout_lib
from alit_jax.models.alit import ALIT
from alit_jax.models.base_tokenizers import build_base
from alit_jax.train import sharding, steps, trainer
from configs import alit_pretrain

NUM_IMAGES, VIEWS, SHARD = 24, 2, 16
# Random halting masks (threshold 0) and 2 random loss iterations of 3, as tests/test_train.py.
RANDOM = {"loss.halting_threshold": 0.0, "loss.loss_iters": 2}


def _config(**overrides):
  """The runlocal config with overrides ("a.b": value)."""
  c = alit_pretrain.get_config("runlocal")
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _leaves(tree):
  return {
    sharding.path_name(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)
  }


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """24 synthetic images x 2 views in 2 shards (16 + 8 images), and the build's log lines."""
  out = tmp_path_factory.mktemp("cache") / "c"
  lines = []
  result = base_cache.build_from_config(
    _config(),
    out,
    views=VIEWS,
    num_images=NUM_IMAGES,
    batch_size=8,
    shard_size=SHARD,
    log=lines.append,
    log_every_s=0.0,
  )
  assert result.complete and result.shards_done == 2 and result.images == NUM_IMAGES
  return out, lines


@pytest.fixture(scope="module")
def base_setup():
  """The runlocal run's model config, base module and (random) base variables."""
  model_config, _, base_vars, _ = base_cache.resolve_base(_config())
  return model_config, build_base(model_config.base), base_vars


def test_cache_round_trip_views_resume_and_sampling(cache_dir, base_setup):
  """Every record holds view k of image i (`TrainAugment` from `view_rng(seed, i, k)`) and the
  base encoder's features and indices of that view; a rerun resumes (nothing recomputed) and a
  different job is refused; the training iterator reads every image once per epoch, view
  epoch % K, and resumes from its state.

  Fails if views are not reproducible from (seed, index, view), if stored arrays differ from the
  encoder's output (layout, dtype, byte order), if the record order breaks the image/view
  addressing, or if the iterator repeats images within an epoch or ignores the epoch's view.
  """
  out, lines = cache_dir
  model_config, base, base_vars = base_setup
  cache = base_cache.BaseCache(out)
  m = cache.manifest
  assert (m["num_images"], m["num_records"], m["num_bad"], m["num_shards"]) == (24, 48, 0, 2)
  assert len(cache) == NUM_IMAGES and cache.views == VIEWS
  assert any("complete: 24 images (48 records), 0 bad" in x for x in lines), lines
  assert any("base_cache: 24/24 images" in x for x in lines), lines  # progress lines

  c = _config()
  src = sources.get_source(c.input.data, c.input.split)
  aug = T.TrainAugment(64, tuple(c.input.scale), tuple(c.input.ratio), c.input.flip_prob)
  picks = [(0, 0), (0, 1), (5, 1), (17, 0), (23, 1)]
  want_images = []
  for i, k in picks:
    rec = cache.view(i, k)
    assert (rec["index"], rec["view"], rec["id"]) == (i, k, src[i]["file_name"])
    want = aug.random_map({"image": src[i]["image"]}, base_cache.view_rng(c.seed, i, k))["image"]
    np.testing.assert_array_equal(rec["image"], want)
    want_images.append(want)
  busy = next(i for i in range(NUM_IMAGES) if src[i]["label"] >= 3)  # shapes, texture, noise
  assert not np.array_equal(cache.view(busy, 0)["image"], cache.view(busy, 1)["image"])
  enc = jax.device_get(
    rollout_lib.base_encode(base, base_vars, steps.to_float(np.stack(want_images)))
  )
  for n, (i, k) in enumerate(picks):
    rec = cache.view(i, k)
    assert rec["base_features"].dtype == np.float32 and rec["gt_indices"].dtype == np.int32
    np.testing.assert_allclose(rec["base_features"], enc["base_features"][n], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(rec["gt_indices"], enc["gt_indices"][n])

  again = base_cache.build_from_config(
    c, out, views=VIEWS, num_images=NUM_IMAGES, batch_size=8, shard_size=SHARD, log=None
  )
  assert (again.complete, again.shards_done, again.shards_skipped) == (True, 0, 2)
  with pytest.raises(
    ValueError, match=r"(?s)base cache of a different job.*views: 2 \(in OUT\) != 3"
  ):
    base_cache.build_from_config(c, out, views=3, num_images=NUM_IMAGES, shard_size=SHARD, log=None)

  it = base_cache.make_train_iterator(
    cache, global_batch_size=8, seed=7, process_index=0, process_count=1, num_threads=2
  )
  batches = [next(it) for _ in range(3)]
  state = it.get_state()
  batches += [next(it) for _ in range(3)]
  for epoch in range(2):
    seen = np.concatenate([b["index"] for b in batches[3 * epoch : 3 * epoch + 3]])
    assert sorted(seen.tolist()) == list(range(NUM_IMAGES))  # once per epoch, reshuffled
    b = batches[3 * epoch]
    for row in range(8):
      rec = cache.view(int(b["index"][row]), epoch)  # epoch e reads view e % K
      np.testing.assert_array_equal(b["image"][row], rec["image"])
      np.testing.assert_array_equal(b["base_features"][row], rec["base_features"])
  assert batches[0]["image"].dtype == np.uint8 and batches[0]["gt_indices"].dtype == np.int32
  assert batches[0]["base_features"].shape == (8, 4, 4, 16)
  assert [b["index"].tolist() for b in batches[:3]] != [b["index"].tolist() for b in batches[3:]]
  resumed = base_cache.make_train_iterator(
    cache, global_batch_size=8, seed=7, process_index=0, process_count=1, num_threads=2
  )
  resumed.set_state(state)
  for b in batches[3:]:
    np.testing.assert_array_equal(next(resumed)["index"], b["index"])


def test_cached_step_equals_step_on_images(cache_dir, base_setup):
  """Two stage-1 updates from the cache equal two updates that run the base on the same images.

  Random halting masks and loss iterations (`RANDOM`). The first update has lr 0 (one warm-up
  step), so the Adam moments compare the gradients tightly; after the second (lr 1e-3) the params
  agree to 1e-5 (Adam turns float noise in near-zero gradients into updates of up to lr). Fails
  if the cached step's loss differs from `train_step`'s: other targets (indices, codebook), the
  image embedding fed other pixels, or another PRNG stream for halting or loss iterations.
  """
  out, _ = cache_dir
  model_config, base, base_vars = base_setup
  model = ALIT(model_config.alit)
  spec = trainer.stage1_spec(_config(**RANDOM), model_config)
  cache = base_cache.BaseCache(out)
  recs = [[cache.view(i, (i + s) % VIEWS) for i in range(8 * s, 8 * s + 8)] for s in range(2)]
  batches = [
    {k: np.stack([r[k] for r in rs]) for k in ("image", *base_cache.BASE_KEYS)} for rs in recs
  ]
  hp = steps.hparams(
    lr=1e-3, min_lr=0.0, warmup_steps=1, total_steps=10, ema_decay=0.9, steps_per_epoch=5
  )
  seed = np.uint32(3)
  state0 = jax.device_get(steps.create_train_state(jax.random.key(1), model, spec))
  plain = jax.jit(steps.train_step, static_argnums=(5, 6, 7))
  cached = jax.jit(steps.train_step_cached, static_argnums=(6, 7, 8))

  def run(step_fn):
    state, states, ms = state0, [], []
    for b in batches:
      state, m = step_fn(state, b)
      states.append(_leaves(jax.device_get(state)))
      ms.append(jax.device_get(m))
    return states, ms

  sa, ma = run(lambda s, b: plain(s, base_vars, b["image"], hp, seed, model, base, spec))
  sb, mb = run(
    lambda s, b: cached(
      s,
      base_vars,
      b["image"],
      {k: b[k] for k in base_cache.BASE_KEYS},
      hp,
      seed,
      model,
      base,
      spec,
    )
  )
  for a, b in zip(ma, mb):
    assert a["masked_fraction"].sum() > 0  # halting masks were drawn
    np.testing.assert_array_equal(a["masked_fraction"], b["masked_fraction"])
    np.testing.assert_array_equal(a["loss_iters"], b["loss_iters"])
    for k in ("loss", "grad_norm", "nll_loss", "code_loss", "quantization_loss"):
      np.testing.assert_allclose(b[k], a[k], rtol=1e-5, err_msg=k)
  for a, b in zip(sa, sb):
    assert a.keys() == b.keys()
    for k in a:
      if "/mu/" in k or "/nu/" in k:
        scale = max(np.abs(a[k]).max(), 1e-30)
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5 * scale, err_msg=k)
  for k in sa[0]:
    if k.startswith("params/"):
      np.testing.assert_array_equal(sb[0][k], sa[0][k], err_msg=k)  # lr 0: unchanged
      np.testing.assert_allclose(sb[1][k], sa[1][k], rtol=0, atol=1e-5, err_msg=k)


def test_trainer_trains_from_cache_without_running_the_base(cache_dir, tmp_path, monkeypatch):
  """`config.input.base_cache=DIR` trains from the cache: the base encoder is never traced, an
  epoch is one pass over the cached images, and the loss stays finite.

  Fails if the trainer still encodes images (the patched `base_encode` raises), or if the cache
  source is not wired into the data loop (batches, steps per epoch).
  """
  out, _ = cache_dir

  def no_base(*args, **kw):
    raise AssertionError("the base encoder ran in a cached run")

  monkeypatch.setattr(rollout_lib, "base_encode", no_base)
  c = _config(total_steps=4, log_every_steps=1, image_summary_every_steps=0)
  c.input.base_cache = str(out)
  result = trainer.train_and_evaluate(c, tmp_path / "wd")
  assert result["step"] == 4 and np.isfinite(result["metrics"]["loss"])
  rows = [json.loads(x) for x in (tmp_path / "wd" / "metrics.jsonl").read_text().splitlines()]
  epochs = [r["train/epoch"] for r in rows if "train/epoch" in r]
  assert epochs == [1 / 3, 2 / 3, 1.0, 4 / 3]  # 24 images, batch 8


def test_mismatched_config_is_refused(cache_dir, tmp_path):
  """A run whose base, image size, dtype, data or augmentation differs from the cache's stops
  before training with every difference named; an unfinished cache is refused too.

  Fails if a cache made for another base tokenizer (another seed draws another random base) or
  other augmentation settings is silently used.
  """
  out, _ = cache_dir
  c = _config(seed=1, **{"input.scale": (0.5, 1.0), "input.base_cache": str(out)})
  with pytest.raises(ValueError) as e:
    trainer.train_and_evaluate(c, tmp_path / "a")
  msg = str(e.value)
  assert "was built for another setup" in msg
  assert "base tokenizer parameters (sha256)" in msg
  assert "config.input.scale: [0.8, 1.0] (cache) != [0.5, 1.0] (this run)" in msg
  assert "config.input.ratio" not in msg  # only the differences
  c = _config(**{"input.data": "synthetic:num_examples=64,image_size=64"})
  c.input.base_cache = str(out)
  with pytest.raises(ValueError, match="config.input.data: .*synthetic:num_examples=256"):
    trainer.train_and_evaluate(c, tmp_path / "b")
  half = tmp_path / "half"
  (half / "shards").mkdir(parents=True)
  (half / "job.json").write_text((out / "job.json").read_text())
  with pytest.raises(FileNotFoundError, match="incomplete"):
    base_cache.BaseCache(half)
  with pytest.raises(FileNotFoundError, match="not a base cache"):
    base_cache.BaseCache(tmp_path)


class _Files:
  """In-memory encoded images with file names; two of them corrupt."""

  def __init__(self):
    rng = np.random.default_rng(0)
    self.items = []
    for i in range(6):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 72, 3), dtype=np.uint8)).save(buf, "PNG")
      self.items.append((f"img{i}.png", buf.getvalue()))
    good = self.items[1][1]
    self.items[2] = ("broken/truncated.png", good[: len(good) // 3])
    self.items[4] = ("broken/empty.jpg", b"")

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    name, data = self.items[i]
    return {"image": data, "label": -1, "file_name": name}

  def __repr__(self):
    return "_Files(6)"


def test_corrupt_images_are_skipped_counted_and_named(base_setup, tmp_path):
  """Undecodable images get no record, are counted, logged by file name and listed with their
  reason in the manifest; the other images keep the image/view addressing.

  Fails if a bad file stops the build, is stored, goes unnamed, or shifts the records of the
  images after it.
  """
  model_config, base, base_vars = base_setup
  lines = []
  aug = base_cache.Augment((0.8, 1.0), (3 / 4, 4 / 3), 0.5, "bilinear")
  result = base_cache.build_cache(
    tmp_path / "c",
    _Files(),
    base=base,
    base_vars=base_vars,
    base_path="(random)",
    image_size=64,
    augment=aug,
    views=2,
    batch_size=4,
    shard_size=4,
    log=lines.append,
  )
  assert result.complete and (result.images, result.bad) == (4, 2)
  m = result.manifest
  assert (m["num_images"], m["num_records"], m["num_bad"]) == (4, 8, 2)
  bad = {b["id"]: b for b in m["bad_images"]}
  assert sorted(bad) == ["broken/empty.jpg", "broken/truncated.png"]
  assert bad["broken/empty.jpg"]["index"] == 4 and "empty" in bad["broken/empty.jpg"]["reason"]
  assert "cannot decode" in bad["broken/truncated.png"]["reason"]
  log = "\n".join(lines)
  assert "'broken/truncated.png'" in log and "'broken/empty.jpg'" in log
  assert "2 bad images skipped" in log
  cache = base_cache.BaseCache(tmp_path / "c")
  assert [cache.view(j, 1)["id"] for j in range(4)] == [
    "img0.png",
    "img1.png",
    "img3.png",
    "img5.png",
  ]
  assert json.loads(pathlib.Path(tmp_path / "c" / "manifest.json").read_text())["num_bad"] == 2
