"""The batch job (frontends/batch/, scripts/batch_generate.py): JSONL in and out,
error lines, exactly-once resume after SIGKILL, and sharding over two processes."""

import json
import pathlib
import random
import signal
import time

import pytest

from ridgeline.frontends import batch
from ridgeline.engine.engine import Engine, EngineConfig, SamplingParams
from tests.batch_jobs import (CONFIG, GREEDY, MAX_TOKENS, complete_lines, run_script,
                              token_prompts, write_lines)


@pytest.fixture(scope="module")
def engine(tiny_model):
  return Engine(tiny_model, None, CONFIG)  # `--model tiny`'s weights (seed 0)


def _job(inp, out, **kw):
  kw.setdefault("default_sampling", {"temperature": 0, "max_tokens": MAX_TOKENS})
  return batch.BatchJob(str(inp), str(out), progress=False, **kw)


def _by_id(records):
  return {r["id"]: r for r in records}


def _key(r):
  """What must not change between runs (timings may)."""
  return (r["id"], r["line"], r["finish_reason"], r.get("token_ids"), r.get("text"),
          r.get("error"), [c.get("token_ids") for c in r.get("choices", [])])


# In process -----------------------------------------------------------------------


def test_end_to_end_tiny_equals_engine_generate(engine, tmp_path):
  prompts = token_prompts(24, seed=1)
  rows = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(prompts)]
  rows[5] = {"prompt": prompts[5]}  # id from the line number
  rows[7]["sampling"] = {"max_tokens": 3}
  rows[9] = {"custom_id": "oa-9", "body": {"prompt": prompts[9], "max_tokens": 5}}
  rows[11]["sampling"] = {"logprobs": 2}
  rows[13]["sampling"] = {"n": 2, "temperature": 1.0, "seed": 5}
  write_lines(tmp_path / "in.jsonl", rows[:12] + [""] + rows[12:])  # a blank line
  out = tmp_path / "out.jsonl"

  summary = batch.run_batch(engine, _job(tmp_path / "in.jsonl", out))

  records = batch.read_records(str(out))
  assert [r["line"] for r in records] == sorted(r["line"] for r in records)  # input order
  assert len(records) == 24 and summary["requests"] == 24 and summary["errors"] == 0
  params = [GREEDY] * 24
  params[7] = SamplingParams(temperature=0, max_tokens=3)
  params[9] = SamplingParams(temperature=0, max_tokens=5)
  params[11] = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=2)
  params[13] = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=MAX_TOKENS)
  expected = engine.generate(prompts, params)
  ids = [f"p{i}" for i in range(24)]
  ids[5], ids[9] = "line-6", "oa-9"
  got = _by_id(records)
  for rid, exp, p in zip(ids, expected, prompts):
    r = got[rid]
    assert r["token_ids"] == exp.token_ids, rid
    assert r["finish_reason"] == exp.finish_reason
    assert r["prompt_tokens"] == len(p)
    assert r["completion_tokens"] == sum(len(c.token_ids) for c in exp.outputs)
    assert r["metrics"]["ttft_s"] > 0 and r["metrics"]["e2e_s"] >= r["metrics"]["ttft_s"]
  assert [c["token_ids"] for c in got["p13"]["choices"]] == [
      c.token_ids for c in expected[13].outputs]
  lps = got["p11"]["logprobs"]
  assert [e["token_id"] for e in lps] == expected[11].token_ids
  assert all(len(e["top"]) == 2 and e["logprob"] <= 0 for e in lps)

  on_disk = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
  assert on_disk["output_tokens"] == sum(r["completion_tokens"] for r in records)
  assert on_disk["run"]["output_tokens_per_s"] > 0
  assert set(on_disk["ttft_s"]) >= {"p50", "p90", "p99"}
  assert on_disk["run"]["decode_batch_max"] <= CONFIG.max_batch
  assert "preemptions" in on_disk["run"]
  text = batch.format_summary(on_disk)
  assert "output tokens/s" in text and "TTFT" in text and "KV cache" in text

  # Rerun: nothing left to do, nothing written twice.
  again = batch.run_batch(engine, _job(tmp_path / "in.jsonl", out))
  assert again["run"]["skipped"] == 24 and again["run"].get("rerun_noop")
  assert [_key(r) for r in batch.read_records(str(out))] == [_key(r) for r in records]


