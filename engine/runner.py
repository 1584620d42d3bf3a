"""The one jitted step: the model and the sampler over a flat batch of tokens.

The model is split once into (graphdef, state); the step is a jitted function of
the state, not an `nnx.jit` of the module (which would walk the module graph on
every call). The page pools are donated, so XLA writes the new K/V into the same
buffers and the old handles are deleted.

A step (`StepInputs`) is every decoding sequence's next token and the prefill
chunks chosen for it, packed as one flat batch (see `attention.StepLayout`):
the weights are read once per step, for all of its tokens. The same call
samples every row that needs a token (decode rows, and prefill chunks that end
their prompt) and returns only the sampled tokens and the log-probabilities
asked for. A decode row's input token may be one the previous step sampled and
the host has not read yet: it names that step's output row (`src`), and the
device takes the token from the previous output directly, so the host can
dispatch step N+1 before it reads step N.

Shapes come from a fixed set (`EngineConfig.step_shapes`): decode rows and
prefill tokens padded to buckets, block tables at full width. `warmup()`
compiles all of them ahead of time, in parallel threads (XLA compiles with the
GIL released), through JAX's persistent compilation cache when it is enabled.
The runner always runs on a mesh: a 1x1 one when none is given.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import os
import threading
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from engine import config as config_lib
from engine import sampling
from engine.config import EngineConfig
from model import attention
from model import sharding as sharding_lib
from model import transformer as transformer_lib


def enable_compilation_cache(path: str) -> None:
  """Persists compiled executables under `path` (called by scripts, not the library)."""
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


@dataclasses.dataclass
class DecodeRow:
  """One decoding sequence's token at `position`: `token` if the host knows it,
  else `src`, the previous step's output row that sampled it."""

  token: int
  src: int
  position: int
  pages: Sequence[int]


@dataclasses.dataclass
class Chunk:
  """Prompt tokens of one sequence at positions start, start+1, ...; `sample`:
  the chunk ends the prompt, so its last token's logits are sampled."""

  tokens: Sequence[int]
  start: int
  pages: Sequence[int]
  sample: bool = False


@dataclasses.dataclass
class Row:
  """A sequence's tokens at positions start, start+1, ... (benchmarks and tests):
  one token is a decode row, more a prefill chunk."""

  tokens: Sequence[int]
  start: int
  pages: Sequence[int]


class StepInputs(NamedTuple):
  """The device inputs of one step (a pytree of int32 arrays plus the sampler's)."""

  tokens: np.ndarray  # [N]
  positions: np.ndarray  # [N], -1 for padding
  slots: np.ndarray  # [N]
  src: np.ndarray  # [Bd] previous step's output row of a decode row's token, -1: `tokens`
  layout: attention.StepLayout
  sample_index: np.ndarray  # [R] token whose logits each sample row reads
  sampler: sampling.SamplerInputs


class StepOutput(NamedTuple):
  tokens: jax.Array  # [max_sample_rows] i32 (rows past the step's R are 0)
  logprob: jax.Array  # [R]
  top_ids: jax.Array  # [R, MAX_LOGPROBS]
  top_logprobs: jax.Array  # [R, MAX_LOGPROBS]


@dataclasses.dataclass
class Pending:
  """A dispatched step whose results the host has not read yet."""

  output: StepOutput
  dispatched_at: float
  want_logprobs: bool


