r"""Dataset-scale adaptive tokenization: images -> variable-length token shards, resumable.

  python -m alit_jax.tokenize_dataset --checkpoint DIR --data SRC --out OUT [--split train] \
      [--criterion l1 --threshold 0.07] [--batch 32] [--shard_size 1024] [--num_heads H] \
      [--coordinator_address HOST:PORT --num_processes P --process_id I]

`--checkpoint` is a pretrained directory (`python -m alit_jax.convert`, `save_pretrained`,
training) or an official PyTorch checkpoint file (`--num_heads` as for `Tokenizer.from_pytorch`).

Sources (`--data`):
  PATH            a folder of image files, read directly: every image below it (recursively,
                  sorted; `alit_jax.data.image_folder.ImageFileSource`), id = path relative to
                  PATH. No build step; for millions of small files prefer building it once.
  folder:PATH     a dataset built by `python -m alit_jax.data.build_folder` (images packed in
                  array_record; id = its `file_name`). A PATH given without `folder:` that holds
                  such a dataset is recognised too.
  NAME            a TFDS dataset prepared as array_record under `--data_dir` (`imagenet2012`,
                  `--split validation`, ...); `synthetic:...` procedural images.

Work split. The source's N records are cut into S = ceil(N / K) shards of K consecutive records
(`--shard_size`). Process p of P handles shards p, p + P, ... Its records are read through grain
(threads, or `--worker_count` processes), decoded, resized (shorter side, bicubic) and center
cropped to the model's resolution (the evaluation transform), then encoded in batches of
`--batch` (per process) split over the process's local devices (`Tokenizer(mesh=local_mesh())`)
with early exit per batch: a batch stops iterating once all its images meet the criterion.
Batches never straddle shards, so a shard's batches are the same in every run.

Output (OUT must be on a filesystem all processes share):
  OUT/job.json                      the job's identity (checkpoint hash, config, data, criterion)
  OUT/shards/tokens-SSSSS-of-TTTTT.array_record   one file per shard, records in source order
  OUT/shards/tokens-SSSSS-of-TTTTT.json           the shard's counts, histogram, bad images
  OUT/manifest.json                 written once every shard is committed (see `build_manifest`)

Record format: each array_record record is a msgpack map
  {"index": int (position in the source), "id": str, "label": int (-1 if none),
   "length": int (token count L), "tokens": bytes, "scores": bytes}
`tokens` holds L (quantized) or L x D (continuous) little-endian values of the job's
`token_dtype` (int16 when the codebook has at most 32768 entries, else int32; float32 or float16
for continuous latents), `scores` the float32 criterion scores of iterations 1..L/T (the
iterations that chose L; later ones may not have run). `alit_jax.data.token_dataset(OUT)` reads
them back. Bad images (unreadable or undecodable) get no record; the shard JSON and the manifest
list them with their id and the reason.

One writer per OUT: each process holds an advisory lock (`fcntl.flock` on
OUT/.lock-process-<index>, one per process index) for the whole job, so a second run on the same
OUT with the same index refuses at once, naming the holder's pid and host, rather than
recomputing and rewriting the first one's shards. A killed run's lock is released by the kernel.

Commit protocol. A shard is written under a temporary name, renamed into place, then its JSON is
written the same way; a shard counts as done only when both exist. A rerun with the same OUT
checks job.json (a different checkpoint, model, criterion, threshold, data, shard size or token
dtype is refused with the differences listed), skips done shards and recomputes the rest, so
killing any process at any moment loses no committed shard and can never duplicate a record
(shards are keyed by their fixed record range, not by process). At most one shard per process
is recomputed; the process count may change between runs. With the same batch size and
devices per process, a resumed job's output is bit-identical to an uninterrupted one. Another
batch size or device layout can change scores in the last bit; tokens and lengths then only
change if such a difference flips a codebook argmin or a threshold decision (not seen in tests).

With `--coordinator_address`, processes join through `jax.distributed` (same flags as training)
and wait for each other at the end (if one dies, jax's heartbeat ends the others); process 0
logs progress and writes the manifest. Without it, `--num_processes/--process_id` run
independent workers, and the one that finds every shard done writes the manifest.

Modules: `records` (sources, preprocessing, record format, job identity, manifest), `job` (the
job itself), `lock` (the per-process lock), `cli` (the command line); the shard layout and the
commit protocol are `alit_jax.data.shards`', the atomic writes `alit_jax.data.files`'.
"""

from alit_jax.data.files import atomic_write_text
from alit_jax.data.image_folder import ImageFileSource
from alit_jax.data.shards import (
  JOB_FILE,
  MANIFEST_FILE,
  SHARD_DIR,
  Log,
  check_or_write_job,
  clean_tmp,
  identity_diff,
  params_sha256,
  shard_done,
  shard_name,
  source_fingerprint,
  write_shard,
)
from alit_jax.tokenize_dataset.cli import main, parse_args
from alit_jax.tokenize_dataset.job import DIE_ENV, Result, tokenize_dataset
from alit_jax.tokenize_dataset.lock import LOCK_PREFIX, OutputLock, OutputLockedError
from alit_jax.tokenize_dataset.records import (
  FORMAT,
  Prepare,
  build_manifest,
  encode_record,
  holds_built_dataset,
  job_identity,
  open_source,
  token_dtype_for,
)

__all__ = [
  "DIE_ENV",
  "FORMAT",
  "JOB_FILE",
  "LOCK_PREFIX",
  "MANIFEST_FILE",
  "SHARD_DIR",
  "ImageFileSource",
  "Log",
  "OutputLock",
  "OutputLockedError",
  "Prepare",
  "Result",
  "atomic_write_text",
  "build_manifest",
  "check_or_write_job",
  "clean_tmp",
  "encode_record",
  "holds_built_dataset",
  "identity_diff",
  "job_identity",
  "main",
  "open_source",
  "params_sha256",
  "parse_args",
  "shard_done",
  "shard_name",
  "source_fingerprint",
  "token_dtype_for",
  "tokenize_dataset",
  "write_shard",
]
