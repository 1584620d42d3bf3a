"""The batch job's guards: a line with huge values fails alone, two jobs never both
write one output, the summary's preemptions are the engine's, and --metrics_port
serves the registry during a run."""

import json
import os
import pathlib
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from ridgeline.frontends import batch
from ridgeline.engine.engine import Engine, EngineConfig
from tests.serving import free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = EngineConfig(page_size=16, num_pages=48, max_model_len=64, max_batch=4,
                      prefill_chunk=32, max_prefill_batch=2)
# 6 pages of 16 tokens for 4 sequences of up to 64: the pool runs out, the newest
# sequences are preempted and recomputed.
SMALL_POOL = EngineConfig(page_size=16, num_pages=6, max_model_len=64, max_batch=4,
                          prefill_chunk=32, max_prefill_batch=2)
SMALL_FLAGS = ["--model", "tiny", "--page_size", "16", "--num_pages", "6",
               "--max_model_len", "64", "--max_batch", "4", "--prefill_chunk", "32",
               "--max_prefill_batch", "2"]


@pytest.fixture(scope="module")
def engine(tiny_model):
  return Engine(tiny_model, None, CONFIG)


def _write(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _rows(n, length=20, seed=0):
  return [{"id": f"r{i}", "prompt": [1 + (seed + i * 7 + j) % 500 for j in range(length)]}
          for i in range(n)]


def _job(inp, out, max_tokens=8, **kw):
  return batch.BatchJob(str(inp), str(out), progress=False,
                        default_sampling={"temperature": 0, "max_tokens": max_tokens}, **kw)


class Hooked:
  """The engine, with a hook after each output it hands the job (to act in the
  middle of a run: the job's loop is `Engine.iterate`)."""

  def __init__(self, engine, before_step):
    self._engine, self._before_step, self.steps = engine, before_step, 0

  def __getattr__(self, name):
    return getattr(self._engine, name)

  def iterate(self, requests, **kwargs):
    for out in self._engine.iterate(requests, **kwargs):
      self.steps += 1
      self._before_step(self.steps)
      yield out


# Defect 1 -------------------------------------------------------------------------


def test_huge_values_in_a_line_fail_that_line_only(engine, tmp_path):
  rows = [{"id": "a", "prompt": [1, 2, 3], "sampling": {"temperature": 1, "top_k": 10**12}},
          {"id": "b", "prompt": [1, 2, 3], "sampling": {"stop_token_ids": [10**6]}},
          {"id": "c", "prompt": [1, 2, 3], "sampling": {"stop_token_ids": [10**12]}},
          {"id": "d", "prompt": [1, 2, 3], "sampling": {"seed": 2**64}},
          {"id": "e", "prompt": [1, 10**12]},
          {"id": "f", "prompt": [1, 2, 3], "sampling": {"stop": 5}},
          {"id": "g", "prompt": [4, 5, 6]}]
  _write(tmp_path / "in.jsonl", rows)
  summary = batch.run_batch(engine, _job(tmp_path / "in.jsonl", tmp_path / "out.jsonl"))
  got = {r["id"]: r for r in batch.read_records(str(tmp_path / "out.jsonl"))}
  assert summary["requests"] == 7 and summary["errors"] == 5
  assert got["a"]["finish_reason"] == "length" and got["g"]["finish_reason"] == "length"
  assert "stop_token_ids must be token ids below the vocabulary size 512" in got["b"]["error"]
  assert "stop_token_ids must be a list of token ids in [0, 2**31)" in got["c"]["error"]
  assert "seed must be an integer in [0, 2**63)" in got["d"]["error"]
  assert "prompt token ids out of range" in got["e"]["error"]
  assert "stop must be a string or a list of strings, got 5" in got["f"]["error"]


# Defect 2: the lock ------------------------------------------------------------------


@pytest.mark.parametrize("first_overwrite", [False, True])
@pytest.mark.parametrize("second_overwrite", [False, True])
def test_two_jobs_on_one_output_never_both_write(engine, tmp_path, first_overwrite,
                                                 second_overwrite):
  rows = _rows(12)
  _write(tmp_path / "in.jsonl", rows)
  out = tmp_path / "out.jsonl"
  out.write_text("")  # an existing (empty) output, which --overwrite would delete
  paused, resume = threading.Event(), threading.Event()
  second = {}

  def before_step(n):
    if n == 4:  # the first job is mid-run and has written some records
      paused.set()
      assert resume.wait(60)

  def first():
    second["first"] = batch.run_batch(Hooked(engine, before_step),
                                      _job(tmp_path / "in.jsonl", out,
                                           overwrite=first_overwrite))

  thread = threading.Thread(target=first)
  thread.start()
  try:
    assert paused.wait(120)
    before = out.read_bytes()
    with pytest.raises(batch.LockedError) as e:
      batch.run_batch(engine, _job(tmp_path / "in.jsonl", out, overwrite=second_overwrite))
    assert str(e.value).startswith(f"another job is writing {out} (lock {out}.lock held")
    assert out.read_bytes() == before  # touched nothing, --overwrite or not
  finally:
    resume.set()
    thread.join(120)
  records = batch.read_records(str(out))
  assert second["first"]["requests"] == 12 and second["first"]["errors"] == 0
  assert [r["id"] for r in records] == [r["id"] for r in rows]


@pytest.mark.parametrize("overwrite", [False, True])
def test_script_refuses_a_held_output_before_loading(tmp_path, overwrite):
  _write(tmp_path / "in.jsonl", _rows(3))
  out = tmp_path / "out.jsonl"
  out.write_text('{"line": 1, "id": "r0", "finish_reason": "length"}\n')
  before = out.read_bytes()
  with batch.JobLock(str(out)):  # a running job
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "batch_generate.py"), "--model", "tiny",
         "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--noprogress",
         *(["--overwrite"] if overwrite else [])],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - t0
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: another job is writing {out} "), \
      proc.stderr
  assert "Traceback" not in proc.stderr
  assert out.read_bytes() == before and not (tmp_path / "out.jsonl.summary.json").exists()
  assert took < 60  # no model was loaded


