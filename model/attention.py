"""Attention over a paged KV cache, and the cache update that precedes it.

The cache of one layer is a pair of page pools, K and V, each
`[pages, page_size, kv_heads, head_dim]`. A sequence owns a list of pages (its
block table); token `t` of a sequence lives in page `block_table[t // page_size]`
at offset `t % page_size`. The host computes, for every new token, its flat slot
`page * page_size + offset`, so the device-side update is one scatter.

Everything the model knows about caching is in the two functions below
(`write_kv` and `attend`): the transformer calls them with explicit inputs and
never looks inside the pools. `attend` dispatches on `impl`; the pure-XLA
reference runs everywhere and is the definition of correct.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Masked logits use a large finite value, not -inf, so a fully masked row (a
# padding query) yields a harmless uniform softmax instead of NaN.
_MASK_VALUE = -1e30

IMPLS = ("xla",)


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

  Returns the updated pools. Under a jit that donates the pools the scatter is
  done in place.
  """
  num_pages, page_size, kv_heads, head_dim = k_pages.shape
  flat = slots.reshape(-1)  # [B*T]

  def scatter(pages, new):
    pages = pages.reshape(num_pages * page_size, kv_heads, head_dim)
    new = new.reshape(-1, kv_heads, head_dim).astype(pages.dtype)
    idx = flat
    if idx.shape[0] == 1:
      # XLA turns a one-index scatter into a dynamic-update-slice, and a pool
      # updated that way and then read (by attention) is copied whole before the
      # update: 60 pool copies per step on CPU, measured. Writing the same value
      # twice keeps it a scatter, which XLA does in place.
      idx, new = jnp.concatenate([idx, idx]), jnp.concatenate([new, new])
    pages = pages.at[idx].set(new, mode="promise_in_bounds")
    return pages.reshape(num_pages, page_size, kv_heads, head_dim)

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
    impl: which implementation to run ("xla").

  Returns [B, T, H, D] attention outputs in q's dtype.
  """
  if impl == "xla":
    return _attend_xla(q, k_pages, v_pages, block_tables, q_positions, kv_lens)
  raise ValueError(f"unknown attention impl {impl!r}; known: {IMPLS}")


def _attend_xla(q, k_pages, v_pages, block_tables, q_positions, kv_lens):
  batch, q_len, num_heads, head_dim = q.shape
  _, page_size, kv_heads, _ = k_pages.shape
  groups = num_heads // kv_heads
  ctx = block_tables.shape[1] * page_size

  # Gather only the pages the batch uses: cost scales with the real context
  # (rounded up to the block-table bucket), not with the pool.
  k = k_pages[block_tables].reshape(batch, ctx, kv_heads, head_dim)  # [B, C, KVH, D]
  v = v_pages[block_tables].reshape(batch, ctx, kv_heads, head_dim)  # [B, C, KVH, D]
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
