"""Benchmarks and the roofline report.

  # decode steps at fixed batch sizes and contexts, beside transformers
  python scripts/benchmark.py --mode decode --batch_sizes 1,2,4,8,16,32,64 --contexts 128 \
      --compare hf --compare_batches 1,64
  # an offline workload (every request generates exactly its output length)
  python scripts/benchmark.py --mode throughput --workloads 128:128,sharegpt --num_requests 64
  # time to first token and per output token under Poisson arrivals
  python scripts/benchmark.py --mode latency --rates 0.5,1,2 --num_requests 16

Modes (comma-separated, run in one process on one engine):
  decode      per (batch, context): the step time of the jitted decode step alone
              (the runner), and of whole engine steps (scheduler, sampler, host
              work) where the prompts are cheap enough to prefill; tokens/s,
              achieved FLOP/s and bytes/s, MFU, MBU, arithmetic intensity against
              the ridge point, and the rooflines (memory; measured matmul).
  throughput  vLLM `bench throughput`-style offline runs through Engine.generate
              (greedy, ignore_eos, max_tokens = the output length): fixed IN:OUT
              lengths, or `sharegpt` (benchmarks/sharegpt_lengths.json).
  latency     Poisson arrivals at each --rates value: TTFT and TPOT percentiles.
  prefill     one prompt of --prefill_tokens through the runner: step time, MFU.
  ttft        one request in this (fresh) process: its time to first token,
              cold or warm depending on --compilation_cache_dir's contents.
  kernels     paged attention: the Pallas GPU kernel against the XLA reference on
              this device (max error) and their times.

--compare hf runs Hugging Face transformers' `generate` (torch, the same weights,
prompts and lengths, greedy, --threads threads) in the same run and prints our/HF
ratios. Every timed figure is the median of repetitions after a warm-up, with its
spread ((max - min) / median). Results go to --output (JSON) and --plot (PNG: the
device's roof, its ridge point and the measured steps on it).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import socket
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flags_common  # noqa: E402

MODES = ("decode", "throughput", "latency", "prefill", "ttft", "kernels")

flags.DEFINE_list("mode", ["decode"], f"Comma-separated modes: {', '.join(MODES)}.")
flags.DEFINE_list("batch_sizes", ["1", "2", "4", "8", "16", "32", "64", "128", "256"],
                  "decode: batch sizes.")
flags.DEFINE_list("contexts", ["128"], "decode: context lengths (tokens already cached).")
flags.DEFINE_integer("steps", 10, "decode/prefill: timed steps per point (after --warmup).")
flags.DEFINE_integer("warmup", 2, "Untimed runs before timing each point.")
flags.DEFINE_integer("repeats", 3, "Repetitions of generate-level and workload timings.")
flags.DEFINE_integer("engine_tokens_limit", 8192,
                     "decode: also time whole engine steps at points whose batch x context "
                     "is at most this (their prompts must be prefilled first).")
flags.DEFINE_enum("compare", "none", ["none", "hf"], "Peer to run side by side.")
flags.DEFINE_list("compare_batches", ["1", "64"], "decode: batch sizes compared with the peer.")
flags.DEFINE_integer("compare_prompt_len", 32, "decode comparison: prompt tokens.")
flags.DEFINE_integer("new_tokens", 64, "decode comparison: tokens generated per request.")
flags.DEFINE_integer("threads", os.cpu_count(), "torch threads for the peer (XLA's CPU "
                     "client uses every core).")
flags.DEFINE_list("workloads", ["128:128", "1024:1024", "sharegpt"],
                  "throughput: IN:OUT token lengths, or 'sharegpt'.")
flags.DEFINE_integer("num_requests", 64, "throughput/latency: requests per run.")
flags.DEFINE_integer("warmup_requests", None,
                     "throughput: requests in the warm-up run (default: --max_batch).")
flags.DEFINE_string("sharegpt_file", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
    "sharegpt_lengths.json"), "throughput: (prompt, output) length pairs.")
flags.DEFINE_list("rates", ["1", "2", "4"], "latency: request rates (requests/s).")
flags.DEFINE_integer("latency_input", 64, "latency: prompt tokens per request.")
flags.DEFINE_integer("latency_output", 32, "latency: output tokens per request.")
flags.DEFINE_integer("prefill_tokens", 2048, "prefill: prompt tokens.")
flags.DEFINE_list("prefill_batch_shapes", [], "prefill: also time steps of BxT (B fresh "
                  "prompts of T tokens in one step), e.g. 512x128.")
flags.DEFINE_integer("ttft_prompt_len", 128, "ttft: prompt tokens.")
flags.DEFINE_enum("attention", None, ["xla", "pallas_gpu", "auto"],
                  "Attention implementation (default: the model's, 'auto').")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature of every request (0 = greedy).")
flags.DEFINE_integer("seed", 0, "Seed for the random prompts and arrivals.")
flags.DEFINE_string("output", "benchmark_results.json", "JSON results file.")
flags.DEFINE_string("plot", None, "Roofline PNG (default: --output with .png).")
flags.DEFINE_string("label", "", "Free text stored with the results (e.g. the machine).")
flags.DEFINE_bool("calibrate", False, "Measure copy bandwidth and a large matmul first "
                  "(always done for prefill and kernels).")
flags.DEFINE_bool("profile", False, "decode: trace a few steps of each point (jax.profiler) "
                  "and print where the time goes, op by op.")
flags.DEFINE_bool("cprofile", False, "decode: profile the host side of the engine steps "
                  "(cProfile) and print the top functions.")

FLAGS = flags.FLAGS


# Small helpers ------------------------------------------------------------------


def summarize(times: list[float]) -> dict:
  """Median and spread of repeated timings (seconds)."""
  import numpy as np
  t = np.asarray(times, np.float64)
  med = float(np.median(t))
  return {"median": med, "min": float(t.min()), "max": float(t.max()),
          "spread": float((t.max() - t.min()) / med) if med > 0 else 0.0, "n": len(t)}


def pct(x: float) -> str:
  return f"{100 * x:.1f}%"


_draws = iter(range(1, 1 << 30))


def random_prompts(n: int, length: int | list[int], vocab: int, seed: int | None = None
                   ) -> list[list[int]]:
  """Random token-id prompts. Each call draws new ones unless given a seed: the
  engine's prefix cache would otherwise serve a repeated prompt from cache and
  time something easier than the workload."""
  import numpy as np
  rng = np.random.default_rng([FLAGS.seed, next(_draws) if seed is None else seed])
  lengths = [length] * n if isinstance(length, int) else list(length)
  # Ids from the middle of the vocabulary: ordinary tokens, no specials.
  lo, hi = min(100, vocab // 4), max(vocab - 100, vocab // 2)
  return [[int(t) for t in rng.integers(lo, hi, size=m)] for m in lengths]


def table(rows: list[list], header: list[str]) -> str:
  cells = [header] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))
  return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


# The engine under test --------------------------------------------------------------


@dataclasses.dataclass
class Bench:
  engine: object
  model_config: object
  peaks: object
  dtype: str
  results: dict


def build(needs: dict, attention_impl: str | None = None) -> Bench:
  """Loads the model the flags name and builds one Engine sized for every mode."""
  import jax
  from engine import roofline
  from engine.engine import Engine
  from engine.runner import enable_compilation_cache
  from model import attention as attention_lib
  from model.loading import load_model

  logging.set_verbosity(logging.WARNING)
  if FLAGS.compilation_cache_dir:
    enable_compilation_cache(FLAGS.compilation_cache_dir)
  t0 = time.perf_counter()
  model, tokenizer = load_model(FLAGS.checkpoint, FLAGS.model, FLAGS.cache_dir, FLAGS.dtype,
                                quantize=FLAGS.quantize)
  if attention_impl or FLAGS.attention:
    model.attention_impl = attention_impl or FLAGS.attention
  load_s = time.perf_counter() - t0
  config = flags_common.engine_config()
  page = config.page_size
  max_len = max(min(config.max_model_len, model.config.max_position_embeddings),
                needs["max_len"])
  max_len = -(-max_len // page) * page
  config = dataclasses.replace(
      config, max_model_len=max_len, max_batch=max(config.max_batch, needs["max_batch"]),
      # The side-by-side decode prefills all its prompts in one step, as generate does.
      max_prefill_batch=max(config.max_prefill_batch, needs.get("prefill_batch", 1)),
      prefill_chunk=max(config.prefill_chunk, needs.get("prefill_tokens", 1)))
  if config.num_pages is None and jax.devices()[0].platform == "cpu":
    # Enough pages for the largest point (a CPU reports no memory to size from).
    pages = needs["pages"] + config.max_pages_per_seq + 1
    config = dataclasses.replace(config, num_pages=pages)
  engine = Engine(model, tokenizer, config)
  peaks = engine.peaks if hasattr(engine, "peaks") else roofline.device_peaks()
  device = jax.devices()[0]
  results = {
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
      "label": FLAGS.label,
      "machine": {"host": socket.gethostname(), "platform": device.platform,
                  "device_kind": device.device_kind, "devices": jax.device_count(),
                  "cpu_count": os.cpu_count(), "processor": platform.processor(),
                  "load_average_before": os.getloadavg(),
                  "jax": jax.__version__},
      "model": model.config.to_dict(),
      "attention_impl": getattr(model, "attention_impl", None),
      "attention_resolved": attention_lib.resolve_impl(model.attention_impl),
      "engine_config": dataclasses.asdict(config),
      "num_pages": engine.runner.num_pages,
      "load_seconds": load_s,
      "peaks": {"name": peaks.name, "flops": peaks.flops, "bandwidth": peaks.bandwidth,
                "measured": peaks.measured,
                "ridge_point": peaks.ridge_point(model.config.compute_dtype)},
  }
  print(f"model {model.config.name} ({model.config.compute_dtype}), {jax.device_count()} x "
        f"{device.device_kind}; peaks: {peaks.name}, "
        + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in peaks.flops.items())
        + f", {peaks.bandwidth / 1e9:.1f} GB/s, ridge "
        f"{results['peaks']['ridge_point']:.1f} FLOP/byte; loaded in {load_s:.1f} s")
  return Bench(engine, model.config, peaks, model.config.compute_dtype, results)


def needs_for(modes) -> dict:
  """Largest batch, sequence length and page count the chosen modes use."""
  page = FLAGS.page_size
  pages_for = lambda n: -(-n // page)
  batch, length, pages = 1, 16, 0
  if "decode" in modes:
    bs = [int(b) for b in FLAGS.batch_sizes]
    cs = [int(c) for c in FLAGS.contexts]
    batch = max(batch, *bs)
    length = max(length, max(cs) + FLAGS.warmup + FLAGS.steps + 8,
                 FLAGS.compare_prompt_len + FLAGS.new_tokens + 2)
    pages = max(pages, max(bs) * pages_for(max(cs) + FLAGS.warmup + FLAGS.steps + 8))
    if FLAGS.compare != "none":
      cb = [int(b) for b in FLAGS.compare_batches]
      batch = max(batch, *cb)
      pages = max(pages, max(cb) * pages_for(FLAGS.compare_prompt_len + FLAGS.new_tokens + 2))
  if "throughput" in modes:
    for w in FLAGS.workloads:
      for p, o in workload_lengths(w, FLAGS.num_requests):
        length = max(length, p + o)
    pages = max(pages, FLAGS.max_batch * pages_for(length))
  if "latency" in modes:
    length = max(length, FLAGS.latency_input + FLAGS.latency_output)
    pages = max(pages, FLAGS.max_batch * pages_for(length))
  if "prefill" in modes:
    length = max(length, FLAGS.prefill_tokens + 1)
    pages = max(pages, pages_for(FLAGS.prefill_tokens))
    for shape in FLAGS.prefill_batch_shapes:
      rows_n, t = (int(x) for x in shape.split("x"))
      length = max(length, t + 1)
      pages = max(pages, rows_n * pages_for(t))
  if "ttft" in modes:
    length = max(length, FLAGS.ttft_prompt_len + 2)
  out = {"max_batch": batch, "max_len": length, "pages": pages}
  if "decode" in modes and FLAGS.compare != "none":
    cb = max(int(b) for b in FLAGS.compare_batches)
    out.update(prefill_batch=cb, prefill_tokens=cb * FLAGS.compare_prompt_len)
  return out


# decode ---------------------------------------------------------------------------------


def time_runner_steps(b: Bench, batch: int, context: int) -> dict:
  """Times the jitted decode step alone: `batch` rows, each with `context` cached
  tokens on its own pages, writing one new token."""
  import jax
  from engine.runner import Row
  page = b.engine.config.page_size
  per_seq = -(-(context + 1) // page)
  # Ordinary tokens (random_prompts draws from the middle of the vocabulary): the
  # lowest ids are special or rare tokens, and a batch-64 step of the default model
  # took 228 ms on them against 160 ms on ordinary ids (CPU, two runs).
  tokens = random_prompts(1, batch, b.model_config.vocab_size)[0]
  rows = [Row([tokens[i]], context, list(range(i * per_seq, (i + 1) * per_seq)))
          for i in range(batch)]
  runner = b.engine.runner
  for _ in range(FLAGS.warmup):
    jax.block_until_ready(runner.step(rows))
  times = []
  for _ in range(FLAGS.steps):
    t0 = time.perf_counter()
    jax.block_until_ready(runner.step(rows))
    times.append(time.perf_counter() - t0)
  out = summarize(times)
  # Back to back, waiting only at the end: the host dispatches step i+1 while
  # the device runs step i, so this is the device's time per step.
  piped = []
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(FLAGS.steps):
      logits = runner.step(rows)
    jax.block_until_ready(logits)
    piped.append((time.perf_counter() - t0) / FLAGS.steps)
  out["pipelined"] = summarize(piped)
  if FLAGS.profile:
    out["profile"] = trace_ops(lambda: jax.block_until_ready(runner.step(rows)),
                               f"decode B={batch} ctx={context}")
  return out


def trace_ops(fn, title: str, runs: int = 3, top: int = 15) -> list:
  """Runs fn under jax.profiler and prints the ops (XLA thunks on a CPU, kernels
  on a GPU) that took the most time per run."""
  import collections
  import glob
  import gzip
  import tempfile
  import jax
  path = tempfile.mkdtemp(prefix="ridgeline_trace_")
  with jax.profiler.trace(path, create_perfetto_trace=True):
    for _ in range(runs):
      fn()
  files = glob.glob(path + "/**/*.trace.json.gz", recursive=True)
  if not files:
    print(f"profile {title}: no trace written")
    return []
  events = json.load(gzip.open(files[0]))
  events = events["traceEvents"] if isinstance(events, dict) else events
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not e.get("name", "").startswith("$"):
      total[e["name"]] += e.get("dur", 0)
      count[e["name"]] += 1
  rows = [(name, us / runs, count[name] / runs) for name, us in total.most_common(top)]
  print(f"profile {title} (us per run, calls per run):")
  for name, us, n in rows:
    print(f"  {us:10.1f}  {n:6.1f}  {name[:100]}")
  return [{"name": n, "us": us, "calls": c} for n, us, c in rows]


def time_engine_steps(b: Bench, batch: int, context: int) -> dict:
  """Times whole engine steps (scheduler, runner, sampler, host work) while
  `batch` sequences of `context` prompt tokens all decode."""
  from engine.sampling import SamplingParams
  eng = b.engine
  prompts = random_prompts(batch, context, b.model_config.vocab_size)
  params = SamplingParams(temperature=FLAGS.temperature, ignore_eos=True, seed=1,
                          max_tokens=FLAGS.warmup + FLAGS.steps + 4)
  ids = [eng.add_request(p, params) for p in prompts]
  started: set[str] = set()
  while len(started) < len(ids):  # prefill every prompt (each yields a first token)
    for d in eng.step():
      started.add(d.request_id)
  times = []
  profiler = None
  for i in range(FLAGS.warmup + FLAGS.steps):
    if i == FLAGS.warmup and FLAGS.cprofile:
      import cProfile
      profiler = cProfile.Profile()
      profiler.enable()
    t0 = time.perf_counter()
    eng.step()
    if i >= FLAGS.warmup:
      times.append(time.perf_counter() - t0)
  if profiler is not None:
    import pstats
    profiler.disable()
    print(f"host profile of {FLAGS.steps} engine steps at B={batch} ctx={context}:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
  for rid in ids:
    eng.abort(rid)
    eng.release(rid)
  return summarize(times)


def point_report(b: Bench, batch: int, context: int, seconds: float) -> dict:
  from engine import roofline
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
  from engine import roofline
  cost = roofline.decode_cost(b.model_config, [context] * batch)
  mem_s = cost.bytes / b.peaks.bandwidth
  peak_s = cost.time_lower_bound(b.peaks, b.dtype)
  mm_s = roofline.decode_matmul_seconds(b.model_config, batch)
  return {"memory_tokens_per_second": batch / mem_s,
          "peak_tokens_per_second": batch / peak_s,
          "matmul_tokens_per_second": batch / max(mm_s, mem_s),
          "matmul_seconds": mm_s}


def run_decode(b: Bench, hf) -> None:
  batches = [int(x) for x in FLAGS.batch_sizes]
  contexts = [int(x) for x in FLAGS.contexts]
  ridge = b.results["peaks"]["ridge_point"]
  points, rows = [], []
  for context in contexts:
    for batch in batches:
      runner = time_runner_steps(b, batch, context)
      point = {"batch": batch, "context": context, "runner": runner,
               **point_report(b, batch, context, runner["median"]),
               "pipelined": point_report(b, batch, context, runner["pipelined"]["median"]),
               "rooflines": rooflines(b, batch, context)}
      if batch * context <= FLAGS.engine_tokens_limit:
        eng = time_engine_steps(b, batch, context)
        point["engine"] = {**eng, **point_report(b, batch, context, eng["median"])}
      points.append(point)
      e = point.get("engine")
      rows.append([batch, context, f"{1e3 * runner['median']:.2f}", pct(runner["spread"]),
                   f"{1e3 * runner['pipelined']['median']:.2f}",
                   f"{point['tokens_per_second']:.1f}",
                   f"{1e3 * e['median']:.2f}" if e else "-",
                   f"{e['tokens_per_second']:.1f}" if e else "-",
                   f"{point['flops_per_second'] / 1e9:.1f}",
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
                     "eng tok/s", "GFLOP/s", "GB/s", "MFU", "MBU", "piped MBU", "FLOP/B",
                     "roof tok/s"]))
  if hf is not None:
    compare_decode(b, hf)


def engine_generate_decode(b: Bench, batch: int, prompt_len: int, new: int) -> float:
  """Per-token decode seconds of Engine.generate at `batch`: the time of
  generating new+1 tokens minus that of 1 token (the prefill), over new."""
  from engine.sampling import SamplingParams
  gen = lambda n: b.engine.generate(
      random_prompts(batch, prompt_len, b.model_config.vocab_size),
      SamplingParams(temperature=0, ignore_eos=True, max_tokens=n))
  t0 = time.perf_counter()
  outs = gen(new + 1)
  full = time.perf_counter() - t0
  assert all(len(o.token_ids) == new + 1 for o in outs)
  t0 = time.perf_counter()
  gen(1)
  return (full - (time.perf_counter() - t0)) / new


def compare_decode(b: Bench, hf) -> None:
  from engine import roofline
  prompt_len, new = FLAGS.compare_prompt_len, FLAGS.new_tokens
  rows, out = [], []
  for batch in [int(x) for x in FLAGS.compare_batches]:
    # Warm both up, then alternate repetitions, so that both see the same machine
    # (other processes on a shared host come and go).
    hf_prompts = random_prompts(batch, prompt_len, b.model_config.vocab_size)
    engine_generate_decode(b, batch, prompt_len, new)
    hf.decode_per_token(hf_prompts, new, repeats=0)
    ours, peer = [], []
    for _ in range(FLAGS.repeats):
      time.sleep(0.5)  # let the other engine's worker threads stop spinning
      ours.append(engine_generate_decode(b, batch, prompt_len, new))
      time.sleep(0.5)
      peer += hf.decode_per_token(hf_prompts, new, repeats=1, warm=False)
    ours, peer = summarize(ours), summarize(peer)
    ctx = prompt_len + new / 2  # the average context while decoding
    cost = roofline.decode_cost(b.model_config, [ctx] * batch)
    mem_roof = batch / (roofline.weight_bytes(b.model_config) / b.peaks.bandwidth)
    mm_s = roofline.decode_matmul_seconds(b.model_config, batch)
    mm_roof = batch / max(mm_s, cost.bytes / b.peaks.bandwidth)
    ours_tps, peer_tps = batch / ours["median"], batch / peer["median"]
    rec = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new,
           "ours": {**ours, "tokens_per_second": ours_tps},
           "hf": {**peer, "tokens_per_second": peer_tps},
           "ratio": ours_tps / peer_tps,
           "memory_roofline_tokens_per_second": mem_roof,
           "matmul_roofline_tokens_per_second": mm_roof,
           "peak_roofline_tokens_per_second": batch / cost.time_lower_bound(b.peaks, b.dtype),
           "of_memory_roofline": ours_tps / mem_roof,
           "of_matmul_roofline": ours_tps / mm_roof}
    out.append(rec)
    rows.append([batch, f"{ours_tps:.1f}", pct(ours["spread"]), f"{peer_tps:.1f}",
                 pct(peer["spread"]), f"{rec['ratio']:.2f}x", f"{mem_roof:.0f}",
                 pct(rec["of_memory_roofline"]), f"{mm_roof:.0f}",
                 pct(rec["of_matmul_roofline"])])
  b.results["compare_decode"] = out
  print(f"\nDecode through generate, ours vs transformers ({prompt_len}-token prompts, {new} "
        f"new tokens, greedy, torch threads {FLAGS.threads}; per-token time = "
        f"(t[{new + 1} tokens] - t[1 token]) / {new}, median of {FLAGS.repeats})")
  print(table(rows, ["B", "ours tok/s", "spread", "HF tok/s", "spread", "ratio",
                     "mem roof", "of mem", "matmul roof", "of matmul"]))
  check_targets(b, out)


def check_targets(b: Bench, compared: list[dict]) -> None:
  """The issue's CPU targets (default model, fp32): batch 1 >= 2.5x transformers
  and >= 70% of the memory roofline; batch 64 >= 1.5x and >= 70% of the measured
  matmul roofline."""
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
  from engine import roofline
  from engine.runner import Row
  n = FLAGS.prefill_tokens
  page = b.engine.config.page_size
  tokens = random_prompts(1, n, b.model_config.vocab_size)[0]
  chunk = b.engine.config.prefill_chunk
  # One sequence, in chunks of --prefill_chunk (one step when it holds the prompt).
  steps = []
  for start in range(0, n, chunk):
    m = min(chunk, n - start)
    steps.append([Row(tokens[start:start + m], start, list(range(-(-(start + m) // page))))])
  runner = b.engine.runner
  run = lambda: [jax.block_until_ready(runner.step(rows)) for rows in steps]
  for _ in range(FLAGS.warmup):
    run()
  times = []
  for _ in range(FLAGS.steps):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  s = summarize(times)
  if FLAGS.profile:
    s["profile"] = trace_ops(run, f"prefill {n} tokens")
  cost = roofline.prefill_cost(b.model_config, [(st, min(chunk, n - st))
                                                for st in range(0, n, chunk)])
  mfu = roofline.mfu(cost, s["median"], b.peaks, b.dtype)
  rec = {"tokens": n, "chunks": len(steps), **s, "tokens_per_second": n / s["median"],
         "flops": cost.flops, "flops_per_second": cost.flops / s["median"], "mfu": mfu}
  measured = b.results.get("measured", {}).get("matmul_flops")
  if measured:
    rec["of_measured_matmul"] = rec["flops_per_second"] / measured
  b.results["prefill"] = rec
  print(f"\nPrefill of {n} tokens ({len(steps)} step(s)): {1e3 * s['median']:.1f} ms "
        f"(spread {pct(s['spread'])}), {rec['tokens_per_second']:.0f} tokens/s, "
        f"{rec['flops_per_second'] / 1e12:.1f} TFLOP/s, MFU {pct(mfu)} of "
        f"{b.peaks.peak_flops(b.dtype) / 1e12:.0f} TFLOP/s"
        + (f", {pct(rec['of_measured_matmul'])} of the measured matmul" if measured else ""))
  batched = []
  for shape in FLAGS.prefill_batch_shapes:
    rows_n, t = (int(x) for x in shape.split("x"))
    per_seq = -(-t // page)
    prompts = random_prompts(rows_n, t, b.model_config.vocab_size)
    rows = [Row(p, 0, list(range(i * per_seq, (i + 1) * per_seq)))
            for i, p in enumerate(prompts)]
    one = lambda: jax.block_until_ready(runner.step(rows))
    one()  # compiles
    ts = []
    for _ in range(3):
      t0 = time.perf_counter()
      one()
      ts.append(time.perf_counter() - t0)
    st = summarize(ts)
    if FLAGS.profile:
      st["profile"] = trace_ops(one, f"prefill step {shape}", runs=1)
    cost = roofline.prefill_cost(b.model_config, [(0, t)] * rows_n)
    r = {"shape": shape, **st, "tokens_per_second": rows_n * t / st["median"],
         "flops_per_second": cost.flops / st["median"],
         "mfu": roofline.mfu(cost, st["median"], b.peaks, b.dtype)}
    batched.append(r)
    print(f"Prefill step {shape}: {1e3 * st['median']:.1f} ms, {r['tokens_per_second']:.0f} "
          f"tokens/s, MFU {pct(r['mfu'])}")
  if batched:
    b.results["prefill_batches"] = batched


# throughput -------------------------------------------------------------------------------


def workload_lengths(name: str, n: int) -> list[tuple[int, int]]:
  if name == "sharegpt":
    data = json.loads(pathlib.Path(FLAGS.sharegpt_file).read_text())["lengths"]
    return [tuple(data[i % len(data)]) for i in range(n)]
  p, o = (int(x) for x in name.split(":"))
  return [(p, o)] * n


def step_seconds(engine) -> dict:
  """Steps and seconds so far by kind (prefill, decode), from the engine's metrics."""
  metrics = getattr(engine, "metrics", None)
  if metrics is None or not hasattr(metrics, "snapshot"):
    return {}
  return {k: {"steps": v["steps"], "seconds": v["seconds"]}
          for k, v in metrics.snapshot().get("steps", {}).items()}


