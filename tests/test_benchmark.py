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


def test_replot_draws_a_saved_run_with_its_caption(tmp_path):
  """--replot draws a committed results JSON again (no model, no benchmark), and the
  caption says how far each point is from its roof and which roof it is under."""
  saved = ROOT / "benchmarks" / "results" / "cpu_smollm2_fp32_compare.json"
  png = tmp_path / "again.png"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--replot",
                         str(saved), "--plot", str(png)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 50_000

  from ridgeline.tools.bench import plots
  results = json.loads(saved.read_text())
  text = "\n".join(plots.caption(results))
  # B=1 at context 64: 27.6 tok/s, 0.505 FLOP/byte, far left of the 8.7 ridge; its
  # roof is the bandwidth, and it reaches bytes/s / bandwidth of it.
  b1 = results["decode"][0]
  assert b1["batch"] == 1
  share = round(100 * b1["bytes_per_second"] / results["peaks"]["bandwidth"])
  assert f"B=1 27.6 tok/s = {share}% of its roof (memory-bound" in text
  # B=64 is past the ridge: its share is of the peak FLOP/s.
  b64 = results["decode"][1]
  peak = results["peaks"]["flops"]["float32"]
  assert f"B=64 401 tok/s = {round(100 * b64['flops_per_second'] / peak)}% of its roof " \
         "(compute-bound" in text
  # The peer's figures, as measured: transformers 25.0 and 342 tok/s.
  assert "B=1: transformers (red) 25 tok/s" in text and "1.41x" in text
  assert "B=64: transformers (red) 342 tok/s" in text and "1.06x" in text
  assert "GFLOP/s" in text and "TFLOP/s" not in text  # CPU units


def test_replot_rejects_a_file_that_is_not_a_results_json(tmp_path):
  bad = tmp_path / "lengths.json"
  bad.write_text(json.dumps({"lengths": [[1, 2]]}))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--replot",
                         str(bad)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode != 0
  assert f"{bad}: not a benchmark results file (no model, peaks, machine, date)" in proc.stderr
  assert not bad.with_suffix(".png").exists()


def test_time_calls_warms_up_then_times_back_to_back_calls():
  from ridgeline.engine import roofline
  calls, synced = [], []
  times = roofline.time_calls(lambda x: calls.append(x) or x, 7, repeats=3, warmup=2, calls=4,
                              sync=synced.append)
  assert len(times) == 3 and all(t >= 0 for t in times)
  assert len(calls) == 2 + 3 * 4  # the warm-up calls, then 4 per repetition
  assert len(synced) == 2 + 3  # waits on every warm-up call, then once per repetition


def test_conversation_serve_sizes_a_pool_that_holds_a_whole_conversation():
  """The server flags of the HTTP conversation workload: a pool of `pool` of the
  conversations' KV that still holds one sequence of max_model_len, itself above
  a conversation's estimated length, for small and large settings."""
  from ridgeline.tools.bench.conversation_serve import ConversationServeConfig
  for cfg in (ConversationServeConfig(), ConversationServeConfig(
      users=4, turns=2, prompt=32, answer=8, message=8),
              ConversationServeConfig(users=1, turns=1, prompt=5, pool=0.01, page_size=8)):
    flags = dict(f[2:].split("=") for f in cfg.server_flags())
    pages, max_len, page = (int(flags[k]) for k in ("num_pages", "max_model_len", "page_size"))
    assert pages * page >= max_len > cfg.final_tokens(), (cfg, flags)
    assert pages >= int(cfg.pool * cfg.users * cfg.final_tokens() / page) - 1


def test_conversation_serve_counts_the_prompt_tokens_never_seen():
  """Two users whose first prompts share a 3-token system prompt, then one's
  second turn: its history, its 2-token answer, then 2 new tokens."""
  from ridgeline.tools.bench.conversation_serve import fresh_prompt_tokens
  sys_, a, b = [1, 2, 3], [10, 11, 12], [20, 21]
  prompts = [sys_ + a, sys_ + b, sys_ + a + [30, 31] + [40, 41]]
  assert fresh_prompt_tokens(prompts, answer=2) == 6 + 2 + 2
  # A prompt that only shares part of an earlier one does not continue it.
  assert fresh_prompt_tokens([sys_ + a, sys_ + [9, 9, 9, 9]], answer=2) == 6 + 4


def test_prometheus_samples_are_read_by_name_and_labels():
  from ridgeline.tools.bench.conversation_serve import _sample
  text = ('# TYPE ridgeline_computed_tokens counter\n'
          'ridgeline_computed_tokens_total{kind="decode"} 5.0\n'
          'ridgeline_computed_tokens_total{kind="prefill"} 7.0\n')
  assert _sample(text, "ridgeline_computed_tokens_total", {"kind": "prefill"}) == 7.0
  assert _sample(text, "ridgeline_computed_tokens_total", {"kind": "decode"}) == 5.0
  assert _sample(text, "ridgeline_missing_total") == 0.0
