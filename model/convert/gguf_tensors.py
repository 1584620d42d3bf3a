"""GGUF tensors -> numpy arrays in our layout (model/convert/gguf.py's weights).

A GGUF tensor lists its dimensions fastest-first (`ne[0]` is the row length), so
its numpy shape is `ne` reversed (`gguf_shape`), and a linear weight comes out
[out, in] like torch's `nn.Linear.weight`; `to_output` transposes projections to
our [in, out] and casts, in one copy. `dequantize` turns every block format the
`gguf` package knows into float32; `blocks_as_qarray` instead keeps a Q8_0,
Q4_0 or Q4_1 projection's own values, scales and minimums as a
`quant.BlockQArray` (exact: no float round trip). `unpermute_rope_rows` undoes
the q/k row interleave llama.cpp's converter applies to `llama` files
(`PERMUTED_QK_ARCHITECTURES`; see model/convert/gguf.py).
"""

from __future__ import annotations

from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from ridgeline.model import quant
from ridgeline.model.config import ModelConfig

# Architectures whose q/k rows llama.cpp's converter interleaves for its GPT-J style
# rotation (see the module docstring); the others keep Hugging Face's order.
PERMUTED_QK_ARCHITECTURES = ("llama",)

def gguf_shape(tensor: Any) -> tuple[int, ...]:
  """The numpy (row-major) shape of a GGUF tensor: its `ne` list reversed."""
  return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def dequantize(tensor: Any, path: str) -> np.ndarray:
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
  shape = gguf_shape(tensor)
  if w.shape != shape:
    w = w.reshape(shape)
  return w


_Q = gguf.GGMLQuantizationType


GGUF_BLOCKS = {"int8": (_Q.Q8_0,), "int4": (_Q.Q4_0, _Q.Q4_1)}


def blocks_as_qarray(tensor: Any, arch: str, config: ModelConfig, name: str):
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
  if arch in PERMUTED_QK_ARCHITECTURES and leaf in ("q", "k"):
    heads = config.num_heads if leaf == "q" else config.num_kv_heads
    q, d, minimum = (unpermute_rope_rows(a, heads) for a in (q, d, minimum))
  return quant.from_prequantized(np.ascontiguousarray(q.T).astype(dtype),
                                 np.ascontiguousarray(d.T).astype(scale_dtype),
                                 np.ascontiguousarray(minimum.T).astype(scale_dtype))


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverts llama.cpp's q/k row interleave: GPT-J pairs back to rotate-half halves.

  The converter wrote, per head, rows (0, d/2, 1, d/2+1, ...) so that llama.cpp's
  adjacent-pair rotation matches the rotate-half checkpoint:
  `w.reshape(n_heads, 2, d // 2, ...).swapaxes(1, 2)`. Swapping the same two axes
  of the (n_heads, d // 2, 2, ...) view puts the halves back.
  """
  rows = w.shape[0]
  half = rows // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_output(w: np.ndarray, tensor: Any, dtype: np.dtype, transpose: bool) -> np.ndarray:
  """Final layout and dtype, as one C-contiguous array that owns its memory.

  F32 tensors dequantize to views of the read-only memory map; those are copied so
  the tree neither keeps the file mapped nor is read-only. Everything else is
  already a fresh array, and the transpose and cast happen in the one copy.
  """
  if transpose:
    w = np.swapaxes(w, -1, -2)  # [out, in] -> [in, out], per expert for 3-D tensors
  must_copy = np.may_share_memory(w, tensor.data)
  return np.array(w, dtype=dtype, order="C", copy=True if must_copy else None)
