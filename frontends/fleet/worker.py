"""The Ray worker: one engine behind an asyncio interface (`EngineWorker`).

Ray calls the actor's methods on its event loop; calls overlap, and every call's
requests join the same running batch. One thread owns the engine (it is not
thread-safe): it takes the items the calls queued, adds them to the engine, steps
it while there is work, and hands each finished request's record (the batch job's
format, frontends/batch/records.py) back to its call's future. An engine that
fails fails every waiting call; Ray restarts the actor, rebuilding the engine from
its EngineSpec, and sends the unanswered calls again.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import threading
from typing import Sequence

from ridgeline.engine.build import EngineSpec
from ridgeline.frontends.batch.records import Item, error_record, result_record


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
    # What the batch records (frontends/batch/records.py) need for OpenAI batch lines.
    self._token_text = openai_format.TokenText(self.engine.tokenizer)
    self._model_name = getattr(self.engine.model_config, "name", None) or "ridgeline"
    self._cond = threading.Condition()
    # (item, call, k) for the items the calls queued and the engine thread has
    # not yet given to the engine (the engine's own queue is its `waiting`).
    self._to_submit: collections.deque = collections.deque()
    self._stop = False
    self._error: BaseException | None = None
    self._snapshot = {"running": 0, "waiting": 0, "kv_utilization": 0.0}
    self._served = 0
    self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
    self._thread.start()

  # The actor's methods --------------------------------------------------------

  async def run(self, items: Sequence[Item]) -> list[dict]:
    """Runs parsed input lines; returns their records (frontends/batch/'s format),
    in the order given."""
    if self._error is not None:
      raise RuntimeError(f"engine thread failed: {self._error!r}")
    if not items:
      return []
    call = _Call(asyncio.get_running_loop(), len(items))
    with self._cond:
      self._to_submit.extend((item, call, k) for k, item in enumerate(items))
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
      if self._to_submit or self._snapshot["running"]:
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
          while not self._to_submit and not inflight and not self._stop:
            self._cond.wait()
          if self._stop:
            return
          taken = list(self._to_submit)
          self._to_submit.clear()
        for n, (item, call, k) in enumerate(taken):
          if item.error is not None:
            self._deliver(call, k, error_record(item, item.error))
            continue
          rid = str(next(ids))
          try:
            engine.add_request(item.prompt, item.params, request_id=rid)
          except CapacityError:
            if not inflight:
              raise
            with self._cond:  # back to the front, in order; retried after a step
              self._to_submit.extendleft(reversed(taken[n:]))
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
        self._snapshot = {"running": len(inflight), "waiting": len(self._to_submit),
                          "kv_utilization": engine.kv_utilization()}
    except BaseException as e:  # noqa: BLE001 -- handed to every waiting call
      self._error = e
      with self._cond:
        waiting = list(self._to_submit)
        self._to_submit.clear()
      for _, call, _ in list(inflight.values()) + waiting:
        call.fail(RuntimeError(f"engine failed: {e!r}"))

  def _record(self, item: Item, out) -> dict:
    return result_record(item, out, self.token_ids, self._token_text, self._model_name)

  def _deliver(self, call: _Call, k: int, record: dict) -> None:
    self._served += 1
    call.deliver(k, record)
