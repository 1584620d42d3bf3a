"""The exactly-once journal: the job's lock, the output file appended to in whole
records (torn tails truncated on restart), the rewrite in input order, and the
merge of a multi-process job's parts.
"""

from __future__ import annotations

import array
import collections
import fcntl
import glob
import json
import math
import os
from typing import Iterable, Sequence

import numpy as np

from ridgeline import util

from ridgeline.frontends.batch.report import _percentiles  # noqa: F401
from ridgeline.frontends.batch.records import (  # noqa: F401
    _dumps, _id_digest, _openai_error_record, _parse_record, _record_view)


_write_json = util.write_json_atomic


def part_path(output: str, index: int, count: int) -> str:
  return f"{output}.part-{index:05d}-of-{count:05d}"


def summary_path(output: str) -> str:
  return output + ".summary.json"


class Tally:
  """What the records of an output add up to."""

  def __init__(self):
    self.requests = self.errors = self.prompt_tokens = self.output_tokens = 0
    self.scored_lines = self.scored_tokens = 0
    self.prompt_logprob = 0.0
    self.finish_reasons = collections.Counter()
    self.latency = {k: array.array("d") for k in ("queue_s", "ttft_s", "tpot_s", "e2e_s")}

  def add(self, record: dict) -> None:
    record = _record_view(record)
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
      out[k] = _percentiles(values)
    if self.scored_lines:
      # The file's perplexity, once every line's prompt was scored: exp of the
      # negative mean log-probability over all scored tokens.
      out["scored"] = {"lines": self.scored_lines, "tokens": self.scored_tokens,
                       "prompt_logprob": self.prompt_logprob}
      if self.scored_lines == self.requests - self.errors and self.scored_tokens:
        out["perplexity"] = math.exp(-self.prompt_logprob / self.scored_tokens)
    return out


def _iter_lines(path: str) -> Iterable[tuple[int, bytes]]:
  """(offset, line) for each line of a file, the last one possibly unterminated."""
  offset = 0
  with open(path, "rb") as f:
    for raw in f:
      yield offset, raw
      offset += len(raw)


class LockedError(RuntimeError):
  """Another job holds the output: this one must not write it."""


class JobLock:
  """The exclusive right to write one output (and its summary, parts and merge).

  An flock on `OUTPUT.lock`, a file that is never replaced or deleted (the output
  itself is replaced atomically when it is rewritten in input order, so a lock on
  it would not survive that). Taken before anything is deleted or written, held
  until the job's last write; the kernel drops it when the process dies.
  """

  def __init__(self, output: str, blocking: bool = False):
    self.path = output + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
      holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip()
      os.close(self._fd)
      self._fd = None
      raise LockedError(f"another job is writing {output} (lock {self.path} held"
                        + (f" by pid {holder}" if holder else "") + "); wait for it to "
                        "finish or stop it (overwriting does not override the lock)") from None
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def _remove_outputs(path: str) -> None:
  """Overwriting: the output, its summary and stale temporaries (lock held)."""
  for f in [path, summary_path(path), *glob.glob(glob.escape(path) + ".tmp-*")]:
    if os.path.exists(f):
      os.remove(f)


class ResultWriter:
  """Append-only JSONL output that survives being killed at any instant.

  Holds an exclusive lock on the file (a second job on the same output fails
  fast). On open, keeps the longest prefix of complete, parseable records and
  truncates the rest; `done` maps each kept record's line number to its id's digest.
  """

  def __init__(self, path: str, fsync: bool = True):
    self.path = path
    self.fsync = fsync
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self._fd)
      raise LockedError(f"another job is writing {path}") from None
    self.done: dict[int, int] = {}
    self.tally = Tally()
    self.truncated_bytes = 0
    for stale in glob.glob(glob.escape(path) + ".tmp-*"):
      os.remove(stale)  # from a rewrite killed before its rename; we hold the lock
    self._recover()

  def _recover(self) -> None:
    size = os.fstat(self._fd).st_size
    good = 0
    for offset, raw in _iter_lines(self.path):
      record = _parse_record(raw)
      if record is None or record["line"] in self.done:
        break
      self.done[record["line"]] = _id_digest(_record_view(record).get("id"))
      self.tally.add(record)
      good = offset + len(raw)
    if good < size:
      os.ftruncate(self._fd, good)
      os.fsync(self._fd)
      self.truncated_bytes = size - good

  def append(self, records: Sequence[dict]) -> None:
    """Writes records with one write and one fsync; all or (after a crash) a tail
    that the next open truncates."""
    if not records:
      return
    data = b"".join(_dumps(r) for r in records)
    start = os.fstat(self._fd).st_size
    try:
      view = memoryview(data)
      while view:
        view = view[os.write(self._fd, view):]
      if self.fsync:
        os.fsync(self._fd)
    except BaseException:
      os.ftruncate(self._fd, start)  # never leave a torn line in the middle
      raise
    for r in records:
      self.done[r["line"]] = _id_digest(_record_view(r).get("id"))
      self.tally.add(r)

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # releases the lock
      self._fd = None


