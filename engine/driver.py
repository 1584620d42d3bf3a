"""One thread that owns an Engine: what every live caller (the server, the Batch
API, the fleet worker, the latency benchmark) drives an engine through.

```python
driver = Driver(engine, warmup="all")
driver.start()                      # warms up, then steps while there is work
driver.submit([Submission("r1", "Hello", SamplingParams(max_tokens=8), on_event)])
...                                 # on_event(Accepted), on_event(Delta)..., on_event(Done)
driver.abort(["r1"])                # frees its KV pages before the next step
driver.stop()                       # the requests still live get Failed("stopped")
```

The engine is not thread-safe, so exactly one thread calls it (add_request, step,
abort, get_output, release): this driver's. Other threads hand it submissions and
aborts through a thread-safe queue; it takes them between two steps, so new
requests join the running batch (continuous batching). With nothing live it
sleeps on that queue until work comes. Each turn takes every message queued, in
order (a submit and then an abort of the same request cancel out), then runs one
step, then delivers what the step produced.

Delivery is per request: each `Submission` has an `on_event` callback, called on
the driver's thread with, in order,
  Accepted(request_id, prompt_tokens)    queued by the engine
  Delta(request_id, output, logprobs, prompt)  new tokens of one completion
  Done(request_id, output)               the final RequestOutput (then released)
or, at any point, one Failed(request_id, cause, message) and nothing after it.
A callback must be quick and must not raise (it hands the event to its own
thread: an asyncio loop's call_soon_threadsafe, a queue.Queue's put).

Failures are plain values, so that this floor knows nothing of HTTP or OpenAI (the
server maps them to its errors): `cause` is CAPACITY (the engine's waiting queue
is full: nothing was kept, try again later), INVALID (the engine's checks refused
the request: its message names why), INTERNAL (add_request raised otherwise: a
duplicate id or a bug), STEP (a step raised: every live request fails with it,
and the driver keeps going for the next ones) or STOPPED (the driver stopped).

A warm-up runs on the driver's thread before `ready` is set: "all" compiles every
step variant, "background" the shapes every step fits in (Engine.warmup), "none"
nothing. One that fails leaves `failed` set (why) and the driver still serving.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, Callable

from ridgeline.engine.engine import CapacityError, RequestOutput
from ridgeline.engine.outputs import StepResult, StreamOutput
from ridgeline.engine.sampling import SamplingParams

__all__ = ["Driver", "Submission", "Event", "Accepted", "Delta", "Done", "Failed", "CAPACITY",
           "INVALID", "INTERNAL", "STEP", "STOPPED"]

log = logging.getLogger("ridgeline.driver")

CAPACITY, INVALID, INTERNAL, STEP, STOPPED = "capacity", "invalid", "internal", "step", "stopped"


@dataclasses.dataclass(frozen=True)
class Event:
  """What the driver tells a submission's `on_event`, about request `request_id`."""

  request_id: str


@dataclasses.dataclass(frozen=True)
class Accepted(Event):
  """The engine queued the request; `prompt_tokens`: its prompt's length."""

  prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class Delta(Event):
  """New tokens of one completion (`output.index`). `logprobs`: theirs, when the
  submission asked (`logprobs=True`); `prompt`: (prompt token ids, prompt
  log-probabilities or None) on each completion's first delta, when the
  submission asked (`with_prompt=True`)."""

  output: StreamOutput
  logprobs: list | None = None
  prompt: tuple[list[int], list | None] | None = None


@dataclasses.dataclass(frozen=True)
class Done(Event):
  """The request ended: its final output (the engine has released it)."""

  output: RequestOutput


@dataclasses.dataclass(frozen=True)
class Failed(Event):
  """The request did not run, or stopped: nothing follows (see the module for the
  causes)."""

  cause: str  # CAPACITY, INVALID, INTERNAL, STEP or STOPPED
  message: str


@dataclasses.dataclass(eq=False)
class Submission:
  """One engine request for the driver. `stream`: deltas as tokens come (else one
  per completion when it ends); `priority`: lower first (vLLM's meaning)."""

  request_id: str
  prompt: Any
  params: SamplingParams
  on_event: Callable[[Event], None]
  stream: bool = False
  priority: int = 0
  logprobs: bool = False  # each Delta carries its tokens' log-probabilities
  with_prompt: bool = False  # each completion's first Delta carries the prompt
  # What the driver has handed out so far (its thread only).
  _prompted: set = dataclasses.field(default_factory=set)
  _emitted: collections.Counter = dataclasses.field(default_factory=collections.Counter)


