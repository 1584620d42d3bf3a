"""An OpenAI-compatible HTTP server over one Engine (FastAPI; run it with uvicorn).

```python
app = create_app(engine, model_name="smollm2", api_key=None)
uvicorn.run(app, host="127.0.0.1", port=8000)
```

One engine, many clients. The engine is not thread-safe, so exactly one thread
owns it: `EngineLoop` runs its step loop in a background thread, and every engine
call (add_request, step, abort, get_output, release) happens there. HTTP handlers
run on the asyncio event loop; they hand new requests and aborts to the engine
thread through a thread-safe queue, and the engine thread hands each request's
deltas back to that request's asyncio.Queue with `loop.call_soon_threadsafe`.
New requests join the running batch between two steps (continuous batching).

A streaming client that disconnects is noticed by Starlette (it listens for
`http.disconnect` while streaming and cancels the stream); the request is then
aborted on the engine thread before its next step, which frees its KV pages.
A non-streaming request polls for the disconnect while it waits.

At capacity the server says so: past `max_pending` live engine requests (by
default the engine's own waiting-queue bound) a request is refused at once with
HTTP 429, a `Retry-After` header and an OpenAI error object, before anything is
queued; a refusal keeps nothing, so memory stays flat however many are refused.

Endpoints: POST /v1/chat/completions, POST /v1/completions (both streaming with
server-sent events or not; completions also with `echo`: the prompt's text and
log-probabilities before the completion's), POST /tokenize and /detokenize and
GET /tokenizer_info (vLLM's; what lm-eval's remote tokenizer reads), GET
/v1/models, GET /health (503 until the model is warmed up), GET /metrics
(Prometheus: the engine's registry and the server's); with a `batch_dir`,
OpenAI's Batch API: /v1/files and /v1/batches (frontends/batch_api.py). Requests
may carry vLLM's `priority` (lower first); batch lines run below them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from typing import Any, Callable

import prometheus_client as prom
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ridgeline.frontends import openai_format as oaf
from ridgeline.engine.sampling import SamplingParams

__all__ = ["create_app", "EngineLoop"]

log = logging.getLogger("ridgeline.server")

try:
  from ridgeline.engine.engine import CapacityError
except ImportError:  # pragma: no cover
  class CapacityError(RuntimeError):
    pass


# The engine thread ------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Sub:
  """One engine request (one prompt of an HTTP request). `post` is thread-safe."""

  rid: str
  slot: int  # the prompt's index in its HTTP request
  prompt: Any
  params: SamplingParams
  want_logprobs: bool
  stream: bool  # deltas as tokens come (else the engine hands out one at the end)
  post: Callable[[tuple], None]
  echo: bool = False  # the first delta of each completion carries the prompt
  priority: int = 0  # lower first (vLLM's meaning)
  echoed: set = dataclasses.field(default_factory=set)  # completions that carried it
  emitted: collections.Counter = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass
class _PromptOnly:
  """A prompt's ids and log-probabilities, as echo_parts reads them."""

  prompt_token_ids: list[int]
  prompt_logprobs: list | None


