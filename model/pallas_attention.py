"""Decode attention through the paged-attention Pallas kernel that JAX ships
(jax.experimental.pallas.ops.gpu.paged_attention, Triton), on our page layout.

model/attention.py runs it for decode rows when `impl` is "pallas_gpu" (or
"pallas_gpu_interpret": the same kernel interpreted, on any backend, for tests);
prefill tiles and windowed layers take the XLA path (model/paged_attention.py).
The Pallas modules are imported on first use (`load_modules`), so a machine
without them runs everything else.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ridgeline.util import ceil_div
from ridgeline.model import kv_quant

def load_modules():
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu
  from jax.experimental.pallas.ops.gpu import paged_attention as pa
  return pl, plgpu, pa


def _largest_power_of_two_divisor(n: int, limit: int) -> int:
  d = 1
  while d * 2 <= limit and n % (d * 2) == 0:
    d *= 2
  return d


def attend_decode(q, k_pages, v_pages, block_tables, kv_lens, *, interpret: bool,
                       softcap: float | None = None, scale: float | None = None,
                       k_splits: int | None = None, pages_per_compute_block: int = 8,
                       num_warps: int = 4, num_stages: int = 2):
  """Decode attention through the kernel body of JAX's Pallas paged attention
  (`paged_attention_kernel`: flash-style online softmax over blocks of pages,
  the context split into `k_splits` partitions combined at the end).

  JAX's own wrapper wants pools laid out [KVH, P, S, D]; ours are [P, S, KVH, D]
  (the XLA path and the page copies prefer them, and transposing a pool per
  step would cost more than attention). So this calls the same kernel through a
  pallas_call whose block specs pick one KV head's [P, S, D] strided view of our
  pools, with the batch as one more grid axis. The kernel does not scale the
  logits: q is scaled first.
 
  The context is split only as far as the grid needs to fill the GPU: every
  (sequence, KV head) pair is already one program, and splitting a batch-512
  step's 16-page contexts 16 ways made 65,536 programs of one page each (377 us
  a layer on an H200, 27% of its bandwidth).
  """
  pl, plgpu, pa = load_modules()
  batch, _, num_heads, head_dim = q.shape
  num_pages, page_size, kv_heads, _ = k_pages.shape
  groups = num_heads // kv_heads
  pages_per_seq = block_tables.shape[1]
  if k_splits is None:  # about 512 programs: a few per multiprocessor
    k_splits = max(1, min(16, 512 // (batch * kv_heads)))
  k_splits = _largest_power_of_two_divisor(pages_per_seq, k_splits)
  pages_per_partition = pages_per_seq // k_splits
  pages_per_compute_block = _largest_power_of_two_divisor(pages_per_partition,
                                                          pages_per_compute_block)
  block_h = 16  # the kernel's smallest query tile (tensor-core dot)
  padded_groups = ceil_div(groups, block_h) * block_h
  head_splits = padded_groups // block_h

  scale = head_dim ** -0.5 if scale is None else scale
  qg = (q.reshape(batch, kv_heads, groups, head_dim).astype(jnp.float32) * scale
        ).astype(q.dtype)  # [B, KVH, G, D]
  if padded_groups != groups:
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, padded_groups - groups), (0, 0)))
  tables = block_tables.reshape(batch, k_splits, pages_per_partition)

  kernel = functools.partial(
      pa.paged_attention_kernel, num_heads=groups,
      pages_per_compute_block=pages_per_compute_block,
      mask_value=pa.DEFAULT_MASK_VALUE, attn_logits_soft_cap=softcap)
  params_cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
  pool_spec = pl.BlockSpec((num_pages, page_size, None, head_dim),
                           lambda h, i, s, b: (0, 0, h, 0))  # one KV head's [P, S, D]
  # An 8-bit pool (model/kv_quant.py): the kernel takes one scale per (page,
  # slot) of the head, here the [P, S] view of the [P, S, KVH, 1] scales.
  k_scales = v_scales = scale_spec = None
  if kv_quant.is_quantized(k_pages):
    scale_spec = pl.BlockSpec((num_pages, page_size, None, None),
                              lambda h, i, s, b: (0, 0, h, 0))
    k_pages, k_scales = k_pages.qvalue, k_pages.scale
    v_pages, v_scales = v_pages.qvalue, v_pages.scale
  o, l, m = pl.pallas_call(
      kernel,
      grid=(kv_heads, head_splits, k_splits, batch),  # axis 2 is the kernel's partition
      in_specs=[
          pl.BlockSpec((None, None, block_h, head_dim), lambda h, i, s, b: (b, h, i, 0)),
          pool_spec, scale_spec, pool_spec, scale_spec,
          pl.BlockSpec((None, None, pages_per_partition), lambda h, i, s, b: (b, s, 0)),
          pl.BlockSpec((1,), lambda h, i, s, b: (b,)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, block_h, head_dim),
                       lambda h, i, s, b: (s, b, h, i, 0)),
          pl.BlockSpec((None, None, None, block_h), lambda h, i, s, b: (s, b, h, i)),
          pl.BlockSpec((None, None, None, block_h), lambda h, i, s, b: (s, b, h, i)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((k_splits, batch, kv_heads, padded_groups, head_dim),
                               jnp.float32),
          jax.ShapeDtypeStruct((k_splits, batch, kv_heads, padded_groups), jnp.float32),
          jax.ShapeDtypeStruct((k_splits, batch, kv_heads, padded_groups), jnp.float32),
      ],
      interpret=interpret,
      compiler_params=params_cls(num_warps=num_warps, num_stages=num_stages),
      name="ridgeline_paged_attention",
  )(qg, k_pages, k_scales, v_pages, v_scales, tables, kv_lens.astype(jnp.int32))

  # Combine the partitions (the kernel leaves each one's unnormalized output,
  # its softmax denominator l and running max m).
  o, l, m = o[..., :groups, :], l[..., :groups], m[..., :groups]
  m_all = m.max(axis=0)  # [B, KVH, G]
  correction = jnp.exp(m - m_all[None])  # [splits, B, KVH, G]
  denom = (l * correction).sum(axis=0)
  out = (o * correction[..., None]).sum(axis=0) / (denom[..., None]
                                                    + jnp.finfo(jnp.float32).eps)
  return out.reshape(batch, 1, num_heads, head_dim).astype(q.dtype)
