"""The benchmark modes, and `run`, which runs the chosen ones on one engine.

  decode      per (batch, context): the step time of the jitted decode step alone
              (the runner), and of whole engine steps (scheduler, sampler, host
              work) where the prompts are cheap enough to prefill; tokens/s,
              achieved FLOP/s and bytes/s, MFU, MBU, arithmetic intensity against
              the ridge point, and the rooflines (memory; measured matmul). With a
              peer: Engine.generate against transformers' generate at
              `compare_batches` (tools/bench/decode.py).
  throughput  vLLM `bench throughput`-style offline runs through Engine.generate
              (greedy, ignore_eos, max_tokens = the output length): fixed IN:OUT
              lengths, or `sharegpt` (benchmarks/sharegpt_lengths.json).
  latency     Poisson arrivals at each rate, through the engine driver: TTFT and
              TPOT percentiles.
  ttft        one request in this (fresh) process: its time to first token, cold
              or warm depending on the persistent compilation cache's contents
              (these three: tools/bench/traffic.py).
  prefill     one prompt of `prefill_tokens` through the runner: step time, MFU.
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
              built: a kernel that fails its check is not used (these two:
              tools/bench/device.py).

A new mode is a function of a `Bench` that stores its figures in `bench.results`
(and prints them): add it to `MODES`, and to `NEEDS` a function of
(Options, EngineConfig, peer: bool) -> Needs if it needs a bigger engine than the
default (more rows, longer sequences, more pages).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Callable

from ridgeline.tools.bench.common import Bench, Needs, Options, build
from ridgeline.tools.bench.conversation import run_conversation
from ridgeline.tools.bench.decode import decode_needs, run_decode
from ridgeline.tools.bench.device import check_kernels, prefill_needs, run_calibration, run_prefill
from ridgeline.tools.bench.host import run_host
from ridgeline.tools.bench.scoring import _needs as _scoring_needs, run_scoring
from ridgeline.tools.bench.structured import _needs as _structured_needs, run_structured
from ridgeline.tools.bench.traffic import (latency_needs, run_latency, run_throughput, run_ttft,
                                           throughput_needs)


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


NEEDS: dict[str, Callable[[Options, object, bool], Needs]] = {
    "decode": decode_needs,
    "throughput": throughput_needs,
    "latency": latency_needs,
    "prefill": prefill_needs,
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
