"""The step: the model over a flat batch of tokens, then the sampler.

The model is split once into (graphdef, state); each part of the step is a jitted
function of the state, not an `nnx.jit` of the module (which would walk the
module graph on every call). The page pools are donated, so XLA writes the new
K/V into the same buffers and the old handles are deleted.

A step is every decoding sequence's next token and the prefill chunks chosen for
it, packed as one flat batch (`ModelInputs`, see `attention.StepLayout`): the
weights are read once per step, for all of its tokens. It runs as two
executables, dispatched one after the other without waiting: the model pass
(`forward`: K/V written, logits of the rows that sample, prompt scores) and the
sampler (`sample`: every row that needs a token, decode rows and prefill chunks
that end their prompt; only the sampled tokens and the log-probabilities asked
for come back). Between the two the host reads the previous step's tokens, so
the sampler's per-row allowed-token masks (structured outputs: a grammar
advanced by the token just read) are filled while the model pass runs. A decode
row's input token may be one the previous step sampled and the host has not read
yet: it names that step's output row (`src`), and the device takes the token from
the previous output directly, so the host can dispatch step N+1 before it reads
step N.

Shapes come from a fixed set (`EngineConfig.step_shapes`): decode rows and
prefill tokens padded to buckets, block tables at full width; the sampler's
variants follow the number of sample rows. `warmup()` compiles them ahead of
time, in parallel threads (XLA compiles with the GIL released), through JAX's
persistent compilation cache when it is enabled, or (background=True) the cover
shapes first and the rest as they pay for themselves. The runner always runs on a
mesh: a 1x1 one when none is given.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import threading
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ridgeline.engine import config as config_lib
from ridgeline.engine import sampling
from ridgeline.engine.config import EngineConfig, StepShape
from ridgeline.model import attention
from ridgeline.model import sharding as sharding_lib
from ridgeline.model import transformer as transformer_lib


def enable_compilation_cache(path: str) -> None:
  """Persists compiled executables under `path` (called by scripts, not the library)."""
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


# A variant that loads from the persistent compilation cache takes ~0.4 s (its
# lowering and the load); compiling one takes 1-3 s on the 2-core CPU host.
CACHED_COMPILE_SECONDS = 0.8


class DecodeRows(NamedTuple):
  """The decoding sequences of a step, one token each (host arrays, [d] rows):
  the token at `positions` is `tokens` if the host knows it, else the previous
  step's output row `src` sampled it; `tables` are their block tables."""

  tokens: np.ndarray  # [d] i32
  src: np.ndarray  # [d] i32, -1: the token is in `tokens`
  positions: np.ndarray  # [d] i32
  tables: np.ndarray  # [d, NB] i32


@dataclasses.dataclass
class Chunk:
  """Prompt tokens of one sequence at positions start, start+1, ...; `sample`:
  the chunk ends the prompt, so its last token's logits are sampled.

  Scoring (prompt log-probabilities): the positions score_start, score_start+1,
  ... (len(score_targets) of them, inside the chunk) get the log-probability of
  their next token (`score_targets`) and their top `score_k` alternatives."""

  tokens: np.ndarray
  start: int
  pages: np.ndarray
  sample: bool = False
  score_start: int = 0
  score_targets: np.ndarray | None = None
  score_k: int = 0


@dataclasses.dataclass
class Row:
  """A sequence's tokens at positions start, start+1, ... (benchmarks and tests):
  one token is a decode row, more a prefill chunk."""

  tokens: Sequence[int]
  start: int
  pages: Sequence[int]


class ModelInputs(NamedTuple):
  """The device inputs of one step's model pass (a pytree of int32 arrays)."""

  tokens: np.ndarray  # [N]
  positions: np.ndarray  # [N], -1 for padding
  slots: np.ndarray  # [N]
  src: np.ndarray  # [Bd] previous step's output row of a decode row's token, -1: `tokens`
  layout: attention.StepLayout
  sample_index: np.ndarray  # [R] token whose logits each sample row reads
  # Prompt positions scored (prompt log-probabilities): S of them, 0 when no
  # chunk of the step asks (a bucket otherwise: a variant of its own).
  score_index: np.ndarray  # [S] token whose logits are scored
  score_target: np.ndarray  # [S] the token whose log-probability is read there
  score_k: np.ndarray  # [S] alternatives wanted there (-1: padding)