def run_throughput(b: Bench, hf) -> None:
  from engine.sampling import SamplingParams
  out, rows = [], []
  for w in FLAGS.workloads:
    lengths = workload_lengths(w, FLAGS.num_requests)
    new_prompts = lambda: random_prompts(len(lengths), [p for p, _ in lengths],
                                         b.model_config.vocab_size)
    params = [SamplingParams(temperature=FLAGS.temperature, ignore_eos=True, max_tokens=o,
                             seed=i) for i, (_, o) in enumerate(lengths)]
    n_warm = FLAGS.warmup_requests or b.engine.config.max_batch
    n_warm = min(n_warm, len(lengths))
    t0 = time.perf_counter()
    b.engine.generate(new_prompts()[:n_warm], params[:n_warm])  # compiles the step shapes
    warm_s = time.perf_counter() - t0
    walls = []
    before = step_seconds(b.engine)
    for _ in range(FLAGS.repeats):
      prompts = new_prompts()  # fresh ones: no prefix-cache hits
      t0 = time.perf_counter()
      outs = b.engine.generate(prompts, params)
      walls.append(time.perf_counter() - t0)
      assert [len(o.token_ids) for o in outs] == [o for _, o in lengths], "short output"
    s = summarize(walls)
    n_in = sum(p for p, _ in lengths)
    n_out = sum(o for _, o in lengths)
    after = step_seconds(b.engine)
    by_kind = {k: {f: after[k][f] - before.get(k, {}).get(f, 0) for f in ("steps", "seconds")}
               for k in after}
    rec = {"workload": w, "requests": len(lengths), "input_tokens": n_in,
           "output_tokens": n_out, "warmup_seconds": warm_s, "seconds": s,
           "model_steps": by_kind,
           "requests_per_second": len(lengths) / s["median"],
           "output_tokens_per_second": n_out / s["median"],
           "total_tokens_per_second": (n_in + n_out) / s["median"]}
    peer = None
    if hf is not None and w != "sharegpt":
      p_len, o_len = lengths[0]
      peer = summarize(hf.throughput_seconds(prompts, o_len, b.engine.config.max_batch))
      rec["hf"] = {"seconds": peer, "output_tokens_per_second": n_out / peer["median"],
                   "batch": b.engine.config.max_batch}
      rec["ratio"] = peer["median"] / s["median"]
    out.append(rec)
    rows.append([w, len(lengths), f"{rec['requests_per_second']:.2f}",
                 f"{rec['output_tokens_per_second']:.1f}",
                 f"{rec['total_tokens_per_second']:.1f}", pct(s["spread"]),
                 f"{rec['hf']['output_tokens_per_second']:.1f}" if peer else "-",
                 f"{rec['ratio']:.2f}x" if peer else "-"])
    print(f"throughput {w}: {rec['output_tokens_per_second']:.1f} output tokens/s; model "
          f"steps: " + ", ".join(f"{k} {v['steps'] / FLAGS.repeats:.0f} taking "
                                 f"{v['seconds'] / FLAGS.repeats:.2f} s" for k, v in by_kind.items()),
          flush=True)
  b.results["throughput"] = out
  print(f"\nOffline throughput (greedy={FLAGS.temperature == 0}, ignore_eos, max_batch "
        f"{b.engine.config.max_batch}, median of {FLAGS.repeats}; transformers runs static "
        f"batches of max_batch)")
  print(table(rows, ["workload", "reqs", "req/s", "out tok/s", "total tok/s", "spread",
                     "HF out tok/s", "ratio"]))


