"""The modes of requests through the engine: throughput, latency, time to first token.

  throughput  vLLM `bench throughput`-style offline runs through Engine.generate
              (greedy, ignore_eos, max_tokens = the output length): fixed IN:OUT
              lengths, or `sharegpt` (benchmarks/sharegpt_lengths.json).
  latency     Poisson arrivals at each rate: TTFT and TPOT percentiles. The
              requests go through the engine driver (engine/driver.py), the thread
              the server runs the engine on, so the figures are the server's less HTTP.
  ttft        one request in this (fresh) process: its time to first token, cold
              or warm depending on the persistent compilation cache's contents.
"""

from __future__ import annotations

import os
import queue
import time

from ridgeline.engine import roofline
from ridgeline.tools.bench.common import (Bench, Needs, Options, host, pct, step_seconds,
                                          summarize, table, workload_lengths)
from ridgeline.util import ceil_div, percentiles


def run_throughput(b: Bench) -> None:
  from ridgeline.engine.sampling import SamplingParams
  o, eng = b.options, b.engine
  out, rows = [], []
  for w in o.workloads:
    lengths = workload_lengths(w, o.num_requests, o.sharegpt_file)
    new_prompts = lambda: b.prompts(len(lengths), [p for p, _ in lengths])
    params = [SamplingParams(temperature=o.temperature, ignore_eos=True, max_tokens=n_out,
                             seed=i) for i, (_, n_out) in enumerate(lengths)]
    n_warm = min(o.warmup_requests or eng.config.max_batch, len(lengths))
    t0 = time.perf_counter()
    eng.generate(new_prompts()[:n_warm], params[:n_warm])  # compiles the step shapes
    warm_s = time.perf_counter() - t0
    # Fresh prompts every repetition (no prefix-cache hits), drawn before timing.
    batches = [new_prompts() for _ in range(o.repeats)]
    fresh = iter(batches)

    def generate_all():
      outs = eng.generate(next(fresh), params)
      assert [len(x.token_ids) for x in outs] == [n for _, n in lengths], "short output"

    before = step_seconds(eng)
    s = summarize(roofline.time_calls(generate_all, repeats=o.repeats, warmup=0, sync=host))
    after = step_seconds(eng)
    n_in = sum(p for p, _ in lengths)
    n_out = sum(n for _, n in lengths)
    by_kind = {k: {f: after[k][f] - before.get(k, {}).get(f, 0) for f in ("steps", "seconds")}
               for k in after}
    rec = {"workload": w, "requests": len(lengths), "input_tokens": n_in,
           "output_tokens": n_out, "warmup_seconds": warm_s, "seconds": s,
           "model_steps": by_kind,
           "requests_per_second": len(lengths) / s["median"],
           "output_tokens_per_second": n_out / s["median"],
           "total_tokens_per_second": (n_in + n_out) / s["median"]}
    theirs = None
    if b.peer is not None and w != "sharegpt":
      theirs = summarize(b.peer.throughput_seconds(batches[-1], lengths[0][1],
                                                   eng.config.max_batch))
      rec["hf"] = {"seconds": theirs, "output_tokens_per_second": n_out / theirs["median"],
                   "batch": eng.config.max_batch}
      rec["ratio"] = theirs["median"] / s["median"]
    out.append(rec)
    rows.append([w, len(lengths), f"{rec['requests_per_second']:.2f}",
                 f"{rec['output_tokens_per_second']:.1f}",
                 f"{rec['total_tokens_per_second']:.1f}", pct(s["spread"]),
                 f"{rec['hf']['output_tokens_per_second']:.1f}" if theirs else "-",
                 f"{rec['ratio']:.2f}x" if theirs else "-"])
    print(f"throughput {w}: {rec['output_tokens_per_second']:.1f} output tokens/s; model "
          f"steps: " + ", ".join(f"{k} {v['steps'] / o.repeats:.0f} taking "
                                 f"{v['seconds'] / o.repeats:.2f} s" for k, v in by_kind.items()),
          flush=True)
  b.results["throughput"] = out
  print(f"\nOffline throughput (greedy={o.temperature == 0}, ignore_eos, max_batch "
        f"{eng.config.max_batch}, median of {o.repeats}; transformers runs static "
        f"batches of max_batch)")
  print(table(rows, ["workload", "reqs", "req/s", "out tok/s", "total tok/s", "spread",
                     "HF out tok/s", "ratio"]))


def throughput_needs(o: Options, config, peer: bool) -> Needs:
  length = max(p + n for w in o.workloads
               for p, n in workload_lengths(w, o.num_requests, o.sharegpt_file))
  return Needs(max_len=length, pages=config.max_batch * ceil_div(length, config.page_size))