def test_bad_lines_become_error_lines_and_the_rest_runs(engine, tmp_path):
  good = token_prompts(6, seed=2)
  rows = [
      {"id": "g0", "prompt": good[0]},
      '{"id": "broken", "prompt": [1, 2',                            # 2 malformed JSON
      '[1, 2, 3]',                                                   # 3 not an object
      {"id": "empty", "prompt": []},                                 # 4
      {"id": "empty-text", "prompt": ""},                            # 5
      {"id": "no-prompt", "sampling": {"max_tokens": 3}},            # 6
      {"id": "g1", "prompt": good[1]},
      {"id": "bad-temp", "prompt": good[2], "sampling": {"temperature": -1}},  # 8
      {"id": "bad-key", "prompt": good[2], "sampling": {"temprature": 0.5}},   # 9
      {"id": "bad-top-p", "prompt": good[2], "sampling": {"top_p": 2.0}},      # 10
      {"id": "bad-sampling", "prompt": good[2], "sampling": 3},                # 11
      {"id": "too-long", "prompt": [5] * 80},                        # 12
      {"id": "bad-token", "prompt": [1, 99999]},                     # 13
      {"id": "text", "prompt": "no tokenizer for text"},             # 14
      {"id": "g1", "prompt": good[3]},                               # 15 duplicate id
      {"id": "empty-chat", "messages": []},                          # 16
      {"id": "g2", "prompt": good[4]},
      {"id": "g3", "prompt": good[5], "sampling": {"max_tokens": 4}},
  ]
  write_lines(tmp_path / "in.jsonl", rows)
  out = tmp_path / "out.jsonl"
  summary = batch.run_batch(engine, _job(tmp_path / "in.jsonl", out))

  records = batch.read_records(str(out))
  assert len(records) == len(rows) and [r["line"] for r in records] == list(range(1, 19))
  errors = {r["line"]: r["error"] for r in records if r["finish_reason"] == "error"}
  assert sorted(errors) == [2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16]
  assert summary["errors"] == 14 and summary["ok"] == 4
  for line, msg in errors.items():
    assert msg.startswith(f"line {line}: "), msg
  assert "not JSON" in errors[2] and "JSON object" in errors[3]
  assert "each line must be a JSON object such as {\"prompt\": \"text\"}" in errors[2]
  assert "empty prompt" in errors[4] and "empty prompt" in errors[5]
  assert "no prompt" in errors[6]
  assert "temperature" in errors[8] and "temprature" in errors[9] and "top_p" in errors[10]
  assert "'sampling' must be an object" in errors[11]
  assert "max_model_len" in errors[12] and "out of range" in errors[13]
  assert "tokenizer" in errors[14] and "duplicate id 'g1'" in errors[15]
  assert "messages" in errors[16]
  assert sum(r["id"] == "g1" for r in records) == 1  # ids stay unique

  expected = engine.generate([good[0], good[1], good[4], good[5]],
                             [GREEDY, GREEDY, GREEDY,
                              SamplingParams(temperature=0, max_tokens=4)])
  got = _by_id(records)
  assert [got[i]["token_ids"] for i in ("g0", "g1", "g2", "g3")] == [
      o.token_ids for o in expected]


