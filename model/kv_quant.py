"""An 8-bit KV cache: int8 or fp8 (e4m3) pages with one scale per (slot, KV head).

A quantized page pool is a `qwix.QArray`: `qvalue` [P, S, K, Dh] int8 or
float8_e4m3fn and `scale` [P, S, K, 1] bfloat16 (absmax of the head's Dh values
over the dtype's largest value). It is a pytree like the float pool, so
donation and sharding constraints (the scale is split by KV head like the
values) work unchanged.

Why per (slot, head) and bfloat16 scales: a token's K/V is written once, when the
token is computed, so its scale can only depend on that token (a per-page scale
would have to rescale earlier tokens of the page); and bf16 scales cost 2 bytes
per 64-128 values, so a token takes Dh + 2 bytes per head instead of 2*Dh (bf16)
or 4*Dh (float32): 1.94x the tokens of a bf16 pool at Dh = 64, 1.97x at 128
(a float32 scale would give only 1.88x at Dh = 64). Rounding the scale to bf16
costs no accuracy: the values are quantized against the rounded scale.

Only three functions touch the layout: `init_pool` (zeros), `store` (new K/V
quantized per token and head, then scattered as values and scales by the caller's
scatter) and `load` (gathered pages dequantized to the compute dtype: XLA fuses
the multiply into the gather).

An int8 pool holds each head's keys and values rotated by an orthonormal
Hadamard matrix R (`rotation`; head sizes that are powers of two): a few
channels of a key carry most of its magnitude (RoPE pairs, outlier features), and
one absmax scale per head spends int8's 255 levels on them; rotated, every
channel carries a mix, the absmax falls toward the rms and the rounding error
with it. Attention is unchanged by it: q.k = (qR).(kR), and the output
sum p v = (sum p vR) R^T, so the model rotates q, k and v after RoPE and
rotates the attention output back (R is symmetric: R^T = R), four [Dh, Dh]
products a token and layer (~3% of a SmolLM2 layer's FLOPs); the XLA path and
the Pallas kernel read the rotated pages as they are. Measured on the default
model (20 prompts x 32 greedy tokens, scripts/quant_bench.py): int8 KV kept 14
identical continuations unrotated, 18 rotated. e4m3's error is relative to
each element, so rotating does not help fp8 (9 of 20 either way) and fp8 pools
are stored unrotated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import qwix
import scipy.linalg

QArray = qwix.QArray

KV_QTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn,
             "float8_e4m3fn": jnp.float8_e4m3fn}
SCALE_DTYPE = jnp.bfloat16


def qtype(kv_dtype) -> jnp.dtype | None:
  """The quantized dtype a kv_dtype names ("int8", "fp8"), or None for a float cache."""
  if kv_dtype is None:
    return None
  if isinstance(kv_dtype, str) and kv_dtype in KV_QTYPES:
    return jnp.dtype(KV_QTYPES[kv_dtype])
  dt = jnp.dtype(kv_dtype)
  if dt in (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn)):
    return dt
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"kv_dtype {kv_dtype!r} is not supported; allowed: a float dtype, "
                     f"{', '.join(sorted(KV_QTYPES))}")
  return None


def is_quantized(pool) -> bool:
  return isinstance(pool, QArray)


def rotation(pool, head_dim: int) -> np.ndarray | None:
  """The orthonormal, symmetric [Dh, Dh] Hadamard matrix an int8 pool's heads are
  stored rotated by (see the module docstring), or None (a float or fp8 pool, or
  a head size that is not a power of two)."""
  if not is_quantized(pool) or pool.qtype != jnp.dtype(jnp.int8) or head_dim & (head_dim - 1):
    return None
  return _hadamard(head_dim)


@functools.lru_cache(maxsize=None)
def _hadamard(n: int) -> np.ndarray:
  return (scipy.linalg.hadamard(n) / np.sqrt(n)).astype(np.float32)


def rotate(x: jax.Array, r: np.ndarray) -> jax.Array:
  """x [..., Dh] times `rotation`'s matrix, in float32 (its own inverse)."""
  return jnp.einsum("...d,de->...e", x.astype(jnp.float32), r).astype(x.dtype)


def bytes_per_head_token(head_dim: int, kv_dtype, compute_dtype) -> int:
  """Bytes one token's K (or V) of one KV head occupies in the pool."""
  q = qtype(kv_dtype)
  if q is not None:
    return head_dim * q.itemsize + jnp.dtype(SCALE_DTYPE).itemsize
  return head_dim * jnp.dtype(kv_dtype or compute_dtype).itemsize


def init_pool(shape: tuple[int, int, int, int], kv_dtype, sharding=None):
  """A zeroed pool [P, S, K, Dh]: a QArray for an 8-bit kv_dtype, else an array."""
  q = qtype(kv_dtype)
  if q is None:
    return jax.jit(lambda: jnp.zeros(shape, jnp.dtype(kv_dtype)), out_shardings=sharding)()
  scale_shape = shape[:3] + (1,)
  make = jax.jit(lambda: (jnp.zeros(shape, q), jnp.zeros(scale_shape, SCALE_DTYPE)),
                 out_shardings=None if sharding is None else (sharding, sharding))
  values, scales = make()
  return QArray(values, scales, None, q)


def store(new: jax.Array, pool: QArray) -> QArray:
  """New keys or values [N, K, Dh] quantized for `pool`: one scale per (token, head)."""
  x = new.astype(jnp.float32)
  # qwix calibrates (absmax / the dtype's largest value, per token and head); the
  # values are then quantized against the bf16-rounded scale they will be read
  # with, so rounding the scale adds no error (qwix would quantize against the
  # float32 scale and round it afterwards).
  scale = qwix.quantize(x, pool.qtype, channelwise_axes=list(range(x.ndim - 1)),
                        scale_dtype=jnp.float32).scale.astype(SCALE_DTYPE)
  scaled = x / scale.astype(jnp.float32)
  if pool.qtype == jnp.dtype(jnp.int8):
    values = jnp.clip(jnp.round(scaled), -127, 127).astype(jnp.int8)
  else:
    top = float(jnp.finfo(pool.qtype).max)
    values = jnp.clip(scaled, -top, top).astype(pool.qtype)
  return QArray(values, scale, None, pool.qtype)


def load(pool, index: jax.Array, dtype) -> jax.Array:
  """pool[index] as a float array of `dtype` (index: the block tables [B, NB])."""
  if not is_quantized(pool):
    return pool[index]
  return qwix.dequantize(QArray(pool.qvalue[index], pool.scale[index].astype(dtype),
                                None, pool.qtype))
