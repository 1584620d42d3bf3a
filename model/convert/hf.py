"""Hugging Face safetensors model directories -> (ModelConfig, canonical params).

Reads `config.json` and `model.safetensors` (or the shards listed in
`model.safetensors.index.json`) of a Llama, Mistral, Qwen2, Qwen3, Gemma 2,
Gemma 3 (text), Mixtral or Qwen3-MoE causal LM, as `save_pretrained` writes them.
Only the weights are converted; the tokenizer is model/tokenizer.py's job.

Conversion is strict on purpose: a tensor our network has no place for (an o_proj
bias, an MLP bias) or a feature it does not implement (yarn RoPE, dense layers
between MoE layers) raises instead of being dropped, because dropping it would
give a model that loads and runs but produces wrong logits.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from ridgeline.util import ceil_div
from ridgeline.model import params as params_lib
from ridgeline.model import quant
from ridgeline.model.config import ModelConfig, RopeScaling
from ridgeline.model.params import Params

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

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
_GEMMA = ("gemma2", "gemma3_text")
# Architectures people reach for that are refused, with the reason.
_REFUSED = {
    "Gemma3ForConditionalGeneration": "the vision tower is not implemented; convert the "
                                      "text model (Gemma3ForCausalLM) instead",
    "Qwen2MoeForCausalLM": "shared experts are not implemented",
}

# Our per-layer name -> (HF name inside model.layers.N, is a Linear weight to transpose).
_ATTENTION_TENSORS = {
    "attn_norm": ("input_layernorm.weight", False),
    "q": ("self_attn.q_proj.weight", True),
    "k": ("self_attn.k_proj.weight", True),
    "v": ("self_attn.v_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "o": ("self_attn.o_proj.weight", True),
}
_DENSE_MLP = {
    "gate": ("mlp.gate_proj.weight", True),
    "up": ("mlp.up_proj.weight", True),
    "down": ("mlp.down_proj.weight", True),
}
_LAYER_TENSORS = {
    **_ATTENTION_TENSORS, **_DENSE_MLP,
    "mlp_norm": ("post_attention_layernorm.weight", False),
}
# Gemma's four norms: HF's post_attention_layernorm follows attention there.
_GEMMA_LAYER_TENSORS = {
    **_ATTENTION_TENSORS, **_DENSE_MLP,
    "post_attn_norm": ("post_attention_layernorm.weight", False),
    "mlp_norm": ("pre_feedforward_layernorm.weight", False),
    "post_mlp_norm": ("post_feedforward_layernorm.weight", False),
}
# MoE: (router name, per-expert name pattern for our gate / up / down).
_MOE_TENSORS = {
    "mixtral": ("block_sparse_moe.gate.weight",
                {"experts_gate": "block_sparse_moe.experts.{}.w1.weight",
                 "experts_up": "block_sparse_moe.experts.{}.w3.weight",
                 "experts_down": "block_sparse_moe.experts.{}.w2.weight"}),
    "qwen3_moe": ("mlp.gate.weight",
                  {"experts_gate": "mlp.experts.{}.gate_proj.weight",
                   "experts_up": "mlp.experts.{}.up_proj.weight",
                   "experts_down": "mlp.experts.{}.down_proj.weight"}),
}
_TOP_TENSORS = {
    "embed": ("model.embed_tokens.weight", False),
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}
# Buffers some exporters save that carry no learned state (RoPE is recomputed).
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

_SAFETENSORS_DTYPES = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
}

# Pre-quantized checkpoints (`quantization_config.quant_method`) we load as they
# are stored. transformers' fp8 integration (FineGrainedFP8Config) writes each
# quantized Linear's `weight` as float8_e4m3fn [out, in] and its dequantization
# multiplier as `weight_scale_inv` (despite the name, w = weight * scale): a
# scalar (per tensor) or, with `weight_block_size` [bo, bi], one per block
# [ceil(out/bo), ceil(in/bi)]. Exporters that follow the compressed-tensors
# naming write `weight_scale` instead (scalar or per output channel [out, 1]);
# both are read. Static activation scales (`activation_scale`, `input_scale`)
# are not used: activations are quantized per token, dynamically (W8A8 on fp8
# hardware), which is at least as accurate.
SUPPORTED_QUANT_METHODS = ("fp8",)
_SCALE_SUFFIXES = ("_scale_inv", "_scale")
_ACTIVATION_SCALES = ("activation_scale", "input_scale")


# Config ------------------------------------------------------------------------


def _architecture(hf: dict[str, Any]) -> str:
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
  arch = _architecture(hf)
  model_type = SUPPORTED_ARCHITECTURES[arch]
  gemma = model_type in _GEMMA
  moe = model_type in _MOE_TENSORS
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


# Weights -----------------------------------------------------------------------


def _weight_files(path: str) -> dict[str, str]:
  """{HF tensor name: file path}, from the index when the weights are sharded."""
  index_path = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index_path):
    with open(index_path) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index_path} has no weight_map")
    files = {n: os.path.join(path, fname) for n, fname in weight_map.items()}
    absent = sorted({f for f in files.values() if not os.path.isfile(f)})
    if absent:
      raise FileNotFoundError(f"shard files named in {index_path} are missing: {absent}")
    return files
  single = os.path.join(path, SINGLE_FILE)
  if os.path.isfile(single):
    with _open(single) as f:
      return {n: single for n in f.keys()}
  raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def _open(filename: str) -> Any:
  try:
    return safe_open(filename, framework="numpy")
  except Exception as e:  # safetensors' errors do not name the file
    raise ValueError(f"cannot read safetensors file {filename}: {e}") from e


def _read_raw(filename: str, name: str) -> np.ndarray:
  """Read one tensor by parsing the safetensors header ourselves.

  Only a fallback for safetensors versions whose numpy framework cannot produce a
  dtype (older releases reject BF16); the format is an 8-byte little-endian header
  length, a JSON header of {name: {dtype, shape, data_offsets}}, then raw data.
  """
  with open(filename, "rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    entry = json.loads(f.read(header_len))[name]
    begin, end = entry["data_offsets"]
    dt = _SAFETENSORS_DTYPES.get(entry["dtype"])
    if dt is None:
      raise ValueError(f"{filename}: tensor {name} has unsupported dtype {entry['dtype']}")
    f.seek(8 + header_len + begin)
    data = f.read(end - begin)
  return np.frombuffer(data, dtype=dt.newbyteorder("<")).reshape(entry["shape"])


def _read_tensor(handle: Any, filename: str, name: str) -> np.ndarray:
  try:
    return handle.get_tensor(name)
  except (TypeError, ValueError, AttributeError):  # numpy has no float8 dtypes
    return _read_raw(filename, name)


def _hf_names(config: ModelConfig, model_type: str) -> dict[str, tuple[Any, bool]]:
  """{our flat name: (HF tensor name, or the list of per-expert names to stack,
  transpose)} for every tensor `config` needs."""
  layer_table = _GEMMA_LAYER_TENSORS if model_type in _GEMMA else _LAYER_TENSORS
  names: dict[str, tuple[Any, bool]] = {}
  for ours in params_lib.flatten(params_lib.param_shapes(config)):
    parts = ours.split(".")
    if parts[0] != "layers":
      names[ours] = _TOP_TENSORS[parts[0]]
      continue
    prefix, leaf = f"model.layers.{parts[1]}.", parts[2]
    if leaf == "router":
      names[ours] = (prefix + _MOE_TENSORS[model_type][0], True)
    elif leaf.startswith("experts_"):
      pattern = _MOE_TENSORS[model_type][1][leaf]
      names[ours] = ([prefix + pattern.format(e) for e in range(config.num_experts)], True)
    else:
      hf_name, transpose = layer_table[leaf]
      names[ours] = (prefix + hf_name, transpose)
  return names


def _model_type(path: str) -> str:
  with open(os.path.join(path, "config.json")) as f:
    return SUPPORTED_ARCHITECTURES[_architecture(json.load(f))]


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


def _read_scale(filename: str, name: str) -> np.ndarray:
  with _open(filename) as handle:
    return np.asarray(_read_tensor(handle, filename, name), np.float32)


def _fp8_weight(path, ours, hf_name, tensor, scale, block, *, quantized, target):
  """A pre-quantized fp8 Linear weight [out, in] and its scale -> a QArray [in, out]
  (bits unchanged), or float [out, in] for a tensor our model keeps in float."""
  if tensor.dtype != np.dtype(ml_dtypes.float8_e4m3fn):
    raise ValueError(f"Hugging Face model {path}: tensor {hf_name} has a scale but dtype "
                     f"{tensor.dtype}, expected float8_e4m3fn")
  d_out, d_in = tensor.shape
  if scale.size == 1:
    scale_t = np.full((1, d_out), scale.reshape(()), np.float32)
  elif scale.ndim == 2 and scale.shape == (d_out, 1) or scale.shape == (d_out,):
    scale_t = scale.reshape(1, d_out)
  elif block is not None and scale.ndim == 2:
    bo = ceil_div(d_out, scale.shape[0])
    if d_in % block or scale.shape[1] != d_in // block:
      raise ValueError(f"Hugging Face model {path}: tensor {hf_name} {list(tensor.shape)} "
                       f"and its block scale {list(scale.shape)} do not fit weight_block_size "
                       f"[{bo}, {block}] (the input size must divide the block)")
    scale_t = np.repeat(scale, bo, axis=0)[:d_out].T  # [in/bi, out]: exact
  else:
    raise ValueError(f"Hugging Face model {path}: scale of {hf_name} has shape "
                     f"{list(scale.shape)}; expected a scalar, [out], [out, 1] or blocks")
  if block is not None and scale_t.shape[0] == 1:
    scale_t = np.repeat(scale_t, d_in // block, axis=0)  # one layout for every layer
  qvalue = np.ascontiguousarray(tensor.T)  # [in, out], still float8_e4m3fn
  w = quant.from_prequantized(qvalue, scale_t)
  if quantized:
    return w
  return np.asarray(quant.dequantize(w)).T.astype(target)  # [out, in], e.g. an fp8 lm_head


def load_hf(path: str | os.PathLike, dtype: str | None = None) -> tuple[ModelConfig, Params]:
  """Convert a Hugging Face model directory into (config, canonical numpy params).

  Linear weights are transposed to [in, out]; every tensor is cast to `dtype`, by
  default the dtype config.json says the weights were saved in (a bf16 directory
  stays bf16: half the memory of float32; float32 keeps bf16/f16 weights exact).
  Tensors are read one at a time (one layer's experts for an MoE), so peak host
  memory is the converted model plus one tensor.

  Raises:
    FileNotFoundError: config.json, the weights, or a shard named in the index is
      missing (the message names the file).
    ValueError: unsupported architecture or feature, missing, unexpected or
      misshapen tensors (named by their Hugging Face names, with the directory).
  """
  path = os.path.abspath(os.fspath(path))
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"no config.json in Hugging Face model directory {path}")
  try:
    with open(config_path) as f:
      hf_json = json.load(f)
    method, block = quantization_method(hf_json, source=path)
    config = config_from_hf(hf_json, dtype=dtype)
  except (ValueError, TypeError, AttributeError) as e:  # bad JSON or an unusable config
    raise ValueError(f"Hugging Face config {config_path}: {e}") from e
  if not config.name:
    config = config.replace(name=os.path.basename(path))

  wanted = _hf_names(config, _model_type(path))
  files = _weight_files(path)

  def sources(entry):
    return entry[0] if isinstance(entry[0], list) else [entry[0]]

  known = {hf for entry in wanted.values() for hf in sources(entry)}
  missing = sorted(hf for hf in known if hf not in files)
  if missing:
    raise ValueError(f"Hugging Face model {path} lacks tensors {missing}")
  if method:
    known |= {hf + suffix for entry in wanted.values() for hf in sources(entry)
              for suffix in _SCALE_SUFFIXES}
    known |= {hf.rpartition(".")[0] + "." + a for entry in wanted.values()
              for hf in sources(entry) for a in _ACTIVATION_SCALES}
  if config.tie_word_embeddings:
    known.add("lm_head.weight")  # some exporters save the tied copy; it is unused
  unexpected = sorted(n for n in files if n not in known and not _IGNORED.match(n))
  if unexpected:
    raise ValueError(
        f"Hugging Face model {path} has tensors the converted model has no place for "
        f"(dropping them would change its outputs): {unexpected}")

  expected_shapes = params_lib.flatten(params_lib.param_shapes(config))
  target = config.weight_dtype
  handles: dict[str, Any] = {}
  flat: dict[str, np.ndarray] = {}
  try:
    for ours, entry in sorted(wanted.items(), key=lambda kv: files[sources(kv[1])[0]]):
      transpose = entry[1]
      want = tuple(expected_shapes[ours])
      stacked = isinstance(entry[0], list)  # experts: [E, in, out] from E [out, in]
      want_one = want[1:] if stacked else want
      want_hf = want_one[::-1] if transpose else want_one  # torch Linear is [out, in]
      pieces = []
      for hf_name in sources(entry):
        filename = files[hf_name]
        if filename not in handles:
          handles[filename] = _open(filename).__enter__()
        tensor = _read_tensor(handles[filename], filename, hf_name)
        if tuple(tensor.shape) != want_hf:
          raise ValueError(
              f"Hugging Face model {path}: tensor {hf_name} has shape "
              f"{tuple(tensor.shape)}, config.json implies {want_hf}")
        scale_name = (next((hf_name + s for s in _SCALE_SUFFIXES if hf_name + s in files),
                           None) if method else None)
        if scale_name is not None:
          scale = _read_scale(files[scale_name], scale_name)
          tensor = _fp8_weight(path, ours, hf_name, tensor, scale, block,
                               quantized=quant.is_quantized_name(ours) and not stacked,
                               target=target)
          if isinstance(tensor, quant.QArray):  # kept in fp8, bits unchanged
            flat[ours] = tensor
            break
        elif tensor.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
          raise ValueError(f"Hugging Face model {path}: tensor {hf_name} is float8_e4m3fn "
                           "but has no weight_scale / weight_scale_inv beside it")
        pieces.append(tensor.T if transpose else tensor)
      if ours in flat:
        continue
      value = np.stack(pieces) if stacked else pieces[0]
      flat[ours] = np.array(value, dtype=target, order="C")  # one copy: cast + layout
  finally:
    for handle in handles.values():
      handle.__exit__(None, None, None)
  logging.info("converted %d tensors from %s", len(flat), path)
  if method:
    config = config.replace(quantization="fp8", quantization_block=block)
    # Projections the exporter left in float (modules_to_not_convert) are
    # quantized here the same way, so every layer has one layout.
    for name in flat:
      if quant.is_quantized_name(name) and not isinstance(flat[name], quant.QArray):
        flat[name] = jax.device_get(quant.quantize_weight(flat[name], "fp8", block))
  params = params_lib.unflatten(flat, config)
  params_lib.check(params, config, source=f"converted parameters of {path}")
  return config, params