class EngineLoop:
  """Owns the engine: runs its steps in one background thread.

  Events posted to a request (tuples, first item the kind):
    ("accepted", slot, prompt_tokens)
    ("error", slot, OpenAIError)
    ("delta", slot, index, text, token_ids, logprobs | None, finish_reason | None,
     echo) -- echo: (prompt token ids, prompt logprobs | None) on a completion's
     first delta when the request echoes its prompt, else None
    ("done", slot, RequestOutput)
  """

  def __init__(self, engine, warmup: bool | str = True):
    self.engine = engine
    # True or "all": every step variant before /health says ready; "background":
    # the cover shapes (Engine.warmup); False or "none": nothing.
    self._warmup = {True: "all", False: "none"}.get(warmup, warmup)
    self._inbox: queue.Queue = queue.Queue()
    self._live: dict[str, _Sub] = {}
    self.ready = threading.Event()
    self.failed: str | None = None  # why the engine could not start
    self.steps = 0
    self._thread = threading.Thread(target=self._run, name="ridgeline-engine", daemon=True)

  # Called from any thread.
  def start(self) -> None:
    self._thread.start()

  def stop(self, timeout: float = 30.0) -> None:
    self._inbox.put(None)
    self._thread.join(timeout)

  def submit(self, subs: list[_Sub]) -> None:
    self._inbox.put(("add", subs))

  def abort(self, rids: list[str]) -> None:
    self._inbox.put(("abort", rids))

  # The engine thread.
  def _compile(self) -> None:
    """Compiles before /health says ready: the engine's own warm-up hook if it has
    one, else one short greedy request (the smallest prefill and decode shapes)."""
    hook = getattr(self.engine, "warmup", None)
    if callable(hook):
      hook(background=self._warmup == "background")
      return
    vocab = self.engine.model_config.vocab_size
    rid = "__warmup__"
    self.engine.add_request([i % vocab for i in range(1, 9)],
                            SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                            request_id=rid)
    while self.engine.has_unfinished():
      self.engine.step()
    out = self.engine.get_output(rid)
    self.engine.release(rid)
    if out.error:
      raise RuntimeError(f"warm-up request failed: {out.error}")

  def _run(self) -> None:
    try:
      if self._warmup != "none":
        t0 = time.perf_counter()
        self._compile()
        log.info("engine warmed up in %.1f s", time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 -- reported by /health
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
          self._fail_all(oaf.OpenAIError("server shutting down", status=503,
                                         type="server_error"))
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
          self._fail_all(oaf.OpenAIError(f"engine step failed: {type(e).__name__}: {e}",
                                         status=500, type="server_error"))
          continue
        self.steps += 1
        self._dispatch(result)

  def _add(self, subs: list[_Sub]) -> None:
    for sub in subs:
      try:
        self.engine.add_request(sub.prompt, sub.params, request_id=sub.rid, stream=sub.stream,
                                priority=sub.priority)
      except CapacityError as e:
        sub.post(("error", sub.slot, oaf.OpenAIError(str(e), status=429,
                                                     type="rate_limit_error",
                                                     code="rate_limit_exceeded")))
        continue
      except Exception as e:  # noqa: BLE001 -- a duplicate id or a bug: this request only
        sub.post(("error", sub.slot, oaf.OpenAIError(str(e), status=500,
                                                     type="server_error")))
        continue
      out = self.engine.get_output(sub.rid)
      if out.error is not None:  # refused by the engine's checks (length, ids, ...)
        self.engine.release(sub.rid)
        sub.post(("error", sub.slot, out.error))
        continue
      self._live[sub.rid] = sub
      sub.post(("accepted", sub.slot, len(out.prompt_token_ids)))

  def _abort(self, rids: list[str]) -> None:
    for rid in rids:
      if self._live.pop(rid, None) is not None:
        self.engine.abort(rid)  # frees its pages now
        with contextlib.suppress(KeyError, ValueError):
          self.engine.release(rid)

  def _finish(self, sub: _Sub) -> None:
    out = self.engine.get_output(sub.rid)
    self.engine.release(sub.rid)
    del self._live[sub.rid]
    sub.post(("done", sub.slot, out))

  def _dispatch(self, result) -> None:
    by_rid = collections.defaultdict(list)
    for d in result.deltas:
      by_rid[d.request_id].append(d)
    for rid, ds in by_rid.items():
      sub = self._live.get(rid)
      if sub is None:
        continue
      out = self.engine.get_output(rid) if sub.want_logprobs or sub.echo else None
      completions = {c.index: c for c in out.outputs} if out is not None else {}
      for d in ds:
        lps = None
        if sub.want_logprobs and d.index in completions:
          start = sub.emitted[d.index]
          lps = (completions[d.index].logprobs or [])[start:start + len(d.token_ids)]
        echo = None
        if sub.echo and d.index not in sub.echoed:
          sub.echoed.add(d.index)
          echo = (out.prompt_token_ids, out.prompt_logprobs)
        sub.emitted[d.index] += len(d.token_ids)
        sub.post(("delta", sub.slot, d.index, d.text, list(d.token_ids), lps,
                  d.finish_reason if d.finished else None, echo))
    for rid in result.finished:
      sub = self._live.get(rid)
      if sub is not None:
        self._finish(sub)

  def _fail_all(self, error: oaf.OpenAIError) -> None:
    for rid, sub in list(self._live.items()):
      self._abort([rid])
      sub.post(("error", sub.slot, error))


# The app ------------------------------------------------------------------------------


def _error_response(e: oaf.OpenAIError, headers: dict | None = None) -> JSONResponse:
  return JSONResponse(e.body(), status_code=e.status, headers=headers)


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


class _Server:
  def __init__(self, engine, model_name: str, max_pending: int, retry_after_s: int,
               warmup: bool | str):
    self.engine = engine
    self.model_name = model_name
    self.max_pending = max_pending
    self.retry_after_s = retry_after_s
    self.loop = EngineLoop(engine, warmup=warmup)
    self.pending = 0  # live engine requests; touched on the event loop only
    self.created = int(time.time())
    self.token_text = oaf.TokenText(engine.tokenizer)
    r = self.registry = prom.CollectorRegistry()
    self.http_requests = prom.Counter("ridgeline_server_requests", "HTTP completion requests "
                                      "by outcome", ["outcome"], registry=r)
    self.pending_gauge = prom.Gauge("ridgeline_server_pending_requests",
                                    "Engine requests the server has in flight", registry=r)

  # The request path.
  async def complete(self, kind: str, request: Request) -> Any:
    try:
      body = json.loads(await request.body())
    except ValueError as e:
      raise oaf.OpenAIError(f"malformed JSON body: {e}", None) from None
    parsed = oaf.parse_request(
        kind, body, oaf.CHAT_DEFAULTS if kind == "chat" else oaf.COMPLETION_DEFAULTS)
    if parsed.model is not None and parsed.model != self.model_name:
      raise oaf.OpenAIError(f"The model `{parsed.model}` does not exist; this server "
                            f"serves `{self.model_name}`", "model", status=404,
                            code="model_not_found")
    if not self.loop.ready.is_set() or self.loop.failed:
      raise oaf.OpenAIError("the model is still loading" if not self.loop.failed
                            else f"the engine failed: {self.loop.failed}", status=503,
                            type="server_error")
    k = len(parsed.prompts)
    if self.pending + k > self.max_pending:
      self.http_requests.labels("rejected_capacity").inc()
      raise oaf.OpenAIError(
          f"server at capacity: {self.pending} requests in flight (bound {self.max_pending}); "
          f"retry after {self.retry_after_s} s", status=429, type="rate_limit_error",
          code="rate_limit_exceeded")

    events: asyncio.Queue = asyncio.Queue()
    aloop = asyncio.get_running_loop()

    def post(event, _put=events.put_nowait):
      with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown)
        aloop.call_soon_threadsafe(_put, event)

    base = uuid.uuid4().hex
    subs = [_Sub(f"{base}-{p}", p, prompt, parsed.params, parsed.top_logprobs is not None,
                 parsed.stream, post, parsed.echo, parsed.priority)
            for p, prompt in enumerate(parsed.prompts)]
    state = {"open": True, "done": set()}
    self.pending += k
    self.pending_gauge.set(self.pending)

    def close() -> None:  # idempotent: abort what is still running, give the slots back
      if not state["open"]:
        return
      state["open"] = False
      left = [s.rid for s in subs if s.slot not in state["done"]]
      if left:
        self.loop.abort(left)
      self.pending -= k
      self.pending_gauge.set(self.pending)

    try:
      self.loop.submit(subs)
      prompt_tokens = [0] * k
      backlog = []  # deltas that arrive before every prompt is accepted
      accepted = 0
      while accepted < k:
        ev = await events.get()
        if ev[0] == "accepted":
          prompt_tokens[ev[1]] = ev[2]
          accepted += 1
        elif ev[0] == "error":
          state["done"].add(ev[1])
          err = ev[2]
          if isinstance(err, str):
            err = oaf.engine_error(err, kind)
          raise err
        else:
          backlog.append(ev)
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
    pending = collections.deque(backlog)
    while len(state["done"]) < k:
      if pending:
        ev = pending.popleft()
      else:
        try:
          ev = await asyncio.wait_for(events.get(), timeout=1.0)
        except asyncio.TimeoutError:
          if await request.is_disconnected():
            self.http_requests.labels("client_disconnected").inc()
            return PlainTextResponse("", status_code=499)  # nobody reads it
          continue
      if ev[0] == "done":
        outputs[ev[1]] = ev[2]
        state["done"].add(ev[1])
      elif ev[0] == "error":
        state["done"].add(ev[1])
        raise ev[2] if isinstance(ev[2], oaf.OpenAIError) else oaf.engine_error(ev[2], kind)
    return JSONResponse(oaf.response_body(
        kind, outputs, self.model_name, self.token_text, parsed.top_logprobs, rid,
        int(time.time()), echo_prompts=parsed.prompts if parsed.echo else None))

  async def _stream(self, kind, parsed, rid, events, backlog, prompt_tokens, state):
    created = int(time.time())
    n = parsed.params.n
    k = len(parsed.prompts)
    usage_on = parsed.include_usage
    completion_tokens = 0
    started: set[int] = set()
    text_offset: collections.Counter = collections.Counter()

    def sse(obj) -> str:
      return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    pending = collections.deque(backlog)
    if kind == "chat":  # OpenAI's first chunk of each choice: the role, no content
      first = [oaf.chunk_choice(kind, i, "", None, None, first=True) for i in range(k * n)]
      started.update(range(k * n))
      yield sse(oaf.chunk(kind, rid, created, self.model_name, first, usage_on))
    while len(state["done"]) < k:
      ev = pending.popleft() if pending else await events.get()
      if ev[0] == "delta":
        _, slot, index, text, token_ids, lps, finish, echo = ev
        choice = slot * n + index
        completion_tokens += len(token_ids)
        prompt_lp = None
        if echo is not None:  # the prompt comes first (OpenAI's and vLLM's echo)
          ids, prompt_logprobs = echo
          out = _PromptOnly(ids, prompt_logprobs)
          prompt_text, prompt_lp = oaf.echo_parts(self.token_text, parsed.prompts[slot], out,
                                                  parsed.top_logprobs)
          text = prompt_text + text
          text_offset[choice] += len(prompt_text)
        lp = None
        if parsed.top_logprobs is not None and lps is not None:
          if kind == "chat":
            lp = oaf.chat_logprobs(self.token_text, token_ids, lps, parsed.top_logprobs)
          else:
            lp = oaf.completion_logprobs(self.token_text, token_ids, lps,
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
      elif ev[0] == "done":
        state["done"].add(ev[1])
      elif ev[0] == "error":
        state["done"].add(ev[1])
        err = ev[2] if isinstance(ev[2], oaf.OpenAIError) else oaf.engine_error(ev[2], kind)
        yield sse(err.body())
        break
    if usage_on:
      final = oaf.chunk(kind, rid, created, self.model_name, [])
      final["usage"] = oaf.usage(sum(prompt_tokens), completion_tokens)
      yield sse(final)
    yield "data: [DONE]\n\n"


def create_app(engine, model_name: str | None = None, api_key: str | None = None,
               max_pending: int | None = None, retry_after_s: int = 1,
               warmup: bool | str = True, batch_dir: str | None = None) -> FastAPI:
  """The FastAPI app over `engine`. Its engine thread starts with the app (lifespan)
  and stops with it.

  model_name: what /v1/models lists and requests may name (default: the model
    config's name). api_key: if set, /v1/* need `Authorization: Bearer <key>`
    (compared in constant time); /health and /metrics stay open. max_pending:
    most engine requests in flight before 429 (default: the engine's max_waiting).
    batch_dir: enables OpenAI's Batch API (frontends/batch_api.py) over this
    directory (its files, batches and journals; resumed on start).
  """
  name = model_name or getattr(engine.model_config, "name", None) or "ridgeline"
  bound = max_pending if max_pending is not None else engine.config.max_waiting
  server = _Server(engine, name, bound, retry_after_s, warmup)
  key = api_key.encode() if api_key else None

  batches = None
  if batch_dir is not None:
    from ridgeline.frontends.batch_api import BatchRunner
    batches = BatchRunner(batch_dir, server.loop, engine, name, registry=server.registry)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    server.loop.start()
    if batches is not None:
      batches.start()
    try:
      yield
    finally:
      if batches is not None:
        await asyncio.get_running_loop().run_in_executor(None, batches.stop)
      await asyncio.get_running_loop().run_in_executor(None, server.loop.stop)

  app = FastAPI(title="Ridgeline", lifespan=lifespan)
  app.state.server = server

  @app.middleware("http")
  async def auth(request: Request, call_next):
    if key is not None and request.url.path.startswith("/v1/"):
      given = request.headers.get("authorization", "")
      token = given[7:] if given[:7].lower() == "bearer " else ""
      if not hmac.compare_digest(token.encode(), key):
        return JSONResponse(oaf.error_body("Incorrect API key provided", "invalid_request_error",
                                           None, "invalid_api_key"), status_code=401)
    return await call_next(request)

  @app.exception_handler(oaf.OpenAIError)
  async def openai_error(request: Request, e: oaf.OpenAIError):
    headers = {"Retry-After": str(server.retry_after_s)} if e.status == 429 else None
    if e.status == 400:
      server.http_requests.labels("invalid").inc()
    return _error_response(e, headers)

  @app.exception_handler(RequestValidationError)
  async def validation_error(request: Request, e: RequestValidationError):
    err = (e.errors() or [{}])[0]
    param = oaf._param_from_loc(err.get("loc", ()))
    return _error_response(oaf.OpenAIError(f"{param}: {err.get('msg')}", param))

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request: Request, e: StarletteHTTPException):
    return JSONResponse(oaf.error_body(str(e.detail), "invalid_request_error"),
                        status_code=e.status_code)

  @app.exception_handler(Exception)
  async def internal_error(request: Request, e: Exception):
    log.exception("unhandled error")
    return JSONResponse(oaf.error_body(f"internal error: {type(e).__name__}: {e}",
                                       "server_error"), status_code=500)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    return await server.complete("chat", request)

  @app.post("/v1/completions")
  async def completions(request: Request):
    return await server.complete("completion", request)

  # vLLM's tokenizer endpoints (and /tokenizer_info, which lm-eval's remote tokenizer
  # reads), so a client needs no tokenizer files of its own.
  def _tokenizer():
    if engine.tokenizer is None:
      raise oaf.OpenAIError("this model has no tokenizer (it serves token ids only)",
                            status=404, code="no_tokenizer")
    return engine.tokenizer

  async def _json(request: Request):
    try:
      return json.loads(await request.body())
    except ValueError as e:
      raise oaf.OpenAIError(f"malformed JSON body: {e}") from None

  @app.post("/tokenize")
  async def tokenize(request: Request):
    return oaf.tokenize(_tokenizer(), await _json(request), engine.config.max_model_len)

  @app.post("/detokenize")
  async def detokenize(request: Request):
    return oaf.detokenize(_tokenizer(), await _json(request))

  @app.get("/tokenizer_info")
  async def tokenizer_info():
    return oaf.tokenizer_info(_tokenizer(), engine.config.max_model_len)

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{
        "id": name, "object": "model", "created": server.created, "owned_by": "ridgeline",
        "max_model_len": engine.config.max_model_len}]}

  _add_batch_api(app, batches, engine)

  @app.get("/health")
  async def health():
    if server.loop.failed:
      return JSONResponse({"status": "failed", "error": server.loop.failed}, status_code=503)
    if not server.loop.ready.is_set():
      return JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ok"}

  @app.get("/metrics")
  async def metrics():
    text = prom.generate_latest(engine.metrics.registry) + prom.generate_latest(
        server.registry)
    return PlainTextResponse(text, media_type=prom.CONTENT_TYPE_LATEST)

  return app


