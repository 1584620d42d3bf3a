"""scripts/benchmark.py end to end on the tiny preset (every CPU-capable mode, tiny
sizes), and the shipped ShareGPT-like lengths."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_benchmark_modes_write_results_and_plot(tmp_path):
  out = tmp_path / "results.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", "tiny",
         "--mode", "decode,throughput,latency,prefill,kernels", "--batch_sizes", "1,2",
         "--contexts", "16", "--steps", "2", "--warmup", "1", "--repeats", "1",
         "--engine_tokens_limit", "64", "--workloads", "16:4", "--num_requests", "4",
         "--rates", "200", "--latency_input", "8", "--latency_output", "3",
         "--prefill_tokens", "32", "--prefill_batch_shapes", "2x16", "--max_model_len", "128",
         "--max_batch", "4", "--output", str(out)]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Decode steps" in proc.stdout and "Offline throughput" in proc.stdout

  results = json.loads(out.read_text())
  assert results["model"]["name"] == "tiny" and results["machine"]["platform"] == "cpu"
  points = results["decode"]
  assert [(p["batch"], p["context"]) for p in points] == [(1, 16), (2, 16)]
  for p in points:
    assert p["step_seconds"] > 0 and p["runner"]["n"] == 2
    assert 0 < p["mbu"] and 0 < p["intensity"] < results["peaks"]["ridge_point"]
    assert p["engine"]["tokens_per_second"] > 0 and "pipelined" in p
  (tp,) = results["throughput"]
  assert tp["output_tokens"] == 16 and tp["output_tokens_per_second"] > 0
  assert tp["model_steps"]["decode"]["steps"] > 0
  (lat,) = results["latency"]["points"]
  assert lat["requests"] == 4 and lat["ttft"]["p50"] > 0 and lat["tpot"]["p90"] > 0
  assert results["prefill"]["tokens"] == 32 and results["prefill_batches"][0]["shape"] == "2x16"
  kernels = results["kernels"]
  assert kernels["ok"] and all(k["relative_error"] < 1e-4 for k in kernels["points"])
  png = out.with_suffix(".png")
  assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_sharegpt_lengths_are_shipped_and_reproducible():
  proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sharegpt_lengths.py"),
                         "--check"], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  data = json.loads((ROOT / "benchmarks" / "sharegpt_lengths.json").read_text())
  lengths = data["lengths"]
  assert len(lengths) == 1000
  assert all(4 <= p <= 1024 and o >= 4 and p + o <= 2048 for p, o in lengths)
  mean_p = sum(p for p, _ in lengths) / len(lengths)
  mean_o = sum(o for _, o in lengths) / len(lengths)
  assert abs(mean_p - 215) < 15 and abs(mean_o - 198) < 15