class Runner:
  """Owns the device state: the model's weights and the KV page pools."""

  def __init__(self, model: transformer_lib.Transformer, config: EngineConfig,
               num_pages: int, mesh: jax.sharding.Mesh | None = None):
    self.model_config = model.config
    self.config = config
    self.num_pages = num_pages  # pages sequences may own
    if mesh is None:
      # One device: where the weights are (or the default one).
      leaf = jax.tree.leaves(nnx.state(model))[0]
      device = next(iter(leaf.devices())) if isinstance(leaf, jax.Array) else jax.devices()[0]
      mesh = jax.sharding.Mesh(np.array([[device]]), (sharding_lib.DATA, sharding_lib.MODEL))
    self.mesh = mesh
    self.graphdef, self.state = nnx.split(model)
    # Weights go to their shardings (a no-op when restored straight into them);
    # the pools are split by KV head like k/v (model/sharding.py).
    self._plan = plan = sharding_lib.plan(model.config, mesh)
    self._state_shardings = sharding_lib.state_shardings(
        self.state, sharding_lib.param_shardings(model.config, mesh))
    self.state = sharding_lib.place(self.state, self._state_shardings)
    # One extra page at index `num_pages` that no sequence owns: padding tokens
    # write their K/V there (see attention.write_kv).
    self.kv = transformer_lib.init_kv_pages(
        model.config, num_pages + 1, config.page_size, config.kv_dtype,
        NamedSharding(mesh, plan.kv_spec()))
    self._scratch_slot = num_pages * config.page_size
    # Commit every input to its device: a compiled call wants committed
    # arguments, and the step's outputs always are.
    self.state = jax.tree.map(lambda x: jax.device_put(x, x.sharding), self.state)
    self.kv = jax.tree.map(lambda x: jax.device_put(x, x.sharding), self.kv)
    self._kv_shardings = jax.tree.map(lambda x: x.sharding, self.kv)
    # Step inputs and outputs are small and replicated: every device sees the
    # whole flat batch (its rows' K/V are split by head, its weights by the rules).
    self._replicated = NamedSharding(mesh, P())
    self._jitted = jax.jit(self._forward, donate_argnums=(1,),
                           out_shardings=(self._kv_shardings, self._replicated))
    self.max_rows = config.max_sample_rows
    self._table_width = config.max_pages_per_seq
    # The previous step's sampled tokens, read by the next step's decode rows.
    self._prev_tokens = jax.device_put(np.zeros(self.max_rows, np.int32), self._replicated)
    # Compiled variants by shape key; `compilations` counts every compile.
    self._compiled: dict[tuple, jax.stages.Compiled] = {}
    self._compile_lock = threading.Lock()
    self.compilations = 0
    self._sub_byte = any(jnp.dtype(x.dtype).itemsize < 1 or jnp.dtype(x.dtype).name in
                         ("int4", "uint4") for x in jax.tree.leaves(self.state))

  # The step -------------------------------------------------------------------------

  def _forward(self, state, kv, prev_tokens, inputs: StepInputs):
    model = nnx.merge(self.graphdef, state)
    num_decode = inputs.src.shape[0]
    tokens = inputs.tokens
    if num_decode:
      src = inputs.src
      known = tokens[:num_decode]
      tokens = tokens.at[:num_decode].set(
          jnp.where(src >= 0, prev_tokens[jnp.maximum(src, 0)], known))
    with sharding_lib.rules_in_effect(self.mesh, self._plan):
      logits, kv = model(tokens, inputs.positions, kv, inputs.slots, inputs.layout,
                         inputs.sample_index)  # [R, V]
    # Penalty history entries the host has not read yet: -2 - s names the
    # previous step's output row s.
    ids = inputs.sampler.history_ids
    ids = jnp.where(ids <= -2, prev_tokens[jnp.clip(-2 - ids, 0, self.max_rows - 1)], ids)
    out = sampling.sample(logits, inputs.sampler._replace(history_ids=ids))
    rows = out.tokens.shape[0]
    all_tokens = jnp.zeros((self.max_rows,), jnp.int32).at[:rows].set(out.tokens)
    return kv, StepOutput(all_tokens, out.logprob, out.top_ids, out.top_logprobs)

  def _key(self, inputs: StepInputs) -> tuple:
    s = inputs.sampler
    return (inputs.src.shape[0], inputs.tokens.shape[0] - inputs.src.shape[0],
            s.banned.shape[1], s.history_rows.shape[0], s.allowed.shape)

  def dispatch(self, decode: Sequence[DecodeRow], chunks: Sequence[Chunk],
               decode_samples: Sequence, chunk_samples: Sequence,
               shape: tuple[int, int]) -> Pending:
    """Runs one step asynchronously. `decode_samples`, `chunk_samples`: a
    sampling.build_inputs row (or None: nobody reads it) per decode row and per
    chunk; `shape` is the step's (decode rows, prefill tokens) bucket. Decode
    row i samples into output row i, chunk j into row shape[0] + j."""
    sample_rows = list(decode_samples) + [None] * (shape[0] - len(decode)) + list(chunk_samples)
    inputs = self.build(decode, chunks, sample_rows, shape)
    compiled = self._compiled.get(self._key(inputs)) or self._compile(inputs)
    t0 = time.perf_counter()
    self.kv, out = compiled(self.state, self.kv, self._prev_tokens, inputs)
    self._prev_tokens = out.tokens
    want = bool(inputs.sampler.logprobs.any())
    return Pending(out, t0, want)

  def build(self, decode: Sequence[DecodeRow], chunks: Sequence[Chunk], sample_rows,
            shape: tuple[int, int]) -> StepInputs:
    """The host arrays of a step (numpy; whole-array operations where a row loop
    would cost: ~12 us a row, 3 ms a step at batch 256)."""
    cfg = self.config
    num_decode, num_prefill = shape
    tile, page = cfg.prefill_tile, cfg.page_size
    num_tiles = num_prefill // tile
    n = num_decode + num_prefill
    width = self._table_width
    tokens = np.zeros(n, np.int32)
    positions = np.full(n, -1, np.int32)
    slots = np.full(n, self._scratch_slot, np.int32)
    src = np.full(num_decode, -1, np.int32)
    decode_tables = np.zeros((num_decode, width), np.int32)
    decode_lens = np.zeros(num_decode, np.int32)
    tile_tables = np.zeros((num_tiles, width), np.int32)
    tile_lens = np.zeros(num_tiles, np.int32)
    num_samples = num_decode + (min(cfg.max_prefill_batch, num_tiles) if num_tiles else 0)
    sample_index = np.zeros(num_samples, np.int32)

    d = len(decode)
    if d:
      starts = np.fromiter((r.position for r in decode), np.int32, d)
      tokens[:d] = np.fromiter((r.token for r in decode), np.int32, d)
      src[:d] = np.fromiter((r.src for r in decode), np.int32, d)
      counts = np.fromiter((len(r.pages) for r in decode), np.int64, d)
      flat = np.fromiter(itertools.chain.from_iterable(r.pages for r in decode), np.int32,
                         int(counts.sum()))
      first = np.repeat(np.cumsum(counts) - counts, counts)  # each entry's row start in flat
      decode_tables[np.repeat(np.arange(d), counts), np.arange(flat.size) - first] = flat
      positions[:d] = starts
      slots[:d] = (decode_tables[np.arange(d), starts // page] * page + starts % page)
      decode_lens[:d] = starts + 1
      sample_index[:d] = np.arange(d)

    t = 0  # next tile
    for j, c in enumerate(chunks):
      m = len(c.tokens)
      at = num_decode + t * tile
      pos = np.arange(c.start, c.start + m, dtype=np.int32)
      pages = np.asarray(c.pages, np.int32)
      tokens[at:at + m] = c.tokens
      positions[at:at + m] = pos
      slots[at:at + m] = pages[pos // page] * page + pos % page
      used = -(-m // tile)
      tile_tables[t:t + used, :len(pages)] = pages
      # Each tile's own last position bounds its loop; every tile of the chunk
      # sees the same pages.
      ends = np.minimum(c.start + (np.arange(used) + 1) * tile, c.start + m)
      tile_lens[t:t + used] = ends
      sample_index[num_decode + j] = at + m - 1
      t += used
    sampler = sampling.build_inputs(
        list(sample_rows) + [None] * (num_samples - len(sample_rows)), num_samples,
        self.model_config.vocab_size)
    layout = attention.StepLayout(decode_tables, decode_lens, tile_tables, tile_lens)
    return StepInputs(tokens, positions, slots, src, layout, sample_index, sampler)

  @staticmethod
  def read(pending: Pending) -> tuple[np.ndarray, tuple | None]:
    """Waits for a step and reads its tokens (and log-probabilities if asked)."""
    o = pending.output
    if not pending.want_logprobs:
      return np.asarray(o.tokens), None
    tokens, *logprobs = jax.device_get((o.tokens, o.logprob, o.top_ids, o.top_logprobs))
    return tokens, tuple(logprobs)

  # Compilation ------------------------------------------------------------------------

  def _compile(self, inputs: StepInputs) -> jax.stages.Compiled:
    key = self._key(inputs)
    spec = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._replicated), inputs)
    prev = jax.ShapeDtypeStruct((self.max_rows,), jnp.int32, sharding=self._replicated)
    # Weights and pools by their formats (layout + sharding), not just their shapes:
    # sub-byte arrays (int4 weights) can be laid out packed or not, and the compiled
    # step must take them as they lie.
    like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.format)  # noqa: E731
    compile_now = lambda: self._jitted.lower(  # noqa: E731
        jax.tree.map(like, self.state), jax.tree.map(like, self.kv), prev, spec).compile()
    if self._sub_byte:
      # An ahead-of-time executable insists on the packed layout of int4 weights,
      # which arrays placed from the host do not have; jit's own dispatch adapts
      # (and compiles on the first call). Compiling ahead is then only worth it
      # to fill a persistent cache that jit reads; without one it would compile
      # every shape twice.
      if jax.config.jax_compilation_cache_dir:
        compile_now()
      compiled = self._jitted
    else:
      compiled = compile_now()
    with self._compile_lock:
      self._compiled.setdefault(key, compiled)
      self.compilations += 1
    return self._compiled[key]

  def standard_inputs(self, shape: tuple[int, int]) -> StepInputs:
    """Inputs of `shape` as a workload without penalties or masks sends them."""
    return self.build([], [], [], shape)

  def warmup(self, threads: int | None = None) -> float:
    """Compiles every standard step shape; returns the seconds it took."""
    t0 = time.perf_counter()
    todo = [self.standard_inputs(s) for s in self.config.step_shapes()]
    todo = [x for x in todo if self._key(x) not in self._compiled]
    threads = threads or max(1, min(len(todo), os.cpu_count() or 1))
    if todo:
      with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(self._compile, todo))
    return time.perf_counter() - t0

  @property
  def variants(self) -> set[tuple]:
    """Shape keys compiled so far."""
    return set(self._compiled)

  def hlo_text(self, shape: tuple[int, int]) -> str:
    inputs = self.standard_inputs(shape)
    return (self._compiled.get(self._key(inputs)) or self._compile(inputs)).as_text()

  # For benchmarks and tests ------------------------------------------------------------

  def run_rows(self, rows: Sequence[Row]) -> jax.Array:
    """One greedy step over `rows` (one token: decode; more: a prefill chunk that
    samples), outside the scheduler; returns the device array of sampled tokens."""
    cfg = self.config
    decode = [DecodeRow(r.tokens[0], -1, r.start, r.pages) for r in rows if len(r.tokens) == 1]
    chunks = [Chunk(r.tokens, r.start, r.pages, True) for r in rows if len(r.tokens) > 1]
    prefill = sum(-(-len(c.tokens) // cfg.prefill_tile) * cfg.prefill_tile for c in chunks)
    if chunks:
      shape = (config_lib.bucket(len(decode), cfg.mixed_decode_buckets),
               config_lib.bucket(prefill, cfg.prefill_token_buckets))
    else:
      shape = (config_lib.bucket(len(decode), cfg.decode_buckets), 0)
    greedy = (sampling.SamplingParams(temperature=0), 0, 0, [], [], [])
    return self.dispatch(decode, chunks, [greedy] * len(decode), [greedy] * len(chunks),
                         shape).output.tokens
