"""An OpenAI-compatible HTTP server over one Engine (FastAPI; run it with uvicorn).

```python
app = create_app(engine, model_name="smollm2", api_key=None)
uvicorn.run(app, host="127.0.0.1", port=8000)
```

One engine, many clients. The engine is not thread-safe, so exactly one thread
owns it: the engine driver (engine/driver.py) runs its step loop in a background
thread, and every engine call happens there. HTTP handlers run on the asyncio
event loop and hand requests and aborts to the driver; new requests join the
running batch between two steps (continuous batching). The request path, from
the body to the response or the event stream, is frontends/completions.py.

At capacity the server says so: past `max_pending` live engine requests (by
default the engine's own waiting-queue bound) a request is refused at once with
HTTP 429, a `Retry-After` header and an OpenAI error object, before anything is
queued; a refusal keeps nothing, so memory stays flat however many are refused.

This module is the app: its lifespan (the driver, and the Batch API's runner,
start and stop with it), the API key check, the error handlers (every error an
OpenAI error object) and the routes. Endpoints: POST /v1/chat/completions, POST
/v1/completions (both streaming with server-sent events or not; completions also
with `echo`: the prompt's text and log-probabilities before the completion's),
POST /tokenize and /detokenize and GET /tokenizer_info (vLLM's; what lm-eval's
remote tokenizer reads), GET /v1/models, GET /health (503 until the model is
warmed up), GET /metrics (Prometheus: the engine's registry and the server's);
with a `batch_dir`, OpenAI's Batch API: /v1/files and /v1/batches
(frontends/batch_api.py). Requests may carry vLLM's `priority` (lower first);
batch lines run below them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging

import prometheus_client as prom
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ridgeline.frontends import batch_api
from ridgeline.frontends import openai_format as oaf
from ridgeline.frontends import tokenizer_api
from ridgeline.frontends.completions import Completions, json_body

__all__ = ["create_app"]

log = logging.getLogger("ridgeline.server")


def _error_response(e: oaf.OpenAIError, headers: dict | None = None) -> JSONResponse:
  return JSONResponse(e.body(), status_code=e.status, headers=headers)


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
  server = Completions(engine, name, bound, retry_after_s, warmup)
  key = api_key.encode() if api_key else None

  batches = None
  if batch_dir is not None:
    batches = batch_api.BatchRunner(batch_dir, server.driver, engine, name,
                                    registry=server.registry)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    server.driver.start()
    if batches is not None:
      batches.start()
    try:
      yield
    finally:
      if batches is not None:
        await asyncio.get_running_loop().run_in_executor(None, batches.stop)
      await asyncio.get_running_loop().run_in_executor(None, server.driver.stop)

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

  @app.post("/tokenize")
  async def tokenize(request: Request):
    return tokenizer_api.tokenize(_tokenizer(), await json_body(request),
                                  engine.config.max_model_len)

  @app.post("/detokenize")
  async def detokenize(request: Request):
    return tokenizer_api.detokenize(_tokenizer(), await json_body(request))

  @app.get("/tokenizer_info")
  async def tokenizer_info():
    return tokenizer_api.tokenizer_info(_tokenizer(), engine.config.max_model_len)

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{
        "id": name, "object": "model", "created": server.created, "owned_by": "ridgeline",
        "max_model_len": engine.config.max_model_len}]}

  batch_api.add_routes(app, batches, engine)

  @app.get("/health")
  async def health():
    if server.driver.failed:
      return JSONResponse({"status": "failed", "error": server.driver.failed}, status_code=503)
    if not server.driver.ready.is_set():
      return JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ok"}

  @app.get("/metrics")
  async def metrics():
    text = prom.generate_latest(engine.metrics.registry) + prom.generate_latest(
        server.registry)
    return PlainTextResponse(text, media_type=prom.CONTENT_TYPE_LATEST)

  return app
