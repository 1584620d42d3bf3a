"""Live servers for tests: uvicorn in a thread on a free 127.0.0.1 port, and the
readiness wait that tests starting a server process use too (one copy each, the
serving benchmark's: tools/serve_bench.py)."""

from __future__ import annotations

import contextlib
import socket
import threading

import uvicorn

from ridgeline.tools.serve_bench import free_port, wait_healthy

__all__ = ["serve_in_thread", "free_port", "wait_healthy"]


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

  def alive() -> None:
    assert thread.is_alive(), "server did not become ready"

  try:
    wait_healthy(url, timeout_s, alive, poll_s=0.1)
    yield url
  finally:
    server.should_exit = True
    thread.join(30)
    sock.close()
