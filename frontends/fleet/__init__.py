"""Ridgeline on Ray: one batch job over many engines, routed by prefix, then by load.

```python
fleet_lib.init_ray()                          # local; init_ray("host:6379") joins a cluster
fleet = fleet_lib.Fleet(fleet_lib.EngineSpec(checkpoint="ckpt/"), num_workers=None)
summary = fleet_lib.run_job(fleet, fleet_lib.FleetJob("in.jsonl", "out.jsonl"))
```

The story of one job:

1. The fleet is a pool of Ray actors, `EngineWorker`, each owning one Engine: one
   per accelerator (`num_gpus=1`, Ray sets CUDA_VISIBLE_DEVICES) or, on CPUs, one
   per `num_cpus` CPUs. An actor that dies is restarted by Ray (`max_restarts`) and
   the calls it had not answered are sent again to the new one (`max_task_retries`),
   so a request running on a dead engine is rerun from its prompt.
2. The input is read as in the single-process job (frontends/batch/: the same
   `parse_line`, ids, defaults, seeds and error records): JSONL through its grain
   source, Parquet through Ray Data (`ray.data.read_parquet`, any filesystem Ray
   Data reads). Non-blank lines are cut into blocks of `block_size` in input order;
   a block is named by its first and last line.
3. The driver routes each request: `PrefixAffinity` sends requests that share a
   prompt prefix to the engine that saw it last, unless that engine is the most
   loaded; otherwise to the engine with the most free capacity, by requests in
   flight against its batch and by its KV-cache utilization (each worker's
   `load()`, read from its engine's metrics). Ray Data's own actor pool
   (`map_batches` with an ActorPoolStrategy) hands whole blocks to whichever
   actor is idle and cannot route a request, so the driver does it.
4. Exactly once: each finished block is written to `OUTPUT.blocks/` under its
   deterministic name, through a temporary file, fsync and rename, so a block is
   either committed whole or absent. A rerun (after the driver was killed, say)
   skips committed blocks; only blocks never committed run again. When every block
   is committed the output is assembled from them in input order (atomically), with
   the summary beside it, `OUTPUT.summary.json`.

Request ids inside an engine are the worker's own; the driver matches records by
input line, so a retried call cannot produce a second record for a line.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import fcntl
import glob
import hashlib
import itertools
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from ridgeline.frontends import batch
from ridgeline import util
from ridgeline.engine.config import EngineConfig

__all__ = ["EngineLoad", "RoundRobin", "PrefixAffinity", "prefix_blocks", "EngineSpec",
           "EngineWorker", "Fleet", "FleetJob", "run_job", "init_ray", "block_dir",
           "serve_fleet", "request_prompt"]


# Routing (pure: no Ray, no engine) ------------------------------------------------


def prefix_blocks(prompt: Any, block_tokens: int = 16, block_chars: int = 64) -> list[bytes]:
  """Hash chain of a prompt's leading blocks: entry i stands for the whole prefix
  up to block i, so two prompts share entry i exactly when they share that prefix.

  Token-id prompts are cut every `block_tokens` ids (the KV page size by default,
  the unit the prefix cache reuses), text every `block_chars` characters, and chat
  prompts message by message (the system prompt, then each turn). A trailing
  partial block is left out: it cannot be a cached page.
  """
  if isinstance(prompt, str):
    units = [prompt[i:i + block_chars].encode("utf-8", "replace")
             for i in range(0, len(prompt) - block_chars + 1, block_chars)]
  elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
    units = [json.dumps(m, sort_keys=True, ensure_ascii=False).encode("utf-8", "replace")
             for m in prompt]
  elif isinstance(prompt, (list, tuple)):
    units = [",".join(str(t) for t in prompt[i:i + block_tokens]).encode()
             for i in range(0, len(prompt) - block_tokens + 1, block_tokens)]
  else:
    return []
  chain, h = [], b""
  for u in units:
    h = hashlib.blake2b(h + b"\0" + u, digest_size=12).digest()
    chain.append(h)
  return chain


@dataclasses.dataclass(frozen=True)
class EngineLoad:
  """What the router knows of one engine.

  requests: requests sent to it and not yet answered (running + waiting there).
  capacity: most requests the driver keeps in flight on it.
  max_batch: its decode batch (EngineConfig.max_batch).
  kv_utilization: fraction of its KV pages owned by sequences (its metrics).
  """

  requests: int
  capacity: int
  max_batch: int
  kv_utilization: float = 0.0

  @property
  def utilization(self) -> float:
    """How loaded: requests in flight per decode batch (past 1, a queue), or the
    KV cache's used fraction, whichever is higher."""
    return max(self.requests / self.max_batch, self.kv_utilization)

  @property
  def full(self) -> bool:
    return self.requests >= self.capacity


def _least_loaded(loads: Sequence[EngineLoad], candidates: Sequence[int]) -> int:
  # Most free capacity; among equals the one with fewer requests, then the lowest index.
  return min(candidates, key=lambda i: (loads[i].utilization, loads[i].requests, i))


class RoundRobin:
  """The baseline: engine 0, 1, 2, ... in turn, skipping full ones."""

  name = "round_robin"

  def __init__(self):
    self._next = 0

  def choose(self, blocks: Sequence[bytes], loads: Sequence[EngineLoad]) -> int | None:
    del blocks
    n = len(loads)
    for k in range(n):
      i = (self._next + k) % n
      if not loads[i].full:
        self._next = i + 1
        return i
    return None


