"""The default model (SmolLM2-135M-Instruct, from its GGUF) end to end: converted
into an orbax checkpoint, served by the Engine, compared with transformers."""

import pytest
import torch

from ridgeline.engine.engine import Engine, EngineConfig, SamplingParams
from ridgeline.engine import loading

PLAIN = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, there was a"]
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "You are a terse assistant."},
          {"role": "user", "content": "Name three colors."}],
         [{"role": "user", "content": "Write a haiku about the sea 🌊."}]]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def engine(default_checkpoint):
  model, tokenizer = loading.load_model(default_checkpoint)
  return Engine(model, tokenizer, EngineConfig(
      page_size=16, num_pages=64, max_model_len=256, max_batch=8, prefill_chunk=64,
      max_prefill_batch=4))


def _hf_greedy(hf_model, ids, n):
  with torch.no_grad():
    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long))
  return out[0, len(ids):].tolist()


def test_greedy_matches_transformers(engine, hf_smollm2):
  hf_model, hf_tok = hf_smollm2
  tok = engine.tokenizer
  prompts = PLAIN + CHATS
  ids = [tok.encode(p) if isinstance(p, str) else tok.encode_chat(p) for p in prompts]
  for p, i in zip(prompts, ids):  # our prompt ids are transformers' prompt ids
    ref = (hf_tok(p, add_special_tokens=True)["input_ids"] if isinstance(p, str) else
           hf_tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True,
                                      return_dict=False))
    assert i == list(ref)
  outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
  for p, i, out in zip(prompts, ids, outs):
    assert out.token_ids == _hf_greedy(hf_model, i, NEW_TOKENS), p
  assert "Paris" in outs[3].text


def test_stop_string_across_tokens_and_stream(engine):
  prompt = CHATS[1]
  full = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=24))[0]
  tok = engine.tokenizer
  # A stop string that starts inside one token and ends inside the next.
  pieces = [tok.decode(full.token_ids[:k]) for k in range(len(full.token_ids) + 1)]
  k = next(k for k in range(2, len(pieces) - 1)
           if len(pieces[k]) - len(pieces[k - 1]) >= 2 and len(pieces[k + 1]) - len(pieces[k]) >= 2)
  stop = pieces[k + 1][len(pieces[k]) - 1:len(pieces[k]) + 1]
  expected = full.text[:full.text.index(stop)]
  out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=24, stop=[stop]))[0]
  assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
  assert out.text == expected
  streamed = "".join(d.text for d in engine.stream(
      prompt, SamplingParams(temperature=0, max_tokens=24, stop=[stop])))
  assert streamed == expected
  streamed = "".join(d.text for d in engine.stream(prompt, SamplingParams(temperature=0,
                                                                          max_tokens=24)))
  assert streamed == full.text


def test_eos_ends_chat_answers(engine):
  out = engine.generate([CHATS[0]], SamplingParams(temperature=0, max_tokens=64))[0]
  assert out.finish_reason == "stop" and out.token_ids[-1] in engine.tokenizer.eos_ids
  assert out.text.strip() == "The capital of France is Paris."
