"""The exactly-once journal: one lock and two kinds of commit, for every writer of
an output.

Three writers need an output written exactly once: the batch job's `ResultWriter`
(records appended as they finish), the merge of a multi-process job's parts
(frontends/batch/merge.py) and the fleet's block journal (frontends/batch/blocks.py,
blocks committed whole). Each takes a `Journal`, the one place that holds an
output's lock and knows how a write becomes durable:

- the lock: an flock on a file that is never replaced or deleted (the output itself
  is replaced atomically when it is rewritten in input order, so a lock on it would
  not survive that, except for an append-only file such as ResultWriter's), taken
  before anything is deleted or written, held to the last write; the kernel drops it
  when the process dies. With the lock held, temporaries of commits killed before
  their rename are removed: nobody else can be writing them.
- `replace(path)`: a file written beside `path`, fsynced and renamed over it, then
  its directory fsynced: there whole, or not at all.
- `append(fd, data)`: one write and one fsync at the end of an append-only file; a
  write that fails is truncated away, and a tail torn by a kill is cut by the
  reader on its next open (`ResultWriter` does, keeping every complete record).

Also here: what an output's records add up to (`Tally`), and reading them back.
"""

from __future__ import annotations

import array
import collections
import contextlib
import fcntl
import glob
import json
import math
import os
from typing import Iterable, Iterator, Sequence

import numpy as np

from ridgeline import util
from ridgeline.frontends.batch.records import (
    encode_record, id_digest, parse_record, record_view)


def part_path(output: str, index: int, count: int) -> str:
  return f"{output}.part-{index:05d}-of-{count:05d}"


def summary_path(output: str) -> str:
  return output + ".summary.json"


class LockedError(RuntimeError):
  """Another job holds the output: this one must not write it."""


class Journal:
  """The exclusive right to write one output, and the commits made under it (the
  module's docstring tells how each is whole or absent).

  lock_path: the file locked (created if absent). busy: what a second writer is
  told (`busy_message` may add who holds it). blocking: wait for the lock instead
  of failing at once. stale: glob patterns of temporaries to remove once locked.
  """

  records_holder = False  # write this process's pid into the lock file

  def __init__(self, lock_path: str, busy: str, *, blocking: bool = False,
               stale: Sequence[str] = ()):
    self.lock_path = lock_path
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    self._fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
      holder = (os.pread(self._fd, 64, 0).decode(errors="replace").strip()
                if self.records_holder else "")
      os.close(self._fd)
      self._fd = None
      raise LockedError(self.busy_message(busy, holder)) from None
    if self.records_holder:
      os.ftruncate(self._fd, 0)
      os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
    for pattern in stale:
      for path in glob.glob(pattern):
        os.remove(path)

  def busy_message(self, busy: str, holder: str) -> str:
    del holder
    return busy

  @contextlib.contextmanager
  def replace(self, path: str, mode: str = "wb", fsync: bool = True) -> Iterator:
    """A file to write `path` through, committed when the block ends."""
    with util.atomic_write(path, mode, fsync=fsync) as f:
      yield f
    if fsync:  # the rename, durable too
      fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)

  def write_json(self, path: str, obj) -> None:
    with self.replace(path, "w") as f:
      f.write(json.dumps(obj, indent=2, default=util.json_default) + "\n")

  @staticmethod
  def append(fd: int, data: bytes, fsync: bool = True) -> None:
    """Appends `data` with one write and one fsync: all of it, or (after a crash) a
    tail that the next open truncates."""
    start = os.fstat(fd).st_size
    try:
      view = memoryview(data)
      while view:
        view = view[os.write(fd, view):]
      if fsync:
        os.fsync(fd)
    except BaseException:
      os.ftruncate(fd, start)  # never leave a torn line in the middle
      raise

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  close = release

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


class JobLock(Journal):
  """The exclusive right to write one output (and its summary, parts and merge):
  the journal on `OUTPUT.lock`, which names the process holding it."""

  records_holder = True

  def __init__(self, output: str, blocking: bool = False):
    self.output = output
    super().__init__(output + ".lock", f"another job is writing {output}", blocking=blocking)
    self.path = self.lock_path

  def busy_message(self, busy: str, holder: str) -> str:
    return (f"{busy} (lock {self.lock_path} held" + (f" by pid {holder}" if holder else "")
            + "); wait for it to finish or stop it (overwriting does not override the lock)")

  def remove_outputs(self) -> None:
    """Overwriting: the output, its summary and stale temporaries."""
    path = self.output
    for f in [path, summary_path(path), *glob.glob(glob.escape(path) + ".tmp-*")]:
      if os.path.exists(f):
        os.remove(f)


