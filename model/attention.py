"""Attention over a paged KV cache, and the cache update that precedes it.

The cache of one layer is a pair of page pools, K and V, each
`[pages, page_size, kv_heads, head_dim]`. A sequence owns a list of pages (its
block table); token `t` of a sequence lives in page `block_table[t // page_size]`
at offset `t % page_size`. The host computes, for every new token, its flat slot
`page * page_size + offset`, so the device-side update is one scatter.

Everything the model knows about caching is in the two functions below
(`write_kv` and `attend`): the transformer calls them with explicit inputs and
never looks inside the pools. `attend` dispatches on `impl`:

  "xla"          pure XLA; runs everywhere and is the definition of correct. A
                 decode step (one query per sequence) takes a cheaper route
                 with the same math (see `_attend_xla_decode`).
  "pallas_gpu"   decode steps run the paged-attention Pallas kernel that JAX
                 ships (jax.experimental.pallas.ops.gpu.paged_attention, Triton)
                 on our page layout; prefill steps run the XLA reference.
  "pallas_gpu_interpret"  the same kernel in Pallas' interpret mode (any
                 backend, slow): for tests on CPU.
  "auto"         "pallas_gpu" on a single NVIDIA GPU, else "xla".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from model import kv_quant

# Masked logits use a large finite value, not -inf, so a fully masked row (a
# padding query) yields a harmless uniform softmax instead of NaN.
_MASK_VALUE = -1e30

IMPLS = ("xla", "pallas_gpu", "pallas_gpu_interpret", "auto")


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
             slots: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Scatters new keys and values into their slots.

  Args:
    k_pages, v_pages: [P, S, KVH, D] page pools of one layer.
    k, v: [B, T, KVH, D] keys and values of the new tokens.
    slots: [B, T] int32 flat slot per token, all in range. Padding tokens
      point at a scratch page that no sequence owns: an out-of-range index with
      mode="drop" would make XLA read the old value to select against it, and
      that read forces a copy of the whole pool before the in-place update.
      The scratch page is the pool's last page (the runner and
      `transformer.contiguous_inputs` both put it there); a one-token step
      also writes into it.

  Returns the updated pools. Under a jit that donates the pools the scatter is
  done in place. An 8-bit pool (a QArray, model/kv_quant.py) gets the new
  tokens quantized, and its values and scales are scattered alike.
  """
  num_pages, page_size, kv_heads, head_dim = k_pages.shape
  flat = slots.reshape(-1)  # [B*T]

  def scatter(pages, new):
    tail = pages.shape[2:]  # [KVH, D] (or [KVH, 1]: the scales of an 8-bit pool)
    pages = pages.reshape(num_pages * page_size, *tail)
    # Computed first, not fused into the scatter: on a GPU, XLA fused a batch-1
    # step's K/V projection (a matrix-vector product) into the scatter, one
    # thread per element looping over the hidden size: 80 us a layer on an H200,
    # a quarter of the step.
    new = jax.lax.optimization_barrier(new.reshape(-1, *tail).astype(pages.dtype))
    idx = flat
    if idx.shape[0] == 1:
      # XLA turns a one-index scatter into a dynamic-update-slice, and a pool
      # updated that way and then read (by attention) is copied whole before the
      # update: 60 pool copies per step on CPU, measured. A second row keeps it a
      # scatter, which XLA does in place. The second row goes to the pool's last
      # slot, in the scratch page that no sequence owns (see the runner), so the
      # indices stay distinct and no write order between repeats matters.
      idx = jnp.concatenate([idx, jnp.full((1,), num_pages * page_size - 1, idx.dtype)])
      new = jnp.concatenate([new, new])
    pages = pages.at[idx].set(new, mode="promise_in_bounds")
    return pages.reshape(num_pages, page_size, *tail)

  if kv_quant.is_quantized(k_pages):
    def scatter_quantized(pool, new):
      q = kv_quant.store(new.reshape(-1, kv_heads, head_dim), pool)  # [B*T, KVH, D]
      return kv_quant.QArray(scatter(pool.qvalue, q.qvalue), scatter(pool.scale, q.scale),
                             None, pool.qtype)
    return scatter_quantized(k_pages, k), scatter_quantized(v_pages, v)

  return scatter(k_pages, k), scatter(v_pages, v)


