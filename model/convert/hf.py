"""Hugging Face safetensors model directories -> (ModelConfig, canonical params).

Reads `config.json` and `model.safetensors` (or the shards listed in
`model.safetensors.index.json`) of a Llama, Mistral or Qwen2 causal LM. Only the
weights are converted; the tokenizer is model/tokenizer.py's job.

Conversion is strict on purpose: a tensor our network has no place for (an o_proj
bias, an MLP bias) or a feature it does not implement (yarn RoPE, a non-SiLU MLP)
raises instead of being dropped, because dropping it would give a model that loads
and runs but produces wrong logits.
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

from model import params as params_lib
from model import quant
from model.config import ModelConfig, RopeScaling
from model.params import Params

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# architecture -> model_type; all three share Llama's tensor names and math here.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}

# Our per-layer name -> (HF name inside model.layers.N, is a Linear weight to transpose).
_LAYER_TENSORS = {
    "attn_norm": ("input_layernorm.weight", False),
    "q": ("self_attn.q_proj.weight", True),
    "k": ("self_attn.k_proj.weight", True),
    "v": ("self_attn.v_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "o": ("self_attn.o_proj.weight", True),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "gate": ("mlp.gate_proj.weight", True),
    "up": ("mlp.up_proj.weight", True),
    "down": ("mlp.down_proj.weight", True),
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
  named = archs or [hf.get("model_type")]
  raise ValueError(
      f"unsupported Hugging Face architecture {named}; supported: "
      f"{sorted(SUPPORTED_ARCHITECTURES)}")


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  """(rope_theta, scaling) from either config layout.

  transformers >= 5 writes `rope_parameters` {"rope_type", "rope_theta", ...};
  older files have a top-level `rope_theta` and `rope_scaling` {"rope_type" or
  "type", ...}.
  """
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
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
  raise ValueError(f"unsupported RoPE scaling type {kind!r}; supported: default, linear, llama3")


def _uses_sliding_window(hf: dict[str, Any], model_type: str) -> bool:
  if hf.get("sliding_window") is None:
    return False
  if "sliding_attention" in (hf.get("layer_types") or []):
    return True
  if model_type == "qwen2":
    return bool(hf.get("use_sliding_window", False))
  return model_type == "mistral"


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
  required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size")
  absent = [k for k in required if hf.get(k) is None]
  if absent:
    raise ValueError(f"Hugging Face config for {arch} lacks required fields {absent}")
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise ValueError(f"{arch}: hidden_act {act!r} is not supported (only silu)")
  if hf.get("mlp_bias"):
    raise ValueError(f"{arch}: mlp_bias=True is not supported")
  if model_type != "qwen2" and hf.get("attention_bias"):
    # Llama's attention_bias also puts a bias on o_proj, which our tree lacks.
    raise ValueError(f"{arch}: attention_bias=True (bias on o_proj too) is not supported")

  heads = int(hf["num_attention_heads"])
  hidden = int(hf["hidden_size"])
  theta, scaling = _rope(hf)
  max_pos = int(hf.get("max_position_embeddings") or 4096)
  if _uses_sliding_window(hf, model_type):
    # Sliding-window attention equals full attention within the window; past it the
    # models differ, so the window becomes our context limit.
    max_pos = min(max_pos, int(hf["sliding_window"]))
  if dtype is None:
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
      dtype = "float32"
  return ModelConfig(
      vocab_size=int(hf["vocab_size"]),
      hidden_size=hidden,
      num_layers=int(hf["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or hidden // heads),
      intermediate_size=int(hf["intermediate_size"]),
      rope_theta=theta,
      rope_scaling=scaling,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=model_type == "qwen2",
      max_position_embeddings=max_pos,
      param_dtype=dtype,
      compute_dtype=dtype,
      name=str(hf.get("_name_or_path") or ""),
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


def _hf_names(config: ModelConfig) -> dict[str, tuple[str, bool]]:
  """{our flat name: (HF tensor name, transpose)} for every tensor `config` needs."""
  names = {}
  for ours in params_lib.flatten(params_lib.param_shapes(config)):
    parts = ours.split(".")
    if parts[0] == "layers":
      hf_name, transpose = _LAYER_TENSORS[parts[2]]
      names[ours] = (f"model.layers.{parts[1]}.{hf_name}", transpose)
    else:
      names[ours] = _TOP_TENSORS[parts[0]]
  return names


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
    bo = -(-d_out // scale.shape[0])
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


def load_hf(path: str | os.PathLike, dtype: str = "float32") -> tuple[ModelConfig, Params]:
  """Convert a Hugging Face model directory into (config, canonical numpy params).

  Linear weights are transposed to [in, out]; every tensor is cast to `dtype`
  (float32 keeps bf16/f16 weights exact). Tensors are read one at a time, so peak
  host memory is the converted model plus one tensor.

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
  with open(config_path) as f:
    hf_json = json.load(f)
  method, block = quantization_method(hf_json, source=path)
  config = config_from_hf(hf_json, dtype=dtype)
  if not config.name:
    config = config.replace(name=os.path.basename(path))

  wanted = _hf_names(config)
  files = _weight_files(path)
  missing = sorted(hf for hf, _ in wanted.values() if hf not in files)
  if missing:
    raise ValueError(f"Hugging Face model {path} lacks tensors {missing}")
  known = {hf for hf, _ in wanted.values()}
  if method:
    known |= {hf + suffix for hf, _ in wanted.values() for suffix in _SCALE_SUFFIXES}
    known |= {hf.rpartition(".")[0] + "." + a for hf, _ in wanted.values()
              for a in _ACTIVATION_SCALES}
  if config.tie_word_embeddings:
    known.add("lm_head.weight")  # some exporters save the tied copy; it is unused
  unexpected = sorted(n for n in files if n not in known and not _IGNORED.match(n))
  if unexpected:
    raise ValueError(
        f"Hugging Face model {path} has tensors the converted model has no place for "
        f"(dropping them would change its outputs): {unexpected}")

  expected_shapes = params_lib.flatten(params_lib.param_shapes(config))
  by_file: dict[str, list[str]] = {}
  for ours, (hf_name, _) in wanted.items():
    by_file.setdefault(files[hf_name], []).append(ours)
  target = config.weight_dtype
  flat: dict[str, np.ndarray] = {}
  for filename, ours_names in sorted(by_file.items()):
    with _open(filename) as handle:
      for ours in ours_names:
        hf_name, transpose = wanted[ours]
        tensor = _read_tensor(handle, filename, hf_name)
        want = tuple(expected_shapes[ours])
        want_hf = want[::-1] if transpose else want  # torch Linear is [out, in]
        if tuple(tensor.shape) != want_hf:
          raise ValueError(
              f"Hugging Face model {path}: tensor {hf_name} has shape "
              f"{tuple(tensor.shape)}, config.json implies {want_hf}")
        scale_name = next((hf_name + s for s in _SCALE_SUFFIXES if hf_name + s in files),
                          None)
        if method and scale_name is not None:
          scale = _read_scale(files[scale_name], scale_name)
          tensor = _fp8_weight(path, ours, hf_name, tensor, scale, block,
                               quantized=quant.is_quantized_name(ours), target=target)
          if isinstance(tensor, quant.QArray):
            flat[ours] = tensor
            continue
        elif tensor.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
          raise ValueError(f"Hugging Face model {path}: tensor {hf_name} is float8_e4m3fn "
                           "but has no weight_scale / weight_scale_inv beside it")
        if transpose:
          tensor = tensor.T
        flat[ours] = np.array(tensor, dtype=target, order="C")  # one copy: cast + layout
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
