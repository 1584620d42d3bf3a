"""A serving benchmark in the manner of `vllm bench serve`: Poisson arrivals at
several request rates, through real HTTP streaming against the OpenAI-compatible
server (frontends/server.py), reporting TTFT, TPOT and inter-token latency
percentiles, output tokens/s and refusals (429).

```python
with start_server([sys.executable, "scripts/serve.py", "--model", "tiny"]) as url:
  results = run(ServeBenchConfig(url=url, rates=(1, 4, 16), num_requests=32))
print(format_table(results))
```

Each request is a streaming /v1/completions call with a random token-id prompt of
`input_len` tokens and `max_tokens = output_len`, `ignore_eos`, greedy, so every
request generates exactly `output_len` tokens (vLLM's random dataset does the
same). Definitions follow vLLM's:

  TTFT  send to the first streamed token
  TPOT  (end - first token) / (output tokens - 1), per request
  ITL   the gaps between consecutive streamed chunks, over all requests
  output tok/s  all output tokens / (last response end - first request sent)

Where the server reaches capacity: the first rate whose achieved request rate
falls below 90% of the offered one, or whose median TTFT exceeds 10x that of the
lowest rate (requests queue instead of being served as they come), or which
gets 429s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import time
from typing import Callable, Iterator, Sequence

import httpx
import numpy as np

from ridgeline.util import percentiles

logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise


@dataclasses.dataclass(frozen=True)
class ServeBenchConfig:
  url: str | None = None  # None: main() starts a server
  rates: Sequence[float] = (1.0, 4.0, 16.0)  # requests/s; inf = all at once
  num_requests: int = 32  # per rate
  input_len: int = 32
  output_len: int = 32
  model: str | None = None  # default: the server's only model
  api_key: str | None = None
  seed: int = 0
  vocab_limit: int = 500  # prompt ids are drawn from [1, vocab_limit)
  timeout_s: float = 300.0  # per request (one slower counts as failed)
  # Before the rates, untimed bursts of 1, 2, 4, ... up to this many requests: they
  # compile the step shapes (batch buckets) the rates will meet, which would
  # otherwise land in their figures (measured on the tiny model: p50 TTFT 5.5 s at
  # 4 req/s after 2 warm-up requests, 2.2 s after one burst of 32, compilation
  # included). None: num_requests; 0: no warm-up.
  warmup_requests: int | None = None


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float = 600.0, alive: Callable[[], None] | None = None,
                 poll_s: float = 0.25) -> None:
  """Polls `url`/health until it answers 200. `alive()` raises when the server
  is gone (its process exited, its thread ended), so that nobody waits for a
  server that will not come; TimeoutError after `timeout_s`."""
  deadline = time.monotonic() + timeout_s
  while True:
    if alive is not None:
      alive()
    try:
      if httpx.get(url + "/health", timeout=5).status_code == 200:
        return
    except httpx.TransportError:
      pass
    if time.monotonic() > deadline:
      raise TimeoutError(f"the server was not ready after {timeout_s} s")
    time.sleep(poll_s)


@contextlib.contextmanager
def start_server(command: Sequence[str], port: int | None = None, timeout_s: float = 600.0,
                 log_path: str | None = None, env: dict | None = None) -> Iterator[str]:
  """Runs `command --host 127.0.0.1 --port PORT` (the server and its flags) in a
  subprocess; yields its URL once /health says ready; stops it afterwards."""
  port = port or free_port()
  log = open(log_path, "wb") if log_path else subprocess.DEVNULL
  proc = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)],
                          stdout=log, stderr=subprocess.STDOUT, env=env)
  url = f"http://127.0.0.1:{port}"

  def alive() -> None:
    if proc.poll() is not None:
      raise RuntimeError(f"the server exited with status {proc.returncode} before it was "
                         f"ready (log: {log_path or 'not kept'})")

  try:
    wait_healthy(url, timeout_s, alive)
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    if log_path:
      log.close()


@dataclasses.dataclass
class _Result:
  status: int = 0
  sent: float = 0.0
  chunk_times: list = dataclasses.field(default_factory=list)
  end: float = 0.0
  output_tokens: int = 0
  error: str | None = None


async def _one(client: httpx.AsyncClient, body: dict, sent: float, timeout_s: float) -> _Result:
  """One streaming request; one that takes over `timeout_s` in all counts as failed
  (the others of its rate keep their results)."""
  r = _Result(sent=sent)
  try:
    async with asyncio.timeout(timeout_s), client.stream(
        "POST", "/v1/completions", json=body) as resp:
      r.status = resp.status_code
      if resp.status_code != 200:
        await resp.aread()
        r.error = resp.text[:200]
        r.end = time.perf_counter()
        return r
      async for line in resp.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
          continue
        obj = json.loads(line[6:])
        if "error" in obj:
          r.error = obj["error"].get("message")
        if obj.get("usage"):
          r.output_tokens = obj["usage"]["completion_tokens"]
        if obj.get("choices"):  # a chunk per step that produced tokens
          r.chunk_times.append(time.perf_counter())
  except httpx.HTTPError as e:
    r.error = f"{type(e).__name__}: {e}"
  except TimeoutError:
    r.error = f"timed out after {timeout_s} s"
  r.end = time.perf_counter()
  return r


async def _run_rate(cfg: ServeBenchConfig, model: str, rate: float, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  prompts = rng.integers(1, cfg.vocab_limit, size=(cfg.num_requests, cfg.input_len)).tolist()
  gaps = (np.zeros(cfg.num_requests) if not np.isfinite(rate)
          else rng.exponential(1.0 / rate, size=cfg.num_requests))
  headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
  limits = httpx.Limits(max_connections=cfg.num_requests + 8,
                        max_keepalive_connections=cfg.num_requests + 8)
  async with httpx.AsyncClient(base_url=cfg.url, timeout=cfg.timeout_s, limits=limits,
                               headers=headers) as client:
    tasks = []
    t0 = time.perf_counter()
    next_at = t0
    for prompt, gap in zip(prompts, gaps):
      next_at += gap
      delay = next_at - time.perf_counter()
      if delay > 0:
        await asyncio.sleep(delay)
      body = {"model": model, "prompt": prompt, "max_tokens": cfg.output_len,
              "temperature": 0, "ignore_eos": True, "stream": True,
              "stream_options": {"include_usage": True}}
      tasks.append(asyncio.create_task(_one(client, body, time.perf_counter(), cfg.timeout_s)))
    results = await asyncio.gather(*tasks)
  ok = [r for r in results if r.status == 200 and r.error is None and r.chunk_times]
  wall = max(r.end for r in results) - t0
  ttft = [r.chunk_times[0] - r.sent for r in ok]
  tpot = [(r.end - r.chunk_times[0]) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
  itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
  out_tokens = sum(r.output_tokens for r in ok)
  return {
      "rate": rate, "requests": len(results), "completed": len(ok),
      "rejected_429": sum(r.status == 429 for r in results),
      "failed": sum(r.status not in (200, 429) or (r.status == 200 and r.error is not None)
                    for r in results),
      "duration_s": wall, "request_throughput": len(ok) / wall if wall else 0.0,
      "output_tokens": out_tokens, "output_tok_s": out_tokens / wall if wall else 0.0,
      "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot), "itl_s": percentiles(itl),
      "errors": sorted({r.error for r in results if r.error})[:3],
  }


async def _server_model(cfg: ServeBenchConfig) -> str:
  headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
  async with httpx.AsyncClient(base_url=cfg.url, timeout=60, headers=headers) as client:
    r = await client.get("/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def run(cfg: ServeBenchConfig) -> list[dict]:
  """One run per rate (after a few untimed warm-up requests); results in rate order,
  with `saturated` marking the rates at or past capacity."""
  async def main():
    model = cfg.model or await _server_model(cfg)
    warm = cfg.num_requests if cfg.warmup_requests is None else cfg.warmup_requests
    burst = 1
    while warm and burst <= warm:
      await _run_rate(dataclasses.replace(cfg, num_requests=burst), model, float("inf"),
                      cfg.seed + 10_000 + burst)
      burst = burst * 2 if burst * 2 <= warm or burst == warm else warm
    return [await _run_rate(cfg, model, float(rate), cfg.seed + i)
            for i, rate in enumerate(cfg.rates)]
  results = asyncio.run(main())
  mark_capacity(results)
  return results


def mark_capacity(results: list[dict]) -> float | None:
  """Sets `saturated` on each result; returns the first saturated rate (None if none)."""
  base = min((r["ttft_s"]["p50"] for r in results if r["ttft_s"]), default=None)
  first = None
  for r in sorted(results, key=lambda r: r["rate"]):
    offered = r["rate"] if np.isfinite(r["rate"]) else float("inf")
    behind = np.isfinite(offered) and r["request_throughput"] < 0.9 * offered
    queued = base is not None and r["ttft_s"] is not None and r["ttft_s"]["p50"] > 10 * base
    r["saturated"] = bool(behind or queued or r["rejected_429"] or r["failed"])
    if r["saturated"] and first is None:
      first = r["rate"]
  return first


def format_table(results: list[dict]) -> str:
  def ms(d, k):
    return f"{d[k] * 1e3:8.1f}" if d else "     n/a"
  head = (f"{'rate':>6} {'done':>5} {'429':>4} {'req/s':>6} {'out tok/s':>9} "
          f"{'TTFT p50':>8} {'p90':>8} {'p99':>8} {'TPOT p50':>8} {'p90':>8} {'p99':>8} "
          f"{'ITL p50':>8} {'p90':>8} {'p99':>8}  saturated")
  lines = [head + "   (times in ms)"]
  for r in results:
    rate = "inf" if not np.isfinite(r["rate"]) else f"{r['rate']:g}"
    t, p, i = r["ttft_s"], r["tpot_s"], r["itl_s"]
    lines.append(
        f"{rate:>6} {r['completed']:>5} {r['rejected_429']:>4} {r['request_throughput']:6.2f} "
        f"{r['output_tok_s']:9.1f} {ms(t, 'p50')} {ms(t, 'p90')} {ms(t, 'p99')} "
        f"{ms(p, 'p50')} {ms(p, 'p90')} {ms(p, 'p99')} {ms(i, 'p50')} {ms(i, 'p90')} "
        f"{ms(i, 'p99')}  {'yes' if r.get('saturated') else 'no'}")
  first = next((r["rate"] for r in results if r.get("saturated")), None)
  lines.append("capacity: " + (f"reached at {first:g} requests/s" if first is not None
                               else "not reached at these rates"))
  return "\n".join(lines)


# The model and engine flags (cli/flags_common.py) a benchmark passes on to
# the server it starts.
SERVER_FLAGS = ("checkpoint", "model", "cache_dir", "dtype", "page_size", "num_pages",
                "kv_cache_mb", "memory_fraction", "max_batch", "max_model_len",
                "prefill_chunk", "max_prefill_batch", "compilation_cache_dir", "mesh",
                "quantize", "kv_cache_dtype", "precompile", "host_kv_cache_gb", "host_kv_policy",
                "batch_rows")


def server_command() -> tuple[list[str], dict]:
  """The command and environment that start this installation's server:
  `python -m ridgeline.cli.serve` with this interpreter and environment, so the
  server imports the same `ridgeline` this process does."""
  return [sys.executable, "-m", "ridgeline.cli.serve"], dict(os.environ)


def main(cfg: ServeBenchConfig, server_flags: Sequence[str], output: str,
         label: str = "") -> list[dict]:
  """The benchmark script's `serve` mode: starts the server (`server_command`) with
  `server_flags` unless `cfg.url` names a running server, runs every rate, prints
  the table and writes the results (JSON) to `output`, the server's log beside it."""
  with contextlib.ExitStack() as stack:
    if not cfg.url:
      command, env = server_command()
      cmd = [*command, *server_flags]
      log = str(pathlib.Path(output).with_suffix(".server.log"))
      print(f"starting the server: {' '.join(cmd)} (log: {log})", flush=True)
      cfg = dataclasses.replace(cfg, url=stack.enter_context(
          start_server(cmd, log_path=log, env=env)))
    results = run(cfg)
  print(format_table(results))
  out = pathlib.Path(output)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"serve": results, "config": dataclasses.asdict(cfg),
                             "command": sys.argv, "label": label}, indent=1, default=float))
  print(f"\nresults: {out}")
  return results
