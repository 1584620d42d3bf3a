"""Weight quantization with Qwix: int8 and int4 weight-only, fp8 (e4m3).

A quantized model keeps the canonical parameter tree (model/params.py) with one
change: each per-layer projection (`q k v o gate up down`, all [in, out]) is a
`qwix.QArray` instead of an array: `qvalue` [in, out] in the quantized dtype and
`scale` with one entry per output channel and block of g input rows (int8, int4)
or per output channel (fp8):

  mode  qvalue         scale, minimum          use in a matmul (see `einsum`)
  int8  int8           [in/32, out] float32    weight-only (dequantized into
                                               the einsum), affine blocks of 32
  int4  int4           [in/32, out] float16    the same, 4 bits (GGUF Q4_1's
                                               layout: 5 bits a weight in all)
  fp8   float8_e4m3fn  [1, out] float32        W8A8 where the device has fp8
                       (no minimum)            matrix units (compute capability
                                               >= 8.9: the activations are
                                               quantized per token and the
                                               matmul runs in fp8); weight-only
                                               elsewhere

int8 and int4 are affine with a float block minimum (`BlockQArray`): a block's
lowest value is stored as it is and its range spans 2^bits levels,
w = (qvalue - qmin) * scale + minimum, as GGUF's Q4_1 does. Qwix's own
asymmetric arrays have an integer zero point, which cannot hold a float minimum
(it is rounded to the grid), so the minimum is a field of our own and its
contribution to a matmul, the block sums of the activations times the per-block
offsets, is a second matmul 1/32 the size of the first (`einsum`).

Why affine blocks of 32, measured on the default model (SmolLM2-135M, weights
from its Q4_1 GGUF, so each block of 32 inputs holds at most 16 distinct values
on a grid of its own): symmetric int8 in blocks of 128/64 (the previous layout)
kept 9 of 20 greedy 32-token continuations identical to float32, per-channel int8
4 of 10 16-token ones, and a simulation of symmetric blocks of 64 at 10 and 12 bits
kept 17 and 19 of 20, so agreement on this model needs ~12-bit accuracy
(docs/quantization.md). Affine blocks of 32 aligned with the file's blocks hold
its grid exactly in 4 bits and to ~4e-8 of the largest weight in 8 bits: 20 of
20. On weights without such a grid (random Gaussian, tests/test_quant.py) the
affine blocks of 32 err less than symmetric blocks of 64 as well (0.46% rms
against 0.59% for int8: a smaller block, and 2^bits levels over [min, max]
instead of 2^bits - 1 over [-absmax, absmax]), for 0.19-0.22 more bytes a
weight than symmetric int8 blocks of 64-128 (int4: 0.625 bytes, less than the
0.64 of int4 with an integer zero point and a float32 scale). fp8
keeps one scale per channel (its exponent handles the spread within a row:
blocks of 32 only went from 0.0163 to 0.0141 nats/token), as W8A8 wants.

The embedding table, the LM head, norms and biases stay in float: every
weight-only recipe we know of (vLLM fp8, llm-compressor, AWQ/GPTQ exports)
leaves them so, because the LM head is the most sensitive matmul and the
embedding is a gather, not a matmul. The config records the mode
(`ModelConfig.quantization`), so a checkpoint knows its layout.

Qwix provides the arrays (`qwix.quantize`, `QArray`), the rounding (minmax
calibration of each block, shifted to start at zero), the dequantization and the
quantized einsum (`qwix.einsum`: for a float activation against a QArray it
dequantizes the weight into the matmul, which XLA fuses; for two QArrays it runs
`dot_general` in the quantized dtype and applies both scales to the output).
Where Qwix falls short here, and what this module does instead:
  - `qwix.quantize_model` (the PTQ provider) works by intercepting the einsums of
    a module traced with sample inputs, and stores its weights in its own
    wrapper types: that does not fit a canonical tree that checkpoints,
    converters and sharding rules all name tensor by tensor, so the weights are
    quantized here explicitly with `qwix.quantize` and used through
    `qwix.einsum` at the model's weight-use points.
  - An integer zero point only (above): the float minimum is `BlockQArray`'s.
  - No knowledge of pre-quantized foreign layouts: an HF fp8 checkpoint's
    `weight_scale` (per tensor or per channel) is turned into a QArray here
    (`from_prequantized`); GGUF's Q8_0, Q4_0 and Q4_1 blocks of 32 along the
    input are `BlockQArray`s exactly (model/convert/gguf.py).
  - Sub-channel blocks smaller than 128 along the contraction make qwix dequantize
    the weight before the matmul (its MIN_TILE_SIZE_TO_DEQUANT_ON_OUTPUT), which is
    what a weight-only matmul does anyway.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from jax.sharding import NamedSharding

# The layout (what is quantized, as what, stored and sharded how), re-exported:
# callers name every quantization thing `quant.X`.
from ridgeline.model.quant_layout import (
    BLOCK, MODES, QTYPES, QUANTIZED, SCALE_DTYPES, STORED_FIELDS, BlockQArray, QArray,
    block_size, check_mode, from_storage, is_quantized_name, leaf_sharding, nbytes,
    scale_shape, storage_shardings, stored_dtype, stored_layout, to_storage, tree_shardings)

__all__ = ["BLOCK", "MODES", "QTYPES", "QUANTIZED", "SCALE_DTYPES", "STORED_FIELDS",
           "BlockQArray", "QArray", "block_size", "check_mode", "from_storage",
           "is_quantized_name", "leaf_sharding", "nbytes", "scale_shape", "storage_shardings",
           "stored_dtype", "stored_layout", "to_storage", "tree_shardings", "quantize_weight",
           "quantize_params", "from_prequantized", "dequantize", "fp8_matrix_units", "einsum"]


# Quantizing ---------------------------------------------------------------------


def quantize_weight(w: Any, mode: str, block: int | None = None) -> QArray:
  """One [in, out] weight (numpy or jax) as a QArray (int8/int4: a BlockQArray),
  computed where `w` lives."""
  w = jnp.asarray(w)
  if w.ndim != 2:
    raise ValueError(f"can only quantize [in, out] weights, got shape {w.shape}")
  return _quantize_fn(mode, block, _out_sharding(w, mode, block))(w)


@functools.lru_cache(maxsize=None)
def _quantize_fn(mode: str, block: int | None, out_shardings):
  scale_dtype = SCALE_DTYPES[mode]

  def fn(w):
    w32 = w.astype(jnp.float32)
    g = block_size(mode, w.shape[0], block)
    if g is None:  # fp8: one scale per output channel
      return qwix.quantize(w32, QTYPES[mode], channelwise_axes=[1],
                           scale_dtype=scale_dtype)
    # Affine blocks: each block shifted to start at zero (its minimum, rounded
    # to the stored dtype, is what is subtracted), then qwix's minmax rounding,
    # whose zero point is then qmin everywhere and is folded away.
    d_in, d_out = w.shape
    minimum = w32.reshape(d_in // g, g, d_out).min(axis=1).astype(scale_dtype)
    shifted = w32 - jnp.repeat(minimum.astype(jnp.float32), g, axis=0)
    q = qwix.quantize(jnp.maximum(shifted, 0.0), QTYPES[mode], channelwise_axes=[1],
                      tiled_axes={0: g}, calibration_method="minmax")
    return BlockQArray(qvalue=q.qvalue, scale=q.scale.astype(scale_dtype), qtype=q.qtype,
                       minimum=minimum)
  return jax.jit(fn, out_shardings=out_shardings)


def _out_sharding(w: jax.Array, mode: str, block: int | None = None):
  sharding = getattr(w, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return None
  scale = leaf_sharding(sharding, scale_shape(mode, w.shape, block))
  if mode == "fp8":
    return QArray(sharding, scale, None, QTYPES[mode])
  return BlockQArray(qvalue=sharding, scale=scale, qtype=QTYPES[mode], minimum=scale)


def quantize_params(params: dict, mode: str, block: int | None = None) -> dict:
  """The canonical tree with every projection quantized (others untouched).

  Each weight is quantized on the devices that hold it and keeps its sharding
  (the scale is sharded like the weight's output axis); the float original is
  dropped from the returned tree, so peak memory is the model plus one tensor."""
  mode = check_mode(mode)
  out = dict(params)
  out["layers"] = []
  for layer in params["layers"]:
    layer = dict(layer)
    for name in QUANTIZED:  # a routed-experts layer has no gate/up/down (they stay float)
      if name in layer and not isinstance(layer[name], QArray):
        layer[name] = quantize_weight(layer[name], mode, block)
    out["layers"].append(layer)
  return out


def from_prequantized(qvalue: np.ndarray, scale: np.ndarray,
                      minimum: np.ndarray | None = None) -> QArray:
  """A QArray from a pre-quantized [in, out] weight and its scale: a scalar or
  [1] (per tensor), [out] (per output channel), or already 2-d [in/g, out]; with
  a block `minimum` shaped like the 2-d scale, a BlockQArray (int8/int4)."""
  # fp8 scales are float32; a BlockQArray's keep the dtype given (SCALE_DTYPES)
  scale = np.asarray(scale, None if minimum is not None else np.float32)
  d_in, d_out = qvalue.shape
  if scale.size == 1:
    scale = np.full((1, d_out), scale.reshape(()), scale.dtype)
  elif scale.ndim == 1 and scale.shape[0] == d_out:
    scale = scale[None, :]
  elif scale.ndim == 2 and scale.shape[1] == d_out and d_in % scale.shape[0] == 0:
    pass
  else:
    raise ValueError(f"scale of shape {scale.shape} does not fit a weight of shape "
                     f"[in={d_in}, out={d_out}]")
  scale = np.ascontiguousarray(scale)
  if minimum is None:
    return QArray(qvalue, scale, None, qvalue.dtype)
  if np.shape(minimum) != scale.shape:
    raise ValueError(f"block minimum of shape {np.shape(minimum)} does not match the "
                     f"scale's {scale.shape}")
  return BlockQArray(qvalue=qvalue, scale=scale, qtype=qvalue.dtype,
                     minimum=np.ascontiguousarray(minimum, scale.dtype))


def dequantize(w: QArray, dtype=jnp.float32) -> jax.Array:
  base = QArray(jnp.asarray(w.qvalue), jnp.asarray(w.scale, dtype), None, w.qtype)
  out = qwix.dequantize(base)
  if isinstance(w, BlockQArray):
    g = w.shape[0] // w.minimum.shape[0]
    out = out + jnp.repeat(w.offset(dtype), g, axis=0)
  return out


# Using a weight -----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def fp8_matrix_units() -> bool:
  """Whether the default device multiplies fp8 matrices natively (NVIDIA compute
  capability 8.9+: Ada, Hopper, Blackwell). Elsewhere fp8 weights are used
  weight-only (upcast into the matmul)."""
  device = jax.devices()[0]
  if device.platform != "gpu":
    return False
  try:
    return float(getattr(device, "compute_capability", "0")) >= 8.9
  except ValueError:
    return False


def einsum(spec: str, x: jax.Array, w: Any, dtype, *, w8a8: bool | None = None) -> jax.Array:
  """`x` (contracting its last axis) times weight `w`, in compute dtype `dtype`.

  `w` a plain array: jnp.einsum after a cast to `dtype`. `w` a QArray: qwix's
  einsum. For fp8 weights on a device with fp8 matrix units (or `w8a8=True`),
  the activations are quantized to e4m3 with one scale per token (dynamic,
  absmax) and the matmul runs in fp8 with float32 accumulation. A BlockQArray
  (int8/int4) adds its offsets: x @ w = qwix.einsum(x, qvalue * scale) +
  (x summed over each block of g inputs) @ offset.
  """
  if not isinstance(w, QArray):
    return jnp.einsum(spec, x, w.astype(dtype))
  if isinstance(w, BlockQArray):
    g = w.shape[0] // w.minimum.shape[0]
    sums = x.reshape(*x.shape[:-1], x.shape[-1] // g, g).sum(-1, dtype=jnp.float32)
    return (qwix.einsum(spec, x, w.base().astype(dtype))
            + jnp.einsum(spec, sums.astype(dtype), w.offset(dtype)))
  if w8a8 is None:
    w8a8 = w.qtype == jnp.float8_e4m3fn and fp8_matrix_units()
  if w8a8:
    xq = qwix.quantize(x, jnp.float8_e4m3fn, channelwise_axes=list(range(x.ndim - 1)),
                       scale_dtype=jnp.float32)
    out = qwix.einsum(spec, xq, w, preferred_element_type=jnp.float32)
    return out.astype(dtype)
  return qwix.einsum(spec, x, w.astype(dtype))