def poisson_run(b: Bench, rate: float, n: int, seed: int) -> dict:
  """`n` requests arriving at `rate` per second (Poisson), submitted to an engine
  driver as they arrive; their TTFT and TPOT (the engine's own per-request
  figures) and the output tokens per second over the whole run."""
  import numpy as np
  from ridgeline.engine import driver as driver_lib
  from ridgeline.engine.sampling import SamplingParams
  o = b.options
  rng = np.random.default_rng(seed)
  gaps = rng.exponential(1.0 / rate, size=n)
  arrivals = np.cumsum(gaps) - gaps[0]
  prompts = b.prompts(n, o.latency_input)
  params = SamplingParams(temperature=o.temperature, ignore_eos=True, seed=1,
                          max_tokens=o.latency_output)
  events: queue.Queue = queue.Queue()
  driver = driver_lib.Driver(b.engine, warmup=False)
  driver.start()
  outputs = []
  try:
    t0 = time.perf_counter()
    for i in range(n):
      time.sleep(max(0.0, arrivals[i] - (time.perf_counter() - t0)))
      driver.submit([driver_lib.Submission(f"poisson-{i}", prompts[i], params, events.put)])
    while len(outputs) < n:
      ev = events.get()
      if isinstance(ev, driver_lib.Failed):
        raise RuntimeError(f"request {ev.request_id} failed ({ev.cause}): {ev.message}")
      if isinstance(ev, driver_lib.Done):
        outputs.append(ev.output)
    wall = time.perf_counter() - t0
  finally:
    driver.stop()
  ttft = [out.metrics.ttft for out in outputs]
  tpot = [out.metrics.tpot for out in outputs if out.metrics.tpot is not None]
  return {"rate": rate, "requests": n, "seconds": wall, "ttft": percentiles(ttft),
          "tpot": percentiles(tpot), "output_tokens_per_second": n * o.latency_output / wall}


def run_latency(b: Bench) -> None:
  o = b.options
  n = o.num_requests
  poisson_run(b, max(o.rates), min(n, 8), o.seed + 99)  # warm-up: compiles the shapes
  out, rows = [], []
  for rate in o.rates:
    rec = poisson_run(b, rate, n, o.seed + 4)
    out.append(rec)
    rows.append([f"{rate:g}", n, f"{1e3 * rec['ttft']['p50']:.0f}",
                 f"{1e3 * rec['ttft']['p90']:.0f}", f"{1e3 * rec['ttft']['p99']:.0f}",
                 f"{1e3 * rec['tpot']['p50']:.1f}", f"{1e3 * rec['tpot']['p90']:.1f}",
                 f"{1e3 * rec['tpot']['p99']:.1f}", f"{rec['output_tokens_per_second']:.1f}"])
  b.results["latency"] = {"input": o.latency_input, "output": o.latency_output, "points": out}
  print(f"\nLatency under Poisson arrivals ({o.latency_input} in / {o.latency_output} "
        f"out per request)")
  print(table(rows, ["req/s", "reqs", "TTFT p50 ms", "p90", "p99", "TPOT p50 ms", "p90",
                     "p99", "out tok/s"]))
  if b.peer is not None:
    prompt = b.prompts(1, o.latency_input)
    ttft = summarize(b.peer.generate_seconds(prompt, 1))
    tpot = summarize(b.peer.decode_per_token(prompt, o.latency_output - 1))
    b.results["latency"]["hf_single_request"] = {"ttft": ttft, "tpot": tpot}
    print(f"transformers, one request alone (no load): TTFT {1e3 * ttft['median']:.0f} ms, "
          f"TPOT {1e3 * tpot['median']:.1f} ms")


def latency_needs(o: Options, config, peer: bool) -> Needs:
  length = o.latency_input + o.latency_output
  return Needs(max_len=length, pages=config.max_batch * ceil_div(length, config.page_size))


def run_ttft(b: Bench) -> None:
  from ridgeline.engine.sampling import SamplingParams
  o = b.options
  params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
  first = b.engine.generate(b.prompts(1, o.ttft_prompt_len), params)[0].metrics.ttft
  again = b.engine.generate(b.prompts(1, o.ttft_prompt_len), params)[0].metrics.ttft
  cache = o.compilation_cache_dir
  entries = len(os.listdir(cache)) if cache and os.path.isdir(cache) else 0
  b.results["ttft"] = {"prompt_len": o.ttft_prompt_len, "first_request": first,
                       "second_request": again, "compilation_cache_dir": cache,
                       "cache_entries_after": entries}
  print(f"\nTTFT ({o.ttft_prompt_len}-token prompt): first request in this process "
        f"{1e3 * first:.0f} ms, second {1e3 * again:.0f} ms (compilation cache: "
        f"{cache or 'off'}, {entries} entries now)")
