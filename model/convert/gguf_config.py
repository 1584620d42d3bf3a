"""GGUF metadata -> `ModelConfig` (model/convert/gguf.py's config).

A GGUF file carries the hyperparameters as `{arch}.*` metadata; whether the
embedding is tied and whether q/k/v have biases come from its tensor table.
Some values are stored per layer (`_scalar`: all layers must agree), floats as
float32 (`_float` recovers the decimal the writer meant), and Gemma's sliding
layers and attention scale are what llama.cpp's graphs hard-code.

Llama 3 RoPE scaling: llama.cpp does not store the llama3 scaling parameters as
metadata; it stores their effect, the per-frequency divisors, as a
`rope_freqs.weight` tensor. `_infer_llama3_scaling` recovers a `RopeScaling`
that reproduces those divisors (and refuses if none does);
`llama3_freq_factors` computes the divisors of a scaling, as llama.cpp does.
"""

from __future__ import annotations

import math
import os
from typing import Any

import gguf
import numpy as np

from ridgeline.model.config import ModelConfig, RopeScaling
from ridgeline.model.convert import gguf_tensors

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3")
GEMMA_ARCHITECTURES = ("gemma2", "gemma3")
# llama.cpp's graph for these routes every layer through experts when the file has
# them (Mixtral is "llama" with expert tensors); Qwen3-MoE renormalises the top k.
_MOE_ARCHITECTURES = ("llama", "qwen3moe")

# Tensors that describe the model rather than hold weights; read into the config.
ROPE_FREQS = "rope_freqs.weight"

# llama.cpp's default for the llama3 original context when the file does not say.
_LLAMA3_ORIGINAL_CONTEXT = 8192
_LLAMA3_DEFAULT_LOW_FREQ_FACTOR = 1.0
_LLAMA3_DEFAULT_HIGH_FREQ_FACTOR = 4.0

_MISSING = object()


def architecture(reader: gguf.GGUFReader, path: str) -> str:
  """The file's `general.architecture`, or ValueError when it is unsupported."""
  arch = _field(reader, "general.architecture", path, None)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(
        f"GGUF file {path} has architecture {arch!r}; the GGUF converter supports "
        f"{list(SUPPORTED_ARCHITECTURES)}")
  return arch


def _field(reader: gguf.GGUFReader, key: str, path: str, default: Any = _MISSING) -> Any:
  field = reader.get_field(key)
  if field is None:
    if default is _MISSING:
      raise ValueError(f"GGUF file {path} lacks metadata key {key!r}")
    return default
  return field.contents()


def _float(value: Any) -> float:
  """A float32 metadata value as the decimal its writer most likely meant.

  GGUF stores floats as float32, so 1e-5 comes back as 9.999999747378752e-06. The
  shortest decimal that rounds to the same float32 recovers 1e-05, which keeps a
  loaded config equal to the preset it came from.
  """
  return float(str(np.float32(value)))


def _scalar(reader: gguf.GGUFReader, key: str, path: str, default: Any = _MISSING) -> Any:
  """A metadata value that some files store per layer; all layers must agree."""
  value = _field(reader, key, path, default)
  if isinstance(value, list):
    if len(set(value)) != 1:
      raise ValueError(
          f"GGUF file {path}: {key} varies per layer ({value}); "
          "only uniform layers are supported")
    value = value[0]
  return value


