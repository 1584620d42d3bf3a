"""Weight quantization with Qwix: int8 and int4 weight-only, fp8 (e4m3).

A quantized model keeps the canonical parameter tree (model/params.py) with one
change: each per-layer projection (`q k v o gate up down`, all [in, out]) is a
`qwix.QArray` instead of an array: `qvalue` [in, out] in the quantized dtype and
`scale` (float32) with one entry per output channel and block of g input rows
(int8, int4) or per output channel (fp8):

  mode  qvalue         scale           use in a matmul (see `einsum`)
  int8  int8           [in/g, out]     weight-only (dequantized into the einsum),
                                       sub-channel blocks of g = 128 input rows
                                       (64 or 32 when 128 does not divide:
                                       SmolLM2's hidden size is 576)
  int4  int4           [in/g, out]     the same, 4 bits, asymmetric (an int4
                                       zero point per block too), g = 32
  fp8   float8_e4m3fn  [1, out]        W8A8 where the device has fp8 matrix
                                       units (compute capability >= 8.9: the
                                       activations are quantized per token and
                                       the matmul runs in fp8); weight-only
                                       elsewhere

Why int8 is sub-channel and not per output channel: on the default model
(SmolLM2-135M, weights from its Q4_1 GGUF) per-channel int8 lost 0.0093 nats
per token against float32 on benchmarks/data/alice.txt (512 tokens) and kept
4 of 10 greedy 16-token continuations; blocks of 64 lost 0.0007 (13x less) and
kept 8 of 10, for 6% more bytes (one float32 scale per 64 int8 values). fp8 keeps one scale
per channel (its exponent handles the spread within a row: blocks of 32 only
went from 0.0163 to 0.0141), as W8A8 wants. int4 is asymmetric with blocks of
32 (like GGUF's Q4_1): symmetric blocks of 32 lost 0.254 nats/token on the same
text, asymmetric 0.113 (blocks of 64: 0.165).

The embedding table, the LM head, norms and biases stay in float: every
weight-only recipe we know of (vLLM fp8, llm-compressor, AWQ/GPTQ exports)
leaves them so, because the LM head is the most sensitive matmul and the
embedding is a gather, not a matmul. The config records the mode
(`ModelConfig.quantization`), so a checkpoint knows its layout.

Qwix provides the arrays (`qwix.quantize`, `QArray`), the dequantization and the
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
  - No knowledge of pre-quantized foreign layouts: an HF fp8 checkpoint's
    `weight_scale` (per tensor or per channel) is turned into a QArray here
    (`from_prequantized`); GGUF's Q8_0 blocks of 32 along the input are a
    sub-channel layout Qwix can represent (scale [in/32, out]).
  - Sub-channel blocks smaller than 128 along the contraction make qwix dequantize
    the weight before the matmul (its MIN_TILE_SIZE_TO_DEQUANT_ON_OUTPUT), which is
    what a weight-only matmul does anyway.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from jax.sharding import NamedSharding, PartitionSpec as P

MODES = ("int8", "int4", "fp8")
QTYPES = {"int8": jnp.int8, "int4": jnp.int4, "fp8": jnp.float8_e4m3fn}
# Per-layer [in, out] projections that get quantized.
QUANTIZED = ("q", "k", "v", "o", "gate", "up", "down")
SUB_CHANNEL_BLOCKS = (128, 64, 32)  # preferred sub-channel block sizes along `in`
INT4_BLOCKS = (32, 64, 128)
SCALE_DTYPE = jnp.float32
STORED_FIELDS = ("qvalue", "scale", "zero_point")

QArray = qwix.QArray


def check_mode(mode: str | None, what: str = "quantize") -> str | None:
  """Validates a quantization mode name (None: no quantization)."""
  if mode is None or mode == "" or mode == "none":
    return None
  if mode not in MODES:
    raise ValueError(f"{what}={mode!r} is not a quantization mode; allowed: "
                     f"{', '.join(MODES)} (or none)")
  return mode


def is_quantized_name(name: str) -> bool:
  """Whether canonical tensor `name` ("layers.3.q") is quantized in a quantized model."""
  parts = name.split(".")
  return len(parts) == 3 and parts[0] == "layers" and parts[2] in QUANTIZED


def sub_channel_block(in_dim: int, blocks=None) -> int:
  for g in blocks or SUB_CHANNEL_BLOCKS:
    if in_dim % g == 0:
      return g
  raise ValueError(f"int8/int4 need an input size divisible by one of {SUB_CHANNEL_BLOCKS}, "
                   f"got {in_dim}")


def block_size(mode: str, d_in: int, block: int | None = None) -> int | None:
  """Input rows per scale (None: one scale per output channel)."""
  if block is not None:
    if d_in % block:
      raise ValueError(f"quantization block {block} does not divide the input size {d_in}")
    return block
  if mode == "int4":
    return sub_channel_block(d_in, INT4_BLOCKS)
  return sub_channel_block(d_in) if mode == "int8" else None


def scale_shape(mode: str, shape: tuple[int, int], block: int | None = None) -> tuple[int, int]:
  """The scale shape of a quantized [in, out] weight."""
  d_in, d_out = shape
  g = block_size(mode, d_in, block)
  return (1, d_out) if g is None else (d_in // g, d_out)


def stored_dtype(mode: str) -> np.dtype:
  return jnp.dtype(QTYPES[mode])


# Quantizing ---------------------------------------------------------------------


def quantize_weight(w: Any, mode: str, block: int | None = None) -> QArray:
  """One [in, out] weight (numpy or jax) as a QArray, computed where `w` lives."""
  w = jnp.asarray(w)
  if w.ndim != 2:
    raise ValueError(f"can only quantize [in, out] weights, got shape {w.shape}")
  return _quantize_fn(mode, block, _out_sharding(w, mode, block))(w)


@functools.lru_cache(maxsize=None)
def _quantize_fn(mode: str, block: int | None, out_shardings):
  def fn(w):
    w32 = w.astype(jnp.float32)
    g = block_size(mode, w.shape[0], block)
    tiled = None if g is None else {0: g}
    # int4 is asymmetric (an int4 zero point per block, qwix's minmax
    # calibration): see the module docstring for the measurement.
    method = "minmax" if mode == "int4" else "absmax"
    return qwix.quantize(w32, QTYPES[mode], channelwise_axes=[1], tiled_axes=tiled,
                         calibration_method=method, scale_dtype=SCALE_DTYPE)
  return jax.jit(fn, out_shardings=out_shardings)


def _out_sharding(w: jax.Array, mode: str, block: int | None = None):
  sharding = getattr(w, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return None
  scale = leaf_sharding(sharding, scale_shape(mode, w.shape, block))
  return QArray(sharding, scale, scale if mode == "int4" else None, QTYPES[mode])


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
                      zero_point: np.ndarray | None = None) -> QArray:
  """A QArray from a pre-quantized [in, out] weight and its scale: a scalar or
  [1] (per tensor), [out] (per output channel), or already 2-d [in/g, out]."""
  scale = np.asarray(scale, np.float32)
  d_in, d_out = qvalue.shape
  if scale.size == 1:
    scale = np.full((1, d_out), scale.reshape(()), np.float32)
  elif scale.ndim == 1 and scale.shape[0] == d_out:
    scale = scale[None, :]
  elif scale.ndim == 2 and scale.shape[1] == d_out and d_in % scale.shape[0] == 0:
    pass
  else:
    raise ValueError(f"scale of shape {scale.shape} does not fit a weight of shape "
                     f"[in={d_in}, out={d_out}]")
  return QArray(qvalue, np.ascontiguousarray(scale), zero_point, qvalue.dtype)


def dequantize(w: QArray, dtype=jnp.float32) -> jax.Array:
  zp = None if w.zero_point is None else jnp.asarray(w.zero_point)
  return qwix.dequantize(QArray(jnp.asarray(w.qvalue), jnp.asarray(w.scale, dtype),
                                zp, w.qtype))


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
  absmax) and the matmul runs in fp8 with float32 accumulation.
  """
  if not isinstance(w, QArray):
    return jnp.einsum(spec, x, w.astype(dtype))
  if w8a8 is None:
    w8a8 = w.qtype == jnp.float8_e4m3fn and fp8_matrix_units()
  if w8a8:
    xq = qwix.quantize(x, jnp.float8_e4m3fn, channelwise_axes=list(range(x.ndim - 1)),
                       scale_dtype=jnp.float32)
    out = qwix.einsum(spec, xq, w, preferred_element_type=jnp.float32)
    return out.astype(dtype)
  return qwix.einsum(spec, x, w.astype(dtype))