class PrefixAffinity:
  """Prefix affinity, then least loaded.

  A request goes to the engine that was last sent its longest known prefix (at
  least `min_blocks` blocks of `prefix_blocks`), so that engine's prefix cache
  hits, unless that engine is the most loaded of the fleet by more than
  `tolerance` (in `EngineLoad.utilization`, 0 to 1) over the least loaded one;
  otherwise, and for requests with no known prefix, it goes to the engine with the
  most free capacity. Without the tolerance two engines a request apart would trade
  every group back and forth; the default, half a batch, lets an engine queue a
  little for its prefix before its requests go elsewhere. The prefix table is bounded (`max_entries`,
  least-recently-used first out), like the caches it stands for.
  """

  name = "prefix_affinity"

  def __init__(self, tolerance: float = 0.5, min_blocks: int = 1,
               max_entries: int = 1 << 20):
    self.tolerance = tolerance
    self.min_blocks = min_blocks
    self.max_entries = max_entries
    self._owner: collections.OrderedDict[bytes, int] = collections.OrderedDict()
    self.affinity_hits = self.spills = self.misses = 0

  def _match(self, blocks: Sequence[bytes]) -> tuple[int, int | None]:
    for depth in range(len(blocks), self.min_blocks - 1, -1):
      if depth and blocks[depth - 1] in self._owner:
        return depth, self._owner[blocks[depth - 1]]
    return 0, None

  def choose(self, blocks: Sequence[bytes], loads: Sequence[EngineLoad]) -> int | None:
    open_ = [i for i, load in enumerate(loads) if not load.full]
    if not open_:
      return None
    depth, owner = self._match(blocks)
    least = _least_loaded(loads, open_)
    if owner is None:
      self.misses += 1
    else:
      top = max(loads[i].utilization for i in open_)
      crowded = owner not in open_ or (
          loads[owner].utilization >= top
          and loads[owner].utilization - loads[least].utilization > self.tolerance)
      if not crowded:
        self.affinity_hits += 1
        self._remember(blocks, owner, depth)
        return owner
      self.spills += 1
    self._remember(blocks, least, depth)
    return least

  def _remember(self, blocks: Sequence[bytes], engine: int, matched: int) -> None:
    # A prefix keeps its engine (that cache holds it); blocks past the match are new.
    for k, h in enumerate(blocks):
      if k >= matched or h not in self._owner:
        self._owner[h] = engine
      self._owner.move_to_end(h)
    while len(self._owner) > self.max_entries:
      self._owner.popitem(last=False)

  def stats(self) -> dict:
    return {"affinity": self.affinity_hits, "spilled": self.spills, "no_prefix": self.misses}


def make_router(name: str, **kwargs):
  if name in ("prefix_affinity", "affinity", "prefix"):
    return PrefixAffinity(**kwargs)
  if name in ("round_robin", "rr"):
    return RoundRobin()
  raise ValueError(f"unknown routing policy {name!r}; known: prefix_affinity, round_robin")


# Workers ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EngineSpec:
  """How a worker builds its engine: picklable, so Ray can rebuild it after a crash.

  checkpoint / preset / cache_dir / dtype / seed: as ridgeline.engine.loading.load_model
    (a preset has random weights from `seed`: every worker gets the same ones).
  config: the EngineConfig.
  compilation_cache_dir: JAX's persistent compilation cache, so a restarted
    worker loads its compiled steps instead of compiling them again.
  """

  checkpoint: str | None = None
  preset: str | None = None
  cache_dir: str | None = None
  dtype: str | None = None
  seed: int = 0
  config: EngineConfig = dataclasses.field(default_factory=EngineConfig)
  compilation_cache_dir: str | None = None
  tokenizer_gguf: str | None = None  # a preset's tokenizer (its vocab sizes the preset)
  quantize: str | None = None  # load_model's `quantize` ("int8", "int4", "fp8")

  def build(self):
    from ridgeline.engine.engine import Engine
    from ridgeline.engine.loading import load_model
    if self.compilation_cache_dir:
      from ridgeline.engine.runner import enable_compilation_cache
      enable_compilation_cache(self.compilation_cache_dir)
    if self.preset and self.tokenizer_gguf:
      from flax import nnx
      from ridgeline.configs import models
      from ridgeline.model import transformer as transformer_lib
      from ridgeline.model.tokenizer import Tokenizer
      tokenizer = Tokenizer.from_gguf(self.tokenizer_gguf)
      config = models.get(self.preset).replace(vocab_size=tokenizer.vocab_size)
      model = transformer_lib.Transformer(config, rngs=nnx.Rngs(self.seed))
      if self.quantize:
        from ridgeline.engine import loading
        config, params = loading._quantized(config, transformer_lib.to_params(model),
                                            self.quantize)
        model = transformer_lib.from_params(config, params)
    else:
      model, tokenizer = load_model(self.checkpoint, self.preset, self.cache_dir, self.dtype,
                                    seed=self.seed, quantize=self.quantize)
    return Engine(model, tokenizer, self.config)


