"""The benchmark modes, and `run`, which runs the chosen ones on one engine.

  decode      per (batch, context): the step time of the jitted decode step alone
              (the runner), and of whole engine steps (scheduler, sampler, host
              work) where the prompts are cheap enough to prefill; tokens/s,
              achieved FLOP/s and bytes/s, MFU, MBU, arithmetic intensity against
              the ridge point, and the rooflines (memory; measured matmul). With a
              peer: Engine.generate against transformers' generate at
              `compare_batches`.
  throughput  vLLM `bench throughput`-style offline runs through Engine.generate
              (greedy, ignore_eos, max_tokens = the output length): fixed IN:OUT
              lengths, or `sharegpt` (benchmarks/sharegpt_lengths.json).
  latency     Poisson arrivals at each rate: TTFT and TPOT percentiles.
  prefill     one prompt of `prefill_tokens` through the runner: step time, MFU.
  ttft        one request in this (fresh) process: its time to first token, cold
              or warm depending on the persistent compilation cache's contents.
  scoring     a scoring job (max_tokens 0, prompt_logprobs 0) against plain prefill
              over the same prompts, in prompt tokens/s (tools/bench/scoring.py).
  conversation  multi-turn conversations on a pool a quarter their size, with the
              KV cache's host tier off, priced, always copying, always recomputing
              (tools/bench/conversation.py).
  structured  JSON validity with and without a schema constraint, and the
              throughput cost of constraining a quarter of a batch
              (tools/bench/structured.py).
  host        per batch size, the host's milliseconds per step (planning, inputs,
              dispatch, reading, text) with the device's step stubbed out, beside
              the whole engine (tools/bench/host.py).
  kernels     paged attention: the Pallas GPU kernel against the XLA reference on
              this device (max error) and their times. It runs before the engine is
              built: a kernel that fails its check is not used.

A new mode is a function of a `Bench` that stores its figures in `bench.results`
(and prints them): add it to `MODES`, and to `NEEDS` a function of
(Options, EngineConfig, peer: bool) -> Needs if it needs a bigger engine than the
default (more rows, longer sequences, more pages).
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Callable

from ridgeline.engine import roofline
from ridgeline.tools.bench.host import run_host
from ridgeline.tools.bench.conversation import run_conversation
from ridgeline.tools.bench.scoring import _needs as _scoring_needs, run_scoring
from ridgeline.tools.bench.structured import _needs as _structured_needs, run_structured
from ridgeline.tools.bench.common import (Bench, Needs, Options, build, cdiv, flops_unit,
                                 fmt_bandwidth, fmt_flops, host, pct, percentiles, run_rows,
                                 step_seconds, summarize, table, trace_ops, workload_lengths)


# decode ---------------------------------------------------------------------------------


def time_runner_steps(b: Bench, batch: int, context: int) -> dict:
  """Times the jitted decode step alone: `batch` rows, each with `context` cached
  tokens on its own pages, writing one new token."""
  import jax
  from ridgeline.engine.runner import Row
  o = b.options
  per_seq = cdiv(context + 1, b.engine.config.page_size)
  tokens = b.prompts(1, batch)[0]
  rows = [Row([tokens[i]], context, list(range(i * per_seq, (i + 1) * per_seq)))
          for i in range(batch)]
  step = lambda: run_rows(b.engine.runner, rows)
  out = summarize(roofline.time_calls(step, repeats=o.steps, warmup=o.warmup))
  # Back to back, waiting only at the end: the host dispatches step i+1 while
  # the device runs step i, so this is the device's time per step.
  out["pipelined"] = summarize(roofline.time_calls(step, repeats=3, warmup=0, calls=o.steps))
  if o.profile:
    out["profile"] = trace_ops(lambda: jax.block_until_ready(step()),
                               f"decode B={batch} ctx={context}")
  return out


def time_engine_steps(b: Bench, batch: int, context: int) -> dict:
  """Times whole engine steps (scheduler, runner, sampler, host work) while
  `batch` sequences of `context` prompt tokens all decode."""
  from ridgeline.engine.sampling import SamplingParams
  eng, o = b.engine, b.options
  params = SamplingParams(temperature=o.temperature, ignore_eos=True, seed=1,
                          max_tokens=o.warmup + o.steps + 4)
  ids = [eng.add_request(p, params) for p in b.prompts(batch, context)]
  while any(not eng.get_output(r).token_ids for r in ids):  # prefill every prompt
    eng.step()
  for _ in range(o.warmup):
    eng.step()
  profiler = None
  if o.cprofile:
    import cProfile
    profiler = cProfile.Profile()
    profiler.enable()
  times = roofline.time_calls(eng.step, repeats=o.steps, warmup=0, sync=host)
  if profiler is not None:
    import pstats
    profiler.disable()
    print(f"host profile of {o.steps} engine steps at B={batch} ctx={context}:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
  for rid in ids:
    eng.abort(rid)
    eng.release(rid)
  return summarize(times)


def point_report(b: Bench, batch: int, context: int, seconds: float) -> dict:
  cost = roofline.decode_cost(b.model_config, [context] * batch)
  return {
      "step_seconds": seconds, "tokens_per_second": batch / seconds,
      "flops": cost.flops, "bytes": cost.bytes, "flops_per_second": cost.flops / seconds,
      "bytes_per_second": cost.bytes / seconds, "intensity": cost.intensity,
      "mfu": roofline.mfu(cost, seconds, b.peaks, b.dtype),
      "mbu": roofline.mbu(cost, seconds, b.peaks),
  }


def rooflines(b: Bench, batch: int, context: int) -> dict:
  """Roofline tokens/s of a decode step three ways: memory (bytes over the
  measured or table bandwidth), the device's peak (max of the two terms), and the
  measured matmul roofline (the step's weight matmuls at their measured speed)."""
  cost = roofline.decode_cost(b.model_config, [context] * batch)
  mem_s = cost.bytes / b.peaks.bandwidth
  peak_s = cost.time_lower_bound(b.peaks, b.dtype)
  mm_s = roofline.decode_matmul_seconds(b.model_config, batch)
  return {"memory_tokens_per_second": batch / mem_s,
          "peak_tokens_per_second": batch / peak_s,
          "matmul_tokens_per_second": batch / max(mm_s, mem_s),
          "matmul_seconds": mm_s}


def run_decode(b: Bench) -> None:
  o = b.options
  ridge = b.results["peaks"]["ridge_point"]
  scale, unit = flops_unit(b.peaks.peak_flops(b.dtype))
  points, rows = [], []
  for context in o.contexts:
    for batch in o.batch_sizes:
      runner = time_runner_steps(b, batch, context)
      point = {"batch": batch, "context": context, "runner": runner,
               **point_report(b, batch, context, runner["median"]),
               "pipelined": point_report(b, batch, context, runner["pipelined"]["median"]),
               "rooflines": rooflines(b, batch, context)}
      if batch * context <= o.engine_tokens_limit:
        eng = time_engine_steps(b, batch, context)
        point["engine"] = {**eng, **point_report(b, batch, context, eng["median"])}
      points.append(point)
      e = point.get("engine")
      rows.append([batch, context, f"{1e3 * runner['median']:.2f}", pct(runner["spread"]),
                   f"{1e3 * runner['pipelined']['median']:.2f}",
                   f"{point['tokens_per_second']:.1f}",
                   f"{1e3 * e['median']:.2f}" if e else "-",
                   f"{e['tokens_per_second']:.1f}" if e else "-",
                   f"{point['flops_per_second'] / scale:.1f}",
                   f"{point['bytes_per_second'] / 1e9:.1f}",
                   pct(point["mfu"]), pct(point["mbu"]), pct(point["pipelined"]["mbu"]),
                   f"{point['intensity']:.2f}",
                   f"{point['rooflines']['peak_tokens_per_second']:.0f}"])
      print(f"decode B={batch} C={context}: runner {1e3 * runner['median']:.2f} ms"
            + (f", engine {1e3 * e['median']:.2f} ms" if e else ""), flush=True)
  b.results["decode"] = points
  print(f"\nDecode steps (ridge point {ridge:.1f} FLOP/byte). step: the jitted step "
        f"alone, dispatch to result (the achieved figures are of it); piped: steps back "
        f"to back (device time); eng: whole engine steps")
  print(table(rows, ["B", "ctx", "step ms", "spread", "piped ms", "tok/s", "eng ms",
                     "eng tok/s", unit, "GB/s", "MFU", "MBU", "piped MBU", "FLOP/B",
                     "roof tok/s"]))
  if b.peer is not None:
    compare_decode(b)


def engine_generate_decode(b: Bench, batch: int, prompt_len: int, new: int) -> float:
  """Per-token decode seconds of Engine.generate at `batch`: the time of
  generating new+1 tokens minus that of 1 token (the prefill), over new."""
  from ridgeline.engine.sampling import SamplingParams

  def gen(n):
    outs = b.engine.generate(b.prompts(batch, prompt_len),
                             SamplingParams(temperature=0, ignore_eos=True, max_tokens=n))
    assert all(len(o.token_ids) == n for o in outs), "short output"

  once = lambda n: roofline.time_calls(gen, n, repeats=1, warmup=0, sync=host)[0]
  return (once(new + 1) - once(1)) / new


def compare_decode(b: Bench) -> None:
  o, peer = b.options, b.peer
  prompt_len, new = o.compare_prompt_len, o.new_tokens
  rows, out = [], []
  for batch in o.compare_batches:
    # Warm both up, then alternate repetitions, so that both see the same machine
    # (other processes on a shared host come and go).
    peer_prompts = b.prompts(batch, prompt_len)
    engine_generate_decode(b, batch, prompt_len, new)
    peer.decode_per_token(peer_prompts, new, repeats=0)
    ours, theirs = [], []
    for _ in range(o.repeats):
      time.sleep(0.5)  # let the other engine's worker threads stop spinning
      ours.append(engine_generate_decode(b, batch, prompt_len, new))
      time.sleep(0.5)
      theirs += peer.decode_per_token(peer_prompts, new, repeats=1, warm=False)
    ours, theirs = summarize(ours), summarize(theirs)
    ctx = prompt_len + new / 2  # the average context while decoding
    cost = roofline.decode_cost(b.model_config, [ctx] * batch)
    mem_roof = batch / (roofline.weight_bytes(b.model_config) / b.peaks.bandwidth)
    mm_s = roofline.decode_matmul_seconds(b.model_config, batch)
    mm_roof = batch / max(mm_s, cost.bytes / b.peaks.bandwidth)
    ours_tps, peer_tps = batch / ours["median"], batch / theirs["median"]
    rec = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new,
           "ours": {**ours, "tokens_per_second": ours_tps},
           "hf": {**theirs, "tokens_per_second": peer_tps},
           "ratio": ours_tps / peer_tps,
           "memory_roofline_tokens_per_second": mem_roof,
           "matmul_roofline_tokens_per_second": mm_roof,
           "peak_roofline_tokens_per_second": batch / cost.time_lower_bound(b.peaks, b.dtype),
           "of_memory_roofline": ours_tps / mem_roof,
           "of_matmul_roofline": ours_tps / mm_roof}
    out.append(rec)
    rows.append([batch, f"{ours_tps:.1f}", pct(ours["spread"]), f"{peer_tps:.1f}",
                 pct(theirs["spread"]), f"{rec['ratio']:.2f}x", f"{mem_roof:.0f}",
                 pct(rec["of_memory_roofline"]), f"{mm_roof:.0f}",
                 pct(rec["of_matmul_roofline"])])
  b.results["compare_decode"] = out
  print(f"\nDecode through generate, ours vs transformers ({prompt_len}-token prompts, {new} "
        f"new tokens, greedy, torch threads {peer.threads}; per-token time = "
        f"(t[{new + 1} tokens] - t[1 token]) / {new}, median of {o.repeats})")
  print(table(rows, ["B", "ours tok/s", "spread", "HF tok/s", "spread", "ratio",
                     "mem roof", "of mem", "matmul roof", "of matmul"]))
  check_targets(b, out)


