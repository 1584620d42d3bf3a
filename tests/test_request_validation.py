"""Requests are checked before they run: every value bound for a device array is
range-checked when a request is added, a bad request fails alone with a message
naming the field and what is allowed, and SamplingParams is frozen."""

import dataclasses

import pytest
from flax import nnx

from ridgeline.configs import models
from ridgeline import util
from ridgeline.engine.engine import Engine, EngineConfig, SamplingParams
from ridgeline.model import default_model
from ridgeline.model import transformer as transformer_lib
from ridgeline.model.tokenizer import load_tokenizer

VOCAB = 49152  # the default model's tokenizer
CONFIG = EngineConfig(page_size=8, num_pages=64, max_model_len=64, max_batch=4,
                      prefill_chunk=32, max_prefill_batch=2)
GREEDY = SamplingParams(temperature=0, max_tokens=4)


@pytest.fixture(scope="module")
def tokenizer():
  return load_tokenizer(default_model.gguf_path())


@pytest.fixture(scope="module")
def engine(tokenizer):
  # Tiny random weights over the real tokenizer's vocabulary.
  config = models.get("tiny").replace(vocab_size=VOCAB)
  model = transformer_lib.Transformer(config, rngs=nnx.Rngs(0))
  return Engine(model, tokenizer, CONFIG)


def _error(engine, prompt, params=GREEDY):
  out = engine.generate([prompt], params)[0]
  assert out.finish_reason == "error", out
  return out.error


# Defect 1: values that reach device arrays -----------------------------------------


def test_huge_values_fail_alone_and_good_prompts_run(engine):
  good = [[1, 2, 3], [4, 5, 6, 7]]
  alone = engine.generate(good, GREEDY)
  prompts = [good[0], [1, 2], [1, 2], [1, 2], [1, 2], good[1]]
  params = [GREEDY,
            SamplingParams(temperature=0, max_tokens=4, stop_token_ids=[10**6]),
            SamplingParams(temperature=0, max_tokens=4, stop_token_ids=[VOCAB]),
            SamplingParams(n=5, temperature=1.0, max_tokens=4),  # n > max_batch (4)
            SamplingParams(temperature=0, max_tokens=4),  # replaced: bad prompt below
            GREEDY]
  prompts[4] = [1, 10**12]
  outs = engine.generate(prompts, params)
  assert [o.finish_reason for o in outs] == ["length", "error", "error", "error", "error",
                                             "length"]
  assert outs[0].token_ids == alone[0].token_ids and outs[5].token_ids == alone[1].token_ids
  assert "stop_token_ids must be token ids below the vocabulary size 49152" in outs[1].error
  assert "[1000000]" in outs[1].error
  assert "[49152]" in outs[2].error
  assert "n must be at most max_batch (4)" in outs[3].error
  assert "prompt token ids out of range" in outs[4].error and "[0, 49152)" in outs[4].error


def test_top_k_beyond_the_vocabulary_means_all_tokens(engine):
  # vLLM's meaning, documented on SamplingParams; it used to overflow int32.
  kw = dict(temperature=1.0, seed=3, max_tokens=6)
  huge = engine.generate([[5, 6, 7]], SamplingParams(top_k=10**12, **kw))[0]
  assert huge.finish_reason == "length"
  assert huge.token_ids == engine.generate([[5, 6, 7]], SamplingParams(top_k=0, **kw))[0].token_ids
  assert huge.token_ids == engine.generate([[5, 6, 7]], SamplingParams(top_k=VOCAB, **kw))[
      0].token_ids


@pytest.mark.parametrize("name,value,allowed", [
    ("seed", 2**64, "an integer in [0, 2**63)"),
    ("max_tokens", 2**40, "an integer >= 1"),
    ("min_tokens", 2**40, "an integer >= 0"),
    ("n", 2**40, "an integer >= 1"),
    ("stop_token_ids", [2**40], "a list of token ids in [0, 2**31)"),
    ("temperature", 1e300, "a finite number >= 0"),
    ("repetition_penalty", 1e-300, "a number > 0"),
    ("logprobs", 10**9, "an integer in [0, 20]"),
    ("skip_special_tokens", "no", "true or false"),
])
def test_out_of_range_parameters_are_named(name, value, allowed):
  with pytest.raises(ValueError) as e:
    SamplingParams(**{name: value})
  assert str(e.value).startswith(f"{name} must be {allowed}")


def test_tokenizer_ids_beyond_the_model_vocabulary_fail(tokenizer):
  small = Engine(transformer_lib.Transformer(models.get("tiny"), rngs=nnx.Rngs(0)),
                 tokenizer, CONFIG)
  error = _error(small, "Hello there, this is a text prompt")
  assert "beyond the model's vocabulary of 512" in error


