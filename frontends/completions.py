"""The server's request path: an OpenAI completion request in, through the engine
driver, out as one JSON response or a stream of server-sent events.

```python
service = Completions(engine, "smollm2", max_pending=64, retry_after_s=1, warmup=True)
response = await service.complete("chat", request)   # in a FastAPI route
```

A request is parsed and checked (frontends/openai_format.py), then admitted or
refused: past `max_pending` live engine requests (`live_requests`, counted on the
event loop) it is refused at once with HTTP 429 before anything is queued, so a
refusal keeps nothing. An admitted request is one engine request per prompt,
handed to the driver (engine/driver.py); the driver's thread calls each one's
callback, which hands the event to this request's asyncio.Queue with
`loop.call_soon_threadsafe`. The response waits until every prompt is accepted
(an engine refusal is still an error status, not a broken stream), then either
collects the final outputs into one body or streams a chunk per delta.

However a response ends (finished, failed, the client gone, cancelled before its
first chunk), `close` runs once: the prompts still running are aborted on the
driver's thread before its next step, which frees their KV pages, and the slots
are given back. Starlette notices a streaming client that disconnects (it listens
for `http.disconnect` while streaming and cancels the stream); a non-streaming
request polls for the disconnect while it waits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import json
import time
import uuid
from typing import Any, Callable

import prometheus_client as prom
from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ridgeline.engine import driver as driver_lib
from ridgeline.frontends import openai_format as oaf


@dataclasses.dataclass
class _PromptOnly:
  """A prompt's ids and log-probabilities, as echo_parts reads them."""

  prompt_token_ids: list[int]
  prompt_logprobs: list | None


async def json_body(request: Request) -> Any:
  """A request's JSON body; one that does not parse is a 400."""
  try:
    return json.loads(await request.body())
  except ValueError as e:
    raise oaf.OpenAIError(f"malformed JSON body: {e}") from None


class _EngineStream(StreamingResponse):
  """A streaming response that runs `on_close` however it ends (finished, client
  gone, or cancelled before the first chunk)."""

  def __init__(self, content, on_close: Callable[[], None], **kw):
    super().__init__(content, **kw)
    self._on_close = on_close

  async def __call__(self, scope, receive, send) -> None:
    try:
      await super().__call__(scope, receive, send)
    finally:
      self._on_close()


