"""Hugging Face safetensors model directories -> (ModelConfig, canonical params).

Reads `config.json` and `model.safetensors` (or the shards listed in
`model.safetensors.index.json`) of a Llama, Mistral, Qwen2, Qwen3, Gemma 2,
Gemma 3 (text), Mixtral or Qwen3-MoE causal LM, as `save_pretrained` writes them.
Only the weights are converted here; config.json is translated by
model/convert/hf_config.py, and the tokenizer is model/tokenizer.py's job.

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
from ridgeline.model.config import ModelConfig
from ridgeline.model.params import Params
# The config's translation, re-exported: callers (and the tests) name it `hf.X`.
from ridgeline.model.convert.hf_config import (
    GEMMA_TYPES, SUPPORTED_ARCHITECTURES, architecture, config_from_hf, quantization_method)

__all__ = ["SUPPORTED_ARCHITECTURES", "config_from_hf", "quantization_method", "load_hf"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

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
_LAYER_TENSORS = {
    **_ATTENTION_TENSORS,
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "gate": ("mlp.gate_proj.weight", True),
    "up": ("mlp.up_proj.weight", True),
    "down": ("mlp.down_proj.weight", True),
}
# Gemma's four norms: HF's post_attention_layernorm follows attention there.
_GEMMA_LAYER_TENSORS = {
    **_LAYER_TENSORS,
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

# Pre-quantized checkpoints (`quantization_config.quant_method`, read by
# hf_config.py's `quantization_method`) we load as they are stored.
# transformers' fp8 integration (FineGrainedFP8Config) writes each quantized
# Linear's `weight` as float8_e4m3fn [out, in] and its dequantization multiplier
# as `weight_scale_inv` (despite the name, w = weight * scale): a scalar (per
# tensor) or, with `weight_block_size` [bo, bi], one per block
# [ceil(out/bo), ceil(in/bi)]. Exporters that follow the compressed-tensors
# naming write `weight_scale` instead (scalar or per output channel [out, 1]);
# both are read. Static activation scales (`activation_scale`, `input_scale`)
# are not used: activations are quantized per token, dynamically (W8A8 on fp8
# hardware), which is at least as accurate.
_SCALE_SUFFIXES = ("_scale_inv", "_scale")
_ACTIVATION_SCALES = ("activation_scale", "input_scale")


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
  layer_table = _GEMMA_LAYER_TENSORS if model_type in GEMMA_TYPES else _LAYER_TENSORS
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
    return SUPPORTED_ARCHITECTURES[architecture(json.load(f))]


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
