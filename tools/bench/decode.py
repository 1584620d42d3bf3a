"""The decode mode: what one decode step costs, against the rooflines.

Per (batch, context): the step time of the jitted decode step alone (the runner;
and back to back, which is the device's time per step), and of whole engine steps
(scheduler, sampler, host work) where the prompts are cheap enough to prefill;
tokens/s, achieved FLOP/s and bytes/s, MFU, MBU, arithmetic intensity against the
ridge point, and the rooflines (memory; measured matmul). With a peer:
Engine.generate against transformers' generate at `compare_batches`, and the CPU
targets checked against those figures.
"""

from __future__ import annotations

import time

from ridgeline.engine import roofline
from ridgeline.tools.bench.common import (Bench, Needs, Options, flops_unit, host, pct,
                                          summarize, table, trace_ops)
from ridgeline.util import ceil_div


def time_runner_steps(b: Bench, batch: int, context: int) -> dict:
  """Times the jitted decode step alone: `batch` rows, each with `context` cached
  tokens on its own pages, writing one new token."""
  import jax
  from ridgeline.engine.runner import Row
  o = b.options
  per_seq = ceil_div(context + 1, b.engine.config.page_size)
  tokens = b.prompts(1, batch)[0]
  rows = [Row([tokens[i]], context, list(range(i * per_seq, (i + 1) * per_seq)))
          for i in range(batch)]
  step = lambda: b.engine.runner.run_rows(rows)
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


def decode_needs(o: Options, config, peer: bool) -> Needs:
  page = config.page_size
  longest = max(o.contexts) + o.warmup + o.steps + 8
  needs = Needs(max_batch=max(o.batch_sizes),
                max_len=max(longest, o.compare_prompt_len + o.new_tokens + 2),
                pages=max(o.batch_sizes) * ceil_div(longest, page))
  if peer:
    cb = max(o.compare_batches)
    needs |= Needs(max_batch=cb, pages=cb * ceil_div(o.compare_prompt_len + o.new_tokens + 2, page),
                   prefill_batch=cb, prefill_tokens=cb * o.compare_prompt_len)
  return needs
