"""A Hugging Face `config.json` -> `ModelConfig`.

Which architectures convert (`SUPPORTED_ARCHITECTURES`; a few that people reach
for are refused with the reason), and how transformers' fields and their
spellings across versions become ours: RoPE parameters (`rope_parameters` or
`rope_theta` and `rope_scaling`; Gemma 3's local base), which layers slide, the
Gemma and MoE specifics, and `quantization_config` (only fp8 loads as stored).
Like the weights (model/convert/hf.py), the translation is strict: a feature
our network does not implement raises instead of being dropped.
"""

from __future__ import annotations

from typing import Any

from ridgeline.model.config import ModelConfig, RopeScaling

# architecture -> model_type.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
GEMMA_TYPES = ("gemma2", "gemma3_text")
MOE_TYPES = ("mixtral", "qwen3_moe")
# Architectures people reach for that are refused, with the reason.
_REFUSED = {
    "Gemma3ForConditionalGeneration": "the vision tower is not implemented; convert the "
                                      "text model (Gemma3ForCausalLM) instead",
    "Qwen2MoeForCausalLM": "shared experts are not implemented",
}
# Pre-quantized checkpoints loaded as they are stored (model/convert/hf.py).
SUPPORTED_QUANT_METHODS = ("fp8",)


def architecture(hf: dict[str, Any]) -> str:
  """The supported architecture `hf` names (or ValueError saying why not)."""
  archs = hf.get("architectures") or []
  by_type = {t: a for a, t in SUPPORTED_ARCHITECTURES.items()}
  for arch in archs:
    if arch in SUPPORTED_ARCHITECTURES:
      return arch
  if not archs and hf.get("model_type") in by_type:
    return by_type[hf["model_type"]]
  if not archs and not hf.get("model_type"):
    raise ValueError("config.json names no model: it has neither 'architectures' nor "
                     f"'model_type' (supported: {sorted(SUPPORTED_ARCHITECTURES)})")
  named = archs or [hf.get("model_type")]
  why = next((f" ({a}: {_REFUSED[a]})" for a in archs if a in _REFUSED), "")
  raise ValueError(
      f"unsupported Hugging Face architecture {named}{why}; supported: "
      f"{sorted(SUPPORTED_ARCHITECTURES)}")


def _rope_params(hf: dict[str, Any], model_type: str) -> tuple[dict, dict | None]:
  """(global RoPE parameters, local-layer RoPE parameters or None).

  transformers >= 5 writes `rope_parameters` {"rope_type", "rope_theta", ...}, and
  for Gemma 3 one such dict per layer type; older files have a top-level
  `rope_theta` and `rope_scaling` {"rope_type" or "type", ...} (and Gemma 3's
  `rope_local_base_freq`).
  """
  rope = hf.get("rope_parameters") or {}
  if "full_attention" in rope or "sliding_attention" in rope:
    return dict(rope.get("full_attention") or {}), dict(rope.get("sliding_attention") or {})
  rope = dict(rope or hf.get("rope_scaling") or {})
  rope.setdefault("rope_theta", hf.get("rope_theta", 1e6 if model_type == "gemma3_text"
                                       else 10000.0))
  local = None
  if model_type == "gemma3_text":
    local = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 10000.0)}
  return rope, local