class Completions:
  """The completion endpoints over one engine, its driver and the server's
  metrics (`registry`)."""

  def __init__(self, engine, model_name: str, max_pending: int, retry_after_s: int,
               warmup: bool | str):
    self.engine = engine
    self.model_name = model_name
    self.max_pending = max_pending
    self.retry_after_s = retry_after_s
    self.driver = driver_lib.Driver(engine, warmup=warmup)
    self.live_requests = 0  # engine requests admitted and not yet closed; event loop only
    self.created = int(time.time())
    self.token_text = oaf.TokenText(engine.tokenizer)
    r = self.registry = prom.CollectorRegistry()
    self.http_requests = prom.Counter("ridgeline_server_requests", "HTTP completion requests "
                                      "by outcome", ["outcome"], registry=r)
    self.live_gauge = prom.Gauge("ridgeline_server_pending_requests",
                                 "Engine requests the server has in flight", registry=r)

  def _count(self, k: int) -> None:
    self.live_requests += k
    self.live_gauge.set(self.live_requests)

  async def complete(self, kind: str, request: Request) -> Any:
    body = await json_body(request)
    parsed = oaf.parse_request(
        kind, body, oaf.CHAT_DEFAULTS if kind == "chat" else oaf.COMPLETION_DEFAULTS)
    if parsed.model is not None and parsed.model != self.model_name:
      raise oaf.OpenAIError(f"The model `{parsed.model}` does not exist; this server "
                            f"serves `{self.model_name}`", "model", status=404,
                            code="model_not_found")
    if not self.driver.ready.is_set() or self.driver.failed:
      raise oaf.OpenAIError("the model is still loading" if not self.driver.failed
                            else f"the engine failed: {self.driver.failed}", status=503,
                            type="server_error")
    k = len(parsed.prompts)
    if self.live_requests + k > self.max_pending:
      self.http_requests.labels("rejected_capacity").inc()
      raise oaf.OpenAIError(
          f"server at capacity: {self.live_requests} requests in flight (bound "
          f"{self.max_pending}); retry after {self.retry_after_s} s", status=429,
          type="rate_limit_error", code="rate_limit_exceeded")

    events: asyncio.Queue = asyncio.Queue()  # (prompt index, driver event)
    aloop = asyncio.get_running_loop()

    def post(slot, event, _put=events.put_nowait):
      with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown)
        aloop.call_soon_threadsafe(_put, (slot, event))

    base = uuid.uuid4().hex
    subs = [driver_lib.Submission(
        f"{base}-{p}", prompt, parsed.params, functools.partial(post, p), stream=parsed.stream,
        priority=parsed.priority, logprobs=parsed.top_logprobs is not None,
        with_prompt=parsed.echo) for p, prompt in enumerate(parsed.prompts)]
    state = {"open": True, "done": set()}
    self._count(k)

    def close() -> None:  # idempotent: abort what is still running, give the slots back
      if not state["open"]:
        return
      state["open"] = False
      left = [s.request_id for p, s in enumerate(subs) if p not in state["done"]]
      if left:
        self.driver.abort(left)
      self._count(-k)

    try:
      self.driver.submit(subs)
      prompt_tokens = [0] * k
      backlog = []  # deltas that arrive before every prompt is accepted
      accepted = 0
      while accepted < k:
        slot, ev = await events.get()
        if isinstance(ev, driver_lib.Accepted):
          prompt_tokens[slot] = ev.prompt_tokens
          accepted += 1
        elif isinstance(ev, driver_lib.Failed):
          state["done"].add(slot)
          raise oaf.driver_error(ev, kind)
        else:
          backlog.append((slot, ev))
    except BaseException:
      close()
      raise
    self.http_requests.labels("accepted").inc()
    rid = oaf.new_id(kind)
    if parsed.stream:
      return _EngineStream(self._stream(kind, parsed, rid, events, backlog, prompt_tokens,
                                        state), close, media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache"})
    try:
      return await self._collect(kind, parsed, rid, events, backlog, state, request)
    finally:
      close()

  async def _collect(self, kind, parsed, rid, events, backlog, state, request) -> Any:
    k = len(parsed.prompts)
    outputs = [None] * k
    queued = collections.deque(backlog)
    while len(state["done"]) < k:
      if queued:
        slot, ev = queued.popleft()
      else:
        try:
          slot, ev = await asyncio.wait_for(events.get(), timeout=1.0)
        except asyncio.TimeoutError:
          if await request.is_disconnected():
            self.http_requests.labels("client_disconnected").inc()
            return PlainTextResponse("", status_code=499)  # nobody reads it
          continue
      if isinstance(ev, driver_lib.Done):
        outputs[slot] = ev.output
        state["done"].add(slot)
      elif isinstance(ev, driver_lib.Failed):
        state["done"].add(slot)
        raise oaf.driver_error(ev, kind)
    return JSONResponse(oaf.response_body(
        kind, outputs, self.model_name, self.token_text, parsed.top_logprobs, rid,
        int(time.time()), echo_prompts=parsed.prompts if parsed.echo else None))

  async def _stream(self, kind, parsed, rid, events, backlog, prompt_tokens, state):
    created = int(time.time())
    n = parsed.params.n
    k = len(parsed.prompts)
    usage_on = parsed.include_usage
    completion_tokens = 0
    text_offset: collections.Counter = collections.Counter()

    def sse(obj) -> str:
      return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    queued = collections.deque(backlog)
    if kind == "chat":  # OpenAI's first chunk of each choice: the role, no content
      first = [oaf.chunk_choice(kind, i, "", None, None, first=True) for i in range(k * n)]
      yield sse(oaf.chunk(kind, rid, created, self.model_name, first, usage_on))
    while len(state["done"]) < k:
      slot, ev = queued.popleft() if queued else await events.get()
      if isinstance(ev, driver_lib.Delta):
        d = ev.output
        text, token_ids = d.text, list(d.token_ids)
        finish = d.finish_reason if d.finished else None
        choice = slot * n + d.index
        completion_tokens += len(token_ids)
        prompt_lp = None
        if ev.prompt is not None:  # the prompt comes first (OpenAI's and vLLM's echo)
          prompt_text, prompt_lp = oaf.echo_parts(self.token_text, parsed.prompts[slot],
                                                  _PromptOnly(*ev.prompt), parsed.top_logprobs)
          text = prompt_text + text
          text_offset[choice] += len(prompt_text)
        lp = None
        if parsed.top_logprobs is not None and ev.logprobs is not None:
          if kind == "chat":
            lp = oaf.chat_logprobs(self.token_text, token_ids, ev.logprobs, parsed.top_logprobs)
          else:
            lp = oaf.completion_logprobs(self.token_text, token_ids, ev.logprobs,
                                         parsed.top_logprobs, text_offset[choice])
            text_offset[choice] += sum(len(t) for t in lp["tokens"])
        if prompt_lp is not None:
          lp = oaf.join_logprobs(prompt_lp, lp) if lp is not None else prompt_lp
        if not text and not token_ids and finish is None:
          continue
        # A chunk per delta that carries tokens, even when they have no text yet (a
        # character split over tokens, a possible stop string held back, or no
        # tokenizer): clients see progress token by token.
        c = oaf.chunk_choice(kind, choice, text if text or token_ids or kind != "chat"
                             else None, lp, finish)
        yield sse(oaf.chunk(kind, rid, created, self.model_name, [c], usage_on))
      elif isinstance(ev, driver_lib.Done):
        state["done"].add(slot)
      elif isinstance(ev, driver_lib.Failed):
        state["done"].add(slot)
        yield sse(oaf.driver_error(ev, kind).body())
        break
    if usage_on:
      final = oaf.chunk(kind, rid, created, self.model_name, [])
      final["usage"] = oaf.usage(sum(prompt_tokens), completion_tokens)
      yield sse(final)
    yield "data: [DONE]\n\n"
