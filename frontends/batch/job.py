"""The job itself: input lines through `Engine.iterate`, records into the journal."""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import time
from typing import Iterator

import grain

from ridgeline.engine.engine import GenerationRequest
from ridgeline.frontends import openai_format as oaf

from ridgeline.frontends.batch.records import (
    Item, error_record, id_digest, record_view, result_record, make_dataset)
from ridgeline.frontends.batch.journal import (
    JobLock, ResultWriter, FollowerWriter, agree_on_done, read_json, part_path, summary_path)
from ridgeline.frontends.batch.merge import merge_parts, rewrite_in_input_order
from ridgeline.frontends.batch.report import engine_counts


@dataclasses.dataclass(frozen=True)
class BatchJob:
  """One batch-generation job (or one process's share of it).

  default_sampling: SamplingParams fields for every line; a line's `sampling`
    object (or OpenAI `body`) overrides them.
  seed: the job seed; lines without a seed get one derived from it and their id.
  process_index / process_count: this process's shard; with process_count > 1 the
    output goes to `part_path(output, index, count)`.
  max_in_flight: most requests queued or running at once (default 4 x max_batch).
  auto_merge: after a process finishes its part, merge all parts into `output`
    if every part is complete.
  overwrite: delete this process's output and summary (and, for process 0 of a
    sharded job, the merged output) before starting, after taking the lock.
  lockstep: the engine is one program over several JAX processes (jax.distributed,
    a mesh spanning them), so every process must submit the same requests: the
    input is not sharded, all processes read every line, and only process 0
    writes `output` (the others learn what is already done from it).
  """

  input: str
  output: str
  default_sampling: dict = dataclasses.field(default_factory=dict)
  seed: int = 0
  process_index: int = 0
  process_count: int = 1
  max_in_flight: int | None = None
  token_ids: bool = True
  fsync: bool = True
  progress: bool = True
  auto_merge: bool = True
  lockstep: bool = False
  overwrite: bool = False

  @property
  def path(self) -> str:
    """Where this process writes."""
    if self.process_count == 1 or self.lockstep:
      return self.output
    return part_path(self.output, self.process_index, self.process_count)


def run_batch(engine, job: BatchJob, load_time_s: float | None = None,
              lock: JobLock | None = None) -> dict:
  """Runs (or resumes) the job on `engine`; returns its summary.

  The summary's "errors" counts every error record of this process's output
  (earlier runs included); "merged" holds the merged summary when this call
  merged the parts.

  The output's JobLock is taken first (or `lock`, already taken by the caller,
  e.g. before loading a model) and held to the last write, so two jobs never
  both write one output, with or without `overwrite`; the second raises
  LockedError having touched nothing.
  """
  if not 0 <= job.process_index < job.process_count:
    raise ValueError(f"process_index {job.process_index} not in [0, {job.process_count})")
  if job.lockstep and job.process_count > 1:
    raise ValueError("a lockstep job reads the whole input in every process; "
                     "it cannot also be sharded (process_count > 1)")
  leader = True
  if job.lockstep:
    import jax
    leader = jax.process_index() == 0
  if not leader:
    return _run_locked(engine, job, load_time_s, None)
  own = lock is None
  lock = lock or JobLock(job.path)
  try:
    if job.overwrite:
      lock.remove_outputs()
      if job.process_count > 1 and job.process_index == 0:
        with JobLock(job.output) as merged:  # the merged output, under its own lock
          merged.remove_outputs()
    return _run_locked(engine, job, load_time_s, lock)
  finally:
    if own:
      lock.release()


def _run_locked(engine, job: BatchJob, load_time_s: float | None,
                lock: JobLock | None) -> dict:
  """The job under `lock` (None: a lockstep follower, which writes nothing)."""
  path = job.path
  leader = lock is not None
  shard = grain.sharding.ShardOptions(job.process_index, job.process_count)
  ds = make_dataset(job.input, job.default_sampling, job.seed, shard)
  previous = None
  if leader:
    previous = read_json(summary_path(path))
    if os.path.exists(summary_path(path)):
      os.remove(summary_path(path))  # it marks a complete part; this one is not yet
  writer = ResultWriter(path, fsync=job.fsync) if leader else FollowerWriter(path)
  try:
    if job.lockstep:
      agree_on_done(writer)
    stats = _feed(engine, dataclasses.replace(job, progress=job.progress and leader), ds,
                  writer)
  finally:
    writer.close()
  if not leader:
    return {"output": path, "complete": True, "writer": False, **writer.tally.as_dict(),
            "run": stats}
  rewrite_in_input_order([path], path, lock)
  summary = {"input": job.input, "output": path,
             "process_index": job.process_index, "process_count": job.process_count,
             "complete": True, **writer.tally.as_dict(), "run": stats}
  if load_time_s is not None:
    summary["run"]["load_time_s"] = round(load_time_s, 3)
  summary["run"]["truncated_bytes"] = writer.truncated_bytes
  summary["engine"] = engine.metrics.snapshot()  # since the engine was built
  if stats["requests"] == 0 and previous and previous.get("run", {}).get("requests"):
    # Nothing was left to do: keep the figures of the run that did the work.
    summary["run"] = dict(previous["run"], skipped=stats["skipped"], rerun_noop=True)
    if "engine" in previous:
      summary["engine"] = previous["engine"]
  lock.write_json(summary_path(path), summary)
  if job.process_count > 1 and job.auto_merge:
    parts = [part_path(job.output, i, job.process_count) for i in range(job.process_count)]
    if all(os.path.exists(summary_path(p)) for p in parts):
      summary["merged"] = merge_parts(job.output, job.process_count)
  return summary


