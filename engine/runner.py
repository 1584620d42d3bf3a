"""Jitted model steps over the paged cache: padding to buckets, donation, warm-up.

The model is split once into (graphdef, state); the step is a jitted function of
the state, not an `nnx.jit` of the module (which would walk the module graph on
every call). The page pools are argument 1 and donated, so XLA writes the new
K/V into the same buffers and the old handles are deleted.

One function serves prefill and decode: a step is B rows of T new tokens each.
Decode is T = 1; a prefill step packs up to `max_prefill_batch` prompt chunks,
each padded to the largest chunk's token bucket. B, T and the block-table width
NB are each padded up to a bucket (`EngineConfig`), so the set of compiled
variants is small and known in advance.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from engine import config as config_lib
from engine import kv_cache
from engine.config import EngineConfig
from model import transformer as transformer_lib

@dataclasses.dataclass
class Row:
  """One sequence's part of a step: `tokens` at positions start, start+1, ..."""

  tokens: Sequence[int]
  start: int
  pages: Sequence[int]


def enable_compilation_cache(path: str) -> None:
  """Persists compiled executables under `path` (called by scripts, not the library)."""
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


class Runner:
  """Owns the device state: the model's weights and the KV page pools."""

  def __init__(self, model: transformer_lib.Transformer, config: EngineConfig,
               num_pages: int, kv_sharding=None):
    self.model_config = model.config
    self.config = config
    self.num_pages = num_pages  # pages sequences may own
    self.graphdef, self.state = nnx.split(model)
    # One extra page at index `num_pages` that no sequence owns: padding tokens
    # write their K/V there (see attention.write_kv).
    self.kv = transformer_lib.init_kv_pages(
        model.config, num_pages + 1, config.page_size, config.kv_dtype, kv_sharding)
    self._scratch_slot = num_pages * config.page_size
    # Commit every input to its device: a jitted call caches on whether its
    # arguments are committed, and the step's outputs always are, so uncommitted
    # initial arrays would compile every variant twice.
    self.state = jax.tree.map(lambda x: jax.device_put(x, x.sharding), self.state)
    self.kv = jax.tree.map(lambda x: jax.device_put(x, x.sharding), self.kv)
    self._step = jax.jit(self._forward, donate_argnums=(1,))
    # Shape keys (B, T, NB) run so far: each distinct key is one compiled variant.
    self.variants: set[tuple[int, int, int]] = set()

  def _forward(self, state, kv, tokens, positions, slots, block_tables, kv_lens,
               logits_indices):
    model = nnx.merge(self.graphdef, state)
    return model(tokens, positions, kv, slots, block_tables, kv_lens, logits_indices)

  def shape_for(self, rows: Sequence[Row]) -> tuple[int, int, int]:
    """The padded (B, T, NB) a step over `rows` runs at."""
    cfg = self.config
    max_t = max(len(r.tokens) for r in rows)
    max_pages = max(len(r.pages) for r in rows)
    if max_t == 1:
      b = config_lib.bucket(len(rows), cfg.decode_batch_buckets)
      t = 1
    else:
      b = config_lib.bucket(len(rows), cfg.prefill_batch_buckets)
      t = config_lib.bucket(max_t, cfg.prefill_token_buckets)
    nb = config_lib.bucket(max_pages, cfg.block_buckets)
    return b, t, nb

  def step(self, rows: Sequence[Row]) -> jax.Array:
    """Runs rows through the model; returns float32 logits [B_bucket, V] on device
    (row i's logits are those of its last token; padding rows follow)."""
    b, t, nb = self.shape_for(rows)
    page_size = self.config.page_size
    tokens = np.zeros((b, t), np.int32)
    positions = np.zeros((b, t), np.int32)
    slots = np.full((b, t), self._scratch_slot, np.int32)
    block_tables = np.zeros((b, nb), np.int32)
    kv_lens = np.zeros(b, np.int32)
    logits_indices = np.zeros(b, np.int32)
    for i, row in enumerate(rows):
      n = len(row.tokens)
      pos = np.arange(row.start, row.start + n, dtype=np.int32)
      pages = np.asarray(row.pages, np.int32)
      tokens[i, :n] = row.tokens
      positions[i, :n] = pos
      slots[i, :n] = pages[pos // page_size] * page_size + pos % page_size
      block_tables[i, :len(pages)] = pages
      kv_lens[i] = row.start + n
      logits_indices[i] = n - 1
    self.variants.add((b, t, nb))
    logits, self.kv = self._step(self.state, self.kv, tokens, positions, slots,
                                 block_tables, kv_lens, logits_indices)
    return logits

  def copy_pages(self, src: Sequence[int], dst: Sequence[int]) -> None:
    self.kv = kv_cache.copy_pages(self.kv, jnp.asarray(src, jnp.int32),
                                  jnp.asarray(dst, jnp.int32))

  def warmup(self, decode_batches: Sequence[int] = (), prefill_tokens: Sequence[int] = ()
             ) -> None:
    """Compiles decode batch buckets and prefill token buckets ahead of time.

    Call it before serving: the dummy rows write into page 0, which must not yet
    belong to a sequence.
    """
    for b in decode_batches:
      self.step([Row([0], 0, [0])] * b)
    for t in prefill_tokens:
      self.step([Row([0] * t, 0, [0] * kv_cache.pages_for(t, self.config.page_size))])
