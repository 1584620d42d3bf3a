"""The Batch API in the valleys of interactive traffic (scripts/benchmark.py
--mode batch_api): does queued batch work leave interactive latency alone, and
how much of the idle server's batch throughput does it keep?

Against one server (started with --batch_dir, or --url), in one run:

1. capacity: the server's interactive request throughput, all `num_requests`
   requests of `input_len` / `output_len` tokens sent at once (after warm-up
   bursts that compile the shapes);
2. interactive alone: Poisson arrivals at half that rate -> TTFT percentiles;
3. the same arrivals (same seed) with one `batch_lines`-line batch queued
   (/v1/files + /v1/batches, the same request lengths) -> TTFT, and the batch's
   lines finished per second over those arrivals;
4. the batch alone for as long -> lines per second; then it is cancelled.

Targets: interactive TTFT p50 with the batch within 20% of without it; the
batch's lines/s beside the traffic at least 60% of alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import time

import httpx
import numpy as np

from ridgeline.tools import serve_bench
from ridgeline.tools.bench.common import table


@dataclasses.dataclass(frozen=True)
class BatchApiBenchConfig:
  url: str
  batch_lines: int = 2000
  num_requests: int = 48  # interactive requests per phase
  input_len: int = 32
  output_len: int = 32
  api_key: str | None = None
  seed: int = 0
  vocab_limit: int = 500


def _counts(client: httpx.Client, batch_id: str) -> tuple[float, int, str]:
  b = client.get(f"/v1/batches/{batch_id}").json()
  return time.perf_counter(), b["request_counts"]["completed"], b["status"]


def run(cfg: BatchApiBenchConfig) -> dict:
  headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
  serve = serve_bench.ServeBenchConfig(
      url=cfg.url, num_requests=cfg.num_requests, input_len=cfg.input_len,
      output_len=cfg.output_len, api_key=cfg.api_key, seed=cfg.seed,
      vocab_limit=cfg.vocab_limit)
  client = httpx.Client(base_url=cfg.url, headers=headers, timeout=600)
  model = asyncio.run(serve_bench._server_model(serve))
  # Warm-up bursts (the shapes the runs meet), then capacity: everything at once.
  serve_bench.run(dataclasses.replace(serve, rates=()))
  capacity = asyncio.run(serve_bench._run_rate(serve, model, float("inf"), cfg.seed))
  rate = capacity["request_throughput"] / 2
  alone = asyncio.run(serve_bench._run_rate(serve, model, rate, cfg.seed + 1))

  rng = np.random.default_rng(cfg.seed + 2)
  lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
            "body": {"model": model, "prompt": rng.integers(1, cfg.vocab_limit,
                                                            cfg.input_len).tolist(),
                     "max_tokens": cfg.output_len, "temperature": 0, "ignore_eos": True}}
           for i in range(cfg.batch_lines)]
  data = "".join(json.dumps(x) + "\n" for x in lines).encode()
  r = client.post("/v1/files", files={"file": ("bench.jsonl", io.BytesIO(data))},
                  data={"purpose": "batch"})
  r.raise_for_status()
  batch = client.post("/v1/batches", json={"input_file_id": r.json()["id"],
                                           "endpoint": "/v1/completions",
                                           "completion_window": "24h"}).json()
  # Until the batch is under way (its first lines done).
  deadline = time.perf_counter() + 300
  while _counts(client, batch["id"])[1] == 0:
    if time.perf_counter() > deadline:
      raise RuntimeError(f"batch {batch['id']} did not start: {_counts(client, batch['id'])}")
    time.sleep(0.2)
  t0, c0, _ = _counts(client, batch["id"])
  mixed = asyncio.run(serve_bench._run_rate(serve, model, rate, cfg.seed + 1))
  t1, c1, _ = _counts(client, batch["id"])
  time.sleep(max(t1 - t0, 1.0))
  t2, c2, status = _counts(client, batch["id"])
  client.post(f"/v1/batches/{batch['id']}/cancel")
  if status != "in_progress":
    raise RuntimeError(f"the batch ended ({status}, {c2} lines) before the alone window did: "
                       "give it more lines (--batch_lines)")
  with_traffic = (c1 - c0) / (t1 - t0)
  batch_alone = (c2 - c1) / (t2 - t1)
  p50 = lambda r: r["ttft_s"]["p50"]  # noqa: E731
  return {
      "capacity_requests_per_s": capacity["request_throughput"], "rate": rate,
      "interactive_alone": alone, "interactive_with_batch": mixed,
      "ttft_p50_ratio": p50(mixed) / p50(alone),
      "batch_lines_per_s_with_traffic": with_traffic, "batch_lines_per_s_alone": batch_alone,
      "batch_ratio": with_traffic / batch_alone if batch_alone else float("nan"),
      "batch_id": batch["id"], "batch_lines": cfg.batch_lines,
      "lines_done": c2}


def format_table(res: dict) -> str:
  a, m = res["interactive_alone"], res["interactive_with_batch"]
  ms = lambda r, k: f"{1e3 * r['ttft_s'][k]:.0f}"  # noqa: E731
  rows = [["interactive alone", f"{res['rate']:.2f}", ms(a, "p50"), ms(a, "p90"),
           f"{a['request_throughput']:.2f}", "-"],
          ["interactive + batch", f"{res['rate']:.2f}", ms(m, "p50"), ms(m, "p90"),
           f"{m['request_throughput']:.2f}", f"{res['batch_lines_per_s_with_traffic']:.2f}"],
          ["batch alone", "-", "-", "-", "-", f"{res['batch_lines_per_s_alone']:.2f}"]]
  head = ["run", "offered req/s", "TTFT p50 ms", "TTFT p90 ms", "achieved req/s",
          "batch lines/s"]
  lines = [table(rows, head)]
  lines.append(f"capacity {res['capacity_requests_per_s']:.2f} req/s; TTFT p50 with / without "
               f"the batch {res['ttft_p50_ratio']:.2f} (target <= 1.20); batch lines/s beside "
               f"the traffic / alone {res['batch_ratio']:.2f} (target >= 0.60)")
  return "\n".join(lines)