def attend(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
           block_tables: jax.Array, q_positions: jax.Array, kv_lens: jax.Array,
           *, impl: str = "xla") -> jax.Array:
  """Causal grouped-query attention of new queries over their sequences' pages.

  Args:
    q: [B, T, H, D] queries, RoPE applied, not yet scaled.
    k_pages, v_pages: [P, S, KVH, D] page pools (the new tokens already written).
    block_tables: [B, NB] int32 pages of each sequence, in order; entries past
      a sequence's last page may hold any valid page index.
    q_positions: [B, T] int32 absolute position of each query token.
    kv_lens: [B] int32 number of valid cached tokens per sequence (including
      the new ones).
    impl: which implementation to run (see the module docstring).

  Returns [B, T, H, D] attention outputs in q's dtype.
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; known: {IMPLS}")
  if impl == "auto":
    impl = resolve_impl(impl)
  decode = q.shape[1] == 1
  if decode and impl in ("pallas_gpu", "pallas_gpu_interpret"):
    return _attend_pallas_gpu(q, k_pages, v_pages, block_tables, kv_lens,
                              interpret=impl == "pallas_gpu_interpret")
  if decode and k_pages.shape[2] <= _BLOCK_DIAGONAL_MAX_KV_HEADS:
    return _attend_xla_decode(q, k_pages, v_pages, block_tables, q_positions, kv_lens)
  return _attend_xla(q, k_pages, v_pages, block_tables, q_positions, kv_lens)


def resolve_impl(impl: str = "auto") -> str:
  """What "auto" means here: the Pallas kernel on one NVIDIA GPU, else XLA. (A
  pallas_call is not split by the SPMD partitioner, so on a mesh of several
  devices the XLA path runs.)"""
  if impl != "auto":
    return impl
  devices = jax.devices()
  if len(devices) == 1 and devices[0].platform == "gpu" and pallas_gpu_available():
    return "pallas_gpu"
  return "xla"


def pallas_gpu_available() -> bool:
  try:
    _pallas_modules()
  except ImportError:
    return False
  return True


def _attend_xla(q, k_pages, v_pages, block_tables, q_positions, kv_lens):
  batch, q_len, num_heads, head_dim = q.shape
  _, page_size, kv_heads, _ = k_pages.shape
  groups = num_heads // kv_heads
  ctx = block_tables.shape[1] * page_size

  # Gather only the pages the batch uses: cost scales with the real context
  # (rounded up to the block-table bucket), not with the pool.
  k = kv_quant.load(k_pages, block_tables, q.dtype).reshape(
      batch, ctx, kv_heads, head_dim)  # [B, C, KVH, D]
  v = kv_quant.load(v_pages, block_tables, q.dtype).reshape(
      batch, ctx, kv_heads, head_dim)  # [B, C, KVH, D]
  qg = q.reshape(batch, q_len, kv_heads, groups, head_dim)  # [B, T, KVH, G, D]

  scale = head_dim ** -0.5
  logits = jnp.einsum("btkgd,bckd->bkgtc", qg, k,
                      preferred_element_type=jnp.float32) * scale  # [B, KVH, G, T, C]
  kv_pos = jnp.arange(ctx, dtype=jnp.int32)
  visible = ((kv_pos[None, None, :] <= q_positions[:, :, None])
             & (kv_pos[None, None, :] < kv_lens[:, None, None]))  # [B, T, C]
  logits = jnp.where(visible[:, None, None], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgtc,bckd->btkgd", probs, v)  # [B, T, KVH, G, D]
  return out.reshape(batch, q_len, num_heads, head_dim)


# The decode route of the XLA implementation ----------------------------------

# Above this many KV heads the block-diagonal trick below does too much extra
# arithmetic (it multiplies by KV-heads-times as many zeros) and the reference
# einsums run instead.
_BLOCK_DIAGONAL_MAX_KV_HEADS = 4


def _attend_xla_decode(q, k_pages, v_pages, block_tables, q_positions, kv_lens):
  """The reference's math for one query per sequence, shaped for the CPU.

  The reference contracts [B, C, KVH, D] keys with per-(batch, kv head) matmuls,
  so XLA transposes the gathered keys and values to put KVH next to B: on the
  CPU those copies cost more than the attention itself (measured: 2 of 5 ms per
  layer at batch 64, context 256). Here the gathered pages stay as they lie,
  [B, C, KVH*D], and the queries become a block-diagonal [B, KVH*D, KVH*G]
  matrix (head k's queries in rows k*D..k*D+D, zeros elsewhere): one batched
  matmul gives every head's logits, and one more gives the outputs, whose
  diagonal blocks are kept. KVH times the arithmetic of the reference, which a
  decode step (memory-bound) does not notice for a few KV heads.
  """
  batch, _, num_heads, head_dim = q.shape
  _, page_size, kv_heads, _ = k_pages.shape
  groups = num_heads // kv_heads
  ctx = block_tables.shape[1] * page_size

  k = kv_quant.load(k_pages, block_tables, q.dtype).reshape(
      batch, ctx, kv_heads * head_dim)  # [B, C, KVH*D]
  v = kv_quant.load(v_pages, block_tables, q.dtype).reshape(
      batch, ctx, kv_heads * head_dim)  # [B, C, KVH*D]
  eye = jnp.eye(kv_heads, dtype=q.dtype)
  qg = q.reshape(batch, kv_heads, groups, head_dim)  # [B, KVH, G, D]
  q_block = jnp.einsum("bkgd,kj->bkdjg", qg, eye).reshape(
      batch, kv_heads * head_dim, kv_heads * groups)  # [B, KVH*D, KVH*G]

  scale = head_dim ** -0.5
  logits = jnp.einsum("bcx,bxj->bcj", k, q_block,
                      preferred_element_type=jnp.float32) * scale  # [B, C, KVH*G]
  kv_pos = jnp.arange(ctx, dtype=jnp.int32)
  visible = ((kv_pos[None, :] <= q_positions[:, :1])
             & (kv_pos[None, :] < kv_lens[:, None]))  # [B, C]
  logits = jnp.where(visible[:, :, None], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=1).astype(v.dtype)  # [B, C, KVH*G]
  out = jnp.einsum("bcj,bcx->bjx", probs, v).reshape(
      batch, kv_heads, groups, kv_heads, head_dim)  # [B, KVH, G, KVH', D]
  out = jnp.einsum("bkgld,kl->bkgd", out, eye)  # [B, KVH, G, D]: the diagonal blocks
  return out.reshape(batch, 1, num_heads, head_dim)


# The Pallas GPU kernel ------------------------------------------------------------

def _pallas_modules():
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu
  from jax.experimental.pallas.ops.gpu import paged_attention as pa
  return pl, plgpu, pa


def _largest_power_of_two_divisor(n: int, limit: int) -> int:
  d = 1
  while d * 2 <= limit and n % (d * 2) == 0:
    d *= 2
  return d


def _attend_pallas_gpu(q, k_pages, v_pages, block_tables, kv_lens, *, interpret: bool,
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
  pl, plgpu, pa = _pallas_modules()
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
  padded_groups = -(-groups // block_h) * block_h
  head_splits = padded_groups // block_h

  scale = head_dim ** -0.5
  qg = (q.reshape(batch, kv_heads, groups, head_dim).astype(jnp.float32) * scale
        ).astype(q.dtype)  # [B, KVH, G, D]
  if padded_groups != groups:
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, padded_groups - groups), (0, 0)))
  tables = block_tables.reshape(batch, k_splits, pages_per_partition)

  kernel = functools.partial(
      pa.paged_attention_kernel, num_heads=groups,
      pages_per_compute_block=pages_per_compute_block,
      mask_value=pa.DEFAULT_MASK_VALUE, attn_logits_soft_cap=None)
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
