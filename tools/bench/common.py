"""What every benchmark mode shares: its options, the engine under test, random
prompts, summaries of timings, tables."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import pathlib
import platform
import socket
from typing import Sequence

import numpy as np

from ridgeline.util import ceil_div

SHAREGPT_FILE = str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
                    / "sharegpt_lengths.json")


@dataclasses.dataclass(frozen=True)
class Options:
  """The knobs of every mode (scripts/benchmark.py's flags, as plain values; the
  flags take their defaults from here)."""

  # decode
  batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
  contexts: tuple[int, ...] = (128,)
  steps: int = 10  # timed steps per point (decode, prefill)
  warmup: int = 2  # untimed runs before timing each point
  repeats: int = 3  # repetitions of generate-level and workload timings
  engine_tokens_limit: int = 8192  # whole engine steps too where batch x context <= this
  compare_batches: tuple[int, ...] = (1, 64)  # batch sizes compared with the peer
  compare_prompt_len: int = 32
  new_tokens: int = 64  # tokens generated per request in the comparison
  # throughput / latency
  workloads: tuple[str, ...] = ("128:128", "1024:1024", "sharegpt")
  num_requests: int = 64
  warmup_requests: int | None = None  # default: the engine's max_batch
  sharegpt_file: str = SHAREGPT_FILE
  rates: tuple[float, ...] = (1.0, 2.0, 4.0)
  latency_input: int = 64
  latency_output: int = 32
  # prefill / ttft
  prefill_tokens: int = 2048
  prefill_batch_shapes: tuple[tuple[int, int], ...] = ()  # (B, T): B fresh prompts of T
  ttft_prompt_len: int = 128
  # host
  host_batches: tuple[int, ...] = (64, 256, 1024)
  host_workload: tuple[int, int] = (128, 128)  # prompt, output tokens
  host_tokenizer: str | None = None  # a tokenizer file/directory, or "default"
  host_engine: bool = True  # also time the whole engine (the bench's model)
  # scoring
  scoring_prompts: tuple[int, int] = (64, 512)  # prompts, tokens each
  # structured
  structured_schemas: int = 20  # of tools/bench/structured.py's SCHEMAS
  structured_prompts: int = 10  # subjects per schema
  structured_batch: int = 64  # rows of the cost run
  structured_tokens: int = 128  # output tokens per row of the cost run
  structured_max_tokens: int = 512  # max_tokens of the validity runs
  # conversation
  conversation_users: int = 16
  conversation_turns: int = 4
  conversation_prompt: int = 256  # tokens of a user's first message
  conversation_answer: int = 32  # tokens of each answer
  conversation_message: int = 32  # tokens of each later message
  conversation_pool: float = 0.25  # device pool / the conversations' final KV
  # every mode
  temperature: float = 0.0
  seed: int = 0
  calibrate: bool = False  # measure copy bandwidth and a large matmul first
  profile: bool = False  # trace a few steps of each point (jax.profiler)
  cprofile: bool = False  # profile the host side of the engine steps (cProfile)
  compilation_cache_dir: str | None = None  # only reported (ttft counts its entries)


@dataclasses.dataclass(frozen=True)
class Needs:
  """The largest batch, sequence length and page count a mode uses, so that one
  engine can be sized for every chosen mode."""

  max_batch: int = 1
  max_len: int = 16
  pages: int = 0
  prefill_batch: int = 1
  prefill_tokens: int = 1

  def __or__(self, other: "Needs") -> "Needs":
    return Needs(*(max(a, b) for a, b in zip(dataclasses.astuple(self),
                                              dataclasses.astuple(other))))


# Timing -------------------------------------------------------------------------------


def host(result):
  """`sync` for `roofline.time_calls` when the work is done once the call returns
  (Engine.generate, an engine step, torch on a CPU)."""
  return result


def summarize(times: Sequence[float]) -> dict:
  """Median and spread ((max - min) / median) of repeated timings (seconds)."""
  t = np.asarray(times, np.float64)
  med = float(np.median(t))
  return {"median": med, "min": float(t.min()), "max": float(t.max()),
          "spread": float((t.max() - t.min()) / med) if med > 0 else 0.0, "n": len(t)}


# Text ------------------------------------------------------------------------------------


def pct(x: float) -> str:
  return f"{100 * x:.1f}%"


def flops_unit(peak: float) -> tuple[float, str]:
  """The FLOP/s unit figures near `peak` read best in: TFLOP/s on accelerators,
  GFLOP/s on CPUs (a few hundred GFLOP/s)."""
  return (1e12, "TFLOP/s") if peak >= 2e12 else (1e9, "GFLOP/s")


def fmt_flops(x: float, peak: float | None = None) -> str:
  scale, unit = flops_unit(peak if peak is not None else x)
  return f"{x / scale:.3g} {unit}"


def fmt_bandwidth(x: float) -> str:
  return f"{x / 1e9:.1f} GB/s" if x < 1e11 else f"{x / 1e9:.0f} GB/s"


def table(rows: list[list], header: list[str]) -> str:
  cells = [header] + [[str(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))
  return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


# Workloads ----------------------------------------------------------------------------------


def workload_lengths(name: str, n: int, sharegpt_file: str = SHAREGPT_FILE
                     ) -> list[tuple[int, int]]:
  """`n` (prompt, output) lengths: 'IN:OUT' for fixed ones, 'sharegpt' for the
  shipped ShareGPT-like pairs (benchmarks/sharegpt_lengths.json)."""
  if name == "sharegpt":
    data = json.loads(pathlib.Path(sharegpt_file).read_text())["lengths"]
    return [tuple(data[i % len(data)]) for i in range(n)]
  try:
    p, o = (int(x) for x in name.split(":"))
  except ValueError:
    raise ValueError(f"workload {name!r}: expected IN:OUT token lengths (e.g. 128:128) "
                     "or 'sharegpt'") from None
  if p < 1 or o < 1:
    raise ValueError(f"workload {name!r}: lengths must be at least 1")
  return [(p, o)] * n


def step_seconds(engine) -> dict:
  """Model steps and their seconds so far, by kind (prefill, decode), from the
  engine's metrics."""
  return {k: {"steps": v["steps"], "seconds": v["seconds"]}
          for k, v in engine.metrics.snapshot().get("steps", {}).items()}


