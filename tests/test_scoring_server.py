"""Scores through the server, on the default model against transformers: `echo`
in legacy and streaming completions, the tokenizer endpoints, the errors, a
text's perplexity, and EleutherAI's lm-evaluation-harness itself
(`local-completions`) on a multiple-choice task and a generation task of ours
(tests/data/lm_eval: local JSON, no hub)."""

import json
import math
import os
import pathlib

import httpx
import numpy as np
import pytest
import torch

from ridgeline.engine.engine import Engine, EngineConfig
from ridgeline.frontends.server import create_app
from ridgeline.engine import loading
from tests.serving import serve_in_thread

NAME = "smollm2"
TASKS = pathlib.Path(__file__).resolve().parent / "data" / "lm_eval"
ALICE = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "alice.txt"
MAX_LEN = 4096


@pytest.fixture(scope="module")
def served(default_checkpoint):
  model, tok = loading.load_model(default_checkpoint)
  # tests/test_prompt_logprobs.py's shapes (the session's compilation cache).
  engine = Engine(model, tok, EngineConfig(page_size=16, num_pages=300, max_model_len=MAX_LEN,
                                           max_batch=8, prefill_chunk=512, max_prefill_batch=8))
  # Compiled as first used: the few shapes these requests need.
  app = create_app(engine, model_name=NAME, warmup=False)
  with serve_in_thread(app, timeout_s=300) as url:
    yield type("Served", (), dict(url=url, engine=engine, tok=tok))


def _post(served, path, body):
  return httpx.post(served.url + path, json=body, timeout=300)


def _target_logprobs(hf_logprobs, ids):
  lp = hf_logprobs(ids)
  return lp[np.arange(len(ids) - 1), ids[1:]]


def test_echo_returns_the_prompt_and_its_logprobs(served, hf_logprobs):
  tok = served.tok
  text = "The capital of France is Paris. The capital of Italy is"
  ids = tok.encode(text)
  ref = _target_logprobs(hf_logprobs, ids)
  body = {"model": NAME, "prompt": [ids, ids[:8]], "echo": True, "logprobs": 2,
          "max_tokens": 1, "temperature": 0}
  r = _post(served, "/v1/completions", body)
  assert r.status_code == 200, r.text
  first, second = r.json()["choices"]
  lp = first["logprobs"]
  assert len(lp["tokens"]) == len(ids) + 1  # the prompt's tokens, then the one generated
  assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
  np.testing.assert_allclose(lp["token_logprobs"][1:len(ids)], ref, atol=1e-4)
  greedy = int(np.argmax(hf_logprobs(ids + [0])[-1]))  # transformers' next token
  assert first["text"] == tok.decode(ids, skip_special_tokens=False) + tok.decode([greedy])
  for pos in range(1, len(ids)):  # the prompt token's own, then its top 2 alternatives
    row = hf_logprobs(ids)[pos - 1]
    tops = lp["top_logprobs"][pos]
    assert 2 <= len(tops) <= 3
    assert max(tops.values()) == pytest.approx(row.max(), abs=1e-4)
  offsets = lp["text_offset"]
  assert offsets[0] == 0 and offsets == sorted(offsets)
  assert first["text"].startswith(text[:20]) and second["index"] == 1
  assert len(second["logprobs"]["tokens"]) == 9
  # Text prompts too; max_tokens 0 scores the prompt only.
  r = _post(served, "/v1/completions", {"model": NAME, "prompt": text, "echo": True,
                                        "logprobs": 0, "max_tokens": 0})
  choice = r.json()["choices"][0]
  assert choice["text"] == text and choice["finish_reason"] == "length"
  np.testing.assert_allclose(choice["logprobs"]["token_logprobs"][1:], ref, atol=1e-4)
  assert r.json()["usage"]["completion_tokens"] == 0
  # Streaming: the first chunk carries the prompt; the chunks add up to the same.
  chunks, text_out, tokens = [], "", []
  with httpx.stream("POST", served.url + "/v1/completions", timeout=300,
                    json={**body, "prompt": ids, "stream": True, "max_tokens": 3}) as s:
    for line in s.iter_lines():
      if line.startswith("data: ") and line != "data: [DONE]":
        chunks.append(json.loads(line[6:]))
  for c in chunks:
    choice = c["choices"][0]
    text_out += choice["text"]
    if choice["logprobs"]:
      tokens += choice["logprobs"]["tokens"]
  full = _post(served, "/v1/completions", {**body, "prompt": ids, "max_tokens": 3}).json()
  assert text_out == full["choices"][0]["text"]
  assert tokens == full["choices"][0]["logprobs"]["tokens"]
  assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"][0] is None


