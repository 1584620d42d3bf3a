"""The batch job on Ray (frontends/fleet/): the same records as the single-process
job, exactly once across a killed engine actor and a killed driver, and prefix
routing against round-robin. One local Ray instance (2 CPUs) and one fleet of two
tiny engines are shared by the module's tests."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest

from ridgeline.frontends import batch
from ridgeline.frontends import fleet as fleet_lib
from ridgeline.engine.config import EngineConfig
# The batch job tests' shapes: few buckets, quick compiles.
from tests.batch_jobs import CONFIG, ENGINE_FLAGS, MAX_TOKENS, ROOT

SAMPLING = {"temperature": 0, "max_tokens": MAX_TOKENS}


# Routing, without Ray ----------------------------------------------------------------


def _load(requests, kv=0.0, capacity=8, max_batch=4):
  return fleet_lib.EngineLoad(requests, capacity, max_batch, kv)


def test_prefix_blocks_chain_and_units():
  a = fleet_lib.prefix_blocks(list(range(40)), block_tokens=16)
  b = fleet_lib.prefix_blocks(list(range(32)) + [99] * 20, block_tokens=16)
  assert len(a) == 2 and len(b) == 3  # whole blocks only
  assert a[:2] == b[:2] and b[2] not in a
  assert fleet_lib.prefix_blocks([5] * 15) == []
  sys_msg = {"role": "system", "content": "You are terse."}
  c1 = fleet_lib.prefix_blocks([sys_msg, {"role": "user", "content": "hi"}])
  c2 = fleet_lib.prefix_blocks([sys_msg, {"role": "user", "content": "bye"}])
  assert c1[0] == c2[0] and c1[1] != c2[1]
  t = fleet_lib.prefix_blocks("x" * 130, block_chars=64)
  assert len(t) == 2 and t == fleet_lib.prefix_blocks("x" * 128 + "yz", block_chars=64)


def test_affinity_keeps_a_prefix_on_its_engine_until_that_engine_is_crowded():
  router = fleet_lib.PrefixAffinity(tolerance=0.5)  # half a batch (max_batch 4: 2 requests)
  p = fleet_lib.prefix_blocks(list(range(48)))
  q = fleet_lib.prefix_blocks(list(range(100, 148)))
  assert router.choose(p, [_load(0), _load(0)]) == 0  # no prefix yet: least loaded, lowest index
  assert router.choose(q, [_load(1), _load(0)]) == 1  # no prefix yet: least loaded
  assert router.choose(p, [_load(3), _load(1)]) == 0  # affinity: half a batch apart is not crowded
  assert router.choose(q, [_load(3), _load(2)]) == 1  # affinity while not the most loaded
  assert router.choose(p, [_load(6), _load(5)]) == 0  # queued past the batch, still close
  # Engine 0 is the most loaded by more than the tolerance: p spills to engine 1 ...
  assert router.choose(p, [_load(4), _load(1)]) == 1
  # ... its prefix stays with engine 0, whose cache holds it.
  assert router.choose(p, [_load(1), _load(1)]) == 0
  # KV-cache use counts as load too.
  assert router.choose(p, [_load(1, kv=0.9), _load(1, kv=0.1)]) == 1
  # Full engines are never chosen; all full means wait.
  assert router.choose(p, [_load(8), _load(1)]) == 1
  assert router.choose(p, [_load(8), _load(8)]) is None
  assert router.stats() == {"affinity": 4, "spilled": 3, "no_prefix": 2}


def test_round_robin_skips_full_engines():
  rr = fleet_lib.RoundRobin()
  loads = [_load(0), _load(0), _load(0)]
  assert [rr.choose([], loads) for _ in range(4)] == [0, 1, 2, 0]
  assert rr.choose([], [_load(0), _load(8), _load(0)]) == 2
  assert rr.choose([], [_load(8)] * 3) is None


# On Ray ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
  ray = pytest.importorskip("ray")
  t0 = time.perf_counter()
  fleet_lib.init_ray(num_cpus=2, log_to_driver=False)
  print(f"ray.init: {time.perf_counter() - t0:.1f} s")
  yield ray
  ray.shutdown()


def _worker_env():
  env = fleet_lib.code_runtime_env()
  # One plain CPU device per engine (conftest's 8 fake devices are for the mesh tests).
  env["env_vars"].update(JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return env


@pytest.fixture(scope="module")
def fleet(ray_cluster, compile_cache):
  t0 = time.perf_counter()
  f = fleet_lib.Fleet(fleet_lib.EngineSpec(preset="tiny", config=CONFIG,
                                           compilation_cache_dir=compile_cache),
                      num_workers=2, num_cpus=0.5, runtime_env=_worker_env())
  print(f"2 engine actors: {time.perf_counter() - t0:.1f} s")
  yield f
  f.shutdown()


def _write_lines(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


def _key(r):
  """What must not change between runs (timings may), in either record format."""
  v = batch.record_view(r)
  choices = ((r.get("response") or {}).get("body") or {}).get("choices")
  return (v.get("id"), r["line"], v.get("finish_reason"), r.get("token_ids"), r.get("text"),
          r.get("error"), json.dumps(choices, sort_keys=True))


@pytest.fixture(scope="module")
def job_input(tmp_path_factory):
  """32 token prompts with the odd cases: an id from the line number, an OpenAI body
  line, an OpenAI Batch API line (OpenAI output), per-line sampling, a bad line, a
  duplicate id and a blank line."""
  rng = random.Random(3)
  rows = [{"id": f"p{i}", "prompt": [rng.randrange(1, 512) for _ in range(rng.randrange(1, 30))]}
          for i in range(32)]
  rows[3] = {"prompt": rows[3]["prompt"]}
  rows[6] = {"custom_id": "oa-6", "body": {"prompt": rows[6]["prompt"], "max_tokens": 5}}
  rows[7] = {"custom_id": "oa-7", "method": "POST", "url": "/v1/completions",
             "body": {"prompt": rows[7]["prompt"], "max_tokens": 4}}  # OpenAI batch format
  rows[9]["sampling"] = {"max_tokens": 3}
  rows[12] = {"id": "bad", "prompt": [1, 2], "sampling": {"temperature": -1}}
  rows[20]["id"] = "p2"  # a duplicate id: an error record, as in batch.py
  path = tmp_path_factory.mktemp("in") / "in.jsonl"
  _write_lines(path, rows[:16] + [""] + rows[16:])
  return path


@pytest.fixture(scope="module")
def reference(job_input, tmp_path_factory):
  """The single-process job (frontends/batch/) on the same weights and input."""
  from flax import nnx
  from ridgeline.configs import models
  from ridgeline.engine.engine import Engine
  from ridgeline.model import transformer as transformer_lib
  engine = Engine(transformer_lib.Transformer(models.get("tiny"), rngs=nnx.Rngs(0)), None, CONFIG)
  out = tmp_path_factory.mktemp("ref") / "out.jsonl"
  batch.run_batch(engine, batch.BatchJob(str(job_input), str(out), SAMPLING, progress=False))
  return [_key(r) for r in batch.read_records(str(out))]


def _fleet_job(inp, out, **kw):
  return fleet_lib.FleetJob(str(inp), str(out), SAMPLING, progress=False, **kw)


def test_fleet_job_equals_the_single_process_job(fleet, job_input, reference, tmp_path):
  out = tmp_path / "out.jsonl"
  summary = fleet_lib.run_job(fleet, _fleet_job(job_input, out, block_size=8))
  records = batch.read_records(str(out))
  assert [_key(r) for r in records] == reference
  views = [batch.record_view(r) for r in records]
  assert sum(v["finish_reason"] == "error" for v in views) == 2  # bad line, duplicate id
  assert records[7]["custom_id"] == "oa-7" and records[7]["response"]["status_code"] == 200
  assert summary["requests"] == 32 and summary["run"]["committed_blocks"] == 4
  assert all(n > 0 for n in summary["run"]["requests_per_worker"])  # both engines worked
  assert json.loads(pathlib.Path(batch.summary_path(str(out))).read_text())["complete"]

  # A rerun finds every block committed: nothing runs, the output is the same.
  again = fleet_lib.run_job(fleet, _fleet_job(job_input, out, block_size=8))
  assert again["run"]["requests"] == 0 and again["run"]["skipped"] == 32
  assert [_key(r) for r in batch.read_records(str(out))] == reference
  with pytest.raises(ValueError, match="block_size=8"):
    fleet_lib.run_job(fleet, _fleet_job(job_input, out, block_size=4))


def test_parquet_input_through_ray_data(fleet, job_input, reference, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = [json.loads(line) for line in pathlib.Path(job_input).read_text().splitlines()
          if line.strip()]
  plain = [r for r in rows if "prompt" in r and "sampling" not in r][:6]
  pq.write_table(pa.Table.from_pylist(plain), tmp_path / "in.parquet")
  out = tmp_path / "out.jsonl"
  fleet_lib.run_job(fleet, _fleet_job(tmp_path / "in.parquet", out, block_size=4))
  got = {r["id"]: r["token_ids"] for r in batch.read_records(str(out))}
  want = {k[0]: k[3] for k in reference}
  assert got and got == {rid: want[rid] for rid in got}


def test_killed_engine_actor_is_replaced_and_nothing_is_lost_or_doubled(
    fleet, job_input, reference, tmp_path):
  pids = [s["pid"] for s in fleet.loads()]
  kills = []

  def kill_once(progress):
    # After the first answers, while engine 0 still holds requests.
    if not kills and progress["requests"] >= 4:
      os.kill(pids[0], signal.SIGKILL)
      kills.append(time.perf_counter())

  out = tmp_path / "out.jsonl"
  t0 = time.perf_counter()
  summary = fleet_lib.run_job(fleet, _fleet_job(job_input, out, block_size=4),
                              on_progress=kill_once)
  wall = time.perf_counter() - t0
  records = batch.read_records(str(out))
  lines = [r["line"] for r in records]
  expected_lines = [k[1] for k in reference]
  duplicates = len(lines) - len(set(lines))
  lost = len(set(expected_lines) - set(lines))
  print(f"fault test: kills {len(kills)}, completed {len(records)}, duplicates {duplicates}, "
        f"lost {lost}, restarts {summary['run']['worker_restarts']}, wall {wall:.1f} s")
  assert len(kills) == 1 and summary["run"]["worker_restarts"] >= 1
  assert duplicates == 0 and lost == 0 and lines == expected_lines
  assert [_key(r) for r in records] == reference
  assert wall < 120
  assert fleet.loads()[0]["pid"] != pids[0]  # the replacement serves on


def test_killed_driver_rerun_completes_the_rest_once(ray_cluster, fleet, job_input, reference,
                                                     compile_cache, tmp_path):
  """The driver (the script) is SIGKILLed once a block is committed, and Ray ends
  the actors it owned; a rerun skips the committed blocks and runs only the rest."""
  out = tmp_path / "out.jsonl"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(ROOT)  # this checkout's package, wherever it is installed
  # It joins this module's Ray instance (--ray_address; the fleet leaves a CPU free).
  address = ray_cluster.get_runtime_context().gcs_address
  cmd = [sys.executable, str(ROOT / "scripts" / "batch_generate.py"), "--ray",
         "--ray_address", address, "--ray_workers", "1", "--ray_worker_cpus", "0.5",
         *ENGINE_FLAGS,
         "--compilation_cache_dir", compile_cache, "--noprogress", "--block_size", "4",
         "--max_tokens", str(MAX_TOKENS), "--input", str(job_input), "--output", str(out)]
  log = open(tmp_path / "driver.log", "w")  # a file, not a pipe nobody drains
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  blocks = pathlib.Path(fleet_lib.block_dir(str(out)))
  deadline = time.time() + 120
  try:
    while time.time() < deadline and proc.poll() is None:
      if len(list(blocks.glob("lines-*.jsonl"))) >= 1:
        break
      time.sleep(0.05)
    assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
    assert list(blocks.glob("lines-*.jsonl")), "no block committed within 120 s"
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    if proc.poll() is None:
      os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    log.close()
  committed_before = len(list(blocks.glob("lines-*.jsonl")))
  assert committed_before < 8 and not out.exists()

  summary = fleet_lib.run_job(fleet, _fleet_job(job_input, out, block_size=4))
  records = batch.read_records(str(out))
  lines = [r["line"] for r in records]
  print(f"driver kill: {committed_before} of 8 blocks committed before the kill; rerun skipped "
        f"{summary['run']['skipped']} lines, ran {summary['run']['requests']}; output "
        f"{len(lines)} lines, {len(lines) - len(set(lines))} duplicates")
  assert summary["run"]["skipped_blocks"] == committed_before
  assert summary["run"]["skipped"] + summary["run"]["requests"] == 32
  assert len(lines) == len(set(lines)) == 32
  assert [_key(r) for r in records] == reference


def test_prefix_affinity_beats_round_robin_on_shared_prefixes(fleet, tmp_path):
  """5 groups of 6 requests; a group shares a 32-token prefix (2 KV pages), then
  4-8 tokens of its own; lines interleave the groups (an odd number of them, so
  round-robin splits every group over both engines). Each engine prefills a
  prefix once and hits it after, so the fleet's hit rate is higher when a group
  stays on one engine. Balance: no engine gets more than its share plus one
  group (6 requests), the stated slack."""
  rng = random.Random(7)
  groups, per_group = 5, 6
  prefixes = [[rng.randrange(1, 512) for _ in range(32)] for _ in range(groups)]
  rows = [{"id": f"g{g}-{k}", "prompt": prefixes[g] + [rng.randrange(1, 512)
                                                        for _ in range(rng.randrange(4, 9))]}
          for k in range(per_group) for g in range(groups)]
  _write_lines(tmp_path / "in.jsonl", rows)
  results = {}
  for router in (fleet_lib.PrefixAffinity(), fleet_lib.RoundRobin()):
    fleet.reset()  # empty prefix caches, for both alike
    out = tmp_path / f"{router.name}.jsonl"
    s = fleet_lib.run_job(fleet, fleet_lib.FleetJob(
        str(tmp_path / "in.jsonl"), str(out), {"temperature": 0, "max_tokens": 2},
        progress=False, block_size=12), router=router)
    results[router.name] = s
    assert len(batch.read_records(str(out))) == groups * per_group
  aff = results["prefix_affinity"]
  rr = results["round_robin"]
  hit_aff = aff["engine"]["prefix_cache"]["hit_rate"]
  hit_rr = rr["engine"]["prefix_cache"]["hit_rate"]
  print(f"prefix-cache hit rate: affinity {hit_aff:.1%} "
        f"(per engine {aff['run']['requests_per_worker']}, {aff['run']['router']}), "
        f"round-robin {hit_rr:.1%} (per engine {rr['run']['requests_per_worker']})")
  assert hit_aff > hit_rr
  share = groups * per_group / len(fleet)
  assert max(aff["run"]["requests_per_worker"]) <= share + per_group


# Ray Serve ------------------------------------------------------------------------------


def test_serve_fleet_answers_the_openai_client_and_429s_when_every_replica_is_full(
    ray_cluster, fleet, compile_cache):
  """Two replicas of the server behind the ingress on 127.0.0.1: the openai client's
  greedy completions equal Engine.generate on the same weights; with each replica
  holding its one allowed request, the next gets 429 with Retry-After."""
  import socket
  import threading
  import httpx
  import openai
  from flax import nnx
  from ray import serve
  from ridgeline.configs import models
  from ridgeline.engine.engine import Engine, SamplingParams
  from ridgeline.model import default_model
  from ridgeline.model import transformer as transformer_lib
  from ridgeline.model.tokenizer import Tokenizer

  config = EngineConfig(page_size=16, num_pages=64, max_model_len=128, max_batch=4,
                        prefill_chunk=64, max_prefill_batch=2)
  gguf = str(default_model.gguf_path())
  spec = fleet_lib.EngineSpec(preset="tiny", config=config, tokenizer_gguf=gguf,
                              compilation_cache_dir=compile_cache)
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  port = sock.getsockname()[1]
  sock.close()
  t0 = time.perf_counter()
  fleet_lib.serve_fleet(spec, 2, host="127.0.0.1", port=port, model_name="tiny",
                        max_pending=1, num_cpus=0.25, runtime_env=_worker_env())
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 180
    while True:
      try:
        if httpx.get(url + "/health", timeout=5).status_code == 200:
          break
      except httpx.TransportError:
        pass
      assert time.monotonic() < deadline, "the Serve fleet did not become ready"
      time.sleep(0.2)
    print(f"Serve fleet (2 replicas + ingress) ready in {time.perf_counter() - t0:.1f} s")

    tokenizer = Tokenizer.from_gguf(gguf)
    model = transformer_lib.Transformer(
        models.get("tiny").replace(vocab_size=tokenizer.vocab_size), rngs=nnx.Rngs(0))
    reference = Engine(model, tokenizer, config)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    prompts = ["The capital of France is", "Once upon a time", "1, 2, 3,"]
    expected = reference.generate(prompts, SamplingParams(temperature=0, max_tokens=8))
    for prompt, exp in zip(prompts, expected):
      got = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
      assert got.choices[0].text == exp.text and got.usage.completion_tokens == 8
    messages = [{"role": "user", "content": "Hi there"}]
    exp = reference.generate([messages], SamplingParams(temperature=0, max_tokens=8))[0]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                          temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == exp.text

    # Fill both replicas (bound 1 each) with long streams, then one more request.
    holds, started = [], threading.Event()

    def hold(k):
      with httpx.stream("POST", url + "/v1/completions", timeout=120, json={
          "model": "tiny", "prompt": f"story {k}", "max_tokens": 100, "temperature": 0,
          "stream": True}) as r:
        holds.append(r.status_code)
        for _ in r.iter_lines():
          started.set()

    threads = [threading.Thread(target=hold, args=(k,)) for k in range(2)]
    for t in threads:
      t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
      view = httpx.get(url + "/fleet").json()
      if [r["in_flight"] for r in view["replicas"]] == [1, 1]:
        break
      time.sleep(0.02)
    assert [r["in_flight"] for r in view["replicas"]] == [1, 1], view
    r = httpx.post(url + "/v1/completions", timeout=30, json={
        "model": "tiny", "prompt": "one more", "max_tokens": 4})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    for t in threads:
      t.join(120)
    assert holds == [200, 200]
    fleet_metrics = httpx.get(url + "/metrics").text
    assert "ridgeline_fleet_rejected_total 1.0" in fleet_metrics
    assert "ridgeline_decode_batch_size" in httpx.get(url + "/replicas/1/metrics").text
  finally:
    serve.shutdown()


def test_engine_spec_passes_quantize_to_the_model():
  spec = fleet_lib.EngineSpec(preset="tiny", quantize="int8", config=EngineConfig(
      page_size=8, num_pages=16, max_model_len=32, max_batch=2, prefill_chunk=16))
  engine = spec.build()
  assert engine.model_config.quantization == "int8"