# The engine under test -------------------------------------------------------------------


@dataclasses.dataclass
class Bench:
  """One engine, the options, the results so far, and the peer if one runs."""

  engine: object
  model_config: object  # model.config.ModelConfig
  options: Options
  results: dict
  peer: object | None = None  # peer.HFPeer
  model: object | None = None  # the model under test (modes that build their own engines)
  tokenizer: object | None = None
  _draws: itertools.count = dataclasses.field(default_factory=lambda: itertools.count(1))

  @property
  def dtype(self) -> str:
    return self.model_config.compute_dtype

  @property
  def peaks(self):
    return self.engine.peaks

  def prompts(self, n: int, length: int | Sequence[int], seed: int | None = None
              ) -> list[list[int]]:
    """Random token-id prompts. Each call draws new ones unless given a seed: the
    engine's prefix cache would otherwise serve a repeated prompt from cache and
    time something easier than the workload."""
    vocab = self.model_config.vocab_size
    rng = np.random.default_rng([self.options.seed, next(self._draws) if seed is None
                                 else seed])
    lengths = [length] * n if isinstance(length, int) else list(length)
    # Ids from the middle of the vocabulary: ordinary tokens, no specials. (The
    # lowest ids are special or rare: a batch-64 decode step of the default model
    # took 228 ms on them against 160 ms on ordinary ids, CPU, two runs.)
    lo, hi = min(100, vocab // 4), max(vocab - 100, vocab // 2)
    return [[int(t) for t in rng.integers(lo, hi, size=m)] for m in lengths]


def build(model, tokenizer, config, needs: Needs, options: Options, *,
          load_seconds: float = 0.0, command: str = "", label: str = "") -> Bench:
  """One Engine over `model`, `config` grown to fit `needs`, and the results dict
  that says what ran where."""
  import jax
  from ridgeline.engine.engine import Engine
  from ridgeline.model import attention as attention_lib

  max_len = max(min(config.max_model_len or needs.max_len,
                    model.config.max_position_embeddings),
                needs.max_len)
  config = dataclasses.replace(
      config, max_model_len=ceil_div(max_len, config.page_size) * config.page_size,
      # At least the rows a mode needs; else the device's own default (None).
      max_batch=(max(config.max_batch or 0, needs.max_batch)
                 if config.max_batch or needs.max_batch > 1 else None),
      # The side-by-side decode prefills all its prompts in one step, as generate does.
      max_prefill_batch=max(config.max_prefill_batch, needs.prefill_batch),
      prefill_chunk=max(config.prefill_chunk, needs.prefill_tokens))
  if config.num_pages is None and jax.devices()[0].platform == "cpu":
    # Enough pages for the largest point (a CPU reports no memory to size from).
    config = dataclasses.replace(config, num_pages=needs.pages + config.max_pages_per_seq + 1)
  engine = Engine(model, tokenizer, config)
  peaks, device = engine.peaks, jax.devices()[0]
  results = {
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "command": command,
      "label": label,
      "machine": {"host": socket.gethostname(), "platform": device.platform,
                  "device_kind": device.device_kind, "devices": jax.device_count(),
                  "cpu_count": os.cpu_count(), "processor": platform.processor(),
                  "load_average_before": os.getloadavg(), "jax": jax.__version__},
      "model": model.config.to_dict(),
      "attention_impl": getattr(model, "attention_impl", None),
      "attention_resolved": attention_lib.resolve_impl(model.attention_impl),
      "engine_config": dataclasses.asdict(config),
      "num_pages": engine.runner.num_pages,
      "load_seconds": load_seconds,
      "peaks": {"name": peaks.name, "flops": peaks.flops, "bandwidth": peaks.bandwidth,
                "measured": peaks.measured,
                "ridge_point": peaks.ridge_point(model.config.compute_dtype)},
  }
  peak = peaks.peak_flops(model.config.compute_dtype)
  print(f"model {model.config.name} ({model.config.compute_dtype}), {jax.device_count()} x "
        f"{device.device_kind}; peaks: {peaks.name}, "
        + ", ".join(f"{k} {fmt_flops(v, peak)}" for k, v in peaks.flops.items())
        + f", {fmt_bandwidth(peaks.bandwidth)}, ridge "
        f"{results['peaks']['ridge_point']:.1f} FLOP/byte; loaded in {load_seconds:.1f} s")
  return Bench(engine, model.config, options, results, model=model, tokenizer=tokenizer)


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
