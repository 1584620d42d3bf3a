"""GGUF (llama.cpp) files -> a `ModelConfig` and the canonical parameter tree.

A GGUF file carries the model's hyperparameters as metadata and its weights as
(possibly quantized) tensors. `load_gguf` reads both with the `gguf` package, whose
`GGUFReader` memory-maps the file and whose `gguf.quants.dequantize` turns every
block format it knows (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, the K-quants, the
IQ formats, ...) back into float32. Tensors are converted one at a time, so the peak
host memory is the finished tree plus one tensor in flight, never a second copy of
the file.

Three things differ between llama.cpp's layout and ours (see `model/params.py`):

1. Shapes. GGUF lists dimensions fastest-first (`ne[0]` is the row length), so a
   linear weight dequantizes to the numpy shape [out, in], like torch's
   `nn.Linear.weight`. Our tree stores projections [in, out] (`x @ w`), so every
   projection is transposed. The embedding is [vocab, hidden] in both.
2. RoPE row order. llama.cpp's `convert_hf_to_gguf.py` permutes the rows of q and k
   (weights and biases) for the `llama` architecture, because llama.cpp's llama
   graph applies the interleaved (GPT-J) rotation while Hugging Face checkpoints use
   rotate-half. We use rotate-half, so the permutation is undone here. Its `qwen2`
   converter (`Qwen2Model`, a plain `TextModel`) does not permute, and llama.cpp
   runs qwen2 with the rotate-half ("NEOX") rotation, so qwen2 rows are taken as
   they are. Hugging Face's own GGUF loader agrees: it reverses the permutation for
   `llama` only.
3. Llama 3 RoPE scaling. llama.cpp does not store the llama3 scaling parameters as
   metadata; it stores their effect, the per-frequency divisors, as a
   `rope_freqs.weight` tensor. `_infer_llama3_scaling` recovers a `RopeScaling`
   that reproduces those divisors (and refuses if none does).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from ridgeline.model import params as params_lib
from ridgeline.model import quant
from ridgeline.model.config import ModelConfig, RopeScaling
from ridgeline.model.params import Params

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3")
_GEMMA = ("gemma2", "gemma3")
# llama.cpp's graph for these routes every layer through experts when the file has
# them (Mixtral is "llama" with expert tensors); Qwen3-MoE renormalises the top k.
_MOE_ARCHITECTURES = ("llama", "qwen3moe")

# Architectures whose q/k rows llama.cpp's converter interleaves for its GPT-J style
# rotation (see the module docstring); the others keep Hugging Face's order.
_PERMUTED_QK_ARCHITECTURES = ("llama",)

# Canonical name -> GGUF name. Layer names are formatted with the block index.
_GLOBAL_TENSORS = {
    "embed": "token_embd.weight",
    "final_norm": "output_norm.weight",
    "lm_head": "output.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "blk.{}.attn_norm.weight",
    "q": "blk.{}.attn_q.weight",
    "k": "blk.{}.attn_k.weight",
    "v": "blk.{}.attn_v.weight",
    "q_bias": "blk.{}.attn_q.bias",
    "k_bias": "blk.{}.attn_k.bias",
    "v_bias": "blk.{}.attn_v.bias",
    "o": "blk.{}.attn_output.weight",
    "mlp_norm": "blk.{}.ffn_norm.weight",  # Gemma's pre-feedforward norm too
    "gate": "blk.{}.ffn_gate.weight",
    "up": "blk.{}.ffn_up.weight",
    "down": "blk.{}.ffn_down.weight",
    "q_norm": "blk.{}.attn_q_norm.weight",
    "k_norm": "blk.{}.attn_k_norm.weight",
    "post_attn_norm": "blk.{}.post_attention_norm.weight",
    "post_mlp_norm": "blk.{}.post_ffw_norm.weight",
    "router": "blk.{}.ffn_gate_inp.weight",
    "experts_gate": "blk.{}.ffn_gate_exps.weight",
    "experts_up": "blk.{}.ffn_up_exps.weight",
    "experts_down": "blk.{}.ffn_down_exps.weight",
}
# Stored [out, in] in GGUF, [in, out] in our tree (experts: [E, out, in] -> [E, in, out]).
_TRANSPOSED = frozenset({"q", "k", "v", "o", "gate", "up", "down", "lm_head", "router",
                         "experts_gate", "experts_up", "experts_down"})
# Tensors that describe the model rather than hold weights; read into the config.
_ROPE_FREQS = "rope_freqs.weight"

# llama.cpp's default for the llama3 original context when the file does not say.
_LLAMA3_ORIGINAL_CONTEXT = 8192
_LLAMA3_DEFAULT_LOW_FREQ_FACTOR = 1.0
_LLAMA3_DEFAULT_HIGH_FREQ_FACTOR = 4.0

_MISSING = object()


def load_gguf(path: str | os.PathLike, dtype: str | None = None,
              keep_quantized: str | None = None, reader: gguf.GGUFReader | None = None
              ) -> tuple[ModelConfig, Params]:
  """Reads a llama/qwen2 GGUF file into (config, canonical numpy parameter tree).

  Args:
    path: the `.gguf` file (a single file; split files are not supported).
    dtype: numpy/JAX dtype name of the returned arrays ("float32", "bfloat16", ...);
      also the config's param and compute dtype. None: the file's own (bfloat16 or
      float16 when every matrix is stored so, else float32, the exact value of
      every quantized format). Quantized tensors are dequantized
      to float32 first, then cast, so the cast is the only rounding added.

  Returns:
    The `ModelConfig` built from the file's metadata and the tree described in
    `model/params.py`, with `q`/`k` in Hugging Face (rotate-half) row order.

  Raises:
    ValueError: unsupported architecture or RoPE scaling, tensors missing or of the
      wrong shape, tensors this converter does not understand, or a tensor type the
      `gguf` package cannot dequantize. Messages name the file and the tensors.

  `keep_quantized`: "int8" or "int4". When every projection of the file is Q8_0
  (for int8) or Q4_0 / Q4_1 (for int4), the projections are returned as
  `quant.BlockQArray`s holding the file's own values, block scales and minimums
  (blocks of 32 inputs, exact: no float round trip) and the config says so.
  Other formats (Q5_*, the K-quants with their nested scales) are dequantized
  as without it (and quantized afterwards if the caller asks).
  """
  path = os.fspath(path)
  reader = reader or open_gguf(path)  # (opening parses the whole vocabulary: ~3 s)
  tensors = {t.name: t for t in reader.tensors}
  arch = _architecture(reader, path)
  if dtype is None:
    dtype = _own_dtype(tensors)
  config = _read_config(reader, arch, tensors, path, dtype)
  names = _tensor_names(config)
  _check_tensor_set(config, names, tensors, path)

  np_dtype = np.dtype(jnp.dtype(dtype))
  keep = _GGUF_BLOCKS.get(keep_quantized)
  if keep is not None and not all(
      gguf.GGMLQuantizationType(tensors[g].tensor_type) in keep
      for n, g in names.items() if quant.is_quantized_name(n)):
    keep = None
  flat: dict[str, np.ndarray] = {}
  for name, gguf_name in names.items():
    tensor = tensors[gguf_name]
    if keep is not None and quant.is_quantized_name(name):
      flat[name] = _blocks_as_qarray(tensor, arch, config, name)
      continue
    w = _dequantize(tensor, path)  # float32; [out, in] for projections
    leaf = name.rsplit(".", 1)[-1]
    if arch in _PERMUTED_QK_ARCHITECTURES and leaf in ("q", "q_bias"):
      w = _unpermute_rope_rows(w, config.num_heads)
    elif arch in _PERMUTED_QK_ARCHITECTURES and leaf in ("k", "k_bias"):
      w = _unpermute_rope_rows(w, config.num_kv_heads)
    if arch in _GEMMA and leaf.endswith("norm"):
      # llama.cpp's converter stores Gemma's norm weights plus one (its graph
      # multiplies by the weight); our tree keeps transformers' (1 + w) convention.
      w = w - np.float32(1.0)
    flat[name] = _to_output(w, tensor, np_dtype, transpose=leaf in _TRANSPOSED)
  if keep is not None:
    config = config.replace(quantization=keep_quantized, quantization_block=32)
  params = params_lib.unflatten(flat, config)
  # Shapes were already checked against the file's tensor table; this guards the
  # conversion itself (a transpose or reshape gone wrong).
  params_lib.check(params, config, source=f"tensors converted from GGUF file {path}")
  return config, params


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
  """gguf's reader (it memory-maps the file; tensors are read on access), with an
  error that names the file: gguf's own says only "GGUF magic invalid"."""
  try:
    return gguf.GGUFReader(os.fspath(path))
  except Exception as e:  # noqa: BLE001 -- ValueError, struct.error, OSError ...
    raise ValueError(f"{os.fspath(path)} is not a readable GGUF file: "
                     f"{type(e).__name__}: {e}") from e