def _add_batch_api(app: FastAPI, batches, engine) -> None:
  """OpenAI's Files and Batches endpoints over `batches` (a BatchRunner; None:
  every one of them says how to enable it)."""

  def runner():
    if batches is None:
      raise oaf.OpenAIError("the Batch API is off: start the server with --batch_dir DIR "
                            "(create_app(batch_dir=...))", status=404,
                            code="batch_api_disabled")
    return batches

  def public(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("_")}

  @app.post("/v1/files")
  async def create_file(file: UploadFile = File(...), purpose: str = Form(...)):
    from ridgeline.frontends.batch_api import check_upload
    store = runner().files
    if purpose != "batch":
      raise oaf.OpenAIError(f"purpose must be 'batch' (the only one this server keeps), "
                            f"got {purpose!r}", "purpose")
    tmp = os.path.join(store.dir, f"upload-{uuid.uuid4().hex}.tmp")
    try:
      with open(tmp, "wb") as f:  # noqa: ASYNC230 -- the writes go to a thread
        while chunk := await file.read(1 << 20):
          await asyncio.to_thread(f.write, chunk)
      # Checked off the event loop (it tokenizes every prompt).
      await asyncio.get_running_loop().run_in_executor(
          None, check_upload, tmp, engine.check_request)
      return store.add(f"file-{uuid.uuid4().hex}", file.filename or "upload.jsonl", purpose,
                       tmp)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

  @app.get("/v1/files")
  async def list_files(purpose: str | None = None):
    data = runner().files.list(purpose)
    return {"object": "list", "data": data, "has_more": False,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}

  @app.get("/v1/files/{file_id}")
  async def get_file(file_id: str):
    return runner().files.get(file_id)

  @app.get("/v1/files/{file_id}/content")
  async def file_content(file_id: str):
    store = runner().files
    meta = store.get(file_id)
    return FileResponse(store.path(file_id), media_type="application/jsonl",
                        filename=meta["filename"])

  @app.delete("/v1/files/{file_id}")
  async def delete_file(file_id: str):
    return runner().files.delete(file_id)

  @app.post("/v1/batches")
  async def create_batch(request: Request):
    try:
      body = json.loads(await request.body())
    except ValueError as e:
      raise oaf.OpenAIError(f"malformed JSON body: {e}") from None
    return public(runner().create(body))

  @app.get("/v1/batches")
  async def list_batches(limit: int = 20, after: str | None = None):
    if not 1 <= limit <= 100:
      raise oaf.OpenAIError(f"limit must be in [1, 100], got {limit}", "limit")
    page = runner().list(limit, after)
    page["data"] = [public(b) for b in page["data"]]
    return page

  @app.get("/v1/batches/{batch_id}")
  async def get_batch(batch_id: str):
    return public(runner().get(batch_id))

  @app.post("/v1/batches/{batch_id}/cancel")
  async def cancel_batch(batch_id: str):
    return public(runner().cancel(batch_id))
