"""A live server for tests: uvicorn in a thread on a free 127.0.0.1 port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import uvicorn


@contextlib.contextmanager
def serve_in_thread(app, timeout_s: float = 120.0):
  """Runs `app` with uvicorn in a thread on a free 127.0.0.1 port; yields the base URL
  once /health says ready. Keep-alive outlasts the test's own pauses (a pooled
  connection the server closes just as the client reuses it is a connection error)."""
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5,
                                         timeout_keep_alive=300))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  url = f"http://127.0.0.1:{port}"
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      if httpx.get(url + "/health", timeout=5).status_code == 200:
        break
    except httpx.TransportError:
      pass
    assert time.monotonic() < deadline and thread.is_alive(), "server did not become ready"
    time.sleep(0.1)
  try:
    yield url
  finally:
    server.should_exit = True
    thread.join(30)
    sock.close()
