"""The fleet's batch job: one input over many engines, each block of output
committed exactly once (`run_job`).

The story of one job:

1. The input is read as in the single-process job (frontends/batch/: the same
   `parse_line`, ids, defaults, seeds and error records): JSONL through its grain
   source, Parquet through Ray Data (`ray.data.read_parquet`, any filesystem Ray
   Data reads). Non-blank lines are cut into blocks of `block_size` in input order.
2. The driver routes each request (frontends/fleet/routing.py) over what it knows
   of each engine: requests in flight against its batch, and its KV-cache
   utilization (each worker's `load()`, refreshed without waiting for it). Ray
   Data's own actor pool hands whole blocks to whichever actor is idle and cannot
   route a request, so the driver does it. Requests go out in calls of at most
   `chunk`; an actor gone for good (restarts used up) has its requests rerouted.
3. Exactly once: each finished block is committed whole through the output's
   block journal (frontends/batch/blocks.py) under its deterministic name. A rerun
   skips committed blocks; only blocks never committed run again. When every block
   is committed the output is assembled from them in input order, with the summary
   beside it, `OUTPUT.summary.json`.

Request ids inside an engine are the worker's own; the driver matches records by
input line, so a retried call cannot produce a second record for a line.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from ridgeline import util
from ridgeline.frontends.batch.blocks import BlockJournal, block_name
from ridgeline.frontends.batch.journal import summary_path
from ridgeline.frontends.batch.records import (
    Item, JsonlSource, error_record, parse_line, record_view)
from ridgeline.frontends.fleet.pool import Fleet
from ridgeline.frontends.fleet.routing import EngineLoad, PrefixAffinity, prefix_blocks


@dataclasses.dataclass(frozen=True)
class FleetJob:
  """One batch job over a fleet.

  input: a JSONL file (frontends/batch/'s lines) or a Parquet file or directory
    (`.parquet`, or input_format="parquet"): a row's columns are a line's fields.
  default_sampling / seed: as batch.BatchJob.
  block_size: input lines per committed output block; a rerun must keep it.
  max_in_flight: most requests in flight per engine (default 4 x its max_batch).
  chunk: most requests sent to one engine in one call.
  """

  input: str
  output: str
  default_sampling: dict = dataclasses.field(default_factory=dict)
  seed: int = 0
  block_size: int = 64
  max_in_flight: int | None = None
  chunk: int = 8
  input_format: str | None = None
  progress: bool = True
  fsync: bool = True


def _parquet_rows(path: str) -> Iterator[tuple[int, bytes]]:
  """(row number, the row as a JSON line) through Ray Data, in file order."""
  import ray
  if ray.available_resources().get("CPU", 0) < 1:
    raise RuntimeError(
        f"{path}: reading Parquet through Ray Data needs a free CPU in the cluster, and the "
        "fleet's actors reserve them all; build the Fleet with fewer workers or a smaller "
        "num_cpus per worker")
  ctx = ray.data.DataContext.get_current()
  ctx.execution_options.preserve_order = True
  for number, row in enumerate(ray.data.read_parquet(path).iter_rows(), 1):
    yield number, json.dumps(_drop_nulls(row), default=util.json_default).encode()


def _drop_nulls(x):
  """Parquet fills absent struct fields and columns with nulls; a null is 'not given'."""
  if isinstance(x, dict):
    return {k: _drop_nulls(v) for k, v in x.items() if v is not None}
  if hasattr(x, "tolist"):
    return _drop_nulls(x.tolist())
  if isinstance(x, (list, tuple)):
    return [_drop_nulls(v) for v in x]
  return x


def _items(job: FleetJob) -> Iterator[Item]:
  fmt = job.input_format or ("parquet" if job.input.endswith(".parquet") or
                             os.path.isdir(job.input) else "jsonl")
  if fmt == "jsonl":
    lines = JsonlSource(job.input)
    source: Iterable[tuple[int, bytes]] = (lines[i] for i in range(len(lines)))
  elif fmt == "parquet":
    source = _parquet_rows(job.input)
  else:
    raise ValueError(f"input_format must be 'jsonl' or 'parquet', got {fmt!r}")
  seen: dict[str, int] = {}
  for line, raw in source:
    item = parse_line(line, raw, job.default_sampling, job.seed)
    if item.key is not None and seen.get(item.key, item.line) != item.line:
      item = Item(item.line, None, error=(
          f"line {item.line}: duplicate id {item.id!r} (first on line {seen[item.key]})"))
    elif item.key is not None:
      seen[item.key] = item.line
    yield item


def _blocks(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
  block = []
  for item in items:
    block.append(item)
    if len(block) == size:
      yield block
      block = []
  if block:
    yield block


def run_job(fleet: Fleet, job: FleetJob, router=None,
            on_progress: Callable[[dict], None] | None = None) -> dict:
  """Runs (or resumes) `job` on `fleet`; returns its summary (also written to
  OUTPUT.summary.json). `router`: a routing policy (default PrefixAffinity).
  `on_progress(stats)`: called after each answered call (tests kill workers there).
  """
  return _JobRun(fleet, job, router if router is not None else PrefixAffinity(),
                 on_progress).run()


class _JobRun:
  """One run of a job: the blocks read and not yet committed, the requests queued
  for routing and in flight, and the counts its summary reports."""

  def __init__(self, fleet: Fleet, job: FleetJob, router,
               on_progress: Callable[[dict], None] | None):
    from tqdm import tqdm
    self.fleet, self.job, self.router, self.on_progress = fleet, job, router, on_progress
    self.n = n = len(fleet.workers)
    # Past its batch an engine queues; that queue lets a prefix wait for its engine
    # instead of spilling the moment the engine's batch is full.
    self.cap = job.max_in_flight or 4 * fleet.max_batch
    self.journal = BlockJournal(job.output, job.input, job.block_size, job.fsync)
    if os.path.exists(summary_path(job.output)):
      os.remove(summary_path(job.output))  # it marks a complete output; not yet
    self.t0 = time.perf_counter()
    start = fleet.loads()
    self.base = {k: (s["pid"], s["prefix_queries"], s["prefix_hits"])
                 for k, s in enumerate(start)}
    self.pids = [{s["pid"]} for s in start]
    self.kv = [s["kv_utilization"] for s in start]
    self.assigned = [0] * n  # in flight per worker
    self.sent = [0] * n  # over the job
    self.outstanding: dict[Any, tuple[int, list[Item]]] = {}  # call -> (worker, items)
    self.buffers: list[list[Item]] = [[] for _ in range(n)]  # routed, not yet sent
    self.blocks: dict[str, dict] = {}  # name -> {"left", "records"}, not yet committed
    self.order: list[str] = []  # every block's name, in input order
    self.queue: collections.deque[tuple[str, Item]] = collections.deque()  # to route
    self.line_block: dict[int, str] = {}  # a routed line's block
    self.source = _blocks(_items(job), job.block_size)
    self.exhausted = False
    self.stats = {"requests": 0, "skipped": 0, "prompt_tokens": 0, "output_tokens": 0,
                  "committed_blocks": 0, "skipped_blocks": 0, "rerouted": 0}
    self.load_ref, self.load_time = None, time.perf_counter()
    self.pbar = tqdm(unit="req", file=sys.stderr, disable=not job.progress,
                     dynamic_ncols=True)

  def run(self) -> dict:
    try:
      while True:
        self.route()
        if not self.outstanding:
          if self.exhausted and not self.queue:
            break
          continue
        self.collect()
        self.refresh_loads()
    except BaseException:
      self.journal.close()  # the committed blocks stay; a rerun takes the lock again
      raise
    finally:
      self.pbar.close()
    wall = time.perf_counter() - self.t0
    try:  # the journal's lock is released whatever fails here (Ray included)
      summary = self.summary(wall)
      self.journal.write_json(summary_path(self.job.output), summary)
    finally:
      self.journal.close()
    return summary

  def take_block(self) -> bool:
    """Pulls the next input block: skipped if committed, else queued for routing."""
    block = next(self.source, None)
    if block is None:
      self.exhausted = True
      return False
    name = block_name(block[0].line, block[-1].line)
    self.order.append(name)
    if name in self.journal.committed:
      self.journal.check(name, block)
      self.stats["skipped"] += len(block)
      self.stats["skipped_blocks"] += 1
      self.pbar.update(len(block))
      return True
    self.blocks[name] = {"left": len(block), "records": {}}
    for item in block:
      if item.error is not None:  # cannot run: its error record needs no engine
        self.finish(name, [error_record(item, item.error)])
      else:
        self.queue.append((name, item))
    return True

  def finish(self, name: str, records: Sequence[dict]) -> None:
    """Records for block `name`; the block is committed with its last one."""
    b, stats = self.blocks[name], self.stats
    for r in records:
      if r["line"] not in b["records"]:  # a record per line, whatever was retried
        b["records"][r["line"]] = r
        b["left"] -= 1
        stats["requests"] += 1
        view = record_view(r)
        stats["prompt_tokens"] += view.get("prompt_tokens") or 0
        stats["output_tokens"] += view.get("completion_tokens") or 0
    self.pbar.update(len(records))
    if b["left"] == 0:
      self.journal.commit(name, [b["records"][k] for k in sorted(b["records"])])
      stats["committed_blocks"] += 1
      del self.blocks[name]

  def loads(self) -> list[EngineLoad]:
    return [EngineLoad(self.assigned[i], self.cap, self.fleet.max_batch, self.kv[i])
            for i in range(self.n)]

  def route(self) -> None:
    """Routes as many queued requests as the engines have room for, and sends them."""
    page_size = self.fleet.spec.config.page_size
    while True:
      while not self.exhausted and len(self.queue) < self.cap * self.n:
        self.take_block()
      if not self.queue:
        break
      name, item = self.queue[0]
      i = self.router.choose(prefix_blocks(item.prompt, page_size), self.loads())
      if i is None:
        break
      self.queue.popleft()
      self.line_block[item.line] = name
      self.buffers[i].append(item)
      self.assigned[i] += 1
      self.sent[i] += 1
      if len(self.buffers[i]) >= self.job.chunk:
        self.send(i)
    for i in range(self.n):
      if self.buffers[i]:
        self.send(i)

  def send(self, i: int) -> None:
    items = self.buffers[i]
    self.buffers[i] = []
    self.outstanding[self.fleet.workers[i].run.remote(items)] = (i, items)

  def collect(self) -> None:
    """Takes the answers of calls that are done (waiting up to half a second)."""
    import ray
    ready, _ = ray.wait(list(self.outstanding), num_returns=1, timeout=0.5)
    for ref in ready:
      i, items = self.outstanding.pop(ref)
      self.assigned[i] -= len(items)
      try:
        records = ray.get(ref)
      except ray.exceptions.RayActorError:
        # The actor is gone for good (restarts used up): others take its requests.
        self.stats["rerouted"] += len(items)
        for item in reversed(items):
          self.queue.appendleft((self.line_block[item.line], item))
        self.kv[i] = 1.0
        self.assigned[i] = self.cap  # never chosen again
        continue
      by_block = collections.defaultdict(list)
      for r in records:
        by_block[self.line_block.pop(r["line"])].append(r)
      for name, rs in by_block.items():
        self.finish(name, rs)
      if self.on_progress is not None:
        self.on_progress({"requests": self.stats["requests"], "sent": list(self.sent),
                          "committed_blocks": self.stats["committed_blocks"]})

  def refresh_loads(self) -> None:
    """Refreshes the engines' own view of their load, without waiting for it."""
    import ray
    now = time.perf_counter()
    if self.load_ref is None and now - self.load_time > 0.25:
      self.load_ref = [w.load.remote() for w in self.fleet.workers]
    if self.load_ref is not None:
      done, _ = ray.wait(self.load_ref, num_returns=len(self.load_ref), timeout=0)
      if len(done) == len(self.load_ref):
        try:
          for k, s in enumerate(ray.get(self.load_ref)):
            self.kv[k] = s["kv_utilization"]
            self.pids[k].add(s["pid"])
        except ray.exceptions.RayActorError:
          pass
        self.load_ref, self.load_time = None, now

  def summary(self, wall: float) -> dict:
    """The output assembled from its blocks, and what the run adds up to."""
    final = self.fleet.loads()
    queries = hits = 0.0
    for k, s in enumerate(final):
      self.pids[k].add(s["pid"])
      pid0, q0, h0 = self.base[k]
      same = s["pid"] == pid0  # a restarted engine's counters start again at 0
      queries += s["prefix_queries"] - (q0 if same else 0)
      hits += s["prefix_hits"] - (h0 if same else 0)
    job, stats, router = self.job, self.stats, self.router
    tally = self.journal.assemble(self.order, job.output)
    summary = {"input": job.input, "output": job.output, "complete": True, **tally.as_dict(),
               "run": {**stats, "wall_time_s": round(wall, 3),
                       "output_tokens_per_s": stats["output_tokens"] / wall if wall else 0.0,
                       "workers": self.n,
                       "routing": getattr(router, "name", type(router).__name__),
                       "requests_per_worker": self.sent,
                       "worker_restarts": sum(len(p) - 1 for p in self.pids)},
               "engine": {"prefix_cache": {
                   "queried_tokens": int(queries), "hit_tokens": int(hits),
                   "hit_rate": hits / queries if queries else 0.0}}}
    if hasattr(router, "stats"):
      summary["run"]["router"] = router.stats()
    return summary
