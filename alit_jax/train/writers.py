"""clu metric writers without TensorFlow: TensorBoard through tensorboardX, plus JSON lines.

`clu.metric_writers` imports its TensorFlow SummaryWriter unconditionally; when TensorFlow is
not installed, a placeholder module is registered first so the rest of clu (writers interface,
`AsyncMultiWriter`, `LoggingWriter`, `periodic_actions.ReportProgress`) imports. Scalars,
images, texts, histograms and hparams then go to TensorBoard event files written by
tensorboardX, and scalars also to `metrics.jsonl` (one JSON object per write, easy to parse).

`metrics.jsonl` is exact across resumes: the trainer flushes (and fsyncs) it at every checkpoint,
and on resume `rewind_jsonl` drops the rows past the restored step before anything new is
written, so the resumed run rewrites them once; the file then holds every step exactly once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys
import types
from collections.abc import Mapping
from typing import Any

import numpy as np


def _install_summary_writer_placeholder() -> None:
  name = "clu.metric_writers.summary_writer"
  if name in sys.modules or importlib.util.find_spec("tensorflow") is not None:
    return
  mod = types.ModuleType(name)

  class SummaryWriter:  # noqa: D401 - placeholder only
    """Unavailable: clu's SummaryWriter needs TensorFlow; use TensorBoardXWriter."""

    def __init__(self, *args, **kwargs):
      raise ImportError("clu's SummaryWriter needs TensorFlow; use TensorBoardXWriter")

  mod.SummaryWriter = SummaryWriter
  sys.modules[name] = mod


_install_summary_writer_placeholder()

from clu import metric_writers, periodic_actions  # noqa: E402
from clu.metric_writers import interface  # noqa: E402

METRICS_FILE = "metrics.jsonl"

__all__ = [
  "METRICS_FILE",
  "JsonlWriter",
  "TensorBoardXWriter",
  "create_writer",
  "metric_writers",
  "periodic_actions",
  "rewind_jsonl",
]


def _scalar(v: Any) -> float:
  return float(np.asarray(v))


class TensorBoardXWriter(interface.MetricWriter):
  """A clu `MetricWriter` writing TensorBoard event files with tensorboardX."""

  def __init__(self, logdir: str | os.PathLike):
    from tensorboardX import SummaryWriter

    self._writer = SummaryWriter(logdir=os.fspath(logdir))

  def write_summaries(self, step, values, metadata=None):
    for key, value in values.items():
      v = np.asarray(value)
      if v.ndim == 0:
        self._writer.add_scalar(key, float(v), step)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for key, value in scalars.items():
      self._writer.add_scalar(key, _scalar(value), step)

  def write_images(self, step: int, images: Mapping[str, Any]):
    for key, value in images.items():
      v = np.asarray(value)
      if v.dtype != np.uint8:
        v = (np.clip(v, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
      if v.ndim == 3:
        self._writer.add_image(key, v, step, dataformats="HWC")
      else:
        self._writer.add_images(key, v, step, dataformats="NHWC")

  def write_videos(self, step, videos):
    del step, videos  # not supported

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate  # not supported

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, value in texts.items():
      self._writer.add_text(key, value, step)

  def write_histograms(self, step, arrays, num_buckets=None):
    for key, value in arrays.items():
      bins = (num_buckets or {}).get(key, "tensorflow")
      self._writer.add_histogram(key, np.asarray(value), step, bins=bins)

  def write_hparams(self, hparams: Mapping[str, Any]):
    text = json.dumps({k: _jsonable(v) for k, v in hparams.items()}, indent=2, sort_keys=True)
    self._writer.add_text("hparams", "```\n" + text + "\n```", 0)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def _jsonable(v: Any) -> Any:
  if isinstance(v, str | int | float | bool) or v is None:
    return v
  if isinstance(v, np.generic | np.ndarray) and np.ndim(v) == 0:
    return v.item()
  if isinstance(v, list | tuple):
    return [_jsonable(x) for x in v]
  return str(v)


class JsonlWriter(interface.MetricWriter):
  """Appends `{"step": s, name: value, ...}` lines to a file for every `write_scalars` call.

  The file is opened (for appending) at the first write, so `rewind_jsonl` may replace it
  between construction and then.
  """

  def __init__(self, path: str | os.PathLike):
    self._path = pathlib.Path(path)
    self._path.parent.mkdir(parents=True, exist_ok=True)
    self._file = None

  def _write_row(self, row: dict) -> None:
    if self._file is None:
      self._file = open(self._path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
    self._file.write(json.dumps(row) + "\n")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step)}
    row.update({k: _scalar(v) for k, v in scalars.items()})
    self._write_row(row)

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._write_row({"hparams": {k: _jsonable(v) for k, v in hparams.items()}})

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def flush(self):
    """Writes the buffered rows through to disk (a crash after this loses none of them)."""
    if self._file is not None and not self._file.closed:
      self._file.flush()
      os.fsync(self._file.fileno())

  def close(self):
    if self._file is not None and not self._file.closed:
      self.flush()
      self._file.close()


def rewind_jsonl(path: str | os.PathLike, step: int) -> bool:
  """Drops the rows of a `JsonlWriter` file past `step` (atomically), for a resume from `step`.

  Rows with `"step" > step` are removed; at `step` 0 (a fresh start) every row is, including the
  hparams row (the run writes it again). A torn last line (a crash mid-write) is dropped too.

  Args:
    path: the metrics.jsonl file (absent: nothing to do).
    step: the restored step.

  Returns:
    True if an hparams row remains.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    return False
  kept, dropped, has_hparams = [], 0, False
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      dropped += 1
      continue
    if step > 0 and (("hparams" in row) or int(row.get("step", 0)) <= step):
      has_hparams |= "hparams" in row
      kept.append(line)
    else:
      dropped += 1
  if dropped:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("".join(x + "\n" for x in kept))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  return has_hparams


def create_writer(workdir: str | os.PathLike, *, enabled: bool = True) -> interface.MetricWriter:
  """Logging + TensorBoard (`WORKDIR/tensorboard`) + `WORKDIR/metrics.jsonl`, asynchronous.

  With `enabled=False` (processes other than 0) the writer discards everything.
  """
  if not enabled:
    return metric_writers.MultiWriter([])
  workdir = pathlib.Path(workdir)
  return metric_writers.AsyncMultiWriter(
    [
      metric_writers.LoggingWriter(),
      TensorBoardXWriter(workdir / "tensorboard"),
      JsonlWriter(workdir / METRICS_FILE),
    ]
  )