def test_tokenizer_endpoints_round_trip_and_errors_name_the_field(served):
  tok = served.tok
  text = "Hello, world! Ünïcödé ✓"
  r = _post(served, "/tokenize", {"model": NAME, "prompt": text, "return_token_strs": True})
  assert r.status_code == 200
  got = r.json()
  assert got["tokens"] == tok.encode(text) and got["count"] == len(got["tokens"])
  assert got["max_model_len"] == MAX_LEN and len(got["token_strs"]) == got["count"]
  back = _post(served, "/detokenize", {"model": NAME, "tokens": got["tokens"]}).json()
  assert back["prompt"] == text
  chat = _post(served, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]}).json()
  assert chat["tokens"] == tok.encode_chat([{"role": "user", "content": "Hi"}])
  eos = _post(served, "/tokenize", {"prompt": "<|im_end|>", "add_special_tokens": False})
  assert eos.json()["tokens"] == [tok.eos_ids[0]]
  info = httpx.get(served.url + "/tokenizer_info").json()
  assert info["eos_token"] == "<|im_end|>" and info["chat_template"]
  for path, body, param in [
      ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                "echo": True}, "echo"),
      ("/v1/completions", {"prompt": "Hi", "echo": True, "logprobs": 21}, "logprobs"),
      ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
      ("/v1/completions", {"prompt": "Hi", "echo": True, "max_tokens": 0}, "max_tokens"),
      ("/detokenize", {"tokens": [10**9]}, "tokens"),
      ("/tokenize", {}, "prompt")]:
    r = _post(served, path, body)
    assert r.status_code == 400, (path, body, r.text)
    assert r.json()["error"]["param"] == param, r.json()


def test_perplexity_through_the_server(served, hf_logprobs):
  text = ALICE.read_text()
  ids = served.tok.encode(text)
  ref = math.exp(-float(np.mean(_target_logprobs(hf_logprobs, ids))))
  r = _post(served, "/v1/completions", {"model": NAME, "prompt": text, "echo": True,
                                        "logprobs": 0, "max_tokens": 0})
  scored = r.json()["choices"][0]["logprobs"]["token_logprobs"]
  assert scored[0] is None and len(scored) == len(ids)
  assert math.exp(-float(np.mean(scored[1:]))) == pytest.approx(ref, rel=5e-5)


def _encode_pair(tok, context, continuation):
  """lm-eval's split of a (context, continuation) pair into token ids."""
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  whole = tok.encode(context + continuation)
  ctx = tok.encode(context)
  return ctx, whole[len(ctx):]


def test_lm_eval_harness_against_the_server_equals_transformers(served, hf_logprobs,
                                                                hf_smollm2, tmp_path):
  os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
  import lm_eval
  from lm_eval.tasks import TaskManager
  tok = served.tok
  tok_dir = tmp_path / "tokenizer"
  tok.save(tok_dir)
  tasks = TaskManager(include_path=str(TASKS), include_defaults=False)
  base = (f"model={NAME},base_url={served.url}/v1/completions,max_length={MAX_LEN},"
          "max_retries=1,timeout=300,num_concurrent=8")
  res = lm_eval.simple_evaluate(
      model="local-completions", model_args=f"{base},tokenizer_backend=huggingface,"
      f"tokenizer={tok_dir}", tasks=["ridgeline_mc", "ridgeline_gen"], task_manager=tasks,
      bootstrap_iters=0, log_samples=True)
  samples = res["samples"]
  for doc in samples["ridgeline_mc"]:
    ours, theirs = [], []
    for (context, continuation), resp in zip((a["arguments"] for a in doc["arguments"])
                                             if isinstance(doc["arguments"][0], dict)
                                             else doc["arguments"], doc["resps"]):
      ctx, cont = _encode_pair(tok, context, continuation)
      lp = hf_logprobs(ctx + cont)
      theirs.append(float(sum(lp[len(ctx) - 1 + i, t] for i, t in enumerate(cont))))
      ours.append(resp[0][0])
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert int(np.argmax(ours)) == int(np.argmax(theirs))
  hf_model = hf_smollm2[0]
  for doc in samples["ridgeline_gen"]:
    context = doc["arguments"][0][0] if not isinstance(doc["arguments"][0], dict) else \
        doc["arguments"][0]["arguments"][0]
    ids = tok.encode(context)
    with torch.no_grad():
      out = hf_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    text = tok.decode(out[0, len(ids):].tolist())
    for stop in ("\n", "."):
      text = text.split(stop)[0]
    assert doc["resps"][0][0] == text, (context[-40:], doc["resps"])
  assert res["results"]["ridgeline_mc"]["acc,none"] >= 0.5  # a 135M model, plain facts
  # The remote tokenizer: lm-eval reads /tokenizer_info, /tokenize and /detokenize.
  remote = lm_eval.simple_evaluate(
      model="local-completions", model_args=f"{base},tokenizer_backend=remote",
      tasks=["ridgeline_gen"], task_manager=tasks, bootstrap_iters=0, log_samples=True)
  assert [d["resps"] for d in remote["samples"]["ridgeline_gen"]] == [
      d["resps"] for d in samples["ridgeline_gen"]]