# Defect 4: the wrong words --------------------------------------------------------


def test_chat_roles(engine):
  for role in ("system", "user", "assistant", "tool"):
    out = engine.generate([[{"role": role, "content": "Hi"}]], GREEDY)[0]
    assert out.finish_reason == "length", (role, out.error)
  error = _error(engine, [{"role": "user", "content": "Hi"}, {"role": "wizard", "content": "x"}])
  assert error == ("messages[1].role must be one of system, user, assistant, tool; "
                   "got 'wizard'")
  assert "messages[0].content must be a string, got int" in _error(
      engine, [{"role": "user", "content": 5}])


def test_stop_must_be_strings():
  with pytest.raises(ValueError, match=r"^stop must be a string or a list of strings, got 5$"):
    SamplingParams(stop=5)
  with pytest.raises(ValueError, match="stop_token_ids must be a list of token ids, got 7"):
    SamplingParams(stop_token_ids=7)
  assert SamplingParams(stop="x").stop == ("x",)


def test_lone_surrogate_bytes_and_whitespace(engine):
  assert _error(engine, "abc\ud800def") == (
      "prompt contains a lone surrogate '\\ud800' at character 3; text must be valid Unicode")
  assert "messages[0].content contains a lone surrogate" in _error(
      engine, [{"role": "user", "content": "\udfff"}])
  assert _error(engine, b"Hello").startswith("prompt is bytes; pass text")
  assert _error(engine, "   \n\t ") == "prompt is empty or only whitespace; give some text"
  assert _error(engine, [{"role": "user", "content": "  "}]) == (
      "every message's content is empty or only whitespace")
  assert "got a list of float" in _error(engine, [1.5, 2.0])


def test_max_tokens_above_the_model_length_is_an_error(engine):
  # vLLM's rule: prompt + max_tokens > max_model_len is refused, with both numbers.
  error = _error(engine, [1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=100))
  assert error == ("max_tokens is 100 but the prompt has 4 tokens and max_model_len is 64: "
                   "at most 60 new tokens fit (or pass None for up to the model length)")
  fits = engine.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=60,
                                                        ignore_eos=True))[0]
  assert fits.finish_reason == "length" and len(fits.token_ids) == 60
  up_to = engine.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=None,
                                                         ignore_eos=True))[0]
  assert len(up_to.token_ids) == 60
  assert "min_tokens is 61 but at most 60 new tokens fit" in _error(
      engine, [1, 2, 3, 4], SamplingParams(min_tokens=61, max_tokens=None))


# Item 10: SamplingParams frozen, skip_special_tokens honoured ------------------------


def test_sampling_params_frozen_and_not_mutated_by_the_engine(engine):
  params = SamplingParams(temperature=1.0, top_k=10**12, seed=None, max_tokens=3)
  before = dataclasses.asdict(params)
  with pytest.raises(dataclasses.FrozenInstanceError):
    params.seed = 1
  engine.generate([[1, 2]], params)
  assert dataclasses.asdict(params) == before


def test_skip_special_tokens_is_honoured(engine, tokenizer):
  eos = tokenizer.eos_ids[0]
  hello = tokenizer.encode("Hello")
  texts = {}
  for skip in (True, False):
    rid = engine.add_request([1, 2], SamplingParams(max_tokens=3, skip_special_tokens=skip))
    detok = engine.scheduler.requests[rid].detokenizer_factory()
    texts[skip] = "".join(detok.push(t) for t in hello + [eos]) + detok.flush()
    engine.abort(rid)
    engine.release(rid)
  special = tokenizer.decode([eos], skip_special_tokens=False)
  assert special and texts[True] == "Hello" and texts[False] == "Hello" + special


# Item 10: one helper each ---------------------------------------------------------


def test_util_helpers():
  assert [util.ceil_div(a, 16) for a in (0, 1, 16, 17, 10**30)] == [0, 1, 1, 2,
                                                                    -(-10**30 // 16)]
  assert util.power_of_two_buckets(12) == (1, 2, 4, 8, 12)
  assert util.bucket(5, (1, 2, 4, 8, 12)) == 8 and util.bucket_size(5, 3) == 6
  with pytest.raises(ValueError, match="exceeds the largest bucket 12"):
    util.bucket(13, (1, 12))
  p = util.percentiles(range(101), count=True, maximum=True)
  assert p == {"count": 101, "mean": 50.0, "p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
  assert util.percentiles([]) is None
