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
   `rope_freqs.weight` tensor, from which model/convert/gguf_config.py recovers
   a `RopeScaling` that reproduces those divisors (and refuses if none does).

This module checks the file's tensor table and drives the conversion; the
metadata's translation is model/convert/gguf_config.py, and reading, unpacking
and re-laying out single tensors is model/convert/gguf_tensors.py.
"""

from __future__ import annotations

import os
import re
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from ridgeline.model import params as params_lib
from ridgeline.model import quant
from ridgeline.model.config import ModelConfig
from ridgeline.model.convert import gguf_tensors
from ridgeline.model.convert.gguf_config import (
    GEMMA_ARCHITECTURES, ROPE_FREQS, SUPPORTED_ARCHITECTURES, architecture, llama3_freq_factors,
    read_config)
from ridgeline.model.convert.gguf_tensors import PERMUTED_QK_ARCHITECTURES
from ridgeline.model.params import Params

# Re-exported: callers (and the tests) name them `gguf.X`.
__all__ = ["SUPPORTED_ARCHITECTURES", "llama3_freq_factors", "load_gguf", "open_gguf"]

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
  arch = architecture(reader, path)
  if dtype is None:
    dtype = _own_dtype(tensors)
  config = read_config(reader, arch, tensors, path, dtype)
  names = _tensor_names(config)
  _check_tensor_set(config, names, tensors, path)

  np_dtype = np.dtype(jnp.dtype(dtype))
  keep = gguf_tensors.GGUF_BLOCKS.get(keep_quantized)
  if keep is not None and not all(
      gguf.GGMLQuantizationType(tensors[g].tensor_type) in keep
      for n, g in names.items() if quant.is_quantized_name(n)):
    keep = None
  flat: dict[str, np.ndarray] = {}
  for name, gguf_name in names.items():
    tensor = tensors[gguf_name]
    if keep is not None and quant.is_quantized_name(name):
      flat[name] = gguf_tensors.blocks_as_qarray(tensor, arch, config, name)
      continue
    w = gguf_tensors.dequantize(tensor, path)  # float32; [out, in] for projections
    leaf = name.rsplit(".", 1)[-1]
    if arch in PERMUTED_QK_ARCHITECTURES and leaf in ("q", "q_bias"):
      w = gguf_tensors.unpermute_rope_rows(w, config.num_heads)
    elif arch in PERMUTED_QK_ARCHITECTURES and leaf in ("k", "k_bias"):
      w = gguf_tensors.unpermute_rope_rows(w, config.num_kv_heads)
    if arch in GEMMA_ARCHITECTURES and leaf.endswith("norm"):
      # llama.cpp's converter stores Gemma's norm weights plus one (its graph
      # multiplies by the weight); our tree keeps transformers' (1 + w) convention.
      w = w - np.float32(1.0)
    flat[name] = gguf_tensors.to_output(w, tensor, np_dtype, transpose=leaf in _TRANSPOSED)
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


def _check_tensor_set(config: ModelConfig, names: dict[str, str], tensors: dict[str, Any],
                      path: str) -> None:
  """Fails before any dequantization if the file's tensor table is not the model.

  Missing tensors are named in GGUF terms (what a user can look for in the file);
  shapes are checked by `params.check` on zero-copy placeholders.
  """
  missing = [f"{g} ({n})" for n, g in names.items() if g not in tensors]
  if missing:
    raise ValueError(f"GGUF file {path} is missing tensors: {', '.join(missing)}")
  known = set(names.values()) | {ROPE_FREQS}
  unknown = sorted(set(tensors) - known, key=_natural_key)
  if unknown:
    raise ValueError(
        f"GGUF file {path} has tensors this converter does not "
        f"understand (they would be dropped): {unknown}")
  shapes = {}
  for name, gguf_name in names.items():
    shape = gguf_tensors.gguf_shape(tensors[gguf_name])
    if name.rsplit(".", 1)[-1] in _TRANSPOSED:
      shape = (*shape[:-2], shape[-1], shape[-2])
    shapes[name] = np.broadcast_to(np.float32(0), shape)  # no memory behind it
  params_lib.check(params_lib.unflatten(shapes, config), config,
                   source=f"tensors in GGUF file {path}")


def _natural_key(name: str) -> list[Any]:
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]

