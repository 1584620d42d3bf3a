"""Named model presets: shapes only. Weights come from checkpoints."""

from __future__ import annotations

from ridgeline.model.config import ModelConfig, RopeScaling

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
    # Llama 3.1: one architecture at two sizes.
    **{name: ModelConfig(
        name=name, vocab_size=_LLAMA3_VOCAB, hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=8, head_dim=128, intermediate_size=ffn,
        rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
        rms_norm_eps=1e-5, max_position_embeddings=131072,
        param_dtype="bfloat16", compute_dtype="bfloat16")
       for name, hidden, layers, heads, ffn in (("llama-3.1-8b", 4096, 32, 32, 14336),
                                                ("llama-3.1-70b", 8192, 80, 64, 28672))},
    "qwen2.5-0.5b": ModelConfig(
        name="qwen2.5-0.5b", vocab_size=151936, hidden_size=896, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, intermediate_size=4864,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, qkv_bias=True,
        max_position_embeddings=32768, param_dtype="bfloat16", compute_dtype="bfloat16"),
    # Small random MoE for CPU tests and benchmarks.
    "tiny-moe": ModelConfig(
        name="tiny-moe", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=512,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64),
    # The architectures of the new converters, at their real sizes.
    "qwen3-0.6b": ModelConfig(
        name="qwen3-0.6b", vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16,
        num_kv_heads=8, head_dim=128, intermediate_size=3072, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=True, qk_norm=True,
        max_position_embeddings=40960, param_dtype="bfloat16", compute_dtype="bfloat16"),
    "qwen3-8b": ModelConfig(
        name="qwen3-8b", vocab_size=151936, hidden_size=4096, num_layers=36, num_heads=32,
        num_kv_heads=8, head_dim=128, intermediate_size=12288, rope_theta=1e6,
        rms_norm_eps=1e-6, qk_norm=True, max_position_embeddings=40960,
        param_dtype="bfloat16", compute_dtype="bfloat16"),
    "mistral-7b-v0.1": ModelConfig(
        name="mistral-7b-v0.1", vocab_size=32000, hidden_size=4096, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336,
        rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=4096,
        max_position_embeddings=32768, param_dtype="bfloat16", compute_dtype="bfloat16"),
    **{name: ModelConfig(
        name=name, vocab_size=262144, hidden_size=hidden, num_layers=layers, num_heads=4,
        num_kv_heads=1, head_dim=256, intermediate_size=ffn, rope_theta=1e6,
        rope_local_theta=1e4, rms_norm_eps=1e-6, tie_word_embeddings=True, qk_norm=True,
        norm_weight_offset=1.0, sandwich_norms=True, activation="gelu_tanh",
        embed_scale=True, query_pre_attn_scalar=256, sliding_window=512,
        layer_types=tuple("sliding" if (i + 1) % 6 else "full" for i in range(layers)),
        max_position_embeddings=32768, param_dtype="bfloat16", compute_dtype="bfloat16")
       for name, hidden, layers, ffn in (("gemma3-270m", 640, 18, 2048),
                                         ("gemma3-1b", 1152, 26, 6912))},
    "gemma2-2b": ModelConfig(
        name="gemma2-2b", vocab_size=256000, hidden_size=2304, num_layers=26, num_heads=8,
        num_kv_heads=4, head_dim=256, intermediate_size=9216, rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, norm_weight_offset=1.0,
        sandwich_norms=True, activation="gelu_tanh", embed_scale=True,
        query_pre_attn_scalar=256, attn_softcap=50.0, final_softcap=30.0,
        sliding_window=4096,
        layer_types=tuple("sliding" if (i + 1) % 2 else "full" for i in range(26)),
        max_position_embeddings=8192, param_dtype="bfloat16", compute_dtype="bfloat16"),
    "mixtral-8x7b": ModelConfig(
        name="mixtral-8x7b", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, intermediate_size=14336, rope_theta=1e6,
        rms_norm_eps=1e-5, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, param_dtype="bfloat16", compute_dtype="bfloat16"),
    "qwen3-30b-a3b": ModelConfig(
        name="qwen3-30b-a3b", vocab_size=151936, hidden_size=2048, num_layers=48,
        num_heads=32, num_kv_heads=4, head_dim=128, intermediate_size=6144,
        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, rope_theta=1e6, rms_norm_eps=1e-6, qk_norm=True,
        max_position_embeddings=40960, param_dtype="bfloat16", compute_dtype="bfloat16"),
}


def get(name: str) -> ModelConfig:
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None
