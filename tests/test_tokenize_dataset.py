"""Tests of dataset tokenization (alit_jax.tokenize_dataset) and its reader (alit_jax.data).

One tiny random tokenizer (`tiny_config`, 64x64, 3 iterations of 4 tokens) saved once, and a
folder of 18 generated images plus 2 corrupt files. Multi-process runs are real subprocesses
(`python -m alit_jax.tokenize_dataset`) joined by `jax.distributed` on localhost, with 2 CPU
devices each; everything else runs in this process.
"""

import io
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image

from alit_jax import tokenize_dataset as td
from alit_jax.data import build_folder, synthetic, token_dataset
from alit_jax.data.token_dataset import (
  TokenDataset,
  bucket_batches,
  decode_record,
  pad_to_bucket,
  records_equal,
)
from alit_jax.models.configs import tiny_config
from alit_jax.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SHARD = 2, 4
BAD = {"flat/zz_empty.png": "empty image data", "texture/zz_truncated.png": "cannot decode"}


def _pick_threshold(scores: np.ndarray) -> float:
  """Midpoint of the widest gap between the middle scores: lengths vary and no score is close."""
  s = np.sort(scores.ravel())
  lo, hi = len(s) // 5, len(s) - len(s) // 5
  gaps = np.diff(s[lo:hi])
  k = int(np.argmax(gaps))
  return float((s[lo + k] + s[lo + k + 1]) / 2)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Checkpoint, image folder, threshold, direct `encode` results and an in-process reference run."""
  root = tmp_path_factory.mktemp("tokds")
  tok = Tokenizer.random(tiny_config(), seed=0)
  ckpt = tok.save_pretrained(root / "ckpt")
  images = root / "images"
  synthetic.write_image_folder(images, 3, 64)
  (images / "flat" / "zz_empty.png").write_bytes(b"")
  png = io.BytesIO()
  Image.fromarray(synthetic.synthetic_image(99, 64)[0]).save(png, format="PNG")
  (images / "texture" / "zz_truncated.png").write_bytes(png.getvalue()[:80])
  good = {
    p.relative_to(images).as_posix(): np.asarray(Image.open(p).convert("RGB"))
    for p in sorted(images.rglob("*.png"))
    if p.relative_to(images).as_posix() not in BAD
  }
  ids = sorted(good)
  x = np.stack([good[i] for i in ids])
  full = tok.encode(x, threshold=-1.0, early_exit=False)  # never met: every score computed
  threshold = _pick_threshold(np.asarray(full.scores))
  # early_exit=False reuses the compiled function above (lengths and tokens do not depend on it).
  enc = tok.encode(x, threshold=threshold, early_exit=False)
  direct = {
    i: (int(enc.lengths[k]), np.asarray(enc.tokens[k]), np.asarray(enc.scores[:, k]))
    for k, i in enumerate(ids)
  }
  recon = {i: np.asarray(enc.reconstructions[k]) for k, i in enumerate(ids)}
  assert len(set(int(v[0]) for v in direct.values())) >= 2, "threshold gives a single length"
  # The reference run: one process, 2 devices, like each subprocess below.
  tok2 = Tokenizer(tok.config, tok.variables, mesh=Mesh(np.array(jax.local_devices()[:2]), ("d",)))
  logs = []
  ref = root / "ref"
  result = td.tokenize_dataset(
    tok2,
    ref,
    str(images),
    threshold=threshold,
    batch_size=BATCH,
    shard_size=SHARD,
    process_index=0,
    process_count=1,
    log=logs.append,
    log_every_s=0,
  )
  return {
    "root": root,
    "tok": tok,
    "tok2": tok2,
    "ckpt": ckpt,
    "images": images,
    "good": good,
    "threshold": threshold,
    "direct": direct,
    "recon": recon,
    "ref": ref,
    "ref_result": result,
    "ref_logs": logs,
    "jax_cache": root / "jax_cache",
  }


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _spawn(env, out, *, processes=2, extra_env=None, extra_args=()):
  """Starts the CLI as `processes` jax.distributed processes (or one plain process)."""
  port = _free_port()
  procs = []
  for i in range(processes):
    e = dict(os.environ)
    e.update(
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      PYTHONPATH=REPO + os.pathsep + e.get("PYTHONPATH", ""),
      JAX_COMPILATION_CACHE_DIR=str(env["jax_cache"]),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    e.update(extra_env or {})
    cmd = [
      sys.executable,
      "-m",
      "alit_jax.tokenize_dataset",
      "--checkpoint",
      str(env["ckpt"]),
      "--data",
      str(env["images"]),
      "--out",
      str(out),
      "--threshold",
      repr(env["threshold"]),
      "--batch",
      str(BATCH),
      "--shard_size",
      str(SHARD),
      "--log_every",
      "0",
      *extra_args,
    ]
    if processes > 1:
      cmd += [
        "--coordinator_address",
        f"127.0.0.1:{port}",
        "--num_processes",
        str(processes),
        "--process_id",
        str(i),
      ]
    log = open(out.parent / f"{out.name}.p{i}.{time.monotonic_ns()}.log", "w+")
    procs.append((subprocess.Popen(cmd, env=e, stdout=log, stderr=subprocess.STDOUT), log))
  return procs


def _finish(procs, timeout=240):
  outs = []
  for p, log in procs:
    try:
      p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q, _ in procs:
        q.kill()
      raise
    log.seek(0)
    outs.append((p.returncode, log.read()))
    log.close()
  return outs


def _all_records(out) -> list[dict]:
  ds = token_dataset(out)
  return [ds[i] for i in range(len(ds))]


def _assert_same_output(out, ref):
  """Same records (bit for bit, same order) and the same manifest up to provenance fields."""
  a, b = _all_records(out), _all_records(ref)
  assert len(a) == len(b)
  for ra, rb in zip(a, b):
    assert records_equal(ra, rb), (ra, rb)
  ma = json.loads((out / td.MANIFEST_FILE).read_text())
  mb = json.loads((ref / td.MANIFEST_FILE).read_text())
  for m in (ma, mb):
    m["job"]["checkpoint"].pop("path")
  assert ma == mb


# ------------------------------------------------------------------------------------------------
# Acceptance


def test_two_processes_every_image_once_and_tokens_equal_encode(env):
  """Acceptance 1: 2 jax.distributed processes on localhost tokenize the folder; the union of
  their shards holds every good image exactly once, bad images are listed once, and each record
  equals a single-process `encode` of that image. Fails if work is lost or duplicated between
  processes, if sharded encoding (2 devices per process) changes tokens, or if progress is not
  logged by process 0 only.
  """
  out = env["root"] / "two_procs"
  results = _finish(_spawn(env, out))
  for rc, log in results:
    assert rc == 0, log
  recs = _all_records(out)
  ids = [r["id"] for r in recs]
  assert sorted(ids) == sorted(env["good"]) and len(set(ids)) == len(ids)
  indices = [r["index"] for r in recs]
  assert indices == sorted(indices) and len(set(indices)) == len(indices)
  for r in recs:
    length, tokens, scores = env["direct"][r["id"]]
    assert r["length"] == length
    assert r["tokens"].dtype == np.int16 and r["tokens"].shape == (length,)
    np.testing.assert_array_equal(r["tokens"], tokens[:length])
    assert np.all(tokens[length:] == -1)
    np.testing.assert_allclose(r["scores"], scores[: length // 4], rtol=1e-5, atol=1e-6)
  manifest = json.loads((out / td.MANIFEST_FILE).read_text())
  assert {b["id"] for b in manifest["bad_images"]} == set(BAD)
  assert manifest["num_records"] == len(env["good"])
  # Both processes wrote shards: shard s belongs to process s % 2.
  writers = {
    json.loads(p.read_text())["written_by"]["process_index"]
    for p in (out / td.SHARD_DIR).glob("*.json")
  }
  assert writers == {0, 1}
  log0, log1 = results[0][1], results[1][1]
  assert "img/s" in log0 and "ETA" in log0 and "mean tokens/image" in log0
  assert "img/s" not in log1
  _assert_same_output(out, env["ref"])


def test_self_sigkill_mid_commit_then_rerun_is_identical(env):
  """Acceptance 2 (deterministic): process 1 SIGKILLs itself after renaming its first shard's
  data file but before writing the shard's JSON (the test hook), the test SIGKILLs process 0,
  and a rerun with the same OUT completes. Fails if the half-committed shard is trusted or lost,
  if committed shards are recomputed or duplicated, or if the final output differs from an
  uninterrupted run.
  """
  out = env["root"] / "killed_hook"
  procs = _spawn(env, out, extra_env={td.DIE_ENV: "process=1,shards=1,stage=data"})
  procs[1][0].wait(timeout=240)
  assert procs[1][0].returncode == -signal.SIGKILL
  procs[0][0].send_signal(signal.SIGKILL)
  _finish(procs)
  assert not (out / td.MANIFEST_FILE).exists()
  s_total = json.loads((out / td.JOB_FILE).read_text())["num_shards"]
  half = out / td.SHARD_DIR / f"{td.shard_name(1, s_total)}.array_record"
  assert half.exists() and not td.shard_done(out, 1, s_total)
  committed = [s for s in range(s_total) if td.shard_done(out, s, s_total)]
  with pytest.raises(FileNotFoundError, match="incomplete"):
    token_dataset(out)
  partial = token_dataset(out, allow_incomplete=True)
  assert len(partial) == sum(
    json.loads((out / td.SHARD_DIR / f"{td.shard_name(s, s_total)}.json").read_text())[
      "num_records"
    ]
    for s in committed
  )

  results = _finish(_spawn(env, out))
  for rc, log in results:
    assert rc == 0, log
  summary = [line for line in results[0][1].splitlines() if "this process:" in line]
  assert f"{sum(s % 2 == 0 for s in committed)} already done" in summary[-1], summary
  _assert_same_output(out, env["ref"])


def test_external_sigkill_then_rerun_is_identical(env):
  """Acceptance 2 (real signal): the test SIGKILLs a running tokenization as soon as its first
  shard is committed, then resumes it in-process. Fails if a kill at an arbitrary moment (mid
  batch, mid write) corrupts committed shards or leaves something a rerun trusts wrongly.
  """
  out = env["root"] / "killed_ext"
  procs = _spawn(env, out, processes=1)
  deadline = time.monotonic() + 240
  shard_dir = out / td.SHARD_DIR
  while not (shard_dir.is_dir() and any(shard_dir.glob("*.json"))):
    assert procs[0][0].poll() is None, _finish(procs)
    assert time.monotonic() < deadline
    time.sleep(0.01)
  procs[0][0].send_signal(signal.SIGKILL)
  _finish(procs)
  s_total = json.loads((out / td.JOB_FILE).read_text())["num_shards"]
  done = [s for s in range(s_total) if td.shard_done(out, s, s_total)]
  assert 1 <= len(done) < s_total, "the kill did not land mid-job"
  result = td.tokenize_dataset(
    env["tok2"],
    out,
    str(env["images"]),
    threshold=env["threshold"],
    batch_size=BATCH,
    shard_size=SHARD,
    process_index=0,
    process_count=1,
    log=None,
  )
  assert result.complete and result.shards_skipped == len(done)
  assert result.shards_done == s_total - len(done)
  _assert_same_output(out, env["ref"])


# ------------------------------------------------------------------------------------------------
# Resume, refusal, bad images


def _rerun(env, out, tok=None, **kw):
  args = dict(
    threshold=env["threshold"],
    batch_size=BATCH,
    shard_size=SHARD,
    process_index=0,
    process_count=1,
    log=None,
  )
  args.update(kw)
  data = args.pop("data", str(env["images"]))
  return td.tokenize_dataset(tok or env["tok2"], out, data, **args)


def test_resume_recomputes_only_uncommitted_shards(env):
  """Every state a kill can leave (data without JSON, JSON without data, temporary files, no
  manifest) is resumed by recomputing exactly those shards. Fails if a rerun redoes finished
  work, trusts a half-written shard, or leaves temporary files behind.
  """
  out = env["root"] / "damaged"
  shutil.copytree(env["ref"], out)
  s_total = json.loads((out / td.JOB_FILE).read_text())["num_shards"]
  d = out / td.SHARD_DIR
  (out / td.MANIFEST_FILE).unlink()
  (d / f"{td.shard_name(1, s_total)}.json").unlink()
  (d / f"{td.shard_name(2, s_total)}.array_record").unlink()
  (d / f".tmp-{td.shard_name(3, s_total)}.array_record.12345").write_bytes(b"partial")
  untouched = (d / f"{td.shard_name(0, s_total)}.array_record").stat().st_mtime_ns
  result = _rerun(env, out)
  assert result.complete and result.shards_done == 2 and result.shards_skipped == s_total - 2
  assert (d / f"{td.shard_name(0, s_total)}.array_record").stat().st_mtime_ns == untouched
  assert not list(d.glob(".tmp-*"))
  _assert_same_output(out, env["ref"])
  again = _rerun(env, out)
  assert again.complete and again.shards_done == 0 and again.images == 0


def test_refuses_resume_into_a_different_job(env, capsys):
  """A rerun with another checkpoint, criterion, threshold, data or shard size into an existing
  OUT is refused with the differing fields named, from the library and the CLI. Fails if
  mismatched tokens could be mixed into one dataset.
  """
  out = env["root"] / "refuse"
  shutil.copytree(env["ref"], out)
  before = sorted(p.name for p in (out / td.SHARD_DIR).iterdir())
  tok = env["tok2"]
  perturbed = jax.tree.map(lambda x: x, tok.variables)
  perturbed["alit"]["params"]["encoder_positional_embedding"] = (
    perturbed["alit"]["params"]["encoder_positional_embedding"] + 1e-3
  )
  other_tok = Tokenizer(tok.config, perturbed)
  other_images = env["root"] / "other_images"
  synthetic.write_image_folder(other_images, 1, 64)
  cases = [
    ({"tok": other_tok}, "checkpoint.params_sha256"),
    ({"criterion": "mse"}, "criterion"),
    ({"threshold": env["threshold"] + 0.01}, "threshold"),
    ({"data": str(other_images)}, "data.fingerprint"),
    ({"shard_size": SHARD * 2}, "shard_size"),
  ]
  for kw, field in cases:
    with pytest.raises(ValueError, match="refusing to resume") as e:
      _rerun(env, out, **kw)
    assert field in str(e.value)
  argv = ["--checkpoint", str(env["ckpt"]), "--data", str(env["images"]), "--out", str(out)]
  assert td.main([*argv, "--threshold", "0.5", "--batch", "2", "--shard_size", str(SHARD)]) == 2
  assert "threshold" in capsys.readouterr().err
  assert sorted(p.name for p in (out / td.SHARD_DIR).iterdir()) == before


def test_second_concurrent_run_refuses_and_first_is_unharmed(env):
  """Issue 18 acceptance 4: while one run holds OUT (in this process, paused inside its first
  log line), a second run of the CLI on the same OUT refuses at once with exit code 2, naming the
  holder's pid and host; the first then finishes with output identical to a lone run's. A rerun
  after the first has ended takes the lock again (nothing stale blocks).

  Fails if two runs can both write one OUT (the issue: each recomputed and rewrote every shard,
  and one's tmp-file cleanup deleted the other's in-flight files), or if the refusal names no
  holder.
  """
  import socket

  out = env["root"] / "concurrent"
  second = []

  def log(msg):
    if not second:  # the first line comes after the lock is taken: start the rival now
      second.append(_finish(_spawn(env, out, processes=1))[0])
      assert not list((out / td.SHARD_DIR).glob("*.json")), "the rival wrote a shard"

  result = _rerun(env, out, log=log, log_every_s=1e9)
  ((rc, text),) = second
  assert rc == 2, text
  assert f"pid {os.getpid()} on host {socket.gethostname()}" in text, text
  assert "Traceback" not in text
  assert result.complete and result.shards_skipped == 0
  _assert_same_output(out, env["ref"])
  again = _rerun(env, out)
  assert again.complete and again.shards_done == 0
  with td.OutputLock(out, 0):
    with pytest.raises(td.OutputLockedError, match=f"pid {os.getpid()}"):
      td.OutputLock(out, 0)
    td.OutputLock(out, 1).release()  # another process index has its own lock


def test_bad_images_are_recorded_and_skipped(env):
  """Unreadable files are listed in the manifest with id and reason, get no record, and do not
  stop the job. Fails if a corrupt file crashes the run, is silently dropped, or is tokenized.
  """
  m = json.loads((env["ref"] / td.MANIFEST_FILE).read_text())
  assert m["num_bad"] == len(BAD) and m["num_records"] == len(env["good"])
  for b in m["bad_images"]:
    assert BAD[b["id"]] in b["reason"], b
    assert isinstance(b["index"], int)
  assert not {r["id"] for r in _all_records(env["ref"])} & set(BAD)
  assert sum(s["num_bad"] for s in m["shards"]) == len(BAD)
  assert sum(m["token_length_histogram"].values()) == m["num_records"]
  assert m["total_tokens"] == sum(int(k) * v for k, v in m["token_length_histogram"].items())
  assert m["job"]["token_counts"] == [4, 8, 12] and m["job"]["token_dtype"] == "int16"
  assert any("ETA" in line for line in env["ref_logs"])


def test_built_folder_source_gives_the_same_tokens(env, tmp_path):
  """`folder:` (a dataset built by build_folder, read through TFDS) yields the same tokens per
  image as reading the files directly. Fails if the TFDS path decodes, orders or ids images
  differently.
  """
  build_folder.build_folder_dataset(env["images"], tmp_path / "built", name="imgs", progress=False)
  out = tmp_path / "tok"
  result = _rerun(env, out, data=f"folder:{tmp_path / 'built'}")
  assert result.complete
  ref = {r["id"]: r for r in _all_records(env["ref"])}
  recs = _all_records(out)
  assert sorted(r["id"] for r in recs) == sorted(ref)
  for r in recs:
    np.testing.assert_array_equal(r["tokens"], ref[r["id"]]["tokens"])


# ------------------------------------------------------------------------------------------------
# Reader


def test_reader_buckets_sharding_and_decode_round_trip(env):
  """token_dataset is a picklable grain source; batches are padded to buckets of the token
  counts (grouped or not), split across processes without overlap, and `Tokenizer.decode` of a
  batch reproduces `encode`'s reconstructions. Fails if tokens are padded wrongly, records are
  lost in bucketing, or stored tokens do not decode to the encoded image.
  """
  ds = token_dataset(env["ref"])
  assert isinstance(ds, TokenDataset) and len(ds) == len(env["good"])
  assert pickle.loads(pickle.dumps(ds))[3]["id"] == ds[3]["id"]
  assert grain.MapDataset.source(ds)[len(ds) - 1]["id"] == ds[-1]["id"]

  batches = list(ds.batches(3))
  assert sorted(i for b in batches for i in b["ids"]) == sorted(env["good"])
  for b in batches:
    assert len(set(b["lengths"].tolist())) == 1  # grouped by bucket = token count
    assert b["tokens"].shape == (len(b["ids"]), int(b["lengths"][0]))
  mixed = list(ds.batches(5, buckets=[8, 12], group_by_length=False, shuffle=True, seed=1))
  for b in mixed:
    width = 8 if b["lengths"].max() <= 8 else 12
    assert b["tokens"].shape[1] == width
    for row, n in zip(b["tokens"], b["lengths"]):
      assert np.all(row[n:] == -1) and np.all(row[:n] >= 0)
  assert sorted(i for b in mixed for i in b["ids"]) == sorted(env["good"])
  halves = [list(ds.batches(4, process_index=p, process_count=2)) for p in (0, 1)]
  ids0 = {i for b in halves[0] for i in b["ids"]}
  ids1 = {i for b in halves[1] for i in b["ids"]}
  assert not ids0 & ids1 and ids0 | ids1 == set(env["good"])

  # Decode every record (padded batch) and compare with encode's reconstruction at that length.
  tok = env["tok"]
  b = pad_to_bucket([ds[i] for i in range(len(ds))], ds.token_counts, ds.pad_value)
  decoded = np.asarray(tok.decode(b["tokens"], b["lengths"]))
  for k, i in enumerate(b["ids"]):
    assert b["lengths"][k] == env["direct"][i][0]
    np.testing.assert_allclose(decoded[k], env["recon"][i], atol=1e-4)


def test_bucket_batches_and_record_round_trip_for_every_dtype():
  """Records of every stored dtype ((L,) ints, (L, D) floats) round-trip bit-exactly, values out
  of an integer dtype's range are refused, and grouped bucketing flushes partial buckets last.
  Fails if the record layout, byte order or bucketing logic breaks.
  """
  rng = np.random.default_rng(0)
  cases = [
    ("int16", rng.integers(0, 2**15, (8,))),
    ("int32", rng.integers(0, 2**20, (12,))),
    ("float32", rng.normal(size=(4, 6)).astype(np.float32)),
    ("float16", rng.normal(size=(8, 6)).astype(np.float16)),
  ]
  for dtype, tokens in cases:
    scores = rng.random(len(tokens) // 4).astype(np.float32)
    raw = td.encode_record(
      index=7, id="a/b.png", label=3, tokens=tokens, scores=scores, token_dtype=dtype
    )
    rec = decode_record(raw, dtype, None if tokens.ndim == 1 else tokens.shape[1])
    assert rec["tokens"].dtype == np.dtype(dtype) and rec["length"] == len(tokens)
    np.testing.assert_array_equal(rec["tokens"], tokens.astype(dtype))
    np.testing.assert_array_equal(rec["scores"], scores)
    assert (rec["id"], rec["index"], rec["label"]) == ("a/b.png", 7, 3)
  with pytest.raises(ValueError, match="out of range"):
    td.encode_record(
      index=0, id="x", label=-1, tokens=np.array([40000]), scores=[], token_dtype="int16"
    )

  recs = [
    {"tokens": np.arange(n), "length": n, "id": str(k), "index": k, "label": 0}
    for k, n in enumerate([4, 8, 4, 12, 4, 8])
  ]
  out = list(bucket_batches(recs, 2, buckets=[4, 8, 12]))
  assert [b["ids"] for b in out] == [["0", "2"], ["1", "5"], ["4"], ["3"]]
  assert [b["tokens"].shape for b in out] == [(2, 4), (2, 8), (1, 4), (1, 12)]
  assert len(list(bucket_batches(recs, 2, buckets=[4, 8, 12], drop_remainder=True))) == 2
  with pytest.raises(ValueError, match="exceeds the largest bucket"):
    list(bucket_batches(recs, 2, buckets=[4, 8]))


# ------------------------------------------------------------------------------------------------
# Tokenizer on a mesh


def test_tokenizer_mesh_splits_and_pads_batches(env):
  """`Tokenizer(mesh=...)` replicates the weights and splits batches over 8 devices, padding a
  batch of 18 to 24; tokens and lengths equal the single-device results and decode matches.
  Fails if the mesh option changes results or leaks padding rows into the outputs.
  """
  tok = env["tok"]
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = Tokenizer(tok.config, tok.variables, mesh=mesh)
  ids = sorted(env["good"])
  x = np.stack([env["good"][i] for i in ids])
  enc = sharded.encode(x, threshold=env["threshold"])
  assert enc.tokens.shape[0] == len(ids) and enc.scores.shape[1] == len(ids)
  leaf = jax.tree.leaves(sharded.variables)[0]
  assert leaf.sharding.device_set == set(mesh.devices.flat) and leaf.sharding.is_fully_replicated
  for k, i in enumerate(ids):
    length, tokens, scores = env["direct"][i]
    assert int(enc.lengths[k]) == length
    np.testing.assert_array_equal(np.asarray(enc.tokens[k]), tokens)
  img = np.asarray(sharded.decode(enc.tokens, enc.lengths))
  assert img.shape == (len(ids), 64, 64, 3)
  np.testing.assert_allclose(img, np.stack([env["recon"][i] for i in ids]), atol=1e-4)
