"""Logit parity with Hugging Face transformers (torch, CPU, fp32) on tiny random
configs saved with save_pretrained and loaded through our HF converter."""

import numpy as np
import pytest
import torch
import transformers

from ridgeline.model import transformer as transformer_lib
from ridgeline.model.convert.hf import load_hf

VOCAB, PROMPT_LEN = 320, 32

CASES = {
    "llama_gqa_untied": transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=10000.0, tie_word_embeddings=False),
    "llama_tied_mha": transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        rope_theta=500000.0, tie_word_embeddings=True),
    "llama3_rope_scaling": transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen2_qkv_bias": transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6),
}


def _save(hf_config, path):
  torch.manual_seed(0)
  cls = (transformers.Qwen2ForCausalLM if isinstance(hf_config, transformers.Qwen2Config)
         else transformers.LlamaForCausalLM)
  model = cls(hf_config).eval()
  with torch.no_grad():  # random biases and norms, so they matter in the comparison
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
  model.save_pretrained(path, safe_serialization=True)
  return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
  hf_model = _save(CASES[case], tmp_path)
  config, params = load_hf(tmp_path)
  model = transformer_lib.from_params(config, params)
  tokens = np.random.default_rng(1).integers(0, VOCAB, size=(2, PROMPT_LEN))
  logits = transformer_lib.score(model, tokens, 8)
  with torch.no_grad():
    ref = hf_model(torch.tensor(tokens)).logits.numpy()
  rel = np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max()
  assert rel <= 1e-4, f"{case}: max relative logit difference {rel:.2e}"
  assert (np.asarray(logits).argmax(-1) == ref.argmax(-1)).all()
