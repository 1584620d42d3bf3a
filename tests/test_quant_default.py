"""Quantization on the default model (SmolLM2-135M-Instruct): logit error bounds,
int8 and int4 greedy agreement, and the 8-bit KV caches. Small on purpose (10
prompts x 16 tokens); scripts/quant_bench.py runs the full 20 x 32 and perplexity.

The model's float weights are its Q4_1 GGUF dequantized: every block of 32 inputs
lies on a 16-value grid, which the affine int8/int4 blocks (model/quant.py) hold
exactly (int4) or to float32 rounding (int8); fp8's per-channel e4m3 does not."""

import dataclasses

import pytest

from ridgeline.tools import quant_eval
from ridgeline.engine.config import EngineConfig
from ridgeline.engine import loading
from ridgeline.model import quant
from ridgeline.model import transformer as transformer_lib

PROMPTS = list(quant_eval.PROMPTS[:10])
TOKENS = 16
# Every prompt in one prefill step, then decode steps of all ten: two step shapes
# a model (each is a compilation of the whole model on this CPU).
CONFIG = EngineConfig(page_size=16, num_pages=10 * 128 // 16 + 8, max_model_len=128,
                      max_batch=16, prefill_chunk=128, max_prefill_batch=16)
# Max |logits - float32 logits| / max |float32 logits| over the 10 prompts.
# Measured on this model: int8 4e-6, int4 4e-6 (float32 rounding: the matmul is
# split into an integer part and a block-offset part), fp8 0.13
# (docs/quantization.md); the bounds leave headroom.
DEFAULT_BOUNDS = {"int8": 1e-4, "int4": 1e-4, "fp8": 0.25}


@pytest.fixture(scope="module")
def setup(default_checkpoint):
  model, tokenizer = loading.load_model(default_checkpoint)
  ref = quant_eval.greedy(model, tokenizer, PROMPTS, TOKENS, CONFIG)
  return model, tokenizer, ref, transformer_lib.to_params(model)


def _quantized(model, params, mode):
  return transformer_lib.from_params(model.config.replace(quantization=mode),
                                     quant.quantize_params(params, mode))


def test_logit_error_bounds_each_mode(setup):
  model, tokenizer, _, params = setup
  ids = [tokenizer.encode(p) for p in PROMPTS]
  errors = {m: quant_eval.max_logit_error(model, _quantized(model, params, m), ids)
            for m in quant.MODES}
  for mode, err in errors.items():
    assert 0 < err <= DEFAULT_BOUNDS[mode], errors


def test_int8_greedy_agreement_and_logprob_gap(setup):
  """The issue's targets: >= 90% identical greedy continuations, a mean log-prob
  gap under 0.05 nats a token (measured: 20 of 20 32-token continuations, gap
  2e-7; int4 the same, bounded here by its logit error above)."""
  model, tokenizer, ref, params = setup
  q = _quantized(model, params, "int8")
  out = quant_eval.greedy(q, tokenizer, PROMPTS, TOKENS, CONFIG)
  assert quant_eval.agreement(ref, out) >= 0.9
  ids = [tokenizer.encode(p) for p in PROMPTS]
  gap = quant_eval.logprob_gap(model, q, ids, ref)
  assert abs(gap) < 0.05, gap


def test_int8_kv_cache_greedy_agreement(setup):
  model, tokenizer, ref, _ = setup
  config = dataclasses.replace(CONFIG, kv_dtype="int8")
  out = quant_eval.greedy(model, tokenizer, PROMPTS, TOKENS, config)
  assert quant_eval.agreement(ref, out) >= 0.9


def test_fp8_kv_cache_greedy_agreement(setup):
  """e4m3 keeps 3 mantissa bits (up to 6% error per element, whatever the
  scale), against int8's 0.4% of the head's largest value: on this model it
  does not reach the 90% that int8 does (measured in docs/quantization.md);
  the bound here is what it reaches, with a margin."""
  model, tokenizer, ref, _ = setup
  config = dataclasses.replace(CONFIG, kv_dtype="fp8")
  out = quant_eval.greedy(model, tokenizer, PROMPTS, TOKENS, config)
  assert quant_eval.agreement(ref, out) >= 0.4
