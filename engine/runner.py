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
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from engine import config as config_lib
from engine import kv_cache
from engine.config import EngineConfig
from model import sharding as sharding_lib
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
               num_pages: int, kv_sharding=None, mesh: jax.sharding.Mesh | None = None):
    self.model_config = model.config
    self.config = config
    self.num_pages = num_pages  # pages sequences may own
    self.mesh = mesh
    self.graphdef, self.state = nnx.split(model)
    if mesh is not None:
      # Weights go to their shardings (a no-op when restored straight into them);
      # the pools are split by KV head like k/v (model/sharding.py).
      self._plan = plan = sharding_lib.plan(model.config, mesh)
      state_shardings = sharding_lib.state_shardings(
          self.state, sharding_lib.param_shardings(model.config, mesh))
      self.state = sharding_lib.place(self.state, state_shardings)
      kv_sharding = NamedSharding(mesh, plan.kv_spec())
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
    if mesh is None:
      self._step = jax.jit(self._forward, donate_argnums=(1,))
      self._row_shardings = None
    else:
      # Explicit shardings: rows over `data`; logits replicated, because the
      # sampler reads every row's full vocabulary; the pools keep theirs.
      rows = lambda ndim: NamedSharding(mesh, plan.batch_spec(ndim))
      self._row_shardings = (rows(2), rows(2), rows(2), rows(2), rows(1), rows(1))
      kv_shardings = jax.tree.map(lambda x: x.sharding, self.kv)
      self._step = jax.jit(
          self._forward, donate_argnums=(1,),
          in_shardings=(state_shardings, kv_shardings, *self._row_shardings),
          out_shardings=(NamedSharding(mesh, P()), kv_shardings))
    # Shape keys (B, T, NB) run so far: each distinct key is one compiled variant.
    self.variants: set[tuple[int, int, int]] = set()

  def _forward(self, state, kv, tokens, positions, slots, block_tables, kv_lens,
               logits_indices):
    model = nnx.merge(self.graphdef, state)
    if self.mesh is None:
      return model(tokens, positions, kv, slots, block_tables, kv_lens, logits_indices)
    with sharding_lib.rules_in_effect(self.mesh, self._plan):
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
    if self.mesh is not None:  # rows split evenly over the data axis
      replicas = self.mesh.shape[sharding_lib.DATA]
      b = -(-b // replicas) * replicas
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
    if t == 1:
      self._fill_decode(rows, tokens, positions, slots, block_tables, kv_lens)
    for i, row in enumerate(rows if t > 1 else ()):
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
    inputs = (tokens, positions, slots, block_tables, kv_lens, logits_indices)
    if self._row_shardings is not None:
      inputs = tuple(sharding_lib.host_to_global(x, s)
                     for x, s in zip(inputs, self._row_shardings))
    logits, self.kv = self._step(self.state, self.kv, *inputs)
    if self.mesh is not None:
      # Every device holds all the logits; the sampler runs on this process's
      # first one (the same computation in every process of a multi-host run).
      logits = logits.addressable_data(0)
    return logits

  def _fill_decode(self, rows, tokens, positions, slots, block_tables, kv_lens) -> None:
    """The decode case of `step`'s inputs (one token per row), built with whole-array
    operations: the per-row loop cost about 12 us a row, 3 ms a step at batch 256."""
    n, page_size = len(rows), self.config.page_size
    starts = np.fromiter((r.start for r in rows), np.int32, n)
    tokens[:n, 0] = np.fromiter((r.tokens[0] for r in rows), np.int32, n)
    counts = np.fromiter((len(r.pages) for r in rows), np.int64, n)
    flat = np.fromiter(itertools.chain.from_iterable(r.pages for r in rows), np.int32,
                       int(counts.sum()))
    first = np.repeat(np.cumsum(counts) - counts, counts)  # each entry's row start in flat
    block_tables[np.repeat(np.arange(n), counts), np.arange(flat.size) - first] = flat
    positions[:n, 0] = starts
    slots[:n, 0] = (block_tables[np.arange(n), starts // page_size] * page_size
                    + starts % page_size)
    kv_lens[:n] = starts + 1

  def copy_pages(self, src: Sequence[int], dst: Sequence[int]) -> None:
    src, dst = jnp.asarray(src, jnp.int32), jnp.asarray(dst, jnp.int32)
    if self.mesh is not None:
      replicated = NamedSharding(self.mesh, P())
      src, dst = (sharding_lib.host_to_global(np.asarray(x), replicated) for x in (src, dst))
    self.kv = kv_cache.copy_pages(self.kv, src, dst)
