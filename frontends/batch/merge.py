"""Outputs in input order: a process's output rewritten once its job ends, and the
parts of a multi-process job merged into one output with one summary.

Both commit through the output's journal (frontends/batch/journal.py): under its
lock, the new file written beside the old one and renamed over it, so a reader
sees the old output or the new one, never half of either; merging twice, or in
two processes at once, is safe.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from ridgeline.frontends.batch.journal import (
    Journal, JobLock, Tally, iter_lines, part_path, read_json, summary_path)
from ridgeline.frontends.batch.records import (
    encode_record, openai_error_record, parse_record, record_view)


def rewrite_in_input_order(sources: Sequence[str], dest: str, journal: Journal) -> Tally:
  """Writes the records of `sources` to `dest` in input-line order, committed
  through `journal` (which holds dest's lock).

  An id seen on an earlier line turns a later record into a duplicate-id error
  (a single process already does this for its own shard; parts need it across
  shards). Does nothing when `dest` is the only source and already in order.
  """
  index = []  # (line, source, offset, length), in file order
  slim = {}  # line -> what the summary and the id check need
  for s, path in enumerate(sources):
    for offset, raw in iter_lines(path):
      record = parse_record(raw)
      if record is None:
        raise ValueError(f"{path}: unreadable record at byte {offset}; rerun the job "
                         "for that part to repair it")
      if record["line"] in slim:
        continue
      view = record_view(record)
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
        fixes[line] = (openai_error_record(line, None, message, "duplicate_custom_id")
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
    with journal.replace(dest) as out:
      for line, s, offset, length in in_order:
        out.write(encode_record(fixes[line]) if line in fixes
                  else os.pread(fds[s], length, offset))
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
  with JobLock(output, blocking=True) as journal:
    part_summaries = [read_json(summary_path(p)) or {} for p in parts]
    tally = rewrite_in_input_order(parts, output, journal)
    summary = _merged_summary(output, process_count, part_summaries, tally)
    journal.write_json(summary_path(output), summary)
  return summary


def _merged_summary(output: str, process_count: int, part_summaries: list[dict],
                    tally: Tally) -> dict:
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
  return summary