class _FollowerWriter:
  """What a non-writing process of a lockstep job keeps: the same `done` and tally
  as process 0's ResultWriter, and no file."""

  def __init__(self, path: str):
    self.path = path
    self.done: dict[int, int] = {}
    self.tally = Tally()
    self.truncated_bytes = 0

  def append(self, records: Sequence[dict]) -> None:
    for r in records:
      self.done[r["line"]] = _id_digest(_record_view(r).get("id"))
      self.tally.add(r)

  def close(self) -> None:
    pass


def _agree_on_done(writer) -> None:
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
  return [r for r in (_parse_record(raw) for _, raw in _iter_lines(path)) if r is not None]


def _rewrite_in_input_order(sources: Sequence[str], dest: str) -> Tally:
  """Writes the records of `sources` to `dest` in input-line order, atomically.

  An id seen on an earlier line turns a later record into a duplicate-id error
  (a single process already does this for its own shard; parts need it across
  shards). Does nothing when `dest` is the only source and already in order.
  """
  index = []  # (line, source, offset, length), in file order
  slim = {}  # line -> what the summary and the id check need
  for s, path in enumerate(sources):
    for offset, raw in _iter_lines(path):
      record = _parse_record(raw)
      if record is None:
        raise ValueError(f"{path}: unreadable record at byte {offset}; rerun the job "
                         "for that part to repair it")
      if record["line"] in slim:
        continue
      view = _record_view(record)
      slim[record["line"]] = {k: view.get(k) for k in (
          "id", "finish_reason", "prompt_tokens", "completion_tokens", "metrics", "openai")}
      index.append((record["line"], s, offset, len(raw)))
  in_order = sorted(index)
  seen: dict[str, int] = {}
  fixes = {}
  tally = Tally()
  for line, *_ in in_order:
    record = slim[line]
    if record["id"] is not None:
      key = str(record["id"])
      if key in seen:
        message = f"line {line}: duplicate id {record['id']!r} (first on line {seen[key]})"
        fixes[line] = (_openai_error_record(line, None, message, "duplicate_custom_id")
                       if record.get("openai") else
                       {"id": None, "line": line, "finish_reason": "error", "error": message})
        record = {"id": None, "line": line, "finish_reason": "error"}
      else:
        seen[key] = line
    tally.add(record)
  if list(sources) == [dest] and in_order == index and not fixes:
    return tally
  fds = [os.open(p, os.O_RDONLY) for p in sources]
  try:
    with util.atomic_write(dest, "wb") as out:
      for line, s, offset, length in in_order:
        out.write(_dumps(fixes[line]) if line in fixes else os.pread(fds[s], length, offset))
  finally:
    for fd in fds:
      os.close(fd)
  return tally


def merge_parts(output: str, process_count: int) -> dict:
  """Merges the complete parts of a multi-process job into `output`, in input
  order, with a summary beside it; returns that summary. Safe to repeat, and
  safe if two processes merge at once (the output is replaced atomically)."""
  parts = [part_path(output, i, process_count) for i in range(process_count)]
  missing = [p for p in parts if not os.path.exists(summary_path(p))]
  if missing:
    raise FileNotFoundError(f"parts not complete (no summary beside them): {missing}")
  with JobLock(output, blocking=True):
    return _merge_locked(output, process_count, parts)


def _merge_locked(output: str, process_count: int, parts: list[str]) -> dict:
  part_summaries = [_read_json(summary_path(p)) or {} for p in parts]
  tally = _rewrite_in_input_order(parts, output)
  runs = [s.get("run", {}) for s in part_summaries]
  wall = max((r.get("wall_time_s", 0) for r in runs), default=0)
  out_tokens = sum(r.get("output_tokens", 0) for r in runs)
  summary = {"input": part_summaries[0].get("input"), "output": output,
             "process_count": process_count, "complete": True, **tally.as_dict(),
             "run": {"requests": sum(r.get("requests", 0) for r in runs),
                     "skipped": sum(r.get("skipped", 0) for r in runs),
                     "wall_time_s": wall, "output_tokens": out_tokens,
                     "prompt_tokens": sum(r.get("prompt_tokens", 0) for r in runs),
                     "output_tokens_per_s": out_tokens / wall if wall else 0.0,
                     "preemptions": sum(r.get("preemptions", 0) for r in runs),
                     "decode_batch_mean": float(np.mean(
                         [r.get("decode_batch_mean", 0) for r in runs])),
                     "decode_batch_max": max(r.get("decode_batch_max", 0) for r in runs),
                     "kv_utilization_mean": float(np.mean(
                         [r.get("kv_utilization_mean", 0) for r in runs])),
                     "kv_utilization_max": max(r.get("kv_utilization_max", 0) for r in runs)},
             "parts": part_summaries}
  caches = [(s.get("engine") or {}).get("prefix_cache") for s in part_summaries]
  if all(caches):
    queried = sum(c.get("queried_tokens", 0) for c in caches)
    hits = sum(c.get("hit_tokens", 0) for c in caches)
    summary["engine"] = {"prefix_cache": {
        "queried_tokens": queried, "hit_tokens": hits,
        "hit_rate": hits / queried if queried else 0.0,
        "evictions": sum(c.get("evictions", 0) for c in caches)}}
  _write_json(summary_path(output), summary)
  return summary


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