# latency ---------------------------------------------------------------------------------


def poisson_run(b: Bench, rate: float, n: int, seed: int) -> dict:
  import numpy as np
  from engine.sampling import SamplingParams
  eng = b.engine
  rng = np.random.default_rng(seed)
  gaps = rng.exponential(1.0 / rate, size=n)
  arrivals = np.cumsum(gaps) - gaps[0]
  prompts = random_prompts(n, FLAGS.latency_input, b.model_config.vocab_size)
  params = SamplingParams(temperature=FLAGS.temperature, ignore_eos=True, seed=1,
                          max_tokens=FLAGS.latency_output)
  ids, submitted = [], 0
  t0 = time.perf_counter()
  while submitted < n or eng.has_unfinished():
    now = time.perf_counter() - t0
    while submitted < n and arrivals[submitted] <= now:
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
  stats = lambda v: {"mean": float(np.mean(v)), "p50": float(np.percentile(v, 50)),
                     "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99))}
  return {"rate": rate, "requests": n, "seconds": wall, "ttft": stats(ttft),
          "tpot": stats(tpot), "output_tokens_per_second": n * FLAGS.latency_output / wall}


def run_latency(b: Bench, hf) -> None:
  rates = [float(r) for r in FLAGS.rates]
  n = FLAGS.num_requests
  poisson_run(b, max(rates), min(n, 8), FLAGS.seed + 99)  # warm-up: compiles the shapes
  out, rows = [], []
  for rate in rates:
    rec = poisson_run(b, rate, n, FLAGS.seed + 4)
    out.append(rec)
    rows.append([f"{rate:g}", n, f"{1e3 * rec['ttft']['p50']:.0f}",
                 f"{1e3 * rec['ttft']['p90']:.0f}", f"{1e3 * rec['ttft']['p99']:.0f}",
                 f"{1e3 * rec['tpot']['p50']:.1f}", f"{1e3 * rec['tpot']['p90']:.1f}",
                 f"{1e3 * rec['tpot']['p99']:.1f}", f"{rec['output_tokens_per_second']:.1f}"])
  b.results["latency"] = {"input": FLAGS.latency_input, "output": FLAGS.latency_output,
                          "points": out}
  print(f"\nLatency under Poisson arrivals ({FLAGS.latency_input} in / {FLAGS.latency_output} "
        f"out per request)")
  print(table(rows, ["req/s", "reqs", "TTFT p50 ms", "p90", "p99", "TPOT p50 ms", "p90",
                     "p99", "out tok/s"]))
  if hf is not None:
    prompt = random_prompts(1, FLAGS.latency_input, b.model_config.vocab_size)
    ttft = summarize(hf.generate_seconds(prompt, 1))
    tpot = summarize(hf.decode_per_token(prompt, FLAGS.latency_output - 1))
    b.results["latency"]["hf_single_request"] = {"ttft": ttft, "tpot": tpot}
    print(f"transformers, one request alone (no load): TTFT {1e3 * ttft['median']:.0f} ms, "
          f"TPOT {1e3 * tpot['median']:.1f} ms")


# ttft / kernels / calibration -----------------------------------------------------------


def run_ttft(b: Bench) -> None:
  from engine.sampling import SamplingParams
  params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
  new_prompt = lambda: random_prompts(1, FLAGS.ttft_prompt_len, b.model_config.vocab_size)
  first = b.engine.generate(new_prompt(), params)[0].metrics.ttft
  again = b.engine.generate(new_prompt(), params)[0].metrics.ttft
  cache = FLAGS.compilation_cache_dir
  entries = len(os.listdir(cache)) if cache and os.path.isdir(cache) else 0
  b.results["ttft"] = {"prompt_len": FLAGS.ttft_prompt_len, "first_request": first,
                       "second_request": again, "compilation_cache_dir": cache,
                       "cache_entries_after": entries}
  print(f"\nTTFT ({FLAGS.ttft_prompt_len}-token prompt): first request in this process "
        f"{1e3 * first:.0f} ms, second {1e3 * again:.0f} ms (compilation cache: "
        f"{cache or 'off'}, {entries} entries now)")


def run_kernels(c, page: int) -> dict:
  """The Pallas GPU paged-attention kernel against the XLA reference, on random
  pools shaped like model config `c`'s, at a few decode batches and contexts.
  Runs before the engine is built: a kernel that fails here is not used."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from model import attention
  dtype = jnp.dtype(c.compute_dtype)
  out = []
  platform_ = jax.devices()[0].platform
  impl = "pallas_gpu" if platform_ == "gpu" else "pallas_gpu_interpret"
  if not attention.pallas_gpu_available():
    print("\nkernels: Pallas GPU ops not importable here")
    return {"impl": impl, "error": "pallas gpu ops not importable", "ok": False}
  small = platform_ != "gpu"
  for batch, ctx in ([(1, 64), (2, 64)] if small else [(1, 4096), (8, 4096), (64, 1024)]):
    nb = -(-ctx // page)
    pool_pages = batch * nb + 1
    rng = np.random.default_rng(batch)
    shape = (pool_pages, page, c.num_kv_heads, c.head_dim)
    kp = jnp.asarray(rng.standard_normal(shape), dtype)
    vp = jnp.asarray(rng.standard_normal(shape), dtype)
    q = jnp.asarray(rng.standard_normal((batch, 1, c.num_heads, c.head_dim)), dtype)
    tables = jnp.asarray(rng.permutation(batch * nb).reshape(batch, nb), jnp.int32)
    lens = jnp.asarray(rng.integers(ctx // 2, ctx + 1, batch), jnp.int32)
    pos = (lens - 1)[:, None]
    fns = {name: jax.jit(lambda *a, impl=name: attention.attend(*a, impl=impl))
           for name in ("xla", impl)}
    ref = fns["xla"](q, kp, vp, tables, pos, lens).astype(jnp.float32)
    rec = {"batch": batch, "context": ctx}
    try:
      got = fns[impl](q, kp, vp, tables, pos, lens).astype(jnp.float32)
      err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
      rec["relative_error"] = err
      for name, f in fns.items():
        args = (q, kp, vp, tables, pos, lens)
        jax.block_until_ready(f(*args))
        ts = []
        for _ in range(3 if small else 20):
          t0 = time.perf_counter()
          jax.block_until_ready(f(*args))
          ts.append(time.perf_counter() - t0)
        rec[name + "_seconds"] = float(np.median(ts))
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
  from engine import roofline
  gpu = jax.devices()[0].platform == "gpu"
  copy = roofline.measure_copy_bandwidth(mib=4096 if gpu else 256)
  n = 8192 if gpu else 1024
  mm = 2 * n ** 3 / roofline.measure_matmul_seconds(n, n, n, b.dtype)
  b.results["measured"] = {"copy_bandwidth": copy, "matmul_flops": mm, "matmul_size": n}
  print(f"measured: copy {copy / 1e9:.1f} GB/s (read + write), {n}^3 {b.dtype} matmul "
        f"{mm / 1e12:.2f} TFLOP/s")


# The peer ---------------------------------------------------------------------------------


class HF:
  """transformers' generate on the same weights, for side-by-side numbers.

  It runs in a worker process: in one process, XLA's and torch's CPU thread pools
  (each as wide as the machine) compete, and the measured slowdown was 40x for
  transformers at batch 1. The two engines take turns, one idle while the other
  is timed.
  """

  def __init__(self, threads: int):
    import multiprocessing
    path = FLAGS.checkpoint
    if path is None:
      from model import default_model
      path = str(default_model.gguf_path())
    p = pathlib.Path(path)
    if p.suffix != ".gguf" and not (p / "config.json").exists():
      raise app.UsageError("--compare hf needs the default model, a .gguf file or a Hugging "
                           "Face directory (the same weights for both engines)")
    ctx = multiprocessing.get_context("spawn")
    self._conn, child = ctx.Pipe()
    self._proc = ctx.Process(target=_hf_worker, args=(child, str(p), threads), daemon=True)
    self._proc.start()
    ok, info = self._conn.recv()
    if not ok:
      raise RuntimeError(f"transformers worker failed: {info}")
    self.threads = threads

  def _call(self, name, *args):
    self._conn.send((name, args))
    ok, value = self._conn.recv()
    if not ok:
      raise RuntimeError(f"transformers worker: {value}")
    return value

  def generate_seconds(self, prompts: list[list[int]], new: int) -> list[float]:
    """Seconds of one generate call of `new` tokens over equal-length prompts."""
    return self._call("generate_seconds", prompts, new, FLAGS.repeats)

  def decode_per_token(self, prompts: list[list[int]], new: int, repeats: int | None = None,
                       warm: bool = True) -> list[float]:
    """Per-token decode seconds: (t[new + 1 tokens] - t[1 token]) / new."""
    return self._call("decode_per_token", prompts, new,
                      FLAGS.repeats if repeats is None else repeats, warm)

  def throughput_seconds(self, prompts: list[list[int]], new: int, batch: int) -> list[float]:
    """Static batches of `batch` equal-length prompts, each generating `new` tokens."""
    return self._call("throughput_seconds", prompts, new, batch, FLAGS.repeats)


def _hf_worker(conn, path: str, threads: int) -> None:
  """The transformers side of --compare hf (a separate process; see HF)."""
  try:
    # Idle OpenMP threads sleep instead of spinning on cores the other engine uses.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers
    torch.set_num_threads(threads)
    p = pathlib.Path(path)
    if p.suffix == ".gguf":
      model = transformers.AutoModelForCausalLM.from_pretrained(
          str(p.parent), gguf_file=p.name, dtype=torch.float32)
    else:
      model = transformers.AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32)
    model.eval()
  except Exception as e:  # reported to the parent
    conn.send((False, f"{type(e).__name__}: {e}"))
    return
  conn.send((True, None))

  def generate(ids, n):
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

  def generate_seconds(prompts, new, repeats):
    ids = torch.tensor(prompts)
    generate(ids, new)  # warm-up
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      out = generate(ids, new)
      times.append(time.perf_counter() - t0)
      assert out.shape[1] == ids.shape[1] + new
    return times

  def decode_per_token(prompts, new, repeats, warm):
    ids = torch.tensor(prompts)
    if warm:
      generate(ids, new + 1)
    per_token = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      generate(ids, new + 1)
      full = time.perf_counter() - t0
      t0 = time.perf_counter()
      generate(ids, 1)
      per_token.append((full - (time.perf_counter() - t0)) / new)
    return per_token

  def throughput_seconds(prompts, new, batch, repeats):
    chunks = [torch.tensor(prompts[i:i + batch]) for i in range(0, len(prompts), batch)]
    generate(chunks[0], 2)  # warm-up
    walls = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      for ids in chunks:
        generate(ids, new)
      walls.append(time.perf_counter() - t0)
    return walls

  calls = {f.__name__: f for f in (generate_seconds, decode_per_token, throughput_seconds)}
  with torch.inference_mode():
    while True:
      try:
        name, args = conn.recv()
      except EOFError:
        return
      try:
        conn.send((True, calls[name](*args)))
      except Exception as e:
        conn.send((False, f"{type(e).__name__}: {e}"))


# The roofline plot ----------------------------------------------------------------------


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  peaks = results["peaks"]
  dtype = results["model"]["compute_dtype"]
  peak = peaks["flops"][dtype]
  bw = peaks["bandwidth"]
  ridge = peak / bw
  fig, ax = plt.subplots(figsize=(8, 5.5))
  xs = np.logspace(-1, max(3, np.log10(ridge) + 1.5), 200)
  ax.loglog(xs, np.minimum(peak, bw * xs), "k-", lw=2,
            label=f"roof: {peak / 1e9:.0f} GFLOP/s {dtype}, {bw / 1e9:.1f} GB/s")
  ax.axvline(ridge, color="gray", ls="--", lw=1)
  ax.text(ridge * 1.08, peak * 0.02, f"ridge {ridge:.1f} FLOP/byte", color="gray", rotation=90)
  measured = results.get("measured", {})
  if measured.get("copy_bandwidth"):
    ax.loglog(xs, np.minimum(peak, measured["copy_bandwidth"] * xs), ":", color="gray",
              label=f"measured copy {measured['copy_bandwidth'] / 1e9:.0f} GB/s")
  for ctx in sorted({p["context"] for p in results.get("decode", [])}):
    pts = [p for p in results["decode"] if p["context"] == ctx]
    x = [p["intensity"] for p in pts]
    ax.loglog(x, [p["flops_per_second"] for p in pts], "o-", label=f"decode step, ctx {ctx}")
    for p in pts:
      ax.annotate(f"B={p['batch']}", (p["intensity"], p["flops_per_second"]),
                  textcoords="offset points", xytext=(4, -10), fontsize=7)
    eng = [p for p in pts if "engine" in p]
    if eng:
      ax.loglog([p["engine"]["intensity"] for p in eng],
                [p["engine"]["flops_per_second"] for p in eng], "s", mfc="none",
                label=f"whole engine step, ctx {ctx}")
  if "prefill" in results:
    pf = results["prefill"]
    from engine import roofline
    from model.config import ModelConfig
    cost = roofline.prefill_cost(ModelConfig.from_dict(results["model"]),
                                 [(0, pf["tokens"])])
    ax.loglog([cost.intensity], [pf["flops_per_second"]], "D",
              label=f"prefill {pf['tokens']} tokens")
  ax.set_xlabel("arithmetic intensity (FLOP/byte)")
  ax.set_ylabel("achieved FLOP/s")
  ax.set_title(f"{results['model']['name']} on {results['machine']['device_kind']} "
               f"({results['date'][:10]})")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# main ---------------------------------------------------------------------------------------


def main(argv):
  del argv
  modes = [m.strip() for m in FLAGS.mode]
  bad = [m for m in modes if m not in MODES]
  if bad:
    raise app.UsageError(f"unknown --mode {bad}; known: {MODES}")
  impl, kernels = None, None
  if "kernels" in modes:
    kernels = run_kernels(flags_common.model_config(), FLAGS.page_size)
    if not kernels["ok"] and FLAGS.attention in (None, "auto"):
      impl = "xla"
      print("kernels: the Pallas kernel failed its check; attention runs on XLA")
  bench = build(needs_for(modes), impl)
  if kernels is not None:
    bench.results["kernels"] = kernels
  hf = HF(FLAGS.threads) if FLAGS.compare == "hf" else None
  if any(m in modes for m in ("prefill", "kernels")) or FLAGS.calibrate:
    run_calibration(bench)
  runs = {"kernels": lambda: None, "ttft": lambda: run_ttft(bench),
          "decode": lambda: run_decode(bench, hf),
          "prefill": lambda: run_prefill(bench),
          "throughput": lambda: run_throughput(bench, hf),
          "latency": lambda: run_latency(bench, hf)}
  out = pathlib.Path(FLAGS.output)
  out.parent.mkdir(parents=True, exist_ok=True)
  save = lambda: out.write_text(json.dumps(bench.results, indent=1, default=float))
  # ttft first: it measures this process's first request. The results are saved
  # after every mode, so a run cut short keeps what it measured.
  for mode in sorted(modes, key=lambda m: m != "ttft"):
    runs[mode]()
    bench.results["load_average_after"] = os.getloadavg()
    save()
  print(f"\nresults: {out}")
  if "decode" in modes or "prefill" in modes:
    png = FLAGS.plot or str(out.with_suffix(".png"))
    plot(bench.results, png)
    print(f"roofline plot: {png}")


if __name__ == "__main__":
  app.run(main)
