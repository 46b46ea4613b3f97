"""One writer per output folder and process index: an advisory `fcntl.flock`."""

from __future__ import annotations

import json
import os
import pathlib
import time

LOCK_PREFIX = ".lock-process-"


class OutputLockedError(RuntimeError):
  """OUT is being written by another run with the same process index (the message names it)."""


def read_holder(fd: int, attempts: int = 20) -> str:
  """The holder's record, waiting briefly for a holder that locked but has not written yet."""
  for _ in range(attempts):
    raw = os.pread(fd, 4096, 0)
    try:
      h = json.loads(raw)
      return f"pid {h['pid']} on host {h['host']}, since {h['since']}"
    except (ValueError, KeyError, TypeError):
      time.sleep(0.05)
  return "a process that has not recorded its pid and host yet"


class OutputLock:
  """An advisory `fcntl.flock` on OUT/.lock-process-<index>, held while this process writes OUT.

  The file records the holder's pid, host and start time. A second run with the same process
  index refuses at once (`OutputLockedError`, naming the holder) instead of recomputing and
  rewriting the first one's shards. The kernel drops a flock when its holder dies, so a lock
  left by a killed run never blocks a rerun. Use as a context manager.
  """

  def __init__(self, out: pathlib.Path, process_index: int):
    import fcntl
    import socket

    self.path = pathlib.Path(out) / f"{LOCK_PREFIX}{process_index}"
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = read_holder(fd)
      os.close(fd)
      raise OutputLockedError(
        f"{out} is being written by another run ({holder}; process index {process_index}); "
        "wait for it to finish, or use another --out"
      ) from None
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    self._fd: int | None = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the only descriptor drops the flock
      self._fd = None

  def __enter__(self) -> OutputLock:
    return self

  def __exit__(self, *exc) -> None:
    self.release()
