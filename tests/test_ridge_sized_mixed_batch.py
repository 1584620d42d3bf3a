"""A ridge-sized batch through the vectorized host loop: 256+ rows mixing stop strings,
n > 1, log-probabilities, streaming and plain requests give the same results
whatever shares their step, and the text made once at the end equals the text
made token by token."""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from ridgeline.configs import models
from ridgeline.engine.engine import Engine, EngineConfig, SamplingParams
from ridgeline.model import transformer as transformer_lib
from ridgeline.model.tokenizer import Tokenizer

ROWS = 288  # requests in the mixed batch (n = 2 on some: more completions)


@pytest.fixture(scope="module")
def setup(smollm2_gguf):
  tok = Tokenizer.from_gguf(smollm2_gguf)
  # The default model's tokenizer over the first 8,192 of its ids (EOS is 2): the
  # sampler's work grows with the vocabulary, and these are real text pieces.
  config = dataclasses.replace(models.get("tiny"), vocab_size=8192)
  model = transformer_lib.Transformer(config, rngs=nnx.Rngs(3))
  engine = Engine(model, tok, EngineConfig(page_size=8, num_pages=3200, max_model_len=56,
                                           max_batch=320, prefill_chunk=1024,
                                           max_prefill_batch=64))
  # Two variants now; a step runs padded into one of them until its own has paid
  # for its compilation (then compiled in the background): outputs may not change.
  engine.warmup(background=True)
  return engine, tok


def _workload(n, seed=0):
  # Seeded rows truncate (top_k): this random model's distributions over 8,192
  # tokens are nearly flat, where a logit's last bit (the batch shape changes the
  # matmuls' rounding) moves an inverse-CDF draw to the neighbouring token.
  rng = np.random.default_rng(seed)
  requests = []
  for i in range(n):
    prompt = [int(t) for t in rng.integers(200, 8000, size=int(rng.integers(3, 16)))]
    kind = i % 6
    kw = dict(max_tokens=int(rng.integers(16, 36)), ignore_eos=bool(i % 2))
    if kind == 0:
      p = SamplingParams(temperature=0, **kw)
    elif kind == 1:
      p = SamplingParams(temperature=0, stop=["e", ", ", "an"], **kw)
    elif kind == 2:
      p = SamplingParams(temperature=0.9, top_k=20, seed=i, n=2, **kw)
    elif kind == 3:
      p = SamplingParams(temperature=0.8, top_k=50, seed=i, logprobs=3, **kw)
    elif kind == 4:
      p = SamplingParams(temperature=1.0, top_k=20, seed=i, stop=[" t", "o"],
                         include_stop_str_in_output=True, min_tokens=2, **kw)
    else:
      p = SamplingParams(temperature=0, logprobs=0, stop_token_ids=[int(prompt[0])], **kw)
    requests.append((prompt, p, i % 3 == 0))  # every third streams
  return requests


def _run_mixed(engine, requests):
  """All at once, streaming ones and plain ones in the same steps."""
  ids = [engine.add_request(p, sp, stream=stream) for p, sp, stream in requests]
  streamed = {rid: {} for rid, (_, _, s) in zip(ids, requests) if s}
  finished_deltas = set()
  while engine.has_unfinished():
    for d in engine.step().deltas:
      if d.request_id in streamed:
        text, toks = streamed[d.request_id].get(d.index, ("", []))
        streamed[d.request_id][d.index] = (text + d.text, toks + d.token_ids)
      if d.finished:
        finished_deltas.add((d.request_id, d.index))
  outs = [engine.get_output(r) for r in ids]
  for r in ids:
    engine.release(r)
  return outs, streamed, finished_deltas, ids


def _reference_text(tok, prompt, token_ids, params, finish_reason):
  """The text the token-by-token path makes: the incremental detokenizer, EOS
  left out, cut at the first stop string (min_tokens respected)."""
  detok = tok.detokenizer(prompt, params.skip_special_tokens)
  text = ""
  for k, t in enumerate(token_ids):
    if t in tok.eos_ids and not params.ignore_eos:
      return text
    prev = len(text)
    text += detok.push(t)
    if t in params.stop_token_ids:
      return text
    if params.stop and k + 1 >= params.min_tokens:
      start = max(0, prev - max(map(len, params.stop)) + 1)
      hits = sorted((text.find(s, start), s) for s in params.stop if text.find(s, start) >= 0)
      if hits:
        pos, s = hits[0]
        return text[:pos + (len(s) if params.include_stop_str_in_output else 0)]
  return text + (detok.flush() if finish_reason != "stop" else "")


def test_mixed_256_row_batch_equals_other_arrangements_and_token_by_token_text(setup):
  engine, tok = setup
  requests = _workload(ROWS)
  mixed, streamed, finished_deltas, ids = _run_mixed(engine, requests)
  assert max(engine.metrics.samples("decode_batch_size")) >= 256  # really one big batch
  # The same requests in another arrangement: plain generate, 48 at a time, reversed.
  alone = {}
  order = list(range(ROWS))[::-1]
  for start in range(0, ROWS, 48):
    part = order[start:start + 48]
    outs = engine.generate([requests[i][0] for i in part], [requests[i][1] for i in part])
    alone.update(zip(part, outs))
  for i, (out, (prompt, params, stream)) in enumerate(zip(mixed, requests)):
    other = alone[i]
    assert len(out.outputs) == params.n
    for c, o in zip(out.outputs, other.outputs):
      assert (c.token_ids, c.text, c.finish_reason, c.stop_reason) == (
          o.token_ids, o.text, o.finish_reason, o.stop_reason), (i, params)
      assert c.text == _reference_text(tok, prompt, c.token_ids, params, c.finish_reason)
      if params.stop and c.finish_reason == "stop" and not params.include_stop_str_in_output:
        assert not any(s in c.text for s in params.stop)
      if params.logprobs is not None:
        assert len(c.logprobs) == len(c.token_ids)
        assert all(t in lp and len(lp) <= params.logprobs + 1
                   for t, lp in zip(c.token_ids, c.logprobs))
        np.testing.assert_allclose([lp[t] for t, lp in zip(c.token_ids, c.logprobs)],
                                   [lp[t] for t, lp in zip(o.token_ids, o.logprobs)],
                                   atol=1e-5)
      assert (ids[i], c.index) in finished_deltas
      if stream:  # the deltas add up to the final text and tokens
        assert streamed[ids[i]][c.index] == (c.text, c.token_ids)
  reasons = {c.finish_reason for o in mixed for c in o.outputs}
  assert {"stop", "length"} <= reasons
  assert engine.num_free_pages() == engine.runner.num_pages