def check_targets(b: Bench, compared: list[dict]) -> None:
  """The CPU targets (default model, fp32): batch 1 >= 2.5x transformers and >= 70%
  of the memory roofline; batch 64 >= 1.5x and >= 70% of the measured matmul
  roofline."""
  targets = []
  for rec in compared:
    if rec["batch"] == 1:
      targets.append(("batch 1 vs transformers", rec["ratio"], 2.5))
      targets.append(("batch 1 of memory roofline", rec["of_memory_roofline"], 0.70))
    if rec["batch"] == 64:
      targets.append(("batch 64 vs transformers", rec["ratio"], 1.5))
      targets.append(("batch 64 of matmul roofline", rec["of_matmul_roofline"], 0.70))
  if not targets:
    return
  b.results["targets"] = [{"name": n, "value": v, "target": t, "met": v >= t}
                          for n, v, t in targets]
  print("\nTargets")
  for n, v, t in targets:
    shown = (lambda x: f"{x:.2f}x") if t > 1 else pct
    print(f"  {n}: {shown(v)} (target {shown(t)}) {'MET' if v >= t else 'NOT MET'}")


# prefill ---------------------------------------------------------------------------------


def run_prefill(b: Bench) -> None:
  import jax
  from ridgeline.engine.runner import Row
  o, runner = b.options, b.engine.runner
  n, page, chunk = o.prefill_tokens, b.engine.config.page_size, b.engine.config.prefill_chunk
  tokens = b.prompts(1, n)[0]
  # One sequence, in chunks of prefill_chunk (one step when it holds the prompt).
  steps = [[Row(tokens[start:start + min(chunk, n - start)], start,
                list(range(cdiv(start + min(chunk, n - start), page))))]
           for start in range(0, n, chunk)]
  run = lambda: [jax.block_until_ready(run_rows(runner, rows)) for rows in steps]
  s = summarize(roofline.time_calls(run, repeats=o.steps, warmup=o.warmup))
  if o.profile:
    s["profile"] = trace_ops(run, f"prefill {n} tokens")
  cost = roofline.prefill_cost(b.model_config, [(st, min(chunk, n - st))
                                                for st in range(0, n, chunk)])
  mfu = roofline.mfu(cost, s["median"], b.peaks, b.dtype)
  rec = {"tokens": n, "chunks": len(steps), **s, "tokens_per_second": n / s["median"],
         "flops": cost.flops, "intensity": cost.intensity,
         "flops_per_second": cost.flops / s["median"], "mfu": mfu}
  measured = b.results.get("measured", {}).get("matmul_flops")
  if measured:
    rec["of_measured_matmul"] = rec["flops_per_second"] / measured
  b.results["prefill"] = rec
  peak = b.peaks.peak_flops(b.dtype)
  print(f"\nPrefill of {n} tokens ({len(steps)} step(s)): {1e3 * s['median']:.1f} ms "
        f"(spread {pct(s['spread'])}), {rec['tokens_per_second']:.0f} tokens/s, "
        f"{fmt_flops(rec['flops_per_second'], peak)}, MFU {pct(mfu)} of "
        f"{fmt_flops(peak)}"
        + (f", {pct(rec['of_measured_matmul'])} of the measured matmul" if measured else ""))
  batched = []
  for rows_n, t in o.prefill_batch_shapes:
    shape = f"{rows_n}x{t}"
    per_seq = cdiv(t, page)
    rows = [Row(p, 0, list(range(i * per_seq, (i + 1) * per_seq)))
            for i, p in enumerate(b.prompts(rows_n, t))]
    one = lambda: run_rows(runner, rows)
    st = summarize(roofline.time_calls(one, repeats=3))
    if o.profile:
      st["profile"] = trace_ops(lambda: jax.block_until_ready(one()),
                                f"prefill step {shape}", runs=1)
    cost = roofline.prefill_cost(b.model_config, [(0, t)] * rows_n)
    r = {"shape": shape, **st, "tokens_per_second": rows_n * t / st["median"],
         "flops_per_second": cost.flops / st["median"], "intensity": cost.intensity,
         "mfu": roofline.mfu(cost, st["median"], b.peaks, b.dtype)}
    batched.append(r)
    print(f"Prefill step {shape}: {1e3 * st['median']:.1f} ms, {r['tokens_per_second']:.0f} "
          f"tokens/s, MFU {pct(r['mfu'])}")
  if batched:
    b.results["prefill_batches"] = batched


