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
That loop is model/paged_attention.py; the Pallas kernel's wrapper is
model/pallas_attention.py.

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

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ridgeline.model import kv_quant
from ridgeline.model import layers
from ridgeline.model import pallas_attention
from ridgeline.model.paged_attention import MASK_VALUE, paged_attention, visible_keys

IMPLS = ("xla", "pallas_gpu", "pallas_gpu_interpret", "auto")


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
      out = pallas_attention.attend_decode(qd[:, None], k_pages, v_pages, layout.decode_tables,
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
    pallas_attention.load_modules()
  except ImportError:
    return False
  return True


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
  visible = (visible_keys(kv_pos[None, None, :], q_positions[:, :, None], window)
             & (kv_pos[None, None, :] < kv_lens[:, None, None]))  # [B, T, C]
  logits = jnp.where(visible[:, None, None], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgtc,bckd->btkgd", probs, v)  # [B, T, KVH, G, D]
  return out.reshape(batch, q_len, num_heads, head_dim)