def read_config(reader: gguf.GGUFReader, arch: str, tensors: dict[str, Any], path: str,
                 dtype: str) -> ModelConfig:
  """ModelConfig from `{arch}.*` metadata; tying and biases from the tensor table."""

  def k(key: str) -> str:
    return f"{arch}.{key}"

  hidden = int(_field(reader, k("embedding_length"), path))
  num_heads = int(_scalar(reader, k("attention.head_count"), path))
  num_kv_heads = int(_scalar(reader, k("attention.head_count_kv"), path, num_heads))
  # key_length is the explicit head size; rope.dimension_count equals it for the
  # whole-head rotation these architectures use; hidden / heads is the classic rule.
  head_dim = _field(reader, k("attention.key_length"), path, None)
  rope_dim = _field(reader, k("rope.dimension_count"), path, None)
  if head_dim is None:
    head_dim = rope_dim if rope_dim is not None else hidden // num_heads
  head_dim = int(head_dim)
  if rope_dim is not None and int(rope_dim) != head_dim:
    raise ValueError(
        f"GGUF file {path}: rope.dimension_count {rope_dim} != head_dim {head_dim}; "
        "only rotations over the whole head are supported")

  vocab = _field(reader, k("vocab_size"), path, None)
  if vocab is None and "token_embd.weight" in tensors:
    # The embedding's row count is what the network uses; tokenizer lists can be
    # shorter than a padded embedding.
    vocab = int(tensors["token_embd.weight"].shape[1])
  if vocab is None:
    vocab = len(_field(reader, "tokenizer.ggml.tokens", path))

  rope_theta = _float(_field(reader, k("rope.freq_base"), path, 10000.0))
  name = _field(reader, "general.name", path, None) or os.path.splitext(os.path.basename(path))[0]
  num_layers = int(_field(reader, k("block_count"), path))
  extra: dict[str, Any] = {}
  experts = int(_field(reader, k("expert_count"), path, 0) or 0)
  if experts:
    if arch not in _MOE_ARCHITECTURES:
      raise ValueError(f"GGUF file {path}: experts in a {arch!r} file are not supported")
    if _field(reader, k("expert_shared_count"), path, 0):
      raise ValueError(f"GGUF file {path}: shared experts are not supported")
    extra.update(num_experts=experts,
                 num_experts_per_tok=int(_field(reader, k("expert_used_count"), path)),
                 norm_topk_prob=True,  # llama.cpp renormalises for mixtral and qwen3moe
                 moe_intermediate_size=_field(reader, k("expert_feed_forward_length"), path,
                                              None))
  if arch in GEMMA_ARCHITECTURES:
    # What llama.cpp's gemma2/gemma3 graphs hard-code (llama-model.cpp): every 2nd
    # (gemma2: even layers) or all but every 6th layer (gemma3) slides; local RoPE
    # base 10000; attention scale 1/sqrt(head_dim), except the 27B models (62 and
    # 46 layers), whose scale is 1/sqrt(hidden / heads).
    window = _field(reader, k("attention.sliding_window"), path, None)
    pattern = 2 if arch == "gemma2" else 6
    types = tuple("sliding" if (i + 1) % pattern else "full" for i in range(num_layers))
    big = (arch, num_layers) in (("gemma2", 46), ("gemma3", 62))
    extra.update(
        norm_weight_offset=1.0, sandwich_norms=True, embed_scale=True, activation="gelu_tanh",
        sliding_window=None if window is None else int(window),
        layer_types=None if window is None else types,
        query_pre_attn_scalar=float(hidden // num_heads if big else head_dim),
        attn_softcap=_field(reader, k("attn_logit_softcapping"), path, None),
        final_softcap=_field(reader, k("final_logit_softcapping"), path, None))
    if arch == "gemma3":
      extra["rope_local_theta"] = _float(_field(reader, k("rope.freq_base_swa"), path, 10000.0))
  for cap in ("attn_softcap", "final_softcap"):
    if extra.get(cap) is not None:
      extra[cap] = _float(extra[cap])
  return ModelConfig(
      vocab_size=int(vocab),
      hidden_size=hidden,
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=head_dim,
      intermediate_size=int(_scalar(reader, k("feed_forward_length"), path,
                                    _field(reader, k("expert_feed_forward_length"), path, 0))),
      rope_theta=rope_theta,
      rope_scaling=_rope_scaling(reader, arch, tensors, rope_theta, head_dim, path),
      rms_norm_eps=_float(_field(reader, k("attention.layer_norm_rms_epsilon"), path, 1e-5)),
      tie_word_embeddings="output.weight" not in tensors,
      qkv_bias="blk.0.attn_q.bias" in tensors,
      max_position_embeddings=int(_field(reader, k("context_length"), path, 4096)),
      param_dtype=dtype,
      compute_dtype=dtype,
      name=str(name),
      qk_norm="blk.0.attn_q_norm.weight" in tensors,
      **extra,
  )


def _rope_scaling(reader: gguf.GGUFReader, arch: str, tensors: dict[str, Any],
                  theta: float, head_dim: int, path: str) -> RopeScaling | None:
  """RoPE scaling from metadata (linear) or from a `rope_freqs` tensor (llama3).

  Only what our model implements is accepted; YaRN, LongRoPE and friends raise
  rather than load a model that would silently compute different positions.
  """
  kind = _field(reader, f"{arch}.rope.scaling.type", path, None)
  factor = _field(reader, f"{arch}.rope.scaling.factor", path, None)
  if kind is None and _field(reader, f"{arch}.rope.scale_linear", path, None) is not None:
    kind, factor = "linear", _field(reader, f"{arch}.rope.scale_linear", path)  # older files
  original_context = _field(reader, f"{arch}.rope.scaling.original_context_length", path, None)
  has_freqs = ROPE_FREQS in tensors

  if kind not in (None, "none", "linear"):
    raise ValueError(
        f"GGUF file {path}: RoPE scaling type {kind!r} is not supported "
        "(supported: linear, and llama3 via a rope_freqs tensor)")
  if kind == "linear":
    if has_freqs:
      raise ValueError(
          f"GGUF file {path} has both linear RoPE scaling and a {ROPE_FREQS} tensor")
    factor = _float(factor if factor is not None else 1.0)
    return None if factor == 1.0 else RopeScaling(type="linear", factor=factor)
  if not has_freqs:
    return None
  freq_factors = gguf_tensors.dequantize(tensors[ROPE_FREQS], path).reshape(-1)
  if freq_factors.shape != (head_dim // 2,):
    raise ValueError(
        f"GGUF file {path}: {ROPE_FREQS} has {freq_factors.size} entries, expected "
        f"head_dim / 2 = {head_dim // 2}")
  return _infer_llama3_scaling(
      freq_factors, theta, head_dim,
      int(original_context) if original_context else _LLAMA3_ORIGINAL_CONTEXT, path)


def llama3_freq_factors(scaling: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
  """What llama.cpp stores as `rope_freqs.weight` for llama3 scaling.

  Each entry divides one RoPE inverse frequency: 1 for short wavelengths, `factor`
  for long ones, and a smooth blend in between. This mirrors the rule Hugging Face
  and llama.cpp's converter both implement.
  """
  inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  wavelen = 2 * math.pi / inv_freq
  ctx = scaling.original_max_position_embeddings
  low, high = scaling.low_freq_factor, scaling.high_freq_factor
  smooth = (ctx / wavelen - low) / (high - low)
  blended = 1.0 / ((1.0 - smooth) / scaling.factor + smooth)
  return np.where(wavelen < ctx / high, 1.0,
                  np.where(wavelen > ctx / low, scaling.factor, blended))


def _infer_llama3_scaling(freq_factors: np.ndarray, theta: float, head_dim: int,
                          original_context: int, path: str) -> RopeScaling | None:
  """A llama3 `RopeScaling` whose divisors match `freq_factors`.

  The divisors only pin down `factor` (the largest divisor) and the two wavelength
  bounds `original_context / low_freq_factor` and `original_context /
  high_freq_factor`: the blend `s = (ctx / wavelen - low) / (high - low)` is linear
  in the inverse frequency, so two or more blended entries give its line, and the
  line's zero and one crossings give the bounds. The original context itself is
  not recoverable; it is taken from `rope.scaling.original_context_length` when
  the file has it, else 8192 (Llama 3.1's and 3.2's value), and any choice
  gives the same frequencies. With fewer than two blended entries the bounds are
  underdetermined, and Llama 3's defaults (1, 4) are tried. Either way the result
  is checked by recomputing the divisors; a mismatch raises instead of guessing.
  """
  freq_factors = freq_factors.astype(np.float64)
  if np.allclose(freq_factors, 1.0, rtol=0, atol=1e-6):
    return None
  factor = float(freq_factors.max())
  inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  blended = (freq_factors > 1 + 1e-6) & (freq_factors < factor * (1 - 1e-6))
  low, high = _LLAMA3_DEFAULT_LOW_FREQ_FACTOR, _LLAMA3_DEFAULT_HIGH_FREQ_FACTOR
  if blended.sum() >= 2:
    # 1 / divisor = (1 - s) / factor + s  =>  s = (1 / divisor - 1 / factor) / (1 - 1 / factor)
    s = (1.0 / freq_factors[blended] - 1.0 / factor) / (1.0 - 1.0 / factor)
    slope, intercept = np.polyfit(inv_freq[blended] / (2 * math.pi), s, 1)
    # s = (ctx / wavelen - low) / (high - low) = ctx * (inv_freq / 2pi) / (high - low) - ...
    span = original_context / slope  # high - low
    low = -intercept * span
    high = low + span

  def sig(x: float) -> float:  # drops float32 noise from the fit: 0.9999999 -> 1.0
    return float(f"{x:.6g}")

  scaling = RopeScaling(type="llama3", factor=sig(factor), low_freq_factor=sig(low),
                        high_freq_factor=sig(high),
                        original_max_position_embeddings=original_context)
  if not (0 < low < high) or not np.allclose(
      llama3_freq_factors(scaling, theta, head_dim), freq_factors, rtol=1e-4, atol=1e-5):
    raise ValueError(
        f"GGUF file {path}: {ROPE_FREQS} {np.round(freq_factors, 4).tolist()} does not "
        "follow llama3 RoPE scaling; no supported scaling reproduces it")
  return scaling