# throughput -------------------------------------------------------------------------------


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
    pending = iter(batches)

    def generate_all():
      outs = eng.generate(next(pending), params)
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


# latency ---------------------------------------------------------------------------------


def poisson_run(b: Bench, rate: float, n: int, seed: int) -> dict:
  import numpy as np
  from ridgeline.engine.sampling import SamplingParams
  o, eng = b.options, b.engine
  rng = np.random.default_rng(seed)
  gaps = rng.exponential(1.0 / rate, size=n)
  arrivals = np.cumsum(gaps) - gaps[0]
  prompts = b.prompts(n, o.latency_input)
  params = SamplingParams(temperature=o.temperature, ignore_eos=True, seed=1,
                          max_tokens=o.latency_output)
  ids, submitted = [], 0
  t0 = time.perf_counter()
  while submitted < n or eng.has_unfinished():
    elapsed = time.perf_counter() - t0
    while submitted < n and arrivals[submitted] <= elapsed:
      ids.append(eng.add_request(prompts[submitted], params))
      submitted += 1
    if eng.has_unfinished():
      eng.step()
    elif submitted < n:
      time.sleep(max(0.0, arrivals[submitted] - (time.perf_counter() - t0)))
  wall = time.perf_counter() - t0
  ttft, tpot = [], []
  for rid in ids:
    m = eng.get_output(rid).metrics
    ttft.append(m.ttft)
    if m.tpot is not None:
      tpot.append(m.tpot)
    eng.release(rid)
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