def _rope(rope: dict[str, Any], where: str = "") -> tuple[float, RopeScaling | None]:
  """(rope_theta, scaling) from one RoPE parameter dict."""
  theta = float(rope.get("rope_theta", 10000.0))
  kind = rope.get("rope_type", rope.get("type")) or "default"
  if kind == "default":
    return theta, None
  if kind == "linear":
    return theta, RopeScaling(type="linear", factor=float(rope["factor"]))
  if kind == "llama3":
    return theta, RopeScaling(
        type="llama3",
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
  raise ValueError(f"unsupported RoPE scaling type {kind!r}{where}; supported: default, "
                   "linear, llama3")


def _layer_types(hf: dict[str, Any], model_type: str, num_layers: int,
                 ) -> tuple[int | None, tuple[str, ...] | None]:
  """(sliding_window, per-layer types) as transformers decides them.

  `layer_types` in the file wins (Qwen2/3, Gemma 2/3 write it); else Mistral and
  Mixtral slide every layer when `sliding_window` is set, Qwen2/3 only with
  `use_sliding_window`, and Gemma 3 slides all but every `sliding_window_pattern`-th.
  """
  window = hf.get("sliding_window")
  if model_type in ("qwen2", "qwen3", "qwen3_moe") and not hf.get("use_sliding_window"):
    window = None
  if window is None:
    return None, None
  names = hf.get("layer_types")
  if names is None:
    if model_type == "gemma3_text":
      pattern = int(hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6)
      names = ["sliding_attention" if (i + 1) % pattern else "full_attention"
               for i in range(num_layers)]
    elif model_type == "gemma2":
      names = ["sliding_attention" if (i + 1) % 2 else "full_attention"
               for i in range(num_layers)]
    elif model_type in ("qwen2", "qwen3", "qwen3_moe"):
      first = int(hf.get("max_window_layers", num_layers))
      names = ["sliding_attention" if i >= first else "full_attention"
               for i in range(num_layers)]
    else:
      names = ["sliding_attention"] * num_layers
  known = {"full_attention": "full", "sliding_attention": "sliding"}
  bad = sorted(set(names) - set(known))
  if bad:
    raise ValueError(f"unsupported layer_types {bad}; supported: {sorted(known)}")
  types = tuple(known[n] for n in names)
  if "sliding" not in types:
    return None, None
  return int(window), types


def config_from_hf(hf_config: dict[str, Any], dtype: str | None = None) -> ModelConfig:
  """Translate the contents of a Hugging Face `config.json` into a ModelConfig.

  Args:
    hf_config: the parsed config.json.
    dtype: parameter and compute dtype. None uses the file's own `dtype` /
      `torch_dtype` (what the weights were saved in), else float32.

  Raises:
    ValueError: an unsupported architecture or feature, or a missing required field.
  """
  hf = hf_config
  arch = architecture(hf)
  model_type = SUPPORTED_ARCHITECTURES[arch]
  gemma = model_type in GEMMA_TYPES
  moe = model_type in MOE_TYPES
  if moe and hf.get("num_local_experts") is None:
    # transformers 5 writes num_local_experts for every MoE; Qwen's own files say num_experts.
    hf = {**hf, "num_local_experts": hf.get("num_experts")}
  required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"]
  required += ["num_local_experts", "num_experts_per_tok"] if moe else []
  required += ["moe_intermediate_size"] if model_type == "qwen3_moe" else ["intermediate_size"]
  absent = [k for k in required if hf.get(k) is None]
  if absent:
    raise ValueError(f"Hugging Face config for {arch} lacks required fields {absent}")
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
  activations = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
  if act not in activations:
    raise ValueError(f"{arch}: hidden activation {act!r} is not supported "
                     f"(supported: {sorted(activations)})")
  if hf.get("mlp_bias"):
    raise ValueError(f"{arch}: mlp_bias=True is not supported")
  if model_type != "qwen2" and hf.get("attention_bias"):
    # Llama's attention_bias also puts a bias on o_proj, which our tree lacks.
    raise ValueError(f"{arch}: attention_bias=True (bias on o_proj too) is not supported")
  if gemma and hf.get("use_bidirectional_attention"):
    raise ValueError(f"{arch}: use_bidirectional_attention=True is not supported")
  if model_type == "qwen3_moe":
    if hf.get("mlp_only_layers") or int(hf.get("decoder_sparse_step", 1)) != 1:
      raise ValueError(f"{arch}: dense layers between MoE layers (mlp_only_layers="
                       f"{hf.get('mlp_only_layers')}, decoder_sparse_step="
                       f"{hf.get('decoder_sparse_step')}) are not supported")
  if moe and hf.get("shared_expert_intermediate_size"):
    raise ValueError(f"{arch}: shared experts are not supported")

  heads = int(hf["num_attention_heads"])
  hidden = int(hf["hidden_size"])
  num_layers = int(hf["num_hidden_layers"])
  global_rope, local_rope = _rope_params(hf, model_type)
  theta, scaling = _rope(global_rope)
  local_theta = None
  if local_rope:
    local_theta, local_scaling = _rope(local_rope, " (sliding layers)")
    if local_scaling is not None:
      raise ValueError(f"{arch}: RoPE scaling on the sliding layers is not supported")
  window, layer_types = _layer_types(hf, model_type, num_layers)
  # The context is the model's own: a sliding window limits what each layer
  # attends to, not how long a sequence may be.
  max_pos = int(hf.get("max_position_embeddings") or 4096)
  if dtype is None:
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
      dtype = "float32"
  extra: dict[str, Any] = {}
  if gemma:
    extra.update(norm_weight_offset=1.0, sandwich_norms=True, embed_scale=True,
                 query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or 256),
                 # transformers' Gemma 3 attention ignores attn_logit_softcapping.
                 attn_softcap=(hf.get("attn_logit_softcapping") if model_type == "gemma2"
                               else None),
                 final_softcap=hf.get("final_logit_softcapping"))
  if moe:
    extra.update(
        num_experts=int(hf["num_local_experts"]),
        num_experts_per_tok=int(hf["num_experts_per_tok"]),
        norm_topk_prob=True if model_type == "mixtral" else bool(hf.get("norm_topk_prob")),
        moe_intermediate_size=(int(hf["moe_intermediate_size"]) if model_type == "qwen3_moe"
                               else None))
  return ModelConfig(
      vocab_size=int(hf["vocab_size"]),
      hidden_size=hidden,
      num_layers=num_layers,
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or hidden // heads),
      intermediate_size=int(hf.get("intermediate_size") or hf["moe_intermediate_size"]),
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
      qkv_bias=model_type == "qwen2",
      max_position_embeddings=max_pos,
      param_dtype=dtype,
      compute_dtype=dtype,
      name=str(hf.get("_name_or_path") or ""),
      qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
      activation=activations[act],
      sliding_window=window,
      layer_types=layer_types,
      rope_local_theta=local_theta,
      **extra,
  )


