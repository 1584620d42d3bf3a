"""Named model presets: shapes only. Weights come from checkpoints."""

from __future__ import annotations

from model.config import ModelConfig, RopeScaling

_LLAMA3_VOCAB = 128256

PRESETS: dict[str, ModelConfig] = {
    # Random weights, for tests: small enough to compile in a second.
    "tiny": ModelConfig(
        name="tiny", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, intermediate_size=128, rope_theta=10000.0,
        max_position_embeddings=512),
    "smollm2-135m": ModelConfig(
        name="smollm2-135m", vocab_size=49152, hidden_size=576, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=8192),
    "llama-3.2-1b": ModelConfig(
        name="llama-3.2-1b", vocab_size=_LLAMA3_VOCAB, hidden_size=2048, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, intermediate_size=8192,
        rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
        rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=131072,
        param_dtype="bfloat16", compute_dtype="bfloat16"),
    "llama-3.1-8b": ModelConfig(
        name="llama-3.1-8b", vocab_size=_LLAMA3_VOCAB, hidden_size=4096, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
        rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
        rms_norm_eps=1e-5, max_position_embeddings=131072,
        param_dtype="bfloat16", compute_dtype="bfloat16"),
    "llama-3.1-70b": ModelConfig(
        name="llama-3.1-70b", vocab_size=_LLAMA3_VOCAB, hidden_size=8192, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, intermediate_size=28672,
        rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
        rms_norm_eps=1e-5, max_position_embeddings=131072,
        param_dtype="bfloat16", compute_dtype="bfloat16"),
    "qwen2.5-0.5b": ModelConfig(
        name="qwen2.5-0.5b", vocab_size=151936, hidden_size=896, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, intermediate_size=4864,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, qkv_bias=True,
        max_position_embeddings=32768, param_dtype="bfloat16", compute_dtype="bfloat16"),
}


def get(name: str) -> ModelConfig:
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None