def test_torn_tail_is_truncated_and_resumed(engine, tmp_path):
  rows = [{"id": f"t{i}", "prompt": p} for i, p in enumerate(token_prompts(10, seed=3))]
  write_lines(tmp_path / "in.jsonl", rows)
  out = tmp_path / "out.jsonl"
  batch.run_batch(engine, _job(tmp_path / "in.jsonl", out))
  full = out.read_bytes()
  reference = [_key(r) for r in batch.read_records(str(out))]
  # A kill mid-write leaves a partial last line; garbage after a crash is cut too.
  cut = full.index(b"\n", len(full) // 2) + 1 + 17
  out.write_bytes(full[:cut])
  with pytest.raises(json.JSONDecodeError):
    json.loads(out.read_bytes().splitlines()[-1])
  summary = batch.run_batch(engine, _job(tmp_path / "in.jsonl", out))
  assert summary["run"]["truncated_bytes"] == 17 and 0 < summary["run"]["skipped"] < 10
  assert [_key(r) for r in batch.read_records(str(out))] == reference

  # A second writer on the same output is refused while the first holds it.
  writer = batch.ResultWriter(str(out))
  with pytest.raises(RuntimeError, match="another job"):
    batch.ResultWriter(str(out))
  writer.close()


def test_parse_openai_and_sampling_overrides():
  line = json.dumps({"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
                     "body": {"model": "x", "messages": [{"role": "user", "content": "Hi"}],
                              "max_completion_tokens": 7, "temperature": 0.5,
                              "logprobs": True, "top_logprobs": 3, "seed": 11}})
  item = batch.parse_line(4, line.encode(), {"max_tokens": 100, "top_p": 0.9})
  assert item.error is None and item.id == "req-1"
  assert item.prompt == [{"role": "user", "content": "Hi"}]
  p = item.params
  assert (p.max_tokens, p.temperature, p.logprobs, p.seed, p.top_p) == (7, 0.5, 3, 11, 0.9)
  # Without a seed, a line's seed follows from the job seed and its id only.
  a = batch.parse_line(1, b'{"id": "x", "prompt": [1]}', {}, seed=3).params.seed
  b = batch.parse_line(9, b'{"id": "x", "prompt": [1]}', {}, seed=3).params.seed
  c = batch.parse_line(1, b'{"id": "x", "prompt": [1]}', {}, seed=4).params.seed
  assert a == b != c
  bad = batch.parse_line(2, b'{"body": {"messages": [{"role": "user", "content": "x"}], '
                            b'"tools": []}}')
  assert bad.id == "line-2" and "tools" in bad.error


def test_default_model_subset_equals_engine_generate(default_checkpoint, tmp_path):
  from ridgeline.engine.loading import load_model
  model, tokenizer = load_model(default_checkpoint)
  # One prefill step and equal-length completions: few shapes to compile.
  engine = Engine(model, tokenizer, EngineConfig(
      page_size=16, num_pages=48, max_model_len=256, max_batch=4, prefill_chunk=256,
      max_prefill_batch=4))
  prompts = [[{"role": "user", "content": "What is the capital of France?"}],
             "The three primary colors are",
             [{"role": "system", "content": "Answer in one word."},
              {"role": "user", "content": "What color is the sky?"}]]
  rows = [{"id": "chat", "messages": prompts[0]}, {"id": "text", "prompt": prompts[1]},
          {"custom_id": "oa", "body": {"messages": prompts[2], "max_tokens": 8}}]
  write_lines(tmp_path / "in.jsonl", rows)
  out = tmp_path / "out.jsonl"
  sampling = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
  summary = batch.run_batch(engine, _job(tmp_path / "in.jsonl", out, default_sampling=sampling))
  assert summary["errors"] == 0
  got = _by_id(batch.read_records(str(out)))
  expected = engine.generate(prompts, SamplingParams(**sampling))
  for rid, exp in zip(("chat", "text", "oa"), expected):
    assert got[rid]["token_ids"] == exp.token_ids and got[rid]["text"] == exp.text
  assert "Paris" in got["chat"]["text"]


# Subprocesses -----------------------------------------------------------------------


def test_sigkill_and_resume_is_exactly_once(engine, compile_cache, tmp_path):
  prompts = token_prompts(120, seed=4, lo=4, hi=15)  # short: few shapes to compile
  rows = [{"id": f"k{i}", "prompt": p} for i, p in enumerate(prompts)]
  rows[40] = '{"id": "k40", "prompt": '  # error lines are written exactly once too
  rows[90] = {"id": "k90", "prompt": [1, 2], "sampling": {"top_k": -5}}
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  write_lines(inp, rows)
  args = ["--input", str(inp), "--output", str(out), "--max_tokens", str(MAX_TOKENS),
          "--max_in_flight", "4"]
  rng = random.Random(0)
  counts = []
  for k in range(4):
    before = complete_lines(out)
    proc = run_script(args, compile_cache)
    if k == 0:  # at a random instant, maybe before any output
      time.sleep(rng.uniform(0.5, 4.0))
    else:  # at a random point of this run's output (lines land a step's worth at a time)
      target = before + rng.randint(5, 25)
      deadline = time.monotonic() + 60
      while (proc.poll() is None and complete_lines(out) < target
             and time.monotonic() < deadline):
        time.sleep(0.005)
      time.sleep(rng.uniform(0.0, 0.02))
    killed = proc.poll() is None
    if killed:
      proc.send_signal(signal.SIGKILL)
    proc.communicate()
    counts.append((complete_lines(out), killed))
    # Whatever a reader sees parses (but an unterminated tail), each line at most once.
    seen = [json.loads(raw)["line"]
            for raw in (out.read_bytes().split(b"\n")[:-1] if out.exists() else [])]
    assert len(seen) == len(set(seen))

  proc = run_script(args, compile_cache)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 2, stderr  # exit status: the number of error lines
  records = batch.read_records(str(out))
  lines = out.read_bytes().split(b"\n")
  assert lines[-1] == b"" and len(lines) - 1 == len(records) == 120
  assert [r["line"] for r in records] == list(range(1, 121))
  ids = [r["id"] for r in records]
  assert ids == [None if i == 40 else f"k{i}" for i in range(120)]  # line 41: no JSON, no id
  errors = {f"k{r['line'] - 1}" for r in records if r["finish_reason"] == "error"}
  assert errors == {"k40", "k90"}
  expected = engine.generate(prompts, GREEDY)
  got = _by_id(records)
  for i, exp in enumerate(expected):
    if f"k{i}" not in errors:
      assert got[f"k{i}"]["token_ids"] == exp.token_ids, i
  print(f"\nkill and resume: (lines on disk, killed) after each run {counts}; final "
        f"{len(records)} lines, {len(set(ids) - {None})} distinct ids + 1 line without one")
  assert sum(c[1] for c in counts) >= 3


def test_two_processes_merge_to_the_single_process_result(engine, compile_cache, tmp_path):
  prompts = token_prompts(40, seed=5, lo=4, hi=15)
  rows = [{"id": f"s{i}", "prompt": p} for i, p in enumerate(prompts)]
  for i in range(0, 40, 5):  # sampled lines: seeded by the job seed and their id
    rows[i]["sampling"] = {"temperature": 0.9, "top_p": 0.9}
  rows[3]["sampling"] = {"temperature": 1.0, "seed": 17, "n": 2}
  rows[7] = {"id": "s2", "prompt": prompts[7]}  # duplicate of line 3's id, other shard
  rows[8] = "not json"
  inp = tmp_path / "in.jsonl"
  write_lines(inp, rows)
  single = batch.run_batch(engine, _job(inp, tmp_path / "single.jsonl", seed=7))

  out = tmp_path / "out.jsonl"
  args = ["--input", str(inp), "--output", str(out), "--max_tokens", str(MAX_TOKENS),
          "--seed", "7", "--process_count", "2"]
  procs = [run_script(args + ["--process_index", str(i)], compile_cache) for i in range(2)]
  results = [p.communicate(timeout=120) for p in procs]
  # Exit status: the merging process reports the merged count, the other its own part's.
  codes = [p.returncode for p in procs]
  assert max(codes) == 2 and set(codes) <= {0, 1, 2}, results
  for i in range(2):
    assert pathlib.Path(batch.part_path(str(out), i, 2)).exists()
  merged = batch.read_records(str(out))
  assert [r["line"] for r in merged] == list(range(1, 41))
  want = batch.read_records(str(tmp_path / "single.jsonl"))
  assert [_key(r) for r in merged] == [_key(r) for r in want]
  assert single["errors"] == 2
  summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
  assert summary["requests"] == 40 and summary["errors"] == 2 and len(summary["parts"]) == 2

  # The documented manual step gives the same file.
  out.unlink()
  merge = run_script(["--merge", "--process_count", "2", "--input", str(inp),
                   "--output", str(out)], compile_cache)
  _, stderr = merge.communicate(timeout=60)
  assert merge.returncode == 2, stderr
  assert [_key(r) for r in batch.read_records(str(out))] == [_key(r) for r in want]
