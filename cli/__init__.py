"""Ridgeline's command-line programs (absl flags), installed as console scripts:

  ridgeline-generate  (generate.py)        a few prompts, tokens/s
  ridgeline-batch     (batch_generate.py)  a JSONL file of prompts -> completions
  ridgeline-convert   (convert_checkpoint.py)  GGUF / HF -> orbax checkpoint
  ridgeline-bench     (benchmark.py)       roofline and throughput benchmarks

`python scripts/NAME.py` runs the same code from a source tree. Each module's
`run()` is its entry point; `_app.run` gives them all the same error handling
and --help.
"""
