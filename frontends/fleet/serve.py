"""A fleet of servers on Ray Serve, behind one routing ingress (`serve_fleet`).

N replicas of frontends/server.py's OpenAI-compatible app, one engine each, behind one
ingress. Each replica is its own one-replica deployment, so the ingress can address
it: it routes with the same PrefixAffinity rule as the batch job (Serve's own
routers pick among interchangeable replicas by queue length alone), over loads it
keeps itself (requests it has in flight on each replica) and reads from the
replicas (KV utilization, running and waiting, every 0.25 s). When every replica is
at its bound the ingress answers 429 with Retry-After itself: nothing is queued.

The ingress reaches a replica through a deployment handle, not a second HTTP hop:
the replica runs the request through its app in process (frontends/fleet/asgi.py).
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any, Sequence

from ridgeline.engine.build import EngineSpec
from ridgeline.frontends.fleet.asgi import call_asgi
from ridgeline.frontends.fleet.routing import EngineLoad, PrefixAffinity, prefix_blocks


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
    async for part in call_asgi(self.app, method, path, query, headers, body):
      yield part

  async def load(self) -> dict:
    await self._started()
    e = self.engine
    return {"pid": os.getpid(), "max_batch": e.config.max_batch,
            "max_pending": self.max_pending, "kv_utilization": e.kv_utilization(),
            "ready": self.app.state.server.driver.ready.is_set()}

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