class Tally:
  """What the records of an output add up to."""

  def __init__(self):
    self.requests = self.errors = self.prompt_tokens = self.output_tokens = 0
    self.scored_lines = self.scored_tokens = 0
    self.prompt_logprob = 0.0
    self.finish_reasons = collections.Counter()
    self.latency = {k: array.array("d") for k in ("queue_s", "ttft_s", "tpot_s", "e2e_s")}

  def add(self, record: dict) -> None:
    record = record_view(record)
    self.requests += 1
    self.finish_reasons[record.get("finish_reason")] += 1
    if record.get("finish_reason") == "error":
      self.errors += 1
      return
    self.prompt_tokens += record.get("prompt_tokens") or 0
    self.output_tokens += record.get("completion_tokens") or 0
    if record.get("prompt_scored_tokens") is not None:
      self.scored_lines += 1
      self.scored_tokens += record["prompt_scored_tokens"]
      self.prompt_logprob += record["prompt_logprob"]
    for k, v in (record.get("metrics") or {}).items():
      if k in self.latency and v is not None:
        self.latency[k].append(v)

  def as_dict(self) -> dict:
    out = {"requests": self.requests, "ok": self.requests - self.errors,
           "errors": self.errors, "prompt_tokens": self.prompt_tokens,
           "output_tokens": self.output_tokens,
           "finish_reasons": dict(sorted((str(k), v) for k, v in self.finish_reasons.items()))}
    for k, values in self.latency.items():
      out[k] = util.percentiles(values)
    if self.scored_lines:
      # The file's perplexity, once every line's prompt was scored: exp of the
      # negative mean log-probability over all scored tokens.
      out["scored"] = {"lines": self.scored_lines, "tokens": self.scored_tokens,
                       "prompt_logprob": self.prompt_logprob}
      if self.scored_lines == self.requests - self.errors and self.scored_tokens:
        out["perplexity"] = math.exp(-self.prompt_logprob / self.scored_tokens)
    return out


def iter_lines(path: str) -> Iterable[tuple[int, bytes]]:
  """(offset, line) for each line of a file, the last one possibly unterminated."""
  offset = 0
  with open(path, "rb") as f:
    for raw in f:
      yield offset, raw
      offset += len(raw)


class ResultWriter:
  """Append-only JSONL output that survives being killed at any instant.

  Holds an exclusive lock on the file (its Journal's: a second job on the same
  output fails fast). On open, keeps the longest prefix of complete, parseable
  records and truncates the rest; `done` maps each kept record's line number to
  its id's digest.
  """

  def __init__(self, path: str, fsync: bool = True):
    self.path = path
    self.fsync = fsync
    # The lock is on the output itself: it is only appended to while held (the
    # rewrite in input order comes after `close`, under the job's JobLock).
    self.journal = Journal(path, f"another job is writing {path}",
                           stale=[glob.escape(path) + ".tmp-*"])
    self._fd = os.open(path, os.O_RDWR | os.O_APPEND)
    self.done: dict[int, int] = {}
    self.tally = Tally()
    self.truncated_bytes = 0
    self._recover()

  def _recover(self) -> None:
    size = os.fstat(self._fd).st_size
    good = 0
    for offset, raw in iter_lines(self.path):
      record = parse_record(raw)
      if record is None or record["line"] in self.done:
        break
      self.done[record["line"]] = id_digest(record_view(record).get("id"))
      self.tally.add(record)
      good = offset + len(raw)
    if good < size:
      os.ftruncate(self._fd, good)
      os.fsync(self._fd)
      self.truncated_bytes = size - good

  def append(self, records: Sequence[dict]) -> None:
    """Writes records with one write and one fsync (Journal.append)."""
    if not records:
      return
    self.journal.append(self._fd, b"".join(encode_record(r) for r in records), self.fsync)
    for r in records:
      self.done[r["line"]] = id_digest(record_view(r).get("id"))
      self.tally.add(r)

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None
    self.journal.release()


class FollowerWriter:
  """What a non-writing process of a lockstep job keeps: the same `done` and tally
  as process 0's ResultWriter, and no file."""

  def __init__(self, path: str):
    self.path = path
    self.done: dict[int, int] = {}
    self.tally = Tally()
    self.truncated_bytes = 0

  def append(self, records: Sequence[dict]) -> None:
    for r in records:
      self.done[r["line"]] = id_digest(record_view(r).get("id"))
      self.tally.add(r)

  def close(self) -> None:
    pass


def agree_on_done(writer) -> None:
  """Lockstep: every process takes process 0's view of what is already written,
  so all of them skip the same lines and submit the same requests."""
  from jax.experimental import multihost_utils
  lines = np.asarray(sorted(writer.done), np.int32)
  n = int(multihost_utils.broadcast_one_to_all(np.asarray([len(lines)], np.int32))[0])
  if len(lines) != n:
    lines = np.zeros(n, np.int32)
  digests = np.asarray([writer.done.get(int(x), -1) for x in lines], np.int32)
  lines, digests = multihost_utils.broadcast_one_to_all((lines, digests))
  writer.done = {int(a): int(b) for a, b in zip(lines, digests)}


def read_records(path: str) -> list[dict]:
  """Every complete record of an output file, in file order."""
  return [r for r in (parse_record(raw) for _, raw in iter_lines(path)) if r is not None]


def read_json(path: str) -> dict | None:
  """A JSON file (a summary, a manifest), or None when absent or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None
