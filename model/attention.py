"""Attention over a paged KV cache, and the cache update that precedes it.

The cache of one layer is a pair of page pools, K and V, each
`[pages, page_size, kv_heads, head_dim]`. A sequence owns a list of pages (its
block table); token `t` of a sequence lives in page `block_table[t // page_size]`
at offset `t % page_size`. The host computes, for every new token, its flat slot
`page * page_size + offset`, so the device-side update is one scatter.

A step is one flat batch of N tokens (`StepLayout`): first the decode region, one
token per decoding sequence, then the prefill region, cut into tiles of Q
consecutive tokens of one sequence each (a prompt chunk takes as many tiles as it
needs; the last one is padded). The weights' matmuls run once over all N tokens;
only attention treats the regions differently: a decode row attends with its own
block table, a tile's Q queries share one gather of their sequence's pages.

Both regions walk the context in blocks of pages with an online softmax, as far
as the longest sequence in the region reaches (a loop with a data-dependent trip
count): block tables are full width (`max_model_len` pages), so their width never
changes the compiled shape, and the work follows the real context, not the table.

Everything the model knows about caching is in `write_kv` and `attend`. `attend`
dispatches on `impl`:

  "xla"          pure XLA; runs everywhere. `_attend_xla` (no blocking, no online
                 softmax) is the definition of correct the tests compare against.
  "pallas_gpu"   decode rows run the paged-attention Pallas kernel that JAX ships
                 (jax.experimental.pallas.ops.gpu.paged_attention, Triton) on our
                 page layout; prefill tiles run the XLA path.
  "pallas_gpu_interpret"  the same kernel in Pallas' interpret mode (any
                 backend, slow): for tests on CPU.
  "auto"         "pallas_gpu" on a single NVIDIA GPU, else "xla".
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ridgeline.util import ceil_div
from ridgeline.model import kv_quant
from ridgeline.model import layers

# Masked logits use a large finite value, not -inf, so a fully masked row (a
# padding query) yields a harmless uniform softmax instead of NaN.
_MASK_VALUE = -1e30

IMPLS = ("xla", "pallas_gpu", "pallas_gpu_interpret", "auto")

# Context covered per iteration of the attention loop (at most). A step whose
# sequences are all shorter runs one iteration (straight-line work); a
# 2,048-token context runs 8. Smaller blocks cost a loop iteration each; larger
# ones attend over more padding for short sequences.
BLOCK_TOKENS = 256

# On a CPU a block is also kept small enough that one gathered block of keys
# (all rows of the region) stays in a core's L2 cache, where the two matmuls
# that follow read it: a batch-64 decode step of the default model (3 KV heads
# of 64) gathers 32-token blocks instead of 256, and ran 214 instead of 236 ms
# on the 2-core development VM (docs/performance.md).
CPU_BLOCK_BYTES = 2 * 2**20


def block_tokens_for(rows: int, kv_heads: int, head_dim: int, itemsize: int,
                     page_size: int, platform: str | None = None) -> int:
  """Context tokens per attention-loop iteration for a region of `rows` rows."""
  platform = platform or jax.default_backend()
  if platform != "cpu":
    return BLOCK_TOKENS
  fit = CPU_BLOCK_BYTES // max(1, rows * kv_heads * head_dim * itemsize)
  pages = max(1, min(BLOCK_TOKENS, fit) // page_size)
  return (1 << (pages.bit_length() - 1)) * page_size  # a power of two of pages


class StepLayout(NamedTuple):
  """Where each region of a step's flat token batch attends (int32 arrays).

  decode_tables: [Bd, NB] pages of each decode row's sequence (NB: full width).
  decode_lens: [Bd] cached tokens of the row's sequence after this step (0: padding).
  tile_tables: [nT, NB] pages of each prefill tile's sequence.
  tile_lens: [nT] cached tokens of the tile's sequence after this step.
  The decode region is tokens [0, Bd); tile t is tokens Bd + t*Q ... Bd + t*Q + Q - 1,
  Q = (N - Bd) / nT. Token positions (one array [N]) give the causal mask;
  padding tokens have position -1 and see nothing.
  """

  decode_tables: jax.Array
  decode_lens: jax.Array
  tile_tables: jax.Array
  tile_lens: jax.Array


def write_kv(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
             slots: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Scatters new keys and values into their slots.

  Args:
    k_pages, v_pages: [P, S, KVH, D] page pools of one layer.
    k, v: [N, KVH, D] keys and values of the step's tokens.
    slots: [N] int32 flat slot per token, all in range. Padding tokens point at
      a scratch page that no sequence owns: an out-of-range index with
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
  flat = slots.reshape(-1)  # [N]

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


def attend(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, positions: jax.Array,
           layout: StepLayout, *, impl: str = "xla", window: int | None = None,
           softcap: float | None = None, scale: float | None = None) -> jax.Array:
  """Causal grouped-query attention of a step's flat queries over their pages.

  Args:
    q: [N, H, D] queries, RoPE applied, not yet scaled.
    k_pages, v_pages: [P, S, KVH, D] page pools (the step's tokens already written).
    positions: [N] int32 absolute position of each query (-1: padding).
    layout: which tokens are decode rows and which prefill tiles (`StepLayout`).
    impl: which implementation to run (see the module docstring).
    window: sliding-window attention: a query at position p sees the keys at
      positions p - window + 1 ... p (Mistral, Gemma's local layers); None: all
      keys up to p.
    softcap: `softcap * tanh(logits / softcap)` on the scaled logits before the
      mask (Gemma 2); None: no capping.
    scale: the logits' scale (Gemma: query_pre_attn_scalar ** -0.5); None:
      head_dim ** -0.5.

  Returns [N, H, D] attention outputs in q's dtype.
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown attention impl {impl!r}; known: {IMPLS}")
  impl = resolve_impl(impl)
  n, num_heads, head_dim = q.shape
  scale = head_dim ** -0.5 if scale is None else scale
  num_decode = layout.decode_tables.shape[0]
  num_tiles = layout.tile_tables.shape[0]
  # The Pallas kernel means a GPU, also when lowered for one elsewhere (jax.export).
  platform = "gpu" if impl in ("pallas_gpu",) else None
  outs = []
  if num_decode:
    qd = q[:num_decode]
    # The Pallas kernel has no window mask; windowed decode rows run the XLA route.
    if impl in ("pallas_gpu", "pallas_gpu_interpret") and window is None:
      out = _attend_pallas_gpu(qd[:, None], k_pages, v_pages, layout.decode_tables,
                               layout.decode_lens, softcap=softcap, scale=scale,
                               interpret=impl == "pallas_gpu_interpret")[:, 0]
    else:
      out = paged_attention(qd[:, None], k_pages, v_pages, layout.decode_tables,
                            positions[:num_decode, None], layout.decode_lens,
                            window=window, softcap=softcap, scale=scale,
                            platform=platform)[:, 0]
    outs.append(out)
  if num_tiles:
    tile = (n - num_decode) // num_tiles
    qt = q[num_decode:].reshape(num_tiles, tile, num_heads, head_dim)
    out = paged_attention(qt, k_pages, v_pages, layout.tile_tables,
                          positions[num_decode:].reshape(num_tiles, tile), layout.tile_lens,
                          window=window, softcap=softcap, scale=scale, platform=platform)
    outs.append(out.reshape(num_tiles * tile, num_heads, head_dim))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)


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


def _visible(kv_pos, q_pos, window):
  """[..., Q, C] which keys each query sees: causal, and within the window."""
  seen = kv_pos <= q_pos
  if window is not None:
    seen &= kv_pos > q_pos - window
  return seen


def _attend_xla(q, k_pages, v_pages, block_tables, q_positions, kv_lens, *, window=None,
                softcap=None, scale=None):
  """The reference: rows of T queries, each row over its whole block table at once.

  q: [B, T, H, D]; block_tables: [B, NB]; q_positions: [B, T]; kv_lens: [B].
  """
  batch, q_len, num_heads, head_dim = q.shape
  _, page_size, kv_heads, _ = k_pages.shape
  groups = num_heads // kv_heads
  ctx = block_tables.shape[1] * page_size
  k = kv_quant.load(k_pages, block_tables, q.dtype).reshape(
      batch, ctx, kv_heads, head_dim)  # [B, C, KVH, D]
  v = kv_quant.load(v_pages, block_tables, q.dtype).reshape(
      batch, ctx, kv_heads, head_dim)  # [B, C, KVH, D]
  qg = q.reshape(batch, q_len, kv_heads, groups, head_dim)  # [B, T, KVH, G, D]
  scale = head_dim ** -0.5 if scale is None else scale
  logits = jnp.einsum("btkgd,bckd->bkgtc", qg, k,
                      preferred_element_type=jnp.float32) * scale  # [B, KVH, G, T, C]
  logits = layers.softcap(logits, softcap)
  kv_pos = jnp.arange(ctx, dtype=jnp.int32)
  visible = (_visible(kv_pos[None, None, :], q_positions[:, :, None], window)
             & (kv_pos[None, None, :] < kv_lens[:, None, None]))  # [B, T, C]
  logits = jnp.where(visible[:, None, None], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgtc,bckd->btkgd", probs, v)  # [B, T, KVH, G, D]
  return out.reshape(batch, q_len, num_heads, head_dim)


# The blocked XLA path ----------------------------------------------------------------

# Up to this many KV heads, one-query rows use the block-diagonal form below;
# above it, it does too much extra arithmetic (KV-heads-times as many zeros).
_BLOCK_DIAGONAL_MAX_KV_HEADS = 4


def paged_attention(q, k_pages, v_pages, block_tables, q_positions, kv_lens, *,
                    window=None, softcap=None, scale=None, block_tokens=None, platform=None):
  """Rows of T queries over their pages, in blocks of pages with an online softmax.

  q: [R, T, H, D]; block_tables: [R, NB]; q_positions: [R, T] (-1: padding);
  kv_lens: [R] (the loop runs to the longest); block_tokens: context per loop
  iteration (None: `block_tokens_for` on `platform`, default the backend's).
  Same result as `_attend_xla`.
  """
  rows, q_len, num_heads, head_dim = q.shape
  _, page_size, kv_heads, _ = k_pages.shape
  if block_tokens is None:
    block_tokens = block_tokens_for(rows, kv_heads, head_dim,
                                    jnp.dtype(q.dtype).itemsize, page_size, platform)
  groups = num_heads // kv_heads
  scale = head_dim ** -0.5 if scale is None else scale
  table_width = block_tables.shape[1]
  block_pages = max(1, min(table_width, block_tokens // page_size))
  if table_width % block_pages:
    block_tables = jnp.pad(block_tables, ((0, 0), (0, block_pages - table_width % block_pages)))
  block = block_pages * page_size
  diagonal = q_len == 1 and kv_heads <= _BLOCK_DIAGONAL_MAX_KV_HEADS
  if diagonal:
    body, state = _decode_block(q, scale, kv_heads, groups, head_dim)
  else:
    body, state = _tile_block(q, scale, kv_heads, groups, head_dim)

  def run(j, carry):
    tables = jax.lax.dynamic_slice_in_dim(block_tables, j * block_pages, block_pages, axis=1)
    # An 8-bit pool (model/kv_quant.py) is dequantized as it is gathered.
    k = kv_quant.load(k_pages, tables, q.dtype).reshape(rows, block, kv_heads, head_dim)
    v = kv_quant.load(v_pages, tables, q.dtype).reshape(rows, block, kv_heads, head_dim)
    kv_pos = j * block + jnp.arange(block, dtype=jnp.int32)  # [C]
    visible = (_visible(kv_pos[None, None, :], q_positions[:, :, None], window)
               & (kv_pos[None, None, :] < kv_lens[:, None, None]))  # [R, T, C]
    return body(carry, k, v, visible, softcap)

  num_blocks = block_tables.shape[1] // block_pages
  if num_blocks == 1:
    state = run(0, state)
  else:
    # As many blocks as the longest row needs: the trip count is data.
    needed = jnp.clip((jnp.max(kv_lens) + block - 1) // block, 1, num_blocks)
    state = jax.lax.fori_loop(0, needed, run, state)
  m, l, acc = state
  if diagonal:
    # acc: [R, KVH*G, KVH*D]; keep each head's diagonal block.
    out = (acc / l[:, :, None]).reshape(rows, kv_heads, groups, kv_heads, head_dim)
    out = jnp.einsum("bkgld,kl->bkgd", out, jnp.eye(kv_heads, dtype=out.dtype))
    return out.reshape(rows, 1, num_heads, head_dim).astype(q.dtype)
  out = acc / l[..., None]  # [R, KVH, G, T, D]
  return jnp.einsum("bkgtd->btkgd", out).reshape(rows, q_len, num_heads, head_dim
                                                  ).astype(q.dtype)


def _online_update(m, l, logits, axis=-1):
  """One block of the online softmax over `axis` of logits: returns the new
  running max and denominator, the correction of the old accumulator, and the
  block's unnormalized probabilities."""
  m_new = jnp.maximum(m, logits.max(axis=axis))
  correction = jnp.exp(m - m_new)
  p = jnp.exp(logits - jnp.expand_dims(m_new, axis))
  return m_new, l * correction + p.sum(axis=axis), correction, p


def _tile_block(q, scale, kv_heads, groups, head_dim):
  rows, q_len = q.shape[:2]
  qg = q.reshape(rows, q_len, kv_heads, groups, head_dim)  # [R, T, KVH, G, D]
  state = (jnp.full((rows, kv_heads, groups, q_len), _MASK_VALUE, jnp.float32),
           jnp.zeros((rows, kv_heads, groups, q_len), jnp.float32),
           jnp.zeros((rows, kv_heads, groups, q_len, head_dim), jnp.float32))

  def body(carry, k, v, visible, softcap):
    m, l, acc = carry
    logits = jnp.einsum("btkgd,bckd->bkgtc", qg, k,
                        preferred_element_type=jnp.float32) * scale  # [R, KVH, G, T, C]
    logits = layers.softcap(logits, softcap)
    logits = jnp.where(visible[:, None, None], logits, _MASK_VALUE)
    m, l, correction, p = _online_update(m, l, logits)
    acc = acc * correction[..., None] + jnp.einsum(
        "bkgtc,bckd->bkgtd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m, l, acc

  return body, state


def _decode_block(q, scale, kv_heads, groups, head_dim):
  """One query per row, shaped for the CPU.

  The general form contracts [R, C, KVH, D] keys with per-(row, kv head) matmuls,
  so XLA transposes the gathered keys and values to put KVH next to R: on the
  CPU those copies cost more than the attention itself (measured: 2 of 5 ms per
  layer at batch 64, context 256). Here the gathered pages stay as they lie,
  [R, C, KVH*D], and the queries become a block-diagonal [R, KVH*D, KVH*G]
  matrix (head k's queries in rows k*D..k*D+D, zeros elsewhere): one batched
  matmul gives every head's logits, and one more gives the outputs, whose
  diagonal blocks are kept at the end. KVH times the arithmetic, which a decode
  step (memory-bound) does not notice for a few KV heads.
  """
  rows = q.shape[0]
  eye = jnp.eye(kv_heads, dtype=q.dtype)
  qg = q.reshape(rows, kv_heads, groups, head_dim)  # [R, KVH, G, D]
  q_block = jnp.einsum("bkgd,kj->bkdjg", qg, eye).reshape(
      rows, kv_heads * head_dim, kv_heads * groups)  # [R, KVH*D, KVH*G]
  width = kv_heads * groups
  state = (jnp.full((rows, width), _MASK_VALUE, jnp.float32),
           jnp.zeros((rows, width), jnp.float32),
           jnp.zeros((rows, width, kv_heads * head_dim), jnp.float32))

  def body(carry, k, v, visible, softcap):
    m, l, acc = carry
    block = k.shape[1]
    k = k.reshape(rows, block, kv_heads * head_dim)  # [R, C, KVH*D]
    v = v.reshape(rows, block, kv_heads * head_dim)
    # [R, C, KVH*G]: keys as they lie times the queries (a [C, X] x [X, J]
    # matmul per row); the transposed [R, J, C] form made XLA transpose the keys.
    logits = jnp.einsum("bcx,bxj->bcj", k, q_block,
                        preferred_element_type=jnp.float32) * scale
    logits = layers.softcap(logits, softcap)
    logits = jnp.where(visible[:, 0, :, None], logits, _MASK_VALUE)
    m, l, correction, p = _online_update(m, l, logits, axis=1)  # p: [R, C, KVH*G]
    acc = acc * correction[..., None] + jnp.einsum(
        "bcj,bcx->bjx", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m, l, acc

  return body, state


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
