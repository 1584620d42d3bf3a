"""Benchmarks of the engine and the roofline report (`scripts/benchmark.py` is the CLI).

  common.py  the options, the engine under test (`Bench`), random prompts, summaries.
  modes.py   the mode table (`MODES`: name -> function of a `Bench`) and `run`, which
             builds one engine and runs the chosen modes on it in one process; the
             modes themselves: decode.py, device.py (prefill, kernels, calibration),
             traffic.py (throughput, latency, ttft), host.py, scoring.py,
             structured.py, conversation.py.
  peer.py    Hugging Face transformers' `generate` on the same weights, in a worker
             process, for side-by-side numbers.
  plots.py   the roofline figure with its caption, from a results dict (or a saved
             results JSON: `replot`).

Every timed figure comes from `engine.roofline.time_calls` (the helper calibration
uses too): the median of repetitions after a warm-up, with its spread.

This file imports nothing: the peer's worker process imports `ridgeline.tools.bench.peer`
and should not pay for the engine and the model (it imports only the timing helper).
"""
