"""The blocked XLA attention path: rows of queries over their pages, in blocks of
pages with an online softmax.

model/attention.py dispatches to it (`attend`): decode rows are rows of one
query, prefill tiles rows of Q queries of one sequence. Each loop iteration
gathers one block of pages for every row and folds it into a running max,
denominator and accumulator, as far as the longest row reaches (the trip count
is data, so full-width block tables cost nothing past the real context). The
block's size follows the platform (`block_tokens_for`): on a CPU a gathered
block stays within a core's L2 cache. Rows of one query with a few KV heads use
a block-diagonal form that keeps the gathered pages as they lie
(`_decode_block`); everything else the general form (`_tile_block`). The result
equals model/attention.py's unblocked reference, `_attend_xla`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ridgeline.model import kv_quant
from ridgeline.model import layers

# Masked logits use a large finite value, not -inf, so a fully masked row (a
# padding query) yields a harmless uniform softmax instead of NaN.
MASK_VALUE = -1e30


def visible_keys(kv_pos, q_pos, window):
  """[..., Q, C] which keys each query sees: causal, and within the window."""
  seen = kv_pos <= q_pos
  if window is not None:
    seen &= kv_pos > q_pos - window
  return seen


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
    visible = (visible_keys(kv_pos[None, None, :], q_positions[:, :, None], window)
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
  state = (jnp.full((rows, kv_heads, groups, q_len), MASK_VALUE, jnp.float32),
           jnp.zeros((rows, kv_heads, groups, q_len), jnp.float32),
           jnp.zeros((rows, kv_heads, groups, q_len, head_dim), jnp.float32))

  def body(carry, k, v, visible, softcap):
    m, l, acc = carry
    logits = jnp.einsum("btkgd,bckd->bkgtc", qg, k,
                        preferred_element_type=jnp.float32) * scale  # [R, KVH, G, T, C]
    logits = layers.softcap(logits, softcap)
    logits = jnp.where(visible[:, None, None], logits, MASK_VALUE)
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
  state = (jnp.full((rows, width), MASK_VALUE, jnp.float32),
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
    logits = jnp.where(visible[:, 0, :, None], logits, MASK_VALUE)
    m, l, correction, p = _online_update(m, l, logits, axis=1)  # p: [R, C, KVH*G]
    acc = acc * correction[..., None] + jnp.einsum(
        "bcj,bcx->bjx", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m, l, acc

  return body, state
