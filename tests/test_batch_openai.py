"""The batch job on OpenAI Batch API files: OpenAI batch output lines (parsed with the
`openai` package's own response types), error lines, exactly-once resume after
SIGKILL, and sharding + merging."""

import json
import random
import signal
import time

import openai.types
import openai.types.chat
import pytest

from ridgeline.frontends import batch
from ridgeline.engine.engine import Engine, EngineConfig, SamplingParams
from tests.batch_jobs import (CONFIG as TINY_JOB, GREEDY, MAX_TOKENS, complete_lines,
                              run_script, token_prompts, write_lines)

CONFIG = EngineConfig(page_size=16, num_pages=64, max_model_len=128, max_batch=8,
                      prefill_chunk=64, max_prefill_batch=4)
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def _line(custom_id, url, body, method="POST"):
  return {"custom_id": custom_id, "method": method, "url": url, "body": body}


def _check_envelope(r):
  """OpenAI's documented batch output line."""
  assert set(r) >= {"id", "custom_id", "response", "error"}
  assert isinstance(r["id"], str) and r["id"].startswith("batch_req_")
  if r["error"] is None:
    resp = r["response"]
    assert resp["status_code"] == 200 and isinstance(resp["request_id"], str)
    body = resp["body"]
    parsed = (openai.types.chat.ChatCompletion if body["object"] == "chat.completion"
              else openai.types.Completion).model_validate(body)
    assert parsed.usage.total_tokens == parsed.usage.prompt_tokens + parsed.usage.completion_tokens
    return parsed
  assert r["response"] is None
  assert set(r["error"]) == {"code", "message"}
  assert isinstance(r["error"]["code"], str) and isinstance(r["error"]["message"], str)
  return None


@pytest.fixture(scope="module")
def text_engine(text_model, default_tokenizer):
  return Engine(text_model, default_tokenizer, CONFIG)


@pytest.fixture(scope="module")
def tiny_engine(tiny_model):
  return Engine(tiny_model, None, TINY_JOB)  # `--model tiny`'s weights and the job's shapes


def test_openai_batch_file_gives_openai_output_lines(text_engine, tmp_path):
  chat = [{"role": "user", "content": "Name a color."}]
  rows = [
      _line("chat-1", CHAT, {"model": "m", "messages": chat, "max_completion_tokens": 6,
                             "temperature": 0, "logprobs": True, "top_logprobs": 2}),
      _line("text-1", COMPLETIONS, {"model": "m", "prompt": "Once upon", "max_tokens": 5,
                                    "temperature": 0}),
      _line("ids-n2", COMPLETIONS, {"prompt": [5, 6, 7], "max_tokens": 4, "n": 2,
                                    "temperature": 1.0, "seed": 3}),
      _line("bad-url", "/v1/embeddings", {"input": "x"}),
      _line("bad-method", CHAT, {"messages": chat}, method="GET"),
      _line("bad-temp", CHAT, {"messages": chat, "temperature": -1}),
      _line("too-long", COMPLETIONS, {"prompt": "word " * 200}),
      '{"custom_id": "torn", "url": "/v1/completions", "body": ',
      _line("chat-1", CHAT, {"messages": chat}),  # duplicate custom_id
      {"id": "own", "prompt": [1, 2, 3]},  # Ridgeline's own line keeps its format
  ]
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  write_lines(inp, rows)
  job = batch.BatchJob(str(inp), str(out), default_sampling={"max_tokens": 8},
                       progress=False)
  summary = batch.run_batch(text_engine, job)
  records = batch.read_records(str(out))
  assert [r["line"] for r in records] == list(range(1, 11))
  assert summary["requests"] == 10 and summary["errors"] == 6

  openai_records = [r for r in records if "custom_id" in r]
  assert len(openai_records) == 9
  parsed = {r["custom_id"]: _check_envelope(r) for r in openai_records if r["custom_id"]}
  errors = {r["line"]: r["error"] for r in openai_records if r["error"]}
  assert sorted(errors) == [4, 5, 6, 7, 8, 9]
  assert errors[4]["code"] == "invalid_url" and "/v1/embeddings" in errors[4]["message"]
  assert errors[5]["code"] == "invalid_method" and "GET" in errors[5]["message"]
  assert "temperature" in errors[6]["message"]
  assert errors[7]["code"] == "context_length_exceeded" and "max_model_len" in errors[7]["message"]
  assert errors[8]["code"] == "invalid_json_line"
  assert errors[9]["code"] == "duplicate_custom_id" and "chat-1" in errors[9]["message"]
  assert records[9]["id"] == "own" and "token_ids" in records[9]  # Ridgeline's format

  # The bodies hold what Engine.generate gives for the same requests.
  exp_chat, exp_text = text_engine.generate(
      [chat, "Once upon"], [SamplingParams(temperature=0, max_tokens=6, logprobs=2),
                            SamplingParams(temperature=0, max_tokens=5)])
  exp_n2 = text_engine.generate([[5, 6, 7]], SamplingParams(n=2, temperature=1.0, seed=3,
                                                            max_tokens=4))[0]
  c = parsed["chat-1"]
  assert c.object == "chat.completion" and c.choices[0].message.content == exp_chat.text
  assert c.usage.prompt_tokens == len(exp_chat.prompt_token_ids)
  assert c.usage.completion_tokens == len(exp_chat.token_ids)
  assert [e.logprob for e in c.choices[0].logprobs.content] == pytest.approx(
      [lp[t] for t, lp in zip(exp_chat.token_ids, exp_chat.outputs[0].logprobs)], abs=1e-6)
  t = parsed["text-1"]
  assert t.object == "text_completion" and t.choices[0].text == exp_text.text
  assert t.choices[0].finish_reason == exp_text.finish_reason
  n2 = parsed["ids-n2"]
  assert {ch.index: ch.text for ch in n2.choices} == {o.index: o.text for o in exp_n2.outputs}
  assert n2.usage.completion_tokens == sum(len(o.token_ids) for o in exp_n2.outputs)

  # Rerun: nothing to do, the same lines.
  again = batch.run_batch(text_engine, job)
  assert again["run"]["skipped"] == 10
  assert [(r["line"], r.get("custom_id"), r.get("error")) for r in
          batch.read_records(str(out))] == [(r["line"], r.get("custom_id"), r.get("error"))
                                            for r in records]

  # Two shards, merged: the single-process result, each custom_id once.
  for i in range(2):
    batch.run_batch(text_engine, batch.BatchJob(
        str(inp), str(tmp_path / "sharded.jsonl"), default_sampling={"max_tokens": 8},
        process_index=i, process_count=2, progress=False))
  merged = batch.read_records(str(tmp_path / "sharded.jsonl"))
  assert [r["line"] for r in merged] == list(range(1, 11))

  def key(r):
    body = (r.get("response") or {}).get("body") or {}
    return (r["line"], r.get("custom_id"), r.get("id"), r.get("error"),
            [ch.get("text", ch.get("message")) for ch in body.get("choices", [])])
  assert [key(r) for r in merged] == [key(r) for r in records]


