"""Content digests of tensors, computed where their shards live.

A checkpoint's manifest (model/checkpoint.py) records one digest per tensor, so
that bytes corrupted inside orbax's data files, which restore without an error,
are caught and named.

The digest is computed where the bytes are, shard by shard: one single-device
program per distinct shard (replicas skipped), each summing its shard with the
global element indices, and the per-shard sums added on the host (sums mod 2^32
do not care how the tensor was cut). No tensor is ever gathered to one device or
host, so it works for restores into multi-device and multi-host shardings. Cost:
one extra read of every weight at save and at restore (bandwidth-bound:
milliseconds per GB on a GPU; 1-2 s per GB on a 2-core CPU, measured, which is
also what saving host numpy params costs) plus one small compile per distinct
shard shape. `checkpoint.restore(..., verify=False)` skips it.

Why not one jitted reduction over each sharded tensor (what model/checkpoint.py did
first): that is one multi-device program with an all-reduce per tensor, and
dispatching a few hundred of them back to back deadlocks XLA:CPU (issue 16).
Its client runs every device's part of a multi-device program on one thread
pool of max(cores, devices) threads -- 8 for 8 fake devices on a 2-core host --
and launching a program on a device blocks a pool thread while that device has
its maximum of programs in flight (a semaphore). With the real model's 272
tensors on an 8-device mesh, devices 0-6 sat in an all-reduce rendezvous waiting
for device 7's part, and the last free thread was blocked launching device 7's
next program, so device 7's part never got a thread (gdb on a 300-sum
reproducer: 7 pool threads in AllReduceThunk, 1 in Semaphore::ScopedAcquire).
Tiny models (21 tensors of at most 32K elements) never fill the in-flight window,
and meshes of at most 4 devices leave threads free. Single-device programs have
no rendezvous to wait in, so they cannot starve each other, and there is no
launch order that devices have to agree on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NAME = "pwsum32x2"  # what the manifest says the digest is; see `_digest_terms`

_GOLDEN = 0x9E3779B9


def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer: a cheap bijection that mixes all bits."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _digest_terms(x: jax.Array, offsets: jax.Array, strides: jax.Array) -> jax.Array:
  """Two order-independent 32-bit sums over a tensor's bit patterns: uint32[2].

  s1 = sum(bits * (2 * index + 1)) changes whenever any single element changes (an
  odd weight times a nonzero difference is nonzero mod 2^32); s2 sums a hash of
  (bits, index), so multi-element corruption escapes both with probability ~2^-64.
  `index` is the element's flat (row-major) index in the whole tensor: `x` may be
  one shard, starting at `offsets` (uint32[ndim]) in a tensor whose row-major
  strides are `strides` (uint32[ndim], mod 2^32). Integer sums mod 2^32 are exact
  in any order, so the shards' terms add up to the whole tensor's, whatever the
  sharding or the device kind.
  """
  itemsize = x.dtype.itemsize
  if x.dtype in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)):  # itemsize says 1
    bits = jax.lax.bitcast_convert_type(x, jnp.uint4).astype(jnp.uint32)
  elif itemsize == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif itemsize in (1, 2):
    narrow = jnp.uint8 if itemsize == 1 else jnp.uint16
    bits = jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)
  else:
    raise ValueError(f"cannot digest dtype {x.dtype} (itemsize {itemsize})")
  index = jnp.zeros(x.shape, jnp.uint32)
  for axis in range(x.ndim):
    iota = jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) + offsets[axis]
    index = index + iota * strides[axis]
  s1 = jnp.sum(bits * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  s2 = jnp.sum(_fmix32(bits + index * jnp.uint32(_GOLDEN)), dtype=jnp.uint32)
  return jnp.stack([s1, s2])


# Compiled once per shard shape and dtype; offsets and strides are arguments.
_digest_jit = jax.jit(_digest_terms)


def _strides(shape: tuple[int, ...]) -> np.ndarray:
  """Row-major element strides of `shape`, mod 2^32: uint32[ndim]."""
  strides, stride = [], 1
  for size in reversed(shape):
    strides.append(stride % 2**32)
    stride *= size
  return np.asarray(strides[::-1], np.uint32)


def _shards(value: Any, host: jax.Device) -> list[tuple[jax.Array, np.ndarray]]:
  """(single-device array, global offsets) for each distinct piece of `value`.

  A jax Array contributes its addressable shards with replica_id 0 (every piece
  once, on whichever process holds that copy); a host array goes whole to `host`.
  """
  if not isinstance(value, jax.Array):
    value = np.asarray(value)
    return [(jax.device_put(value, host), np.zeros(value.ndim, np.uint32))]
  pieces = []
  for shard in value.addressable_shards:
    if shard.replica_id == 0:
      offsets = [0 if s.start is None else s.start for s in shard.index]
      pieces.append((shard.data, np.asarray(offsets, np.uint32)))
  return pieces


def digests(flat: Mapping[str, Any]) -> dict[str, str]:
  """Digest strings for every array, computed shard by shard where each shard lives.

  Only single-device programs are launched (see the module docstring for why);
  host (numpy) arrays go to the CPU backend, so saving a converted model never
  needs accelerator memory. Across processes, each process sums the shards it
  holds and one allgather (the same call, in the same order, on every process)
  adds up the partial sums.
  """
  try:
    host = jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS excludes the CPU backend
    host = jax.local_devices()[0]
  names = list(flat)
  pending = []
  for name in names:
    strides = _strides(tuple(np.shape(flat[name])))
    pending.append([_digest_jit(piece, offsets, strides)
                    for piece, offsets in _shards(flat[name], host)])
  fetched = jax.device_get(pending)  # one sync for all shards of all tensors
  partial = np.zeros((len(names), 2), np.uint32)
  for i, terms in enumerate(fetched):
    for t in terms:
      partial[i] += np.asarray(t, np.uint32)  # wraps mod 2^32, like the device sums
  if jax.process_count() > 1 and any(
      isinstance(v, jax.Array) and not v.is_fully_addressable for v in flat.values()):
    from jax.experimental import multihost_utils
    gathered = np.asarray(multihost_utils.process_allgather(partial))  # [processes, N, 2]
    partial = np.sum(gathered.astype(np.uint64), axis=0) % 2**32
  return {name: "%08x%08x" % (int(partial[i, 0]), int(partial[i, 1]))
          for i, name in enumerate(names)}
