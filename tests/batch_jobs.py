"""What the batch job's tests share: the tiny engine's settings (in process and as
the script's flags, so both run the same weights and shapes), prompts, input files
and the script run as a child process."""

import json
import os
import pathlib
import random
import subprocess
import sys

from ridgeline.engine.engine import EngineConfig, SamplingParams

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Small shapes, few shape buckets: every bucket is a compilation, here and in each child.
CONFIG = EngineConfig(page_size=16, num_pages=48, max_model_len=64, max_batch=4,
                      prefill_chunk=32, max_prefill_batch=2)
ENGINE_FLAGS = ["--model", "tiny", "--page_size", "16", "--num_pages", "48",
                "--max_model_len", "64", "--max_batch", "4", "--prefill_chunk", "32",
                "--max_prefill_batch", "2"]
MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)


def token_prompts(n, seed=0, lo=1, hi=30):
  rng = random.Random(seed)
  return [[rng.randrange(1, 512) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def write_lines(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


def run_script(args, compile_cache, **popen):
  """scripts/batch_generate.py on the tiny engine, as a child process."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, str(ROOT / "scripts" / "batch_generate.py"), *ENGINE_FLAGS,
         "--compilation_cache_dir", compile_cache, "--noprogress", *args]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **popen)


def complete_lines(path):
  """Newline-terminated lines of a file (what a reader can see at this instant)."""
  try:
    return pathlib.Path(path).read_bytes().count(b"\n")
  except FileNotFoundError:
    return 0
