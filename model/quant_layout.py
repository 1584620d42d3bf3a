"""The quantized layout: which tensors are quantized, as what, and how they are
stored and sharded.

A quantized projection is a `qwix.QArray` (fp8: `qvalue` and a per-channel
`scale`) or a `BlockQArray` (int8, int4: affine blocks of `BLOCK` inputs, with a
float block `minimum` beside the scale); model/quant.py tells why, makes them
and multiplies by them. This module is what the rest of the model floor needs
to know about them without computing anything: the shapes and dtypes a
checkpoint of a quantized config holds (`stored_layout`), the conversion between
QArray leaves and the {"qvalue", "scale", "minimum"} dicts orbax writes
(`to_storage`, `from_storage`), and the sharding of each field, which follows
its weight's where the shape divides (`leaf_sharding`). model/quant.py
re-exports every name, so callers say `quant.X` for all of them.
"""

from __future__ import annotations

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ridgeline.util import ceil_div
from ridgeline.model import params as params_lib

MODES = ("int8", "int4", "fp8")
QTYPES = {"int8": jnp.int8, "int4": jnp.int4, "fp8": jnp.float8_e4m3fn}
# Per-layer [in, out] projections that get quantized.
QUANTIZED = ("q", "k", "v", "o", "gate", "up", "down")
BLOCK = 32  # int8/int4 inputs per block (GGUF's block size)
# The dtype of the scales (and int8/int4 block minimums) as stored and used.
SCALE_DTYPES = {"int8": jnp.float32, "int4": jnp.float16, "fp8": jnp.float32}
STORED_FIELDS = ("qvalue", "scale", "minimum")

QArray = qwix.QArray


@flax.struct.dataclass
class BlockQArray(QArray):
  """An affine int8/int4 weight: a QArray (`qvalue`, per-block `scale`, no zero
  point) plus each block's float `minimum` [in/g, out]:
  w = (qvalue - qmin) * scale + minimum, qmin the qtype's lowest integer."""
  minimum: jax.Array | None = None

  def offset(self, dtype=jnp.float32) -> jax.Array:
    """What a zero `qvalue` stands for in each block: minimum - qmin * scale."""
    qmin = float(jnp.iinfo(self.qtype).min)
    return self.minimum.astype(dtype) - qmin * self.scale.astype(dtype)

  def base(self) -> QArray:
    """The symmetric part qvalue * scale, as a plain QArray (what qwix multiplies)."""
    return QArray(self.qvalue, self.scale, None, self.qtype)


nnx.register_data_type(BlockQArray)


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


def sub_channel_block(in_dim: int) -> int:
  if in_dim % BLOCK:
    raise ValueError(f"int8/int4 need input sizes divisible by {BLOCK}, got {in_dim}")
  return BLOCK


def block_size(mode: str, d_in: int, block: int | None = None) -> int | None:
  """Input rows per scale (None: one scale per output channel)."""
  if block is not None:
    if d_in % block:
      raise ValueError(f"quantization block {block} does not divide the input size {d_in}")
    return block
  return None if mode == "fp8" else sub_channel_block(d_in)


def scale_shape(mode: str, shape: tuple[int, int], block: int | None = None) -> tuple[int, int]:
  """The scale shape of a quantized [in, out] weight."""
  d_in, d_out = shape
  g = block_size(mode, d_in, block)
  return (1, d_out) if g is None else (d_in // g, d_out)


def stored_dtype(mode: str) -> np.dtype:
  return jnp.dtype(QTYPES[mode])


# Storage and shardings ----------------------------------------------------------------


def leaf_sharding(sharding: jax.sharding.Sharding, shape) -> jax.sharding.Sharding:
  """The sharding of a QArray field (qvalue, scale, minimum) of a weight sharded as
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
  weight "layers.0.q" is stored as "layers.0.q.qvalue", "layers.0.q.scale" and
  (int8, int4) "layers.0.q.minimum"."""
  shapes = params_lib.flatten(params_lib.param_shapes(config))
  mode = getattr(config, "quantization", None)
  out = {}
  for name, shape in shapes.items():
    if mode and is_quantized_name(name):
      out[name + ".qvalue"] = (tuple(shape), stored_dtype(mode))
      sshape = scale_shape(mode, tuple(shape), config.quantization_block)
      out[name + ".scale"] = (sshape, jnp.dtype(SCALE_DTYPES[mode]))
      if mode != "fp8":
        out[name + ".minimum"] = (sshape, jnp.dtype(SCALE_DTYPES[mode]))
    else:
      out[name] = (tuple(shape), jnp.dtype(config.param_dtype))
  return out


def to_storage(tree: Any) -> Any:
  """QArray leaves -> {"qvalue", "scale"[, "minimum"]} dicts (what orbax writes)."""
  if isinstance(tree, QArray):
    out = {"qvalue": tree.qvalue, "scale": tree.scale}
    if isinstance(tree, BlockQArray):
      out["minimum"] = tree.minimum
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
      if name + ".minimum" in flat:
        out[name] = BlockQArray(qvalue=flat[name + ".qvalue"], scale=flat[name + ".scale"],
                                qtype=QTYPES[mode], minimum=flat[name + ".minimum"])
      else:
        out[name] = QArray(flat[name + ".qvalue"], flat[name + ".scale"], None, QTYPES[mode])
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
    return jax.tree.map(lambda leaf: leaf_sharding(shardings, leaf.shape), params)
  if isinstance(params, dict):
    return {k: tree_shardings(v, shardings[k]) for k, v in params.items()}
  if isinstance(params, list):
    return [tree_shardings(v, s) for v, s in zip(params, shardings)]
  return shardings


def nbytes(shape, dtype) -> int:
  """Bytes of a stored tensor (int4: half a byte an element, rounded up)."""
  bits = jnp.dtype(dtype).itemsize * 8
  if jnp.dtype(dtype) in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)):
    bits = 4
  return ceil_div(math.prod(shape) * bits, 8)