def test_openai_batch_sigkill_and_resume_is_exactly_once(tiny_engine, compile_cache, tmp_path):
  prompts = token_prompts(48, seed=7, lo=4, hi=15)
  rows = [_line(f"r{i}", COMPLETIONS, {"model": "tiny", "prompt": p}) for i, p in
          enumerate(prompts)]
  rows[10] = _line("r10", "/v1/moderations", {"input": "x"})
  rows[20] = _line("r20", CHAT, {"messages": [{"role": "user", "content": "no tokenizer"}]})
  rows[30] = '{"custom_id": "r30", "url": "/v1/completions", "body": {"prompt": '
  inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
  write_lines(inp, rows)
  args = ["--input", str(inp), "--output", str(out), "--max_tokens", str(MAX_TOKENS),
          "--max_in_flight", "4"]
  rng = random.Random(1)
  killed_runs = 0
  for k in range(2):
    before = complete_lines(out)
    proc = run_script(args, compile_cache)
    target = before + rng.randint(5, 20)
    deadline = time.monotonic() + 60
    while proc.poll() is None and complete_lines(out) < target and time.monotonic() < deadline:
      time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.02))
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      killed_runs += 1
    proc.communicate()
    seen = [json.loads(raw)["custom_id"] for raw in out.read_bytes().split(b"\n")[:-1]]
    assert len(seen) == len(set(seen))
  proc = run_script(args, compile_cache)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 3, stderr  # three error lines
  records = batch.read_records(str(out))
  assert len(records) == 48 and out.read_bytes().count(b"\n") == 48
  assert [r["custom_id"] for r in records] == [None if i == 30 else f"r{i}" for i in range(48)]
  for r in records:
    _check_envelope(r)
  assert {r["line"] - 1 for r in records if r["error"]} == {10, 20, 30}
  expected = tiny_engine.generate(prompts, GREEDY)
  got = {r["custom_id"]: r for r in records}
  for i, exp in enumerate(expected):
    if i not in (10, 20, 30):
      body = got[f"r{i}"]["response"]["body"]
      assert body["usage"]["completion_tokens"] == len(exp.token_ids), i
      assert body["choices"][0]["finish_reason"] == exp.finish_reason
  assert killed_runs >= 1


def test_show_prints_openai_batch_records(tmp_path, capsys):
  from ridgeline.cli.batch_generate import _show
  record = {"id": "batch_req_1", "custom_id": "req-1", "line": 1, "error": None,
            "response": {"status_code": 200, "request_id": "r", "body": {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3}}}}
  path = tmp_path / "out.jsonl"
  path.write_text(json.dumps(record) + "\n")
  _show(str(path), 5)
  out = capsys.readouterr().out
  assert "### req-1 (line 1)" in out and "Paris." in out and "[3 tokens, stop" in out