class StepOutput(NamedTuple):
  tokens: jax.Array  # [max_sample_rows] i32 (rows past the step's R are 0)
  logprob: jax.Array  # [R]
  top_ids: jax.Array  # [R, MAX_LOGPROBS]
  top_logprobs: jax.Array  # [R, MAX_LOGPROBS]
  score_logprob: jax.Array  # [S] log-probability of each scored position's target
  score_top_ids: jax.Array  # [S, MAX_LOGPROBS]
  score_top_logprobs: jax.Array  # [S, MAX_LOGPROBS]


@dataclasses.dataclass
class Forwarded:
  """A step whose model pass is dispatched and whose sampler is not yet."""

  shape: StepShape
  logits: jax.Array  # [R, V] of the rows that sample
  scores: tuple  # (logprob [S], top_ids [S, K], top_logprobs [S, K]) on the device
  dispatched_at: float


@dataclasses.dataclass
class Pending:
  """A dispatched step whose results the host has not read yet."""

  output: StepOutput
  dispatched_at: float
  want_logprobs: bool
  want_scores: bool = False


class StepResult(NamedTuple):
  """What the host reads of a step: the sampled tokens, and the log-probability
  arrays (numpy) when some row asked for them (else None)."""

  tokens: np.ndarray
  logprobs: tuple | None  # (logprob [R], top_ids [R, K], top_logprobs [R, K])
  scores: tuple | None  # (logprob [S], top_ids [S, K], top_logprobs [S, K])


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
    self._model_jit = jax.jit(self._model_pass, donate_argnums=(1,),
                              out_shardings=(self._kv_shardings, self._replicated,
                                             self._replicated))
    self._sample_jit = jax.jit(self._sample_pass, out_shardings=self._replicated)
    self.max_rows = config.max_sample_rows
    self._table_width = config.max_pages_per_seq
    # The previous step's sampled tokens, read by the next step's decode rows.
    self._prev_tokens = jax.device_put(np.zeros(self.max_rows, np.int32), self._replicated)
    # Compiled variants by key (`_model_key`, `_sampler_key`); `compilations`
    # counts them (a key two threads compiled at once counts once).
    self._compiled: dict[tuple, object] = {}
    self._compile_lock = threading.Lock()
    self.compilations = 0
    self._compile_time = 0.0
    # Compiling in the background (warmup(background=True)): its executor and
    # the shapes queued on it.
    self._background: concurrent.futures.ThreadPoolExecutor | None = None
    self._queued: set[StepShape] = set()
    self.mask_words = -(-model.config.vocab_size // 32)
    self._no_masks: dict[int, jax.Array] = {}  # rows -> an all-zero mask on the device
    self._scatter = jax.jit(_scatter_pages, donate_argnums=(0,),
                            out_shardings=self._kv_shardings)  # the host tier's copies
    self._sub_byte = any(jnp.dtype(x.dtype).itemsize < 1 or jnp.dtype(x.dtype).name in
                         ("int4", "uint4") for x in jax.tree.leaves(self.state))

  # The two passes -----------------------------------------------------------------

  def _model_pass(self, state, kv, prev_tokens, inputs: ModelInputs):
    """K/V written for every token; logits of the sample rows [R, V]; the prompt
    scores asked for."""
    model = nnx.merge(self.graphdef, state)
    num_decode = inputs.src.shape[0]
    tokens = inputs.tokens
    if num_decode:
      src = inputs.src
      known = tokens[:num_decode]
      tokens = tokens.at[:num_decode].set(
          jnp.where(src >= 0, prev_tokens[jnp.maximum(src, 0)], known))
    rows = inputs.sample_index.shape[0]
    index = jnp.concatenate([inputs.sample_index, inputs.score_index])
    with sharding_lib.rules_in_effect(self.mesh, self._plan):
      logits, kv = model(tokens, inputs.positions, kv, inputs.slots, inputs.layout,
                         index)  # [R + S, V]
    scores = sampling.score(logits[rows:], inputs.score_target, inputs.score_k)
    return kv, logits[:rows], scores

  def _sample_pass(self, logits, prev_tokens, sampler: sampling.SamplerInputs) -> StepOutput:
    # Penalty history entries the host has not read yet name the previous
    # step's output row that holds them.
    hsrc = sampler.history_src
    ids = jnp.where(hsrc >= 0, prev_tokens[jnp.clip(hsrc, 0, self.max_rows - 1)],
                    sampler.history_ids)
    out = sampling.sample(logits, sampler._replace(history_ids=ids))
    rows = logits.shape[0]
    all_tokens = jnp.zeros((self.max_rows,), jnp.int32).at[:rows].set(out.tokens)
    return all_tokens, out.logprob, out.top_ids, out.top_logprobs

  @staticmethod
  def _model_key(inputs: ModelInputs) -> tuple:
    return ("model", inputs.src.shape[0], inputs.tokens.shape[0] - inputs.src.shape[0],
            inputs.score_index.shape[0])

  @staticmethod
  def _sampler_key(sampler: sampling.SamplerInputs) -> tuple:
    return ("sample", sampler.temperature.shape[0], sampler.banned.shape[1],
            sampler.history_rows.shape[0])

  def sample_rows(self, shape: StepShape) -> int:
    return self.config.sample_rows(shape)

  def forward(self, shape: StepShape, decode: DecodeRows, chunks: Sequence[Chunk]
              ) -> Forwarded:
    """Dispatches a step's model pass (asynchronously)."""
    inputs = self.build(shape, decode, chunks)
    key = self._model_key(inputs)
    compiled = self._compiled.get(key) or self._compile_model(inputs)
    t0 = time.perf_counter()
    self.kv, logits, scores = compiled(self.state, self.kv, self._prev_tokens, inputs)
    return Forwarded(shape, logits, scores, t0)

  def sample(self, forwarded: Forwarded, sampler: sampling.SamplerInputs) -> Pending:
    """Dispatches a step's sampler (asynchronously): `sampler` has
    `sample_rows(shape)` rows; its `allowed` masks may be None (no row has one)."""
    sampler = self.with_masks(sampler)
    key = self._sampler_key(sampler)
    compiled = self._compiled.get(key) or self._compile_sampler(sampler)
    tokens, logprob, top_ids, top_lp = compiled(forwarded.logits, self._prev_tokens, sampler)
    self._prev_tokens = tokens
    out = StepOutput(tokens, logprob, top_ids, top_lp, *forwarded.scores)
    return Pending(out, forwarded.dispatched_at, bool(sampler.logprobs.any()),
                   forwarded.scores[0].shape[0] > 0)

  def dispatch(self, shape: StepShape, decode: DecodeRows, chunks: Sequence[Chunk],
               sampler: sampling.SamplerInputs) -> Pending:
    """A whole step: the model pass, then the sampler."""
    return self.sample(self.forward(shape, decode, chunks), sampler)

  def with_masks(self, sampler: sampling.SamplerInputs) -> sampling.SamplerInputs:
    """The sampler's inputs with a mask array of every row: an all-zero one kept
    on the device when no row has a mask (not sent each step), so masked and
    unmasked steps share one compiled sampler."""
    if sampler.allowed is not None:
      return sampler
    rows = sampler.temperature.shape[0]
    if rows not in self._no_masks:
      self._no_masks[rows] = jax.device_put(np.zeros((rows, self.mask_words), np.uint32),
                                            self._replicated)
    return sampler._replace(allowed=self._no_masks[rows])

  def build(self, shape: StepShape, decode: DecodeRows, chunks: Sequence[Chunk]
            ) -> ModelInputs:
    """The host arrays of a step's model pass: the decode region as whole-array
    operations (no Python per row), then a few lines per prefill chunk."""
    cfg = self.config
    num_decode, num_prefill = shape.decode, shape.prefill
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
    num_samples = self.sample_rows(shape)
    sample_index = np.zeros(num_samples, np.int32)

    d = len(decode.tokens)
    if d:
      pos = decode.positions
      tokens[:d] = decode.tokens
      src[:d] = decode.src
      decode_tables[:d] = decode.tables
      positions[:d] = pos
      slots[:d] = decode.tables[np.arange(d), pos // page] * page + pos % page
      decode_lens[:d] = pos + 1
      sample_index[:d] = np.arange(d)

    score_index, score_target, score_k = [], [], []
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
      if c.score_targets is not None and len(c.score_targets):
        n_score = len(c.score_targets)
        score_index.append(at + c.score_start - c.start + np.arange(n_score))
        score_target.append(c.score_targets)
        score_k.append(np.full(n_score, c.score_k))
      t += used
    layout = attention.StepLayout(decode_tables, decode_lens, tile_tables, tile_lens)
    n_score = sum(len(x) for x in score_index)
    width = config_lib.bucket(n_score, self.score_buckets) if n_score else 0
    scores = [np.zeros(width, np.int32), np.zeros(width, np.int32), np.full(width, -1, np.int32)]
    if n_score:
      for a, parts in zip(scores, (score_index, score_target, score_k)):
        a[:n_score] = np.concatenate(parts)
    return ModelInputs(tokens, positions, slots, src, layout, sample_index, *scores)

  @property
  def score_buckets(self) -> tuple[int, ...]:
    """Scored positions of a step (prompt log-probabilities): 16, 64, ... up to
    the largest prefill bucket (each a variant, compiled when first used)."""
    return config_lib.geometric_buckets(self.config.prefill_token_buckets[-1], 16, 4)

  @staticmethod
  def read(pending: Pending) -> StepResult:
    """Waits for a step and reads its tokens (and log-probabilities if asked),
    in one transfer."""
    o = pending.output
    parts = [o.tokens]
    if pending.want_logprobs:
      parts += [o.logprob, o.top_ids, o.top_logprobs]
    if pending.want_scores:
      parts += [o.score_logprob, o.score_top_ids, o.score_top_logprobs]
    got = jax.device_get(parts) if len(parts) > 1 else [np.asarray(o.tokens)]
    logprobs = tuple(got[1:4]) if pending.want_logprobs else None
    scores = tuple(got[-3:]) if pending.want_scores else None
    return StepResult(got[0], logprobs, scores)

  # Compilation ------------------------------------------------------------------------

  def _model_args(self, inputs: ModelInputs, placement) -> tuple:
    """Abstract arguments of the model pass: weights and pools placed by
    `placement(array)`, then the previous tokens and the inputs (replicated)."""
    like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement(x))  # noqa: E731
    return (jax.tree.map(like, self.state), jax.tree.map(like, self.kv),
            self._abstract(np.zeros(self.max_rows, np.int32)), self._abstract(inputs))

  def _sampler_args(self, sampler: sampling.SamplerInputs) -> tuple:
    rows = sampler.temperature.shape[0]
    logits = jax.ShapeDtypeStruct((rows, self.model_config.vocab_size), jnp.float32,
                                  sharding=self._replicated)
    return (logits, self._abstract(np.zeros(self.max_rows, np.int32)),
            self._abstract(self.with_masks(sampler)))

  def _abstract(self, tree):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._replicated), tree)

  def _compile_model(self, inputs: ModelInputs):
    # Weights and pools by their formats (layout + sharding), not just their shapes:
    # sub-byte arrays (int4 weights) can be laid out packed or not, and the compiled
    # step must take them as they lie.
    args = self._model_args(inputs, lambda x: x.format)
    compile_now = lambda: self._model_jit.lower(*args).compile()  # noqa: E731
    if self._sub_byte:
      # An ahead-of-time executable insists on the packed layout of int4 weights,
      # which arrays placed from the host do not have; jit's own dispatch adapts
      # (and compiles on the first call). Compiling ahead is then only worth it
      # to fill a persistent cache that jit reads; without one it would compile
      # every shape twice.
      if jax.config.jax_compilation_cache_dir:
        compile_now()
      return self._store(self._model_key(inputs), self._model_jit, 0.0)
    t0 = time.perf_counter()
    return self._store(self._model_key(inputs), compile_now(), time.perf_counter() - t0)

  def _compile_sampler(self, sampler: sampling.SamplerInputs):
    t0 = time.perf_counter()
    compiled = self._sample_jit.lower(*self._sampler_args(sampler)).compile()
    return self._store(self._sampler_key(sampler), compiled, time.perf_counter() - t0)

  def _store(self, key: tuple, compiled, seconds: float):
    """Keeps a compiled executable (the first, if two threads compiled one key)."""
    with self._compile_lock:
      if key not in self._compiled:
        self._compiled[key] = compiled
        self.compilations += 1
        self._compile_time += seconds
    return self._compiled[key]

  def _compile_shape(self, shape: StepShape) -> None:
    """The model pass of a standard step of `shape` and its sampler, unless compiled."""
    if self._standard_key(shape) not in self._compiled:
      self._compile_model(self.standard_inputs(shape))
    sampler = self.standard_sampler(shape)
    if self._sampler_key(sampler) not in self._compiled:
      self._compile_sampler(sampler)

  def export(self, shape: StepShape, platforms: Sequence[str] = ("cuda",),
             sampler: sampling.SamplerInputs | None = None
             ) -> tuple[jax.export.Exported, jax.export.Exported]:
    """The model pass and the sampler of a step of `shape` (with `sampler`'s inputs,
    default plain ones) lowered for `platforms` with jax.export, on any host (a CPU
    lowers for CUDA): a shape or dtype that only the GPU path rejects fails here,
    in a CPU test, rather than on a lent GPU. The Pallas kernel's Triton calls are
    allowed (they have no compatibility guarantee across jax versions, which does
    not matter for a check)."""
    shape = StepShape(*shape)
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    model = jax.export.export(self._model_jit, platforms=platforms, disabled_checks=checks)(
        *self._model_args(self.standard_inputs(shape), lambda x: x.sharding))
    sampler = sampler if sampler is not None else self.standard_sampler(shape)
    sample = jax.export.export(self._sample_jit, platforms=platforms)(
        *self._sampler_args(sampler))
    return model, sample

  def standard_inputs(self, shape: StepShape) -> ModelInputs:
    """The model pass's inputs of `shape` (no scoring)."""
    return self.build(StepShape(*shape), self.no_decode, [])

  def standard_sampler(self, shape: StepShape) -> sampling.SamplerInputs:
    """Sampler inputs of `shape` as a workload without penalties or bans sends them."""
    return sampling.inputs_for([], self.sample_rows(StepShape(*shape)),
                               self.model_config.vocab_size)

  @property
  def no_decode(self) -> DecodeRows:
    empty = np.zeros(0, np.int32)
    return DecodeRows(empty, empty, empty, np.zeros((0, self._table_width), np.int32))

  def warmup(self, threads: int | None = None, *, background: bool = False) -> float:
    """Compiles the standard step shapes (each shape's model pass and the sampler
    of its rows); returns the seconds it took.

    background=False: every shape now, in parallel threads. background=True:
    only the cover shapes now (the largest decode-only and the largest mixed
    shape, which every step fits in); from then on a step whose own shape is
    not compiled runs padded into the smallest compiled shape that holds it
    (`shape_for`), and the scheduler has its own shape compiled in a background
    thread once the padding has cost more than compiling would
    (`compile_later`). No step waits for a compilation either way; the second
    way starts sooner and compiles only the shapes that pay for themselves.
    """
    t0 = time.perf_counter()
    shapes = self.config.step_shapes()
    if background:
      self._background = concurrent.futures.ThreadPoolExecutor(1, "ridgeline-compile")
      shapes = self.cover_shapes()
    todo = [functools.partial(self._compile_model, self.standard_inputs(s))
            for s in shapes if self._standard_key(s) not in self._compiled]
    samplers = {self._sampler_key(x): x for x in map(self.standard_sampler, shapes)}
    todo += [functools.partial(self._compile_sampler, x) for k, x in samplers.items()
             if k not in self._compiled]
    threads = threads or max(1, min(len(todo), os.cpu_count() or 1))
    if todo:
      with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda compile_: compile_(), todo))
    if background and self.compile_seconds < CACHED_COMPILE_SECONDS:
      # The cover shapes came from the persistent cache, so the others are likely
      # there too: load them all now, in the background (~0.4 s each).
      for shape in self.config.step_shapes():
        self.compile_later(shape)
    return time.perf_counter() - t0

  def cover_shapes(self) -> list[StepShape]:
    """The shapes every step fits in: the largest decode-only one, and the
    largest with prefill (which also holds any decode-only step)."""
    cfg = self.config
    return [StepShape(cfg.decode_buckets[-1], 0),
            StepShape(cfg.mixed_decode_buckets[-1], cfg.prefill_token_buckets[-1])]

  def shape_for(self, shape: StepShape) -> StepShape:
    """The shape a step of `shape` runs as: its own if it is compiled, or unless
    shapes compile in the background; else the smallest compiled standard shape
    that holds it (a decode-only one for a decode-only step, if any)."""
    if self._background is None or self._ready(shape):
      return shape
    fits = [s for s in self._compiled_standard()
            if s.decode >= shape.decode and s.prefill >= shape.prefill]
    if shape.prefill == 0:  # a decode-only shape holds it without a padded prefill region
      fits = [s for s in fits if s.prefill == 0] or fits
    if not fits:
      return shape  # nothing compiled holds it: dispatch compiles it now
    return min(fits, key=lambda s: (s.prefill, s.decode))

  def compile_later(self, shape: StepShape) -> None:
    """Queues `shape` to compile in the background thread (once)."""
    with self._compile_lock:
      if self._background is None or shape in self._queued or self._ready(shape):
        return
      self._queued.add(shape)
    self._background.submit(self._compile_shape, shape)

  @property
  def compile_seconds(self) -> float:
    """The mean wall seconds a variant took to compile so far (2 before any)."""
    return self._compile_time / self.compilations if self.compilations else 2.0

  def _ready(self, shape: StepShape) -> bool:
    """Whether a standard step of `shape` runs without compiling."""
    return all(k in self._compiled for k in self.standard_keys(shape))

  def standard_keys(self, shape: StepShape) -> tuple[tuple, tuple]:
    """The keys of a standard step's model pass and sampler."""
    return (self._standard_key(shape),
            ("sample", self.sample_rows(shape), sampling.BAN_WIDTH, sampling.HISTORY_TOKENS))

  def _standard_key(self, shape: StepShape) -> tuple:
    return ("model", shape.decode, shape.prefill, 0)

  def _compiled_standard(self) -> list[StepShape]:
    return [StepShape(k[1], k[2]) for k in list(self._compiled)
            if k[0] == "model" and k[3] == 0 and self._ready(StepShape(k[1], k[2]))]

  @property
  def variants(self) -> set[tuple]:
    """Keys of the executables compiled so far (model passes and samplers)."""
    return set(self._compiled)

  def hlo_text(self, shape: StepShape) -> str:
    """The compiled model pass of `shape` (where the page pools are donated)."""
    shape = StepShape(*shape)
    compiled = self._compiled.get(self._standard_key(shape)) or self._compile_model(
        self.standard_inputs(shape))
    return compiled.as_text()

  # The host tier's copies (engine/kv_host.py) --------------------------------------------

  def save_pages(self, pages: Sequence[int]) -> list[jax.Array]:
    """The pools' rows of `pages`, gathered now (dispatched before any later step
    writes them): one device array per pool leaf, page-major, padded to a power
    of two of rows (one compiled gather per width)."""
    return _gather_pages(self.kv, self._page_index(pages))

  def load_pages(self, pages: Sequence[int], rows: Sequence) -> None:
    """Writes rows (per pool leaf, [len(pages), ...]; numpy, or device arrays not
    yet moved to the host) into device `pages`, dispatched now (before the step
    that reads them), the pools donated."""
    idx = self._page_index(pages)
    padded = []
    for r in rows:
      extra = len(idx) - len(r)
      if isinstance(r, np.ndarray):
        padded.append(np.concatenate([r, np.zeros((extra,) + r.shape[1:], r.dtype)]))
      else:  # rows still on the device (gathered since the host tier last settled)
        padded.append(jnp.concatenate([r, jnp.zeros((extra,) + r.shape[1:], r.dtype)]))
    self.kv = self._scatter(self.kv, idx, padded)

  def warm_copies(self) -> float:
    """Compiles the host tier's gathers and scatters of every width up front;
    returns the fixed cost of a copy back: the best of 5 one-page round trips
    (gather, to host, scatter), dispatch and synchronisation included, in seconds."""
    width = 1
    while True:
      rows = self.save_pages([self.num_pages] * width)
      self.load_pages([self.num_pages] * width, rows)
      if width >= self.num_pages:
        break
      width *= 2
    jax.block_until_ready(self.kv)
    best = float("inf")
    for _ in range(5):
      t0 = time.perf_counter()
      rows = [np.asarray(x) for x in self.save_pages([self.num_pages])]
      self.load_pages([self.num_pages], [r[:1] for r in rows])
      jax.block_until_ready(self.kv)
      best = min(best, time.perf_counter() - t0)
    return best

  def _page_index(self, pages: Sequence[int]) -> np.ndarray:
    """`pages`, padded with the scratch page to a power of two."""
    n = len(pages)
    idx = np.full(1 << max(0, (n - 1).bit_length()), self.num_pages, np.int32)
    idx[:n] = pages
    return idx

  @property
  def page_bytes(self) -> int:
    """Bytes of one page across every layer's pools (8-bit values and scales as
    they are)."""
    return sum(x.nbytes // x.shape[0] for x in jax.tree.leaves(self.kv))

  # For benchmarks and tests ------------------------------------------------------------

  def run_rows(self, rows: Sequence[Row]) -> jax.Array:
    """One greedy step over `rows` (one token: decode; more: a prefill chunk that
    samples), outside the scheduler; returns the device array of sampled tokens."""
    cfg = self.config
    one = [r for r in rows if len(r.tokens) == 1]
    chunks = [Chunk(np.asarray(r.tokens, np.int32), r.start, np.asarray(r.pages, np.int32),
                    True) for r in rows if len(r.tokens) > 1]
    tables = np.zeros((len(one), self._table_width), np.int32)
    for i, r in enumerate(one):
      tables[i, :len(r.pages)] = r.pages
    decode = DecodeRows(np.asarray([r.tokens[0] for r in one], np.int32),
                        np.full(len(one), -1, np.int32),
                        np.asarray([r.start for r in one], np.int32), tables)
    prefill = sum(-(-len(c.tokens) // cfg.prefill_tile) * cfg.prefill_tile for c in chunks)
    if chunks:
      shape = StepShape(config_lib.bucket(len(one), cfg.mixed_decode_buckets),
                        config_lib.bucket(prefill, cfg.prefill_token_buckets))
    else:
      shape = StepShape(config_lib.bucket(len(one), cfg.decode_buckets), 0)
    greedy = sampling.SampleRow(sampling.SamplingParams(temperature=0))
    rows_ = ([greedy] * len(one) + [None] * (shape.decode - len(one))
             + [greedy] * len(chunks))
    sampler = sampling.inputs_for(rows_, self.sample_rows(shape), self.model_config.vocab_size)
    return self.dispatch(shape, decode, chunks, sampler).output.tokens


@jax.jit
def _gather_pages(kv, index):
  return [x[index] for x in jax.tree.leaves(kv)]


def _scatter_pages(kv, index, rows):
  leaves, treedef = jax.tree.flatten(kv)
  return jax.tree.unflatten(treedef, [x.at[index].set(r.astype(x.dtype))
                                      for x, r in zip(leaves, rows)])