def _feed(engine, job: BatchJob, ds: grain.MapDataset, writer: ResultWriter) -> dict:
  """The loop: input lines go through `Engine.iterate` (at most max_in_flight at a
  time); each result is written as it ends. Lines already done, duplicates and
  lines that do not parse never reach the engine."""
  from tqdm import tqdm  # progress only; keeps the module importable without it
  cap = job.max_in_flight or 4 * engine.config.max_batch
  total = len(ds)
  items = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
  seen: dict[str, int] = {}  # id -> first line with it, over this shard
  live: dict[str, Item] = {}
  tally = collections.Counter()
  metrics = engine.metrics
  batches0 = metrics.sample_count("decode_batch_size")
  loads0 = metrics.sample_count("kv_cache_utilization")
  counts0 = engine_counts(engine)
  tokens0 = metrics.registry.get_sample_value("ridgeline_generation_tokens_total") or 0.0
  token_text = oaf.TokenText(getattr(engine, "tokenizer", None))
  model_name = getattr(getattr(engine, "model_config", None), "name", None) or "ridgeline"
  pbar = tqdm(total=total, initial=len(writer.done), unit="req", file=sys.stderr,
              disable=not job.progress, dynamic_ncols=True, smoothing=0.1)
  t0 = last_refresh = time.perf_counter()

  def finish(records: list[dict]) -> None:
    writer.append(records)
    for r in records:
      tally["completed"] += 1
      view = record_view(r)
      tally["prompt_tokens"] += view.get("prompt_tokens", 0)
      tally["output_tokens"] += view.get("completion_tokens", 0)
    pbar.update(len(records))

  def requests() -> Iterator[GenerationRequest]:
    for item in items:
      if item.key is not None and seen.get(item.key, item.line) != item.line:
        item = Item(item.line, None, api=item.api, error_code="duplicate_custom_id", error=(
            f"line {item.line}: duplicate id {item.id!r} (first on line {seen[item.key]})"))
      elif item.key is not None:
        seen[item.key] = item.line
      if item.line in writer.done:
        if writer.done[item.line] != id_digest(item.id):
          raise RuntimeError(
              f"{writer.path} has a record for line {item.line} with another id than "
              f"the input's {item.id!r}: the output belongs to a different input file")
        tally["skipped"] += 1
        continue
      if item.error is not None:
        finish([error_record(item, item.error)])
        continue
      rid = str(item.line)
      live[rid] = item
      yield GenerationRequest(item.prompt, item.params, rid)

  try:
    # Not streamed: a line's text is decoded once, when it finishes (the tokens
    # generated so far, for the progress bar, are the engine's counter).
    for out in engine.iterate(requests(), max_live=cap):
      now = time.perf_counter()
      if job.progress and now - last_refresh > 0.5:
        last_refresh = now
        tokens = metrics.registry.get_sample_value("ridgeline_generation_tokens_total")
        pbar.set_postfix_str(
            f"{(tokens - tokens0) / (now - t0):.1f} tok/s, batch "
            f"{engine.scheduler.last_decode_batch}, kv {engine.kv_utilization():.0%}",
            refresh=True)
      # One result (finished, or refused by the engine's checks) per request.
      finish([result_record(live.pop(out.request_id), out, job.token_ids, token_text,
                            model_name)])
  finally:
    pbar.close()
  wall = time.perf_counter() - t0
  counts = engine_counts(engine)
  counts.subtract(counts0)
  batches = metrics.samples("decode_batch_size", batches0)
  loads = metrics.samples("kv_cache_utilization", loads0)
  completed, output_tokens = tally["completed"], tally["output_tokens"]
  return {
      "requests": completed, "skipped": tally["skipped"], "wall_time_s": round(wall, 3),
      "prompt_tokens": tally["prompt_tokens"], "output_tokens": output_tokens,
      "output_tokens_per_s": output_tokens / wall if wall > 0 else 0.0,
      "requests_per_s": completed / wall if wall > 0 else 0.0,
      "steps": len(loads),
      "decode_batch_mean": sum(batches) / len(batches) if batches else 0.0,
      "decode_batch_max": max(batches, default=0),
      "kv_utilization_mean": sum(loads) / len(loads) if loads else 0.0,
      "kv_utilization_max": max(loads, default=0.0),
      # This run's share of the engine's own counters (engine/metrics.py).
      "preemptions": int(counts["preemptions"]),
      "engine_counts": {k: int(v) for k, v in sorted(counts.items())},
  }
