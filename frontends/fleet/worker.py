"""The Ray worker: one engine behind an asyncio interface (`EngineWorker`).

Ray calls the actor's methods on its event loop; calls overlap, and every call's
requests join the same running batch. The engine runs on the engine driver
(engine/driver.py, the one thread that owns it, as under the server): a call
queues its items here, at most `max_waiting` of them are handed to the driver at
a time (so the engine's waiting queue is never full and no request is refused
for capacity), and each finished request's record (the batch job's format,
frontends/batch/records.py) goes back to its call's future from the driver's
events. A step that fails fails every waiting call and the worker with it; Ray
restarts the actor, rebuilding the engine from its EngineSpec, and sends the
unanswered calls again.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import threading
from typing import Sequence

from ridgeline.engine.build import EngineSpec
from ridgeline.engine.driver import CAPACITY, INVALID, Done, Driver, Failed, Submission
from ridgeline.frontends.batch.records import Item, error_record, refused_record, result_record


class _Call:
  """One `run` call: its records, filled in from the driver's events."""

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
  batch, stepped by the engine's driver; calls wait on futures its events
  resolve.
  """

  def __init__(self, spec: EngineSpec, token_ids: bool = True):
    self.spec = spec
    self.token_ids = token_ids
    self._start()

  def _start(self) -> None:
    from ridgeline.frontends import openai_format
    self.engine = self.spec.build()
    # What the batch records (frontends/batch/records.py) need for OpenAI batch lines.
    self._token_text = openai_format.TokenText(self.engine.tokenizer)
    self._model_name = getattr(self.engine.model_config, "name", None) or "ridgeline"
    self._lock = threading.Lock()
    # (item, call, k) for the items the calls queued and not yet handed to the
    # driver; `_live`: those handed to it and not yet done, by request id.
    self._to_submit: collections.deque = collections.deque()
    self._live: dict[str, tuple] = {}
    self._ids = itertools.count()
    self._error: BaseException | None = None
    self._kv_utilization = 0.0
    self._served = 0
    self.driver = Driver(self.engine, warmup="none")
    self.driver.start()

  # The actor's methods --------------------------------------------------------

  async def run(self, items: Sequence[Item]) -> list[dict]:
    """Runs parsed input lines; returns their records (frontends/batch/'s format),
    in the order given."""
    if self._error is not None:
      raise RuntimeError(f"engine thread failed: {self._error!r}")
    if not items:
      return []
    call = _Call(asyncio.get_running_loop(), len(items))
    with self._lock:
      self._to_submit.extend((item, call, k) for k, item in enumerate(items))
    self._feed()
    return await call.future

  async def load(self) -> dict:
    """Load and cache counters, from the engine's own metrics."""
    queries, hits = _prefix_counters(self.engine)
    return {"pid": os.getpid(), "max_batch": self.engine.config.max_batch,
            "prefix_queries": queries, "prefix_hits": hits, "served": self._served,
            "running": len(self._live), "waiting": len(self._to_submit),
            "kv_utilization": self._kv_utilization}

  async def metrics_text(self) -> str:
    return self.engine.metrics.prometheus_text()

  async def reset(self) -> dict:
    """A fresh engine (empty prefix cache, zeroed metrics); only when idle."""
    with self._lock:
      if self._to_submit or self._live:
        raise RuntimeError("reset while requests are in flight")
    self.driver.stop()
    self._start()
    return await self.load()

  # Feeding the driver, and its events (on the driver's thread) -------------------

  def _feed(self) -> None:
    """Hands queued items to the driver while fewer than `max_waiting` are live
    (lines that failed to parse get their error records here, without the engine)."""
    subs, errors = [], []
    with self._lock:
      while self._to_submit and len(self._live) < self.engine.config.max_waiting:
        item, call, k = self._to_submit.popleft()
        if item.error is not None:
          errors.append((call, k, error_record(item, item.error)))
          continue
        rid = str(next(self._ids))
        self._live[rid] = (item, call, k)
        subs.append(Submission(rid, item.prompt, item.params, self._on_event))
    for call, k, record in errors:
      self._deliver(call, k, record)
    if subs:
      self.driver.submit(subs)

  def _on_event(self, event) -> None:
    if isinstance(event, (Done, Failed)):
      with self._lock:
        item, call, k = self._live.pop(event.request_id)
    if isinstance(event, Done):
      self._kv_utilization = self.engine.kv_utilization()
      self._deliver(call, k, self._record(item, event.output))
    elif isinstance(event, Failed):
      if event.cause == INVALID:  # refused by the engine's checks: its error record
        self._deliver(call, k, refused_record(item, event.message))
      elif event.cause == CAPACITY:  # not expected (see _feed): queued again, first
        with self._lock:
          self._to_submit.appendleft((item, call, k))
      else:
        self._fail(RuntimeError(event.message), call)
        return
    else:
      return
    self._feed()

  def _fail(self, error: BaseException, call: _Call) -> None:
    """The engine failed (a step raised): every waiting call fails, and so does
    every later one (Ray restarts the actor)."""
    self._error = error
    with self._lock:
      waiting = list(self._to_submit) + list(self._live.values())
      self._to_submit.clear()
    call.fail(RuntimeError(f"engine failed: {error!r}"))
    for _, other, _ in waiting:
      other.fail(RuntimeError(f"engine failed: {error!r}"))

  def _record(self, item: Item, out) -> dict:
    return result_record(item, out, self.token_ids, self._token_text, self._model_name)

  def _deliver(self, call: _Call, k: int, record: dict) -> None:
    self._served += 1
    call.deliver(k, record)