def _own_dtype(tensors: dict[str, Any]) -> str:
  """The dtype a GGUF file's weights are in: bf16/f16 when all its matrices are
  (norms and other vectors are F32 in every llama.cpp file), else float32."""
  kinds = {gguf.GGMLQuantizationType(t.tensor_type) for t in tensors.values()
           if len(t.shape) > 1}
  by_type = {gguf.GGMLQuantizationType.BF16: "bfloat16",
             gguf.GGMLQuantizationType.F16: "float16"}
  if len(kinds) == 1 and next(iter(kinds)) in by_type:
    return by_type[next(iter(kinds))]
  return "float32"


# Metadata -> ModelConfig -------------------------------------------------------------


def _architecture(reader: gguf.GGUFReader, path: str) -> str:
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


def _read_config(reader: gguf.GGUFReader, arch: str, tensors: dict[str, Any], path: str,
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
  if arch in _GEMMA:
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
  has_freqs = _ROPE_FREQS in tensors

  if kind not in (None, "none", "linear"):
    raise ValueError(
        f"GGUF file {path}: RoPE scaling type {kind!r} is not supported "
        "(supported: linear, and llama3 via a rope_freqs tensor)")
  if kind == "linear":
    if has_freqs:
      raise ValueError(
          f"GGUF file {path} has both linear RoPE scaling and a {_ROPE_FREQS} tensor")
    factor = _float(factor if factor is not None else 1.0)
    return None if factor == 1.0 else RopeScaling(type="linear", factor=factor)
  if not has_freqs:
    return None
  freq_factors = _dequantize(tensors[_ROPE_FREQS], path).reshape(-1)
  if freq_factors.shape != (head_dim // 2,):
    raise ValueError(
        f"GGUF file {path}: {_ROPE_FREQS} has {freq_factors.size} entries, expected "
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
        f"GGUF file {path}: {_ROPE_FREQS} {np.round(freq_factors, 4).tolist()} does not "
        "follow llama3 RoPE scaling; no supported scaling reproduces it")
  return scaling


# Tensors ---------------------------------------------------------------------------


def _tensor_names(config: ModelConfig) -> dict[str, str]:
  """Flat canonical name ("layers.3.q") -> GGUF tensor name, for every expected leaf."""
  names = {}
  for name in params_lib.flatten(params_lib.param_shapes(config)):
    parts = name.split(".")
    if parts[0] == "layers":
      names[name] = _LAYER_TENSORS[parts[2]].format(parts[1])
    else:
      names[name] = _GLOBAL_TENSORS[parts[0]]
  return names


def _gguf_shape(tensor: Any) -> tuple[int, ...]:
  """The numpy (row-major) shape of a GGUF tensor: its `ne` list reversed."""
  return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _check_tensor_set(config: ModelConfig, names: dict[str, str], tensors: dict[str, Any],
                      path: str) -> None:
  """Fails before any dequantization if the file's tensor table is not the model.

  Missing tensors are named in GGUF terms (what a user can look for in the file);
  shapes are checked by `params.check` on zero-copy placeholders.
  """
  missing = [f"{g} ({n})" for n, g in names.items() if g not in tensors]
  if missing:
    raise ValueError(f"GGUF file {path} is missing tensors: {', '.join(missing)}")
  known = set(names.values()) | {_ROPE_FREQS}
  unknown = sorted(set(tensors) - known, key=_natural_key)
  if unknown:
    raise ValueError(
        f"GGUF file {path} has tensors this converter does not "
        f"understand (they would be dropped): {unknown}")
  shapes = {}
  for name, gguf_name in names.items():
    shape = _gguf_shape(tensors[gguf_name])
    if name.rsplit(".", 1)[-1] in _TRANSPOSED:
      shape = (*shape[:-2], shape[-1], shape[-2])
    shapes[name] = np.broadcast_to(np.float32(0), shape)  # no memory behind it
  params_lib.check(params_lib.unflatten(shapes, config), config,
                   source=f"tensors in GGUF file {path}")


def _natural_key(name: str) -> list[Any]:
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _dequantize(tensor: Any, path: str) -> np.ndarray:
  """float32 numpy array of `tensor` in row-major shape (GGUF's ne reversed)."""
  qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
  data = tensor.data
  try:
    if data.dtype == np.uint8:  # block-quantized (and BF16): raw bytes per row
      w = gguf.quants.dequantize(data, qtype)
    else:  # F32, F16, F64, I8..I64: the reader already typed the memory map
      w = np.asarray(data).astype(np.float32, copy=False)
  except NotImplementedError as e:
    raise ValueError(
        f"GGUF file {path}: tensor {tensor.name} has type {qtype.name}, which the gguf "
        f"package cannot dequantize ({e})") from e
  shape = _gguf_shape(tensor)
  if w.shape != shape:
    w = w.reshape(shape)
  return w


_Q = gguf.GGMLQuantizationType
_GGUF_BLOCKS = {"int8": (_Q.Q8_0,), "int4": (_Q.Q4_0, _Q.Q4_1)}


def _blocks_as_qarray(tensor: Any, arch: str, config: ModelConfig, name: str):
  """A Q8_0, Q4_0 or Q4_1 projection as a BlockQArray [in, out] with scales and
  minimums [in/32, out]: w = (qvalue - qmin) * scale + minimum.

  Q8_0 block (34 bytes): float16 d, 32 int8 q; w = d * q (minimum -128 d).
  Q4_0 block (18 bytes): float16 d, 16 bytes of nibbles (low nibbles are
  elements 0-15, high 16-31); w = d * (nibble - 8) (minimum -8 d).
  Q4_1 block (20 bytes): float16 d, float16 m, the nibbles; w = d * nibble + m.
  The int4 values are nibble - 8.
  """
  qtype = _Q(tensor.tensor_type)
  rows, row_bytes = tensor.data.shape  # [out, in bytes]
  block_bytes = {_Q.Q8_0: 34, _Q.Q4_0: 18, _Q.Q4_1: 20}[qtype]
  blocks = np.asarray(tensor.data).reshape(rows, row_bytes // block_bytes, block_bytes)
  d = blocks[..., :2].copy().view(np.float16)[..., 0]  # [out, in/32]
  if qtype == _Q.Q8_0:
    q = blocks[..., 2:].copy().view(np.int8)  # [out, in/32, 32]
    minimum, dtype = d.astype(np.float32) * -128, np.int8
  else:
    nibbles = blocks[..., 4 if qtype == _Q.Q4_1 else 2:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.int8) - 8
    minimum, dtype = d * np.float16(-8), jnp.int4
    if qtype == _Q.Q4_1:
      minimum = blocks[..., 2:4].copy().view(np.float16)[..., 0]
  scale_dtype = quant.SCALE_DTYPES["int8" if dtype == np.int8 else "int4"]
  q = q.reshape(rows, -1)  # [out, in]
  leaf = name.rsplit(".", 1)[-1]
  if arch in _PERMUTED_QK_ARCHITECTURES and leaf in ("q", "k"):
    heads = config.num_heads if leaf == "q" else config.num_kv_heads
    q, d, minimum = (_unpermute_rope_rows(a, heads) for a in (q, d, minimum))
  return quant.from_prequantized(np.ascontiguousarray(q.T).astype(dtype),
                                 np.ascontiguousarray(d.T).astype(scale_dtype),
                                 np.ascontiguousarray(minimum.T).astype(scale_dtype))


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverts llama.cpp's q/k row interleave: GPT-J pairs back to rotate-half halves.

  The converter wrote, per head, rows (0, d/2, 1, d/2+1, ...) so that llama.cpp's
  adjacent-pair rotation matches the rotate-half checkpoint:
  `w.reshape(n_heads, 2, d // 2, ...).swapaxes(1, 2)`. Swapping the same two axes
  of the (n_heads, d // 2, 2, ...) view puts the halves back.
  """
  rows = w.shape[0]
  half = rows // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_output(w: np.ndarray, tensor: Any, dtype: np.dtype, transpose: bool) -> np.ndarray:
  """Final layout and dtype, as one C-contiguous array that owns its memory.

  F32 tensors dequantize to views of the read-only memory map; those are copied so
  the tree neither keeps the file mapped nor is read-only. Everything else is
  already a fresh array, and the transpose and cast happen in the one copy.
  """
  if transpose:
    w = np.swapaxes(w, -1, -2)  # [out, in] -> [in, out], per expert for 3-D tensors
  must_copy = np.may_share_memory(w, tensor.data)
  return np.array(w, dtype=dtype, order="C", copy=True if must_copy else None)