# ttft / kernels / calibration -----------------------------------------------------------


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


def check_kernels(c, page: int) -> dict:
  """The Pallas GPU paged-attention kernel against the XLA reference, on random
  pools shaped like model config `c`'s, at a few decode batches and contexts."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ridgeline.model import attention
  dtype = jnp.dtype(c.compute_dtype)
  out = []
  platform_ = jax.devices()[0].platform
  impl = "pallas_gpu" if platform_ == "gpu" else "pallas_gpu_interpret"
  if not attention.pallas_gpu_available():
    print("\nkernels: Pallas GPU ops not importable here")
    return {"impl": impl, "error": "pallas gpu ops not importable", "ok": False}
  small = platform_ != "gpu"
  for batch, ctx in ([(1, 64), (2, 64)] if small else [(1, 4096), (8, 4096), (64, 1024)]):
    nb = cdiv(ctx, page)
    rng = np.random.default_rng(batch)
    shape = (batch * nb + 1, page, c.num_kv_heads, c.head_dim)
    kp = jnp.asarray(rng.standard_normal(shape), dtype)
    vp = jnp.asarray(rng.standard_normal(shape), dtype)
    q = jnp.asarray(rng.standard_normal((batch, c.num_heads, c.head_dim)), dtype)
    tables = jnp.asarray(rng.permutation(batch * nb).reshape(batch, nb), jnp.int32)
    lens = jnp.asarray(rng.integers(ctx // 2, ctx + 1, batch), jnp.int32)
    layout = attention.StepLayout(tables, lens, jnp.zeros((0, nb), jnp.int32),
                                  jnp.zeros((0,), jnp.int32))  # decode rows only
    args = (q, kp, vp, lens - 1, layout)
    fns = {name: jax.jit(lambda *a, impl=name: attention.attend(*a, impl=impl))
           for name in ("xla", impl)}
    ref = fns["xla"](*args).astype(jnp.float32)
    rec = {"batch": batch, "context": ctx}
    try:
      got = fns[impl](*args).astype(jnp.float32)
      rec["relative_error"] = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
      for name, f in fns.items():
        rec[name + "_seconds"] = float(np.median(
            roofline.time_calls(f, *args, repeats=3 if small else 20)))
      kv_bytes = 2 * float(jnp.sum(lens)) * c.num_kv_heads * c.head_dim * dtype.itemsize
      rec["pallas_bytes_per_second"] = kv_bytes / rec[impl + "_seconds"]
    except Exception as e:  # report, and let the rest of the run go on
      rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    out.append(rec)
    print(f"kernels B={batch} ctx={ctx}: " + ", ".join(
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()
        if k not in ("batch", "context")), flush=True)
  ok = all(p.get("relative_error", 1.0) < 1e-2 for p in out)
  return {"impl": impl, "points": out, "ok": ok}


def run_calibration(b: Bench) -> None:
  """Measured ceilings on this device: copy bandwidth and a large matmul."""
  import jax
  gpu = jax.devices()[0].platform == "gpu"
  copy = roofline.measure_copy_bandwidth(mib=4096 if gpu else 256)
  n = 8192 if gpu else 1024
  mm = 2 * n ** 3 / roofline.measure_matmul_seconds(n, n, n, b.dtype)
  b.results["measured"] = {"copy_bandwidth": copy, "matmul_flops": mm, "matmul_size": n}
  print(f"measured: copy {fmt_bandwidth(copy)} (read + write), {n}^3 {b.dtype} matmul "
        f"{fmt_flops(mm)}")


# The mode table --------------------------------------------------------------------------


def _report_kernels(b: Bench) -> None:
  """kernels ran before the engine was built (see run); its results are stored."""


MODES: dict[str, Callable[[Bench], None]] = {
    "host": run_host,
    "scoring": run_scoring,
    "structured": run_structured,
    "conversation": run_conversation,
    "decode": run_decode,
    "throughput": run_throughput,
    "latency": run_latency,
    "prefill": run_prefill,
    "ttft": run_ttft,
    "kernels": _report_kernels,
}


def _decode_needs(o: Options, config, peer: bool) -> Needs:
  page = config.page_size
  longest = max(o.contexts) + o.warmup + o.steps + 8
  needs = Needs(max_batch=max(o.batch_sizes),
                max_len=max(longest, o.compare_prompt_len + o.new_tokens + 2),
                pages=max(o.batch_sizes) * cdiv(longest, page))
  if peer:
    cb = max(o.compare_batches)
    needs |= Needs(max_batch=cb, pages=cb * cdiv(o.compare_prompt_len + o.new_tokens + 2, page),
                   prefill_batch=cb, prefill_tokens=cb * o.compare_prompt_len)
  return needs


def _throughput_needs(o: Options, config, peer: bool) -> Needs:
  length = max(p + n for w in o.workloads
               for p, n in workload_lengths(w, o.num_requests, o.sharegpt_file))
  return Needs(max_len=length, pages=config.max_batch * cdiv(length, config.page_size))


def _latency_needs(o: Options, config, peer: bool) -> Needs:
  length = o.latency_input + o.latency_output
  return Needs(max_len=length, pages=config.max_batch * cdiv(length, config.page_size))


def _prefill_needs(o: Options, config, peer: bool) -> Needs:
  page = config.page_size
  needs = Needs(max_len=o.prefill_tokens + 1, pages=cdiv(o.prefill_tokens, page))
  for rows_n, t in o.prefill_batch_shapes:
    needs |= Needs(max_len=t + 1, pages=rows_n * cdiv(t, page))
  return needs


NEEDS: dict[str, Callable[[Options, object, bool], Needs]] = {
    "decode": _decode_needs,
    "throughput": _throughput_needs,
    "latency": _latency_needs,
    "prefill": _prefill_needs,
    "ttft": lambda o, config, peer: Needs(max_len=o.ttft_prompt_len + 2),
    "scoring": _scoring_needs,
    "structured": _structured_needs,
}


def needs_for(modes, options: Options, config, peer: bool = False) -> Needs:
  """What an engine must hold to run every one of `modes`."""
  needs = Needs()
  for mode in modes:
    if mode in NEEDS:
      needs |= NEEDS[mode](options, config, peer)
  return needs


def check_modes(modes) -> list[str]:
  modes = [m.strip() for m in modes]
  bad = [m for m in modes if m not in MODES]
  if bad or not modes:
    raise ValueError(f"unknown benchmark mode(s) {bad}; known: {', '.join(MODES)}")
  return modes


# Running them -----------------------------------------------------------------------------


def run(modes, options: Options, model, tokenizer, config, *, output: str | os.PathLike,
        plot: str | os.PathLike | None = None, peer=None, attention: str | None = None,
        load_seconds: float = 0.0, command: str = "", label: str = "") -> dict:
  """Runs `modes` on one Engine over `model` (its config grown to fit them all) and
  returns the results, saved as JSON to `output` after every mode (a run cut
  short keeps what it measured). `plot`: the roofline PNG, written when decode or
  prefill ran. `attention`: the attention implementation (None: the model's; a
  failed kernel check then falls back to XLA). `peer`: an HFPeer to compare with."""
  from ridgeline.tools.bench import plots
  modes = check_modes(modes)
  kernels = None
  if "kernels" in modes:
    kernels = check_kernels(model.config, config.page_size)
    if not kernels["ok"] and attention in (None, "auto"):
      attention = "xla"
      print("kernels: the Pallas kernel failed its check; attention runs on XLA")
  if attention:
    model.attention_impl = attention
  bench = build(model, tokenizer, config, needs_for(modes, options, config, peer is not None),
                options, load_seconds=load_seconds, command=command, label=label)
  bench.peer = peer
  if kernels is not None:
    bench.results["kernels"] = kernels
  if any(m in modes for m in ("prefill", "kernels")) or options.calibrate:
    run_calibration(bench)
  out = pathlib.Path(output)
  out.parent.mkdir(parents=True, exist_ok=True)
  # ttft first: it measures this process's first request.
  for mode in sorted(modes, key=lambda m: m != "ttft"):
    MODES[mode](bench)
    bench.results["load_average_after"] = os.getloadavg()
    out.write_text(json.dumps(bench.results, indent=1, default=float))
  print(f"\nresults: {out}")
  if "decode" in bench.results or "prefill" in bench.results:
    png = pathlib.Path(plot) if plot else out.with_suffix(".png")
    plots.roofline(bench.results, png)
    print(f"roofline plot: {png}")
  return bench.results