class Driver:
  """Owns an engine: runs its steps in one background thread (see the module)."""

  def __init__(self, engine, warmup: bool | str = True):
    self.engine = engine
    self._warmup = {True: "all", False: "none"}.get(warmup, warmup)
    self._inbox: queue.Queue = queue.Queue()
    self._live: dict[str, Submission] = {}
    self.ready = threading.Event()  # set once the warm-up is over (or failed)
    self.failed: str | None = None  # why the warm-up failed
    self.steps = 0  # engine steps run
    self._thread = threading.Thread(target=self._run, name="ridgeline-engine", daemon=True)

  # Called from any thread.

  def start(self) -> None:
    self._thread.start()

  def stop(self, timeout: float = 30.0) -> None:
    """Fails the live requests (STOPPED) and ends the thread."""
    self._inbox.put(None)
    self._thread.join(timeout)

  def submit(self, subs: list[Submission]) -> None:
    self._inbox.put(("add", subs))

  def abort(self, request_ids: list[str]) -> None:
    """Stops requests (no event follows); their pages are freed before the next step."""
    self._inbox.put(("abort", request_ids))

  @property
  def num_live(self) -> int:
    """Requests accepted and not yet done (as of the driver's last turn)."""
    return len(self._live)

  # The driver's thread.

  def _run(self) -> None:
    try:
      if self._warmup != "none":
        t0 = time.perf_counter()
        self.engine.warmup(background=self._warmup == "background")
        log.info("engine warmed up in %.1f s", time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 -- reported through `failed`
      log.exception("engine warm-up failed")
      self.failed = f"{type(e).__name__}: {e}"
    self.ready.set()
    while True:
      busy = bool(self._live) or self.engine.has_unfinished()
      msgs = [] if busy else [self._inbox.get()]  # idle: sleep until a message comes
      while True:
        try:
          msgs.append(self._inbox.get_nowait())
        except queue.Empty:
          break
      for msg in msgs:
        if msg is None:
          self._fail_all(STOPPED, "stopped")
          return
        kind, payload = msg
        if kind == "add":
          self._add(payload)
        else:
          self._abort(payload)
      if self._live or self.engine.has_unfinished():
        try:
          result = self.engine.step()
        except Exception as e:  # noqa: BLE001 -- fail the batch, keep serving
          log.exception("engine step failed")
          self._fail_all(STEP, f"engine step failed: {type(e).__name__}: {e}")
          continue
        self.steps += 1
        self._deliver(result)

  def _add(self, subs: list[Submission]) -> None:
    for sub in subs:
      try:
        self.engine.add_request(sub.prompt, sub.params, request_id=sub.request_id,
                                stream=sub.stream, priority=sub.priority)
      except CapacityError as e:
        sub.on_event(Failed(sub.request_id, CAPACITY, str(e)))
        continue
      except Exception as e:  # noqa: BLE001 -- a duplicate id or a bug: this request only
        sub.on_event(Failed(sub.request_id, INTERNAL, str(e)))
        continue
      out = self.engine.get_output(sub.request_id)
      if out.error is not None:  # refused by the engine's checks (length, ids, ...)
        self.engine.release(sub.request_id)
        sub.on_event(Failed(sub.request_id, INVALID, out.error))
        continue
      self._live[sub.request_id] = sub
      sub.on_event(Accepted(sub.request_id, len(out.prompt_token_ids)))

  def _abort(self, request_ids: list[str]) -> None:
    for rid in request_ids:
      if self._live.pop(rid, None) is not None:
        self.engine.abort(rid)  # frees its pages now
        with contextlib.suppress(KeyError, ValueError):
          self.engine.release(rid)

  def _deliver(self, result: StepResult) -> None:
    by_rid = collections.defaultdict(list)
    for d in result.deltas:
      by_rid[d.request_id].append(d)
    for rid, ds in by_rid.items():
      sub = self._live.get(rid)
      if sub is None:
        continue
      out = self.engine.get_output(rid) if sub.logprobs or sub.with_prompt else None
      completions = {c.index: c for c in out.outputs} if out is not None else {}
      for d in ds:
        lps = None
        if sub.logprobs and d.index in completions:
          start = sub._emitted[d.index]
          lps = (completions[d.index].logprobs or [])[start:start + len(d.token_ids)]
        prompt = None
        if sub.with_prompt and d.index not in sub._prompted:
          sub._prompted.add(d.index)
          prompt = (out.prompt_token_ids, out.prompt_logprobs)
        sub._emitted[d.index] += len(d.token_ids)
        sub.on_event(Delta(rid, d, lps, prompt))
    for rid in result.finished:
      sub = self._live.pop(rid, None)
      if sub is not None:
        out = self.engine.get_output(rid)
        self.engine.release(rid)
        sub.on_event(Done(rid, out))

  def _fail_all(self, cause: str, message: str) -> None:
    for rid, sub in list(self._live.items()):
      self._abort([rid])
      sub.on_event(Failed(rid, cause, message))