def quantization_method(hf_config: dict[str, Any], source: str = "") -> tuple[str | None, int | None]:
  """(method, input block) of a pre-quantized checkpoint's `quantization_config`
  ((None, None) when it has none). Every method but fp8 is refused, naming it:
  loading AWQ/GPTQ/bitsandbytes weights as if they were float would give garbage.
  """
  qc = hf_config.get("quantization_config")
  if not qc:
    return None, None
  where = f"Hugging Face model {source}: " if source else ""
  method = qc.get("quant_method") if isinstance(qc, dict) else None
  if method not in SUPPORTED_QUANT_METHODS:
    raise ValueError(
        f"{where}quantization_config.quant_method is {method!r}: this quantization method "
        f"is not supported (supported: {', '.join(SUPPORTED_QUANT_METHODS)}; or load the "
        "float checkpoint and quantize it with quantize=int8/int4/fp8)")
  fmt = qc.get("fmt", qc.get("scale_fmt", "e4m3"))
  if fmt not in ("e4m3", "float", None):
    raise ValueError(f"{where}fp8 format {fmt!r} is not supported (only e4m3 with float scales)")
  block = qc.get("weight_block_size")
  if block is None:
    return "fp8", None
  if not (isinstance(block, (list, tuple)) and len(block) == 2):
    raise ValueError(f"{where}quantization_config.weight_block_size must be [out, in], "
                     f"got {block!r}")
  return "fp8", int(block[1])