# Defect 3 and item 8 ----------------------------------------------------------------


def _scrape(port: int) -> str:
  with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
    return r.read().decode()


def _sample(text: str, name: str) -> float:
  for line in text.splitlines():
    if line.startswith(name + " ") or line.startswith(name + "{"):
      return float(line.rsplit(" ", 1)[1])
  raise KeyError(name)


def test_summary_preemptions_equal_the_engine_metric_and_metrics_are_served(tiny_model, tmp_path):
  small = Engine(tiny_model, None, SMALL_POOL)
  server = small.metrics.serve(0)  # 127.0.0.1, any free port
  port = server.server_port
  scraped = []

  def before_step(n):
    if n in (2, 9):  # (the job reads one output per finished line: 12 here)
      now = small.metrics.registry.get_sample_value("ridgeline_generation_tokens_total")
      scraped.append((now, _scrape(port)))

  rows = _rows(12, length=24)
  _write(tmp_path / "in.jsonl", rows)
  job = _job(tmp_path / "in.jsonl", tmp_path / "out.jsonl", max_tokens=30)
  registry = small.metrics.registry
  before = registry.get_sample_value("ridgeline_preemptions_total")
  summary = batch.run_batch(Hooked(small, before_step), job)
  preempted = registry.get_sample_value("ridgeline_preemptions_total") - before
  server.shutdown()

  assert preempted > 0  # the workload does preempt
  assert summary["run"]["preemptions"] == preempted
  assert summary["engine"]["preemptions"] == preempted  # a fresh engine
  on_disk = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
  assert on_disk["run"]["preemptions"] == preempted
  assert f"preemptions   {int(preempted)}" in batch.format_summary(on_disk)
  # Scraped during the run (after outputs 2 and 9): the counters as they were then.
  assert len(scraped) == 2
  assert [_sample(text, "ridgeline_generation_tokens_total") for _, text in scraped] == [
      now for now, _ in scraped]
  assert 0 < scraped[0][0] < scraped[1][0]


def test_script_metrics_port_and_preemptions(tmp_path):
  rows = _rows(48, length=24)
  _write(tmp_path / "in.jsonl", rows)
  out = tmp_path / "out.jsonl"
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.Popen(
      [sys.executable, str(ROOT / "scripts" / "batch_generate.py"), *SMALL_FLAGS,
       "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--max_tokens", "36",
       "--noprogress", "--compilation_cache_dir", str(tmp_path / "jax_cache"),
       "--metrics_port", str(port)],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  scraped = None
  deadline = time.monotonic() + 240
  while proc.poll() is None and time.monotonic() < deadline:
    try:
      text = _scrape(port)
      if _sample(text, "ridgeline_generation_tokens_total") > 0:
        scraped = text
        break
    except (OSError, KeyError):
      pass
    time.sleep(0.1)
  stdout, stderr = proc.communicate(timeout=240)
  assert proc.returncode == 0, stderr
  assert f"metrics: http://127.0.0.1:{port}/metrics" in stderr
  assert scraped is not None, "nothing scraped while the job ran"
  assert "ridgeline_kv_cache_utilization" in scraped
  summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
  assert summary["requests"] == 48 and summary["errors"] == 0
  assert summary["run"]["preemptions"] > 0
  assert summary["run"]["preemptions"] == summary["engine"]["preemptions"]
  assert f"preemptions   {summary['run']['preemptions']}" in stdout