# Shardings and storage ----------------------------------------------------------------


def leaf_sharding(sharding: jax.sharding.Sharding, shape) -> jax.sharding.Sharding:
  """The sharding of a QArray field (qvalue or scale) of a weight sharded as
  `sharding`: the same spec, with the dimensions that do not divide their mesh
  axis (the scale's size-1 or short block axis) replicated."""
  if not isinstance(sharding, NamedSharding):
    return sharding
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  mesh_sizes = dict(zip(sharding.mesh.axis_names, sharding.mesh.devices.shape))
  out = []
  for dim, axis in zip(shape, spec):
    if axis is None:
      out.append(None)
      continue
    names = axis if isinstance(axis, tuple) else (axis,)
    size = math.prod(mesh_sizes[a] for a in names)
    out.append(axis if dim % size == 0 else None)
  return NamedSharding(sharding.mesh, P(*out))


def stored_layout(config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{stored name: (shape, dtype)} of a checkpoint of `config`: a quantized
  weight "layers.0.q" is stored as "layers.0.q.qvalue" and "layers.0.q.scale"."""
  from model import params as params_lib
  shapes = params_lib.flatten(params_lib.param_shapes(config))
  mode = getattr(config, "quantization", None)
  out = {}
  for name, shape in shapes.items():
    if mode and is_quantized_name(name):
      out[name + ".qvalue"] = (tuple(shape), stored_dtype(mode))
      sshape = scale_shape(mode, tuple(shape), config.quantization_block)
      out[name + ".scale"] = (sshape, jnp.dtype(SCALE_DTYPE))
      if mode == "int4":
        out[name + ".zero_point"] = (sshape, stored_dtype(mode))
    else:
      out[name] = (tuple(shape), jnp.dtype(config.param_dtype))
  return out


def to_storage(tree: Any) -> Any:
  """QArray leaves -> {"qvalue", "scale"} dicts (what orbax writes)."""
  if isinstance(tree, QArray):
    out = {"qvalue": tree.qvalue, "scale": tree.scale}
    if tree.zero_point is not None:
      out["zero_point"] = tree.zero_point
    return out
  if isinstance(tree, dict):
    return {k: to_storage(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [to_storage(v) for v in tree]
  return tree


def from_storage(flat: dict[str, Any], config) -> dict[str, Any]:
  """Flat stored names -> flat canonical names with QArray leaves."""
  mode = getattr(config, "quantization", None)
  out = {}
  for name, value in flat.items():
    base, _, field = name.rpartition(".")
    if mode and field in STORED_FIELDS and is_quantized_name(base):
      continue
    out[name] = value
  if mode:
    for name in [n[:-len(".qvalue")] for n in flat if n.endswith(".qvalue")]:
      out[name] = QArray(flat[name + ".qvalue"], flat[name + ".scale"],
                         flat.get(name + ".zero_point"), QTYPES[mode])
  return out


def storage_shardings(shardings: dict[str, Any], layout) -> dict[str, Any]:
  """Flat canonical shardings -> flat stored-name shardings (see `leaf_sharding`)."""
  out = {}
  for name, (shape, _) in layout.items():
    if name in shardings:
      out[name] = shardings[name]
    else:
      base = name.rpartition(".")[0]
      out[name] = leaf_sharding(shardings[base], shape)
  return out


def tree_shardings(params: Any, shardings: Any) -> Any:
  """A shardings tree shaped like `params` (QArray leaves get a QArray of
  shardings), for jax.tree.map over both (e.g. `sharding.place`)."""
  if isinstance(params, QArray):
    zp = (None if params.zero_point is None
          else leaf_sharding(shardings, params.zero_point.shape))
    return QArray(leaf_sharding(shardings, params.qvalue.shape),
                  leaf_sharding(shardings, params.scale.shape), zp, params.qtype)
  if isinstance(params, dict):
    return {k: tree_shardings(v, shardings[k]) for k, v in params.items()}
  if isinstance(params, list):
    return [tree_shardings(v, s) for v, s in zip(params, shardings)]
  return shardings


# Bytes ----------------------------------------------------------------------------


def weight_bytes(config) -> int:
  """Bytes of every stored weight of `config` (int4: half a byte an element)."""
  return sum(_nbytes(shape, dtype) for shape, dtype in stored_layout(config).values())


def _nbytes(shape, dtype) -> int:
  bits = jnp.dtype(dtype).itemsize * 8
  if jnp.dtype(dtype) in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)):
    bits = 4
  return -(-math.prod(shape) * bits // 8)


def nbytes(shape, dtype) -> int:
  return _nbytes(shape, dtype)
