"""Prompt log-probabilities on the default model against transformers: plain,
after prefix-cache hits, across a preemption and on a 1x2 mesh; scoring only
(max_tokens 0); the perplexity of a text (in several prefill chunks) as a batch
job."""

import json
import math
import pathlib

import numpy as np
import pytest

from ridgeline.frontends import batch
from ridgeline.engine.engine import Engine, EngineConfig, SamplingParams
from ridgeline.engine import loading
from ridgeline.model import sharding

ALICE = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "alice.txt"
PROMPTS = ["The capital of France is Paris, and the capital of Italy is Rome.",
           "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)",
           "Once upon a time, there was a little fox who lived at the edge of the woods "
           "and dreamed of the sea."]


@pytest.fixture(scope="module")
def loaded(default_checkpoint):
  return loading.load_model(default_checkpoint)


@pytest.fixture(scope="module")
def hf_scores(hf_logprobs):
  """transformers' log-probability of each prompt token after the first, and the
  whole log-softmax rows (conftest.hf_logprobs)."""
  def scores(ids):
    lp = hf_logprobs(ids)
    return lp[np.arange(len(ids) - 1), ids[1:]], lp
  return scores


def _ours(out):
  ids = out.prompt_token_ids
  assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
  return np.array([e[t] for t, e in zip(ids[1:], out.prompt_logprobs[1:])])


# Room for the whole of alice.txt (3.5k tokens: 7 prefill chunks of 512); the same
# shapes as tests/test_scoring_server.py's engine (the session's compilation cache).
SCORING = EngineConfig(page_size=16, num_pages=300, max_model_len=4096, max_batch=8,
                       prefill_chunk=512, max_prefill_batch=8)


def _engine(loaded, mesh=None, **kw):
  model, tok = loaded
  cfg = dict(page_size=16, num_pages=64, max_model_len=256, max_batch=8, prefill_chunk=64,
             max_prefill_batch=4)
  cfg.update(kw)
  return Engine(model, tok, EngineConfig(**cfg), mesh=mesh)


@pytest.fixture(scope="module")
def engine(loaded):
  return Engine(*loaded, SCORING)


def test_prompt_logprobs_equal_transformers_through_every_path(engine, hf_scores):
  tok = engine.tokenizer
  ids = [tok.encode(p) for p in PROMPTS]
  refs = [hf_scores(i) for i in ids]
  k = 3
  params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=k)
  outs = engine.generate(PROMPTS, params)
  for out, (ref, full) in zip(outs, refs):
    got = _ours(out)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    for pos, entry in enumerate(out.prompt_logprobs[1:]):  # the prompt's own + top k
      top = np.argsort(-full[pos])[:k]
      assert set(int(t) for t in top) <= set(entry) and len(entry) <= k + 1
  # Again: every page is now cached, but a cached prefix has no logits; the
  # request recomputes and scores it. A new prompt sharing a prefix does too.
  again = engine.generate(PROMPTS[:1] + [PROMPTS[0] + " Berlin is the capital"], params)
  np.testing.assert_allclose(_ours(again[0]), refs[0][0], atol=1e-4)
  long_ids = tok.encode(PROMPTS[0] + " Berlin is the capital")
  np.testing.assert_allclose(_ours(again[1]), hf_scores(long_ids)[0], atol=1e-4)
  # Scoring only: max_tokens 0 generates nothing and ends with "length".
  scored = engine.generate(PROMPTS, SamplingParams(max_tokens=0, prompt_logprobs=0))
  for out, (ref, _) in zip(scored, refs):
    assert out.token_ids == [] and out.finish_reason == "length"
    np.testing.assert_allclose(_ours(out), ref, atol=1e-4)
    assert all(len(e) == 1 for e in out.prompt_logprobs[1:])
  assert engine.num_free_pages() == engine.runner.num_pages


def test_prompt_logprobs_across_preemption_and_on_a_mesh(loaded, default_checkpoint,
                                                        hf_scores):
  tok = loaded[1]
  prompts = [p * 2 for p in PROMPTS]  # 40-60 tokens: several pages each
  ids = [tok.encode(p) for p in prompts]
  refs = [hf_scores(i)[0] for i in ids]
  params = SamplingParams(temperature=0, max_tokens=48, prompt_logprobs=1, ignore_eos=True)
  # Admitted together (their prompts fit), they outgrow 12 pages while decoding.
  small = _engine(loaded, num_pages=12, max_model_len=112)
  outs = small.generate(prompts, params)
  assert small.metrics.snapshot()["preemptions"] > 0
  for out, ref in zip(outs, refs):
    np.testing.assert_allclose(_ours(out), ref, atol=1e-4)
  mesh = sharding.make_mesh("data=1,model=2")  # weights and KV heads split in two
  meshed = _engine(loading.load_model(default_checkpoint, mesh=mesh), mesh=mesh)
  out = meshed.generate(prompts[:1], SamplingParams(max_tokens=0, prompt_logprobs=1))[0]
  np.testing.assert_allclose(_ours(out), refs[0], atol=1e-4)


def test_perplexity_of_a_text_as_a_batch_job(engine, hf_scores, tmp_path):
  """A quarter of alice.txt here (the whole of it goes through the server in
  tests/test_scoring_server.py; `scripts/benchmark.py --mode scoring` times it)."""
  tok = engine.tokenizer
  text = ALICE.read_text()[:4000]  # ~900 tokens: 2 prefill chunks
  ids = tok.encode(text)
  ref = math.exp(-float(np.mean(hf_scores(ids)[0])))
  src = tmp_path / "in.jsonl"
  lines = [{"id": "alice", "prompt": text,
            "sampling": {"max_tokens": 0, "prompt_logprobs": 0}},
           {"custom_id": "echo", "method": "POST", "url": "/v1/completions",
            "body": {"prompt": PROMPTS[0], "echo": True, "logprobs": 0, "max_tokens": 0}}]
  src.write_text("".join(json.dumps(x) + "\n" for x in lines))
  job = batch.BatchJob(str(src), str(tmp_path / "out.jsonl"), progress=False,
                       default_sampling={"temperature": 0})
  summary = batch.run_batch(engine, job)
  records = {r.get("custom_id") or r["id"]: r
             for r in map(json.loads, open(tmp_path / "out.jsonl"))}
  alice = records["alice"]
  assert alice["prompt_scored_tokens"] == len(ids) - 1 and alice["completion_tokens"] == 0
  assert math.exp(-alice["prompt_logprob"] / alice["prompt_scored_tokens"]) == pytest.approx(
      ref, rel=5e-5)  # 4 significant digits
  body = records["echo"]["response"]["body"]
  lp = body["choices"][0]["logprobs"]
  assert body["choices"][0]["text"] == PROMPTS[0] and lp["token_logprobs"][0] is None
  echo_ids = tok.encode(PROMPTS[0])
  np.testing.assert_allclose(lp["token_logprobs"][1:], hf_scores(echo_ids)[0], atol=1e-4)
  total = alice["prompt_logprob"] + sum(lp["token_logprobs"][1:])
  count = alice["prompt_scored_tokens"] + len(echo_ids) - 1
  assert summary["perplexity"] == pytest.approx(math.exp(-total / count), rel=1e-9)
  assert "perplexity" in batch.format_summary(summary)
