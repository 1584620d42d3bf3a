"""Benchmarks of the engine and the roofline report (`scripts/benchmark.py` is the CLI).

  common.py  the options, the engine under test (`Bench`), random prompts, summaries,
             and `run_rows`, the one place that calls the runner's step.
  modes.py   the modes (`MODES`: name -> function of a `Bench`) and `run`, which
             builds one engine and runs the chosen modes on it in one process.
  peer.py    Hugging Face transformers' `generate` on the same weights, in a worker
             process, for side-by-side numbers.
  plots.py   the roofline figure with its caption, from a results dict (or a saved
             results JSON: `replot`).

Every timed figure comes from `engine.roofline.time_calls` (the helper calibration
uses too): the median of repetitions after a warm-up, with its spread.

This file imports nothing: the peer's worker process imports `engine.bench.peer`
and should not pay for the engine and the model (it imports only the timing helper).
"""