class _Call:
  """One `run` call: its records, filled in by the engine thread."""

  def __init__(self, loop, n: int):
    self.loop = loop
    self.future = loop.create_future()
    self.records: list[dict | None] = [None] * n
    self.remaining = n

  def deliver(self, k: int, record: dict) -> None:
    self.records[k] = record
    self.remaining -= 1
    if self.remaining == 0:
      self.loop.call_soon_threadsafe(self._resolve)

  def fail(self, error: BaseException) -> None:
    self.loop.call_soon_threadsafe(self._reject, error)

  def _resolve(self):
    if not self.future.done():
      self.future.set_result(self.records)

  def _reject(self, error):
    if not self.future.done():
      self.future.set_exception(error)


def _prefix_counters(engine) -> tuple[float, float]:
  registry = engine.metrics.registry
  return (registry.get_sample_value("ridgeline_prefix_cache_queries_tokens_total") or 0.0,
          registry.get_sample_value("ridgeline_prefix_cache_hits_tokens_total") or 0.0)


class EngineWorker:
  """One engine behind an asyncio interface: the Ray actor of a fleet (or used
  in-process). Calls may overlap: every call's requests join the same running
  batch. One thread owns the engine (it is not thread-safe) and steps it while
  there is work; calls wait on futures it resolves.
  """

  def __init__(self, spec: EngineSpec, token_ids: bool = True):
    self.spec = spec
    self.token_ids = token_ids
    self._start()

  def _start(self) -> None:
    from ridgeline.frontends import openai_format
    self.engine = self.spec.build()
    # What batch.py's record builders need for OpenAI batch lines.
    self._token_text = openai_format.TokenText(self.engine.tokenizer)
    self._model_name = getattr(self.engine.model_config, "name", None) or "ridgeline"
    self._cond = threading.Condition()
    self._pending: collections.deque = collections.deque()  # (item, call, k)
    self._stop = False
    self._error: BaseException | None = None
    self._snapshot = {"running": 0, "waiting": 0, "kv_utilization": 0.0}
    self._served = 0
    self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
    self._thread.start()

  # The actor's methods --------------------------------------------------------

  async def run(self, items: Sequence[batch.Item]) -> list[dict]:
    """Runs parsed input lines; returns their records (frontends/batch/'s format),
    in the order given."""
    if self._error is not None:
      raise RuntimeError(f"engine thread failed: {self._error!r}")
    if not items:
      return []
    call = _Call(asyncio.get_running_loop(), len(items))
    with self._cond:
      self._pending.extend((item, call, k) for k, item in enumerate(items))
      self._cond.notify()
    return await call.future

  async def load(self) -> dict:
    """Load and cache counters, from the engine's own metrics."""
    queries, hits = _prefix_counters(self.engine)
    return {"pid": os.getpid(), "max_batch": self.engine.config.max_batch,
            "prefix_queries": queries, "prefix_hits": hits, "served": self._served,
            **self._snapshot}

  async def metrics_text(self) -> str:
    return self.engine.metrics.prometheus_text()

  async def reset(self) -> dict:
    """A fresh engine (empty prefix cache, zeroed metrics); only when idle."""
    with self._cond:
      if self._pending or self._snapshot["running"]:
        raise RuntimeError("reset while requests are in flight")
      self._stop = True
      self._cond.notify()
    self._thread.join()
    self._start()
    return await self.load()

  # The engine thread ------------------------------------------------------------

  def _loop(self) -> None:
    from ridgeline.engine.engine import CapacityError
    engine = self.engine
    ids = itertools.count()
    inflight: dict[str, tuple] = {}
    try:
      while True:
        with self._cond:
          while not self._pending and not inflight and not self._stop:
            self._cond.wait()
          if self._stop:
            return
          taken = list(self._pending)
          self._pending.clear()
        for n, (item, call, k) in enumerate(taken):
          if item.error is not None:
            self._deliver(call, k, batch._error_record(item, item.error))
            continue
          rid = str(next(ids))
          try:
            engine.add_request(item.prompt, item.params, request_id=rid)
          except CapacityError:
            if not inflight:
              raise
            with self._cond:  # back to the front, in order; retried after a step
              self._pending.extendleft(reversed(taken[n:]))
            break
          out = engine.get_output(rid)
          if out.finished:  # failed validation: an error record
            self._deliver(call, k, self._record(item, out))
            engine.release(rid)
          else:
            inflight[rid] = (item, call, k)
        if inflight:
          for rid in engine.step().finished:
            if rid in inflight:
              item, call, k = inflight.pop(rid)
              self._deliver(call, k, self._record(item, engine.get_output(rid)))
              engine.release(rid)
        self._snapshot = {"running": len(inflight), "waiting": len(self._pending),
                          "kv_utilization": engine.kv_utilization()}
    except BaseException as e:  # noqa: BLE001 -- handed to every waiting call
      self._error = e
      with self._cond:
        waiting = list(self._pending)
        self._pending.clear()
      for _, call, _ in list(inflight.values()) + waiting:
        call.fail(RuntimeError(f"engine failed: {e!r}"))

  def _record(self, item: batch.Item, out) -> dict:
    return batch._result_record(item, out, self.token_ids, self._token_text, self._model_name)

  def _deliver(self, call: _Call, k: int, record: dict) -> None:
    self._served += 1
    call.deliver(k, record)


# The fleet --------------------------------------------------------------------------


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs) -> dict:
  """ray.init for a job: `address` joins a running cluster; None starts a local
  one (with `num_cpus`, no dashboard: it starts faster and uses less memory).
  Returns the cluster's resources."""
  import ray
  if not ray.is_initialized():
    if address:
      ray.init(address=address, **kwargs)
    else:
      ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
  return ray.cluster_resources()


