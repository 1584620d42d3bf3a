"""An ASGI app called in process: one HTTP request through it as an async
generator, (status, headers) first, then the body's chunks as the app sends them.

The Serve ingress (frontends/fleet/serve.py) hands a request to a replica through a
deployment handle; the replica runs it through its own FastAPI app here, so SSE
streams stay streams and a client that goes away is a disconnect the app sees.
"""

from __future__ import annotations

import asyncio


def _scope(method: str, path: str, query: bytes, headers: list) -> dict:
  return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
          "http_version": "1.1", "method": method, "scheme": "http", "path": path,
          "raw_path": path.encode(), "query_string": query, "root_path": "",
          "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
          "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}


async def call_asgi(app, method: str, path: str, query: bytes, headers: list, body: bytes):
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