def code_runtime_env(ship: bool = False) -> dict:
  """A runtime_env whose workers run the Ridgeline code this process runs.

  ship=False: workers import it from the same place (one machine): the folder
  that holds an installed `ridgeline` goes first on their PYTHONPATH (a source
  tree's editable install needs nothing).
  ship=True: Ray uploads the package (`py_modules`) to every node of a cluster,
  for a checkout that the nodes do not have installed (Ray takes this only as
  the job's runtime_env: `init_ray(..., runtime_env=...)`): a staged copy named
  `ridgeline`, laid out as it installs.
  """
  import ridgeline.engine  # the package this process runs
  source = pathlib.Path(ridgeline.engine.__file__).resolve().parent.parent
  installed = source.name == "ridgeline"
  if not ship:  # a source tree runs through its editable install, as here
    return {"env_vars": {"PYTHONPATH": str(source.parent)} if installed else {}}
  stage = pathlib.Path(tempfile.mkdtemp(prefix="ridgeline-ship-")) / "ridgeline"
  for floor in ("util", "model", "configs", "engine", "frontends"):
    shutil.copytree(source / floor, stage / floor,
                    ignore=shutil.ignore_patterns("__pycache__"))
  return {"py_modules": [str(stage)]}


class Fleet:
  """N EngineWorker actors, with the resources and retries of a fleet.

  num_workers: default one per GPU of the cluster, or CPUs // num_cpus without GPUs.
  num_gpus: per worker; default 1 when the cluster has GPUs, else 0.
  max_restarts / max_task_retries: Ray's actor fault tolerance (-1: without limit).
  """

  def __init__(self, spec: EngineSpec, num_workers: int | None = None,
               num_gpus: float | None = None, num_cpus: float = 1,
               max_restarts: int = -1, max_task_retries: int = -1,
               runtime_env: dict | None = None, token_ids: bool = True):
    import ray
    if not ray.is_initialized():
      raise RuntimeError("Ray is not initialized: call fleet.init_ray() (or ray.init()) first")
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    if num_gpus is None:
      num_gpus = 1 if gpus else 0
    if num_workers is None:
      # Without GPUs, one CPU stays unreserved: Ray Data's read tasks (Parquet
      # input) need one, and would wait forever behind actors holding them all.
      num_workers = (int(gpus // num_gpus) if num_gpus else
                     int((resources.get("CPU", 1) - 1) // num_cpus) if num_cpus else 1)
      num_workers = max(num_workers, 1)
    self.spec = spec
    actor = ray.remote(EngineWorker).options(
        num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts,
        max_task_retries=max_task_retries, runtime_env=runtime_env)
    self.workers = [actor.remote(spec, token_ids) for _ in range(num_workers)]
    # Waits until every engine is built (and fails if one cannot be); the decode
    # batch is the engines' own (sized to their device unless the spec sets it).
    self.max_batch = min(load["max_batch"] for load in self.loads())

  def __len__(self) -> int:
    return len(self.workers)

  def loads(self, timeout: float | None = None) -> list[dict]:
    import ray
    return ray.get([w.load.remote() for w in self.workers], timeout=timeout)

  def reset(self) -> list[dict]:
    import ray
    return ray.get([w.reset.remote() for w in self.workers])

  def shutdown(self) -> None:
    import ray
    for w in self.workers:
      ray.kill(w)
    self.workers = []


# The job ----------------------------------------------------------------------------


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


def block_dir(output: str) -> str:
  return output + ".blocks"


_BLOCK_RE = re.compile(r"^lines-(\d{10})-(\d{10})\.jsonl$")


def _block_name(first: int, last: int) -> str:
  return f"lines-{first:010d}-{last:010d}.jsonl"


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


def _items(job: FleetJob) -> Iterator[batch.Item]:
  fmt = job.input_format or ("parquet" if job.input.endswith(".parquet") or
                             os.path.isdir(job.input) else "jsonl")
  if fmt == "jsonl":
    lines = batch.JsonlSource(job.input)
    source: Iterable[tuple[int, bytes]] = (lines[i] for i in range(len(lines)))
  elif fmt == "parquet":
    source = _parquet_rows(job.input)
  else:
    raise ValueError(f"input_format must be 'jsonl' or 'parquet', got {fmt!r}")
  seen: dict[str, int] = {}
  for line, raw in source:
    item = batch.parse_line(line, raw, job.default_sampling, job.seed)
    if item.key is not None and seen.get(item.key, item.line) != item.line:
      item = batch.Item(item.line, None, error=(
          f"line {item.line}: duplicate id {item.id!r} (first on line {seen[item.key]})"))
    elif item.key is not None:
      seen[item.key] = item.line
    yield item


def _blocks(items: Iterator[batch.Item], size: int) -> Iterator[list[batch.Item]]:
  block = []
  for item in items:
    block.append(item)
    if len(block) == size:
      yield block
      block = []
  if block:
    yield block


class _Journal:
  """The committed blocks of one job's output, under an exclusive lock."""

  def __init__(self, job: FleetJob):
    self.dir = block_dir(job.output)
    os.makedirs(self.dir, exist_ok=True)
    self._lock = os.open(os.path.join(self.dir, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self._lock)
      raise RuntimeError(f"another job is writing {job.output}") from None
    self.fsync = job.fsync
    for stale in glob.glob(os.path.join(glob.escape(self.dir), "*.tmp-*")):
      os.remove(stale)  # a block killed before its rename; we hold the lock
    manifest = os.path.join(self.dir, "manifest.json")
    mine = {"input": os.path.abspath(job.input), "block_size": job.block_size}
    old = batch._read_json(manifest)
    if old is None:
      batch._write_json(manifest, mine)
    elif old.get("block_size") != job.block_size:
      self.close()
      raise ValueError(f"{self.dir} was written with block_size={old.get('block_size')}; "
                       f"rerun with the same block size, or delete it to start over")
    self.committed = {m.group(0) for m in map(_BLOCK_RE.match, os.listdir(self.dir)) if m}

  def path(self, name: str) -> str:
    return os.path.join(self.dir, name)

  def check(self, name: str, block: Sequence[batch.Item]) -> list[dict]:
    """A committed block's records, checked against the input's lines and ids."""
    records = batch.read_records(self.path(name))
    views = [batch._record_view(r) for r in records]
    got = [(v["line"], None if v.get("id") is None else str(v["id"])) for v in views]
    want = [(it.line, it.key) for it in block]
    if got != want:
      raise RuntimeError(f"{self.path(name)} does not hold the input's lines and ids "
                         f"({len(got)} records for {len(want)} lines): the output belongs "
                         "to another input; delete it to start over")
    return records

  def commit(self, name: str, records: Sequence[dict]) -> None:
    # The commit: the block is there whole, or not at all.
    with util.atomic_write(self.path(name), "wb", fsync=self.fsync) as f:
      f.write(b"".join(batch._dumps(r) for r in records))
    if self.fsync:
      fd = os.open(self.dir, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    self.committed.add(name)

  def close(self) -> None:
    if self._lock is not None:
      os.close(self._lock)
      self._lock = None


def _assemble(journal: _Journal, names: Sequence[str], output: str) -> batch.Tally:
  """The output: every block's records in input order, replaced atomically."""
  tally = batch.Tally()
  with util.atomic_write(output, "wb") as out:
    for name in names:
      with open(journal.path(name), "rb") as f:
        data = f.read()
      for raw in data.splitlines(keepends=True):
        tally.add(json.loads(raw))
      out.write(data)
  return tally


def run_job(fleet: Fleet, job: FleetJob, router=None,
            on_progress: Callable[[dict], None] | None = None) -> dict:
  """Runs (or resumes) `job` on `fleet`; returns its summary (also written to
  OUTPUT.summary.json). `router`: a routing policy (default PrefixAffinity).
  `on_progress(stats)`: called after each answered call (tests kill workers there).
  """
  import ray
  from tqdm import tqdm
  router = router if router is not None else PrefixAffinity()
  n = len(fleet.workers)
  # Past its batch an engine queues; that queue lets a prefix wait for its engine
  # instead of spilling the moment the engine's batch is full.
  cap = job.max_in_flight or 4 * fleet.max_batch
  journal = _Journal(job)
  if os.path.exists(batch.summary_path(job.output)):
    os.remove(batch.summary_path(job.output))  # it marks a complete output; not yet
  t0 = time.perf_counter()
  start = fleet.loads()
  base = {k: (s["pid"], s["prefix_queries"], s["prefix_hits"]) for k, s in enumerate(start)}
  pids = [{s["pid"]} for s in start]
  kv = [s["kv_utilization"] for s in start]
  assigned = [0] * n  # in flight per worker
  sent = [0] * n  # over the job
  outstanding: dict[Any, tuple[int, list[batch.Item]]] = {}
  buffers: list[list[batch.Item]] = [[] for _ in range(n)]
  blocks: dict[str, dict] = {}  # name -> {"left", "records"}, blocks not yet committed
  order: list[str] = []  # every block's name, in input order
  queue: collections.deque[tuple[str, batch.Item]] = collections.deque()
  source = _blocks(_items(job), job.block_size)
  exhausted = False
  stats = {"requests": 0, "skipped": 0, "prompt_tokens": 0, "output_tokens": 0,
           "committed_blocks": 0, "skipped_blocks": 0, "rerouted": 0}
  load_ref, load_time = None, time.perf_counter()
  pbar = tqdm(unit="req", file=sys.stderr, disable=not job.progress, dynamic_ncols=True)

  def take_block() -> bool:
    """Pulls the next input block: skipped if committed, else queued for routing."""
    nonlocal exhausted
    block = next(source, None)
    if block is None:
      exhausted = True
      return False
    name = _block_name(block[0].line, block[-1].line)
    order.append(name)
    if name in journal.committed:
      journal.check(name, block)
      stats["skipped"] += len(block)
      stats["skipped_blocks"] += 1
      pbar.update(len(block))
      return True
    blocks[name] = {"left": len(block), "records": {}}
    for item in block:
      if item.error is not None:  # cannot run: its error record needs no engine
        finish(name, [batch._error_record(item, item.error)])
      else:
        queue.append((name, item))
    return True

  def finish(name: str, records: Sequence[dict]) -> None:
    b = blocks[name]
    for r in records:
      if r["line"] not in b["records"]:  # a record per line, whatever was retried
        b["records"][r["line"]] = r
        b["left"] -= 1
        stats["requests"] += 1
        view = batch._record_view(r)
        stats["prompt_tokens"] += view.get("prompt_tokens") or 0
        stats["output_tokens"] += view.get("completion_tokens") or 0
    pbar.update(len(records))
    if b["left"] == 0:
      journal.commit(name, [b["records"][k] for k in sorted(b["records"])])
      stats["committed_blocks"] += 1
      del blocks[name]

  def loads() -> list[EngineLoad]:
    return [EngineLoad(assigned[i], cap, fleet.max_batch, kv[i]) for i in range(n)]

  def send(i: int) -> None:
    items = buffers[i]
    buffers[i] = []
    ref = fleet.workers[i].run.remote(items)
    outstanding[ref] = (i, items)

  line_block: dict[int, str] = {}
  try:
    while True:
      # Route as many queued requests as the engines have room for.
      while True:
        while not exhausted and len(queue) < cap * n:
          take_block()
        if not queue:
          break
        name, item = queue[0]
        i = router.choose(prefix_blocks(item.prompt, fleet.spec.config.page_size), loads())
        if i is None:
          break
        queue.popleft()
        line_block[item.line] = name
        buffers[i].append(item)
        assigned[i] += 1
        sent[i] += 1
        if len(buffers[i]) >= job.chunk:
          send(i)
      for i in range(n):
        if buffers[i]:
          send(i)
      if not outstanding:
        if exhausted and not queue:
          break
        continue
      ready, _ = ray.wait(list(outstanding), num_returns=1, timeout=0.5)
      for ref in ready:
        i, items = outstanding.pop(ref)
        assigned[i] -= len(items)
        try:
          records = ray.get(ref)
        except ray.exceptions.RayActorError:
          # The actor is gone for good (restarts used up): others take its requests.
          stats["rerouted"] += len(items)
          for item in reversed(items):
            queue.appendleft((line_block[item.line], item))
          kv[i] = 1.0
          assigned[i] = cap  # never chosen again
          continue
        by_block = collections.defaultdict(list)
        for r in records:
          by_block[line_block.pop(r["line"])].append(r)
        for name, rs in by_block.items():
          finish(name, rs)
        if on_progress is not None:
          on_progress({"requests": stats["requests"], "sent": list(sent),
                       "committed_blocks": stats["committed_blocks"]})
      # Refresh the engines' own view of their load, without waiting for it.
      now = time.perf_counter()
      if load_ref is None and now - load_time > 0.25:
        load_ref = [w.load.remote() for w in fleet.workers]
      if load_ref is not None:
        done, _ = ray.wait(load_ref, num_returns=len(load_ref), timeout=0)
        if len(done) == len(load_ref):
          try:
            for k, s in enumerate(ray.get(load_ref)):
              kv[k] = s["kv_utilization"]
              pids[k].add(s["pid"])
          except ray.exceptions.RayActorError:
            pass
          load_ref, load_time = None, now
  except BaseException:
    journal.close()  # the committed blocks stay; a rerun takes the lock again
    raise
  finally:
    pbar.close()
  wall = time.perf_counter() - t0
  try:  # the journal's lock is released whatever fails here (Ray included)
    final = fleet.loads()
    queries = hits = 0.0
    for k, s in enumerate(final):
      pids[k].add(s["pid"])
      pid0, q0, h0 = base[k]
      same = s["pid"] == pid0  # a restarted engine's counters start again at 0
      queries += s["prefix_queries"] - (q0 if same else 0)
      hits += s["prefix_hits"] - (h0 if same else 0)
    tally = _assemble(journal, order, job.output)
  finally:
    journal.close()
  summary = {"input": job.input, "output": job.output, "complete": True, **tally.as_dict(),
             "run": {**stats, "wall_time_s": round(wall, 3),
                     "output_tokens_per_s": stats["output_tokens"] / wall if wall else 0.0,
                     "workers": n,
                     "routing": getattr(router, "name", type(router).__name__),
                     "requests_per_worker": sent,
                     "worker_restarts": sum(len(p) - 1 for p in pids)},
             "engine": {"prefix_cache": {
                 "queried_tokens": int(queries), "hit_tokens": int(hits),
                 "hit_rate": hits / queries if queries else 0.0}}}
  if hasattr(router, "stats"):
    summary["run"]["router"] = router.stats()
  batch._write_json(batch.summary_path(job.output), summary)
  return summary


# A fleet of servers on Ray Serve ------------------------------------------------------
#
# N replicas of frontends/server.py's OpenAI-compatible app, one engine each, behind one
# ingress. Each replica is its own one-replica deployment, so the ingress can address
# it: it routes with the same PrefixAffinity rule as the batch job (Serve's own
# routers pick among interchangeable replicas by queue length alone), over loads it
# keeps itself (requests it has in flight on each replica) and reads from the
# replicas (KV utilization, running and waiting, every 0.25 s). When every replica is
# at its bound the ingress answers 429 with Retry-After itself: nothing is queued.


def request_prompt(body: Any) -> Any:
  """The prompt of an OpenAI request body, for routing (None if it has none)."""
  if not isinstance(body, dict):
    return None
  if isinstance(body.get("messages"), list):
    return body["messages"]
  prompt = body.get("prompt")
  if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
    prompt = prompt[0]  # a batch of prompts: route by the first
  return prompt


def _scope(method: str, path: str, query: bytes, headers: list) -> dict:
  return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
          "http_version": "1.1", "method": method, "scheme": "http", "path": path,
          "raw_path": path.encode(), "query_string": query, "root_path": "",
          "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
          "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}


async def _call_asgi(app, method: str, path: str, query: bytes, headers: list, body: bytes):
  """Runs one HTTP request through an ASGI app in this process; yields
  (status, headers) first, then the body's chunks as the app sends them (SSE
  streams stay streams). Closing the generator early is a client disconnect."""
  sent = asyncio.Queue()
  gone = asyncio.Event()
  delivered = False

  async def receive():
    nonlocal delivered
    if not delivered:
      delivered = True
      return {"type": "http.request", "body": body, "more_body": False}
    await gone.wait()
    return {"type": "http.disconnect"}

  async def send(message):
    await sent.put(message)

  task = asyncio.ensure_future(app(_scope(method, path, query, headers), receive, send))
  try:
    while True:
      getter = asyncio.ensure_future(sent.get())
      done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
      if getter not in done:
        getter.cancel()
        task.result()  # raises what the app raised
        return
      message = getter.result()
      if message["type"] == "http.response.start":
        yield (message["status"], [(k.decode("latin-1"), v.decode("latin-1"))
                                   for k, v in message.get("headers", [])])
      elif message["type"] == "http.response.body":
        if message.get("body"):
          yield message["body"]
        if not message.get("more_body"):
          return
  finally:
    gone.set()
    if not task.done():
      try:
        await asyncio.wait_for(task, timeout=5)
      except (asyncio.TimeoutError, Exception):  # noqa: BLE001 -- the client is gone
        task.cancel()


class ServerReplica:
  """One Serve replica: an engine and frontends/server.py's app over it, called by
  the ingress through a deployment handle (no second HTTP hop)."""

  def __init__(self, spec: EngineSpec, model_name: str | None, max_pending: int | None,
               retry_after_s: int, api_key: str | None = None):
    from ridgeline.frontends.server import create_app
    self.engine = spec.build()
    # The ingress forwards the client's headers, so the replicas check the API key.
    self.app = create_app(self.engine, model_name=model_name, api_key=api_key,
                          max_pending=max_pending, retry_after_s=retry_after_s)
    self.max_pending = max_pending or self.engine.config.max_waiting
    self._life = None

  async def _started(self) -> None:
    if self._life is None:  # the app's lifespan (its engine thread) starts here
      self._life = self.app.router.lifespan_context(self.app)
      await self._life.__aenter__()

  async def handle(self, method: str, path: str, query: bytes, headers: list, body: bytes):
    await self._started()
    async for part in _call_asgi(self.app, method, path, query, headers, body):
      yield part

  async def load(self) -> dict:
    await self._started()
    e = self.engine
    return {"pid": os.getpid(), "max_batch": e.config.max_batch,
            "max_pending": self.max_pending, "kv_utilization": e.kv_utilization(),
            "ready": self.app.state.server.loop.ready.is_set()}

  async def metrics_text(self) -> str:
    chunks = [p async for p in self.handle("GET", "/metrics", b"", [], b"")]
    return b"".join(c for c in chunks if isinstance(c, bytes)).decode()


def _ingress_app(replica_names: Sequence[str], app_name: str, retry_after_s: int,
                 tolerance: float, load_period_s: float):
  """The ingress: a FastAPI app, built on its replica (Serve's app builder)."""
  import prometheus_client as prom
  from fastapi import FastAPI, Request
  from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
  from ray import serve

  handles = [serve.get_deployment_handle(n, app_name=app_name) for n in replica_names]
  n = len(handles)
  router = PrefixAffinity(tolerance=tolerance)
  inflight = [0] * n
  seen = [{"max_batch": 1, "max_pending": 1, "kv_utilization": 0.0, "ready": False}
          for _ in range(n)]
  registry = prom.CollectorRegistry()
  routed = prom.Counter("ridgeline_fleet_routed", "Requests sent to each replica",
                        ["replica"], registry=registry)
  rejected = prom.Counter("ridgeline_fleet_rejected", "Requests refused with 429: every "
                          "replica at its bound", registry=registry)
  g_inflight = prom.Gauge("ridgeline_fleet_in_flight", "Requests in flight per replica",
                          ["replica"], registry=registry)
  g_kv = prom.Gauge("ridgeline_fleet_kv_cache_utilization", "KV-cache use per replica",
                    ["replica"], registry=registry)
  g_replicas = prom.Gauge("ridgeline_fleet_replicas", "Replicas behind the ingress",
                          registry=registry)
  g_replicas.set(n)
  state = {"poller": None}

  async def poll_loads():
    while True:
      for i, h in enumerate(handles):
        try:
          seen[i] = await h.load.remote()
          g_kv.labels(str(i)).set(seen[i]["kv_utilization"])
        except Exception:  # noqa: BLE001 -- a replica being replaced: keep the last view
          pass
      await asyncio.sleep(load_period_s)

  def loads() -> list[EngineLoad]:
    return [EngineLoad(inflight[i], seen[i]["max_pending"], seen[i]["max_batch"],
                       seen[i]["kv_utilization"]) for i in range(n)]

  app = FastAPI(title="Ridgeline fleet")

  # Starlette routes (request in, response out): this module's postponed annotations
  # would hide `Request` from FastAPI's parameter injection.
  @app.middleware("http")
  async def start_polling(request, call_next):
    if state["poller"] is None:
      state["poller"] = asyncio.ensure_future(poll_loads())
      for i, h in enumerate(handles):  # the first view, before routing anything
        seen[i] = await h.load.remote()
    return await call_next(request)

  async def forward(i: int, request: Request, body: bytes):
    headers = [(k, v) for k, v in request.headers.items() if k.lower() != "host"]
    stream = handles[i].options(stream=True).handle.remote(
        request.method, request.url.path, request.url.query.encode(), headers, body)
    inflight[i] += 1
    g_inflight.labels(str(i)).set(inflight[i])
    routed.labels(str(i)).inc()

    def done():
      inflight[i] -= 1
      g_inflight.labels(str(i)).set(inflight[i])

    try:
      status, out_headers = await stream.__anext__()
    except BaseException:
      done()
      raise
    out_headers = [(k, v) for k, v in out_headers if k.lower() != "content-length"]

    async def body_iter():
      try:
        async for chunk in stream:
          yield chunk
      finally:
        done()
        stream.cancel()

    media = dict((k.lower(), v) for k, v in out_headers).get("content-type")
    return StreamingResponse(body_iter(), status_code=status, media_type=media,
                             headers={k: v for k, v in out_headers
                                      if k.lower() != "content-type"})

  async def completions(request: Request):
    body = await request.body()
    try:
      parsed = json.loads(body)
    except ValueError:
      parsed = None  # the replica says what is wrong with it
    blocks = prefix_blocks(request_prompt(parsed))
    i = router.choose(blocks, loads())
    if i is None:
      rejected.inc()
      return JSONResponse(
          {"error": {"message": f"every replica is at capacity ({sum(inflight)} requests in "
                                f"flight over {n} replicas); retry after {retry_after_s} s",
                     "type": "rate_limit_error", "param": None,
                     "code": "rate_limit_exceeded"}},
          status_code=429, headers={"Retry-After": str(retry_after_s)})
    return await forward(i, request, body)

  async def models(request: Request):
    return await forward(0, request, b"")

  async def health(request: Request):
    ready = [bool(s.get("ready")) for s in seen]
    return JSONResponse({"status": "ok" if all(ready) else "loading", "replicas": ready},
                        status_code=200 if all(ready) else 503)

  async def metrics(request: Request):
    """The fleet view: routing, in flight and KV use per replica."""
    return PlainTextResponse(prom.generate_latest(registry), media_type=prom.CONTENT_TYPE_LATEST)

  async def replica_metrics(request: Request):
    """Replica i's own /metrics (its engine's registry and its server's)."""
    i = int(request.path_params["i"])
    if not 0 <= i < n:
      return JSONResponse({"error": f"replica {i} not in [0, {n})"}, status_code=404)
    return PlainTextResponse(await handles[i].metrics_text.remote(),
                             media_type=prom.CONTENT_TYPE_LATEST)

  async def fleet_view(request: Request):
    return JSONResponse({"replicas": [dict(seen[i], in_flight=inflight[i]) for i in range(n)],
                         "router": router.stats()})

  app.add_route("/v1/models", models, methods=["GET"])
  app.add_route("/v1/{path:path}", completions, methods=["POST"])
  app.add_route("/health", health, methods=["GET"])
  app.add_route("/metrics", metrics, methods=["GET"])
  app.add_route("/replicas/{i:int}/metrics", replica_metrics, methods=["GET"])
  app.add_route("/fleet", fleet_view, methods=["GET"])
  return app


def serve_fleet(spec: EngineSpec, num_replicas: int = 2, *, host: str = "127.0.0.1",
                port: int = 8000, model_name: str | None = None,
                max_pending: int | None = None, retry_after_s: int = 1,
                api_key: str | None = None,
                tolerance: float = 0.5, num_cpus: float = 1, num_gpus: float | None = None,
                app_name: str = "ridgeline", runtime_env: dict | None = None):
  """Starts Ray Serve (on the initialized Ray) with `num_replicas` server replicas
  and the routing ingress at http://host:port; returns the app's handle.
  `max_pending`: each replica's bound (frontends/server.py's; default its max_waiting).
  """
  import ray
  from ray import serve
  if num_gpus is None:
    num_gpus = 1 if ray.cluster_resources().get("GPU", 0) else 0
  serve.start(http_options={"host": host, "port": port})
  options = {"num_cpus": num_cpus, "num_gpus": num_gpus}
  if runtime_env:
    options["runtime_env"] = runtime_env
  names = [f"replica-{i}" for i in range(num_replicas)]
  replica = serve.deployment(ServerReplica)
  binds = [replica.options(name=nm, num_replicas=1, ray_actor_options=options,
                           max_ongoing_requests=100000).bind(
                               spec, model_name, max_pending, retry_after_s, api_key)
           for nm in names]
  ingress_options = {"num_cpus": 0}
  if runtime_env:
    ingress_options["runtime_env"] = runtime_env

  def build():
    return _ingress_app(names, app_name, retry_after_s, tolerance, 0.25)

  @serve.deployment(name="ingress", ray_actor_options=ingress_options,
                    max_ongoing_requests=100000)
  @serve.ingress(build)
  class Ingress:
    def __init__(self, *replicas):
      del replicas  # bound so Serve deploys them with this app; reached by name

  # A replica that dies is replaced by Serve's controller (its health checks).
  return serve.run(Ingress.bind(*binds), name=app_name, route_prefix="/")
