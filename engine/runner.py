"""The step: the model over a flat batch of tokens, then the sampler.

The model is split once into (graphdef, state); each part of the step is a jitted
function of the state, not an `nnx.jit` of the module (which would walk the
module graph on every call). The page pools are donated, so XLA writes the new
K/V into the same buffers and the old handles are deleted.

A step (its inputs packed as one flat batch: engine/step_inputs.py) runs as two
executables, dispatched one after the other without waiting: the model pass
(`forward`: K/V written, logits of the rows that sample, prompt scores) and the
sampler (`sample`: every row that needs a token, decode rows and prefill chunks
that end their prompt; only the sampled tokens and the log-probabilities asked
for come back). Between the two the host reads the previous step's tokens, so
the sampler's per-row allowed-token masks (structured outputs: a grammar
advanced by the token just read) are filled while the model pass runs. A decode
row whose token the host has not read yet takes it from the previous step's
sampled tokens, which stay on the device (`_prev_tokens`), as do penalty
histories.

The runner's other duties live beside it, as parts of the class: compiling and
keeping the executables, warm-up and export (`StepCompiler`,
engine/step_compiler.py) and the host KV tier's page copies (`PageCopies`,
engine/kv_copies.py). The runner always runs on a mesh: a 1x1 one when none is
given.
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from ridgeline.engine import config as config_lib
from ridgeline.engine import sampler_inputs
from ridgeline.engine import sampling
from ridgeline.engine import step_inputs
from ridgeline.engine.config import EngineConfig, StepShape
from ridgeline.engine.kv_copies import PageCopies
from ridgeline.engine.sampler_inputs import SamplerInputs
from ridgeline.engine.sampling_params import SamplingParams
from ridgeline.engine.step_compiler import StepCompiler
from ridgeline.engine.step_compiler import enable_compilation_cache
from ridgeline.engine.step_inputs import Chunk, DecodeRows, ModelInputs, Row
from ridgeline.model import sharding as sharding_lib
from ridgeline.model import transformer as transformer_lib
from ridgeline.util import ceil_div

# enable_compilation_cache and Row are re-exported: the CLI, the fleet, the tests
# and the benchmarks import them from here.
__all__ = ["Runner", "Forwarded", "Sampled", "StepTokens", "StepOutput", "Chunk", "DecodeRows",
           "Row", "enable_compilation_cache"]

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
class Sampled:
  """A step whose sampler is dispatched: its tokens are on the device until the
  host reads them (`Runner.read`)."""

  output: StepOutput
  dispatched_at: float
  want_logprobs: bool
  want_scores: bool = False


class StepTokens(NamedTuple):
  """What the host reads of a step: the sampled tokens, and the log-probability
  arrays (numpy) when some row asked for them (else None)."""

  tokens: np.ndarray
  logprobs: tuple | None  # (logprob [R], top_ids [R, K], top_logprobs [R, K])
  scores: tuple | None  # (logprob [S], top_ids [S, K], top_logprobs [S, K])


class Runner(StepCompiler, PageCopies):
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
    # The previous step's sampled tokens, read by the next step's decode rows.
    self._prev_tokens = jax.device_put(np.zeros(self.max_rows, np.int32), self._replicated)
    self.mask_words = ceil_div(model.config.vocab_size, 32)
    self._no_masks: dict[int, jax.Array] = {}  # rows -> an all-zero mask on the device
    self._init_compiler()
    self._init_copies()

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

  def _sample_pass(self, logits, prev_tokens, sampler: SamplerInputs) -> StepOutput:
    # Penalty history entries the host has not read yet name the previous
    # step's output row that holds them.
    hsrc = sampler.history_src
    ids = jnp.where(hsrc >= 0, prev_tokens[jnp.clip(hsrc, 0, self.max_rows - 1)],
                    sampler.history_ids)
    out = sampling.sample(logits, sampler._replace(history_ids=ids))
    rows = logits.shape[0]
    all_tokens = jnp.zeros((self.max_rows,), jnp.int32).at[:rows].set(out.tokens)
    return all_tokens, out.logprob, out.top_ids, out.top_logprobs

  def sample_rows(self, shape: StepShape) -> int:
    return self.config.sample_rows(shape)

  def forward(self, shape: StepShape, decode: DecodeRows, chunks: Sequence[Chunk]
              ) -> Forwarded:
    """Dispatches a step's model pass (asynchronously)."""
    inputs = step_inputs.build(self.config, shape, decode, chunks, self._scratch_slot)
    key = self._model_key(inputs)
    compiled = self._compiled.get(key) or self._compile_model(inputs)
    t0 = time.perf_counter()
    self.kv, logits, scores = compiled(self.state, self.kv, self._prev_tokens, inputs)
    return Forwarded(shape, logits, scores, t0)

  def sample(self, forwarded: Forwarded, sampler: SamplerInputs) -> Sampled:
    """Dispatches a step's sampler (asynchronously): `sampler` has
    `sample_rows(shape)` rows; its `allowed` masks may be None (no row has one)."""
    sampler = self.with_masks(sampler)
    key = self._sampler_key(sampler)
    compiled = self._compiled.get(key) or self._compile_sampler(sampler)
    tokens, logprob, top_ids, top_lp = compiled(forwarded.logits, self._prev_tokens, sampler)
    self._prev_tokens = tokens
    out = StepOutput(tokens, logprob, top_ids, top_lp, *forwarded.scores)
    return Sampled(out, forwarded.dispatched_at, bool(sampler.logprobs.any()),
                   forwarded.scores[0].shape[0] > 0)

  def dispatch(self, shape: StepShape, decode: DecodeRows, chunks: Sequence[Chunk],
               sampler: SamplerInputs) -> Sampled:
    """A whole step: the model pass, then the sampler."""
    return self.sample(self.forward(shape, decode, chunks), sampler)

  def with_masks(self, sampler: SamplerInputs) -> SamplerInputs:
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

  @staticmethod
  def read(sampled: Sampled) -> StepTokens:
    """Waits for a step and reads its tokens (and log-probabilities if asked),
    in one transfer."""
    o = sampled.output
    parts = [o.tokens]
    if sampled.want_logprobs:
      parts += [o.logprob, o.top_ids, o.top_logprobs]
    if sampled.want_scores:
      parts += [o.score_logprob, o.score_top_ids, o.score_top_logprobs]
    got = jax.device_get(parts) if len(parts) > 1 else [np.asarray(o.tokens)]
    logprobs = tuple(got[1:4]) if sampled.want_logprobs else None
    scores = tuple(got[-3:]) if sampled.want_scores else None
    return StepTokens(got[0], logprobs, scores)

  # For benchmarks and tests ------------------------------------------------------------

  def run_rows(self, rows: Sequence[Row]) -> jax.Array:
    """One greedy step over `rows` (one token: decode; more: a prefill chunk that
    samples), outside the scheduler; returns the device array of sampled tokens."""
    cfg = self.config
    one = [r for r in rows if len(r.tokens) == 1]
    chunks = [Chunk(np.asarray(r.tokens, np.int32), r.start, np.asarray(r.pages, np.int32),
                    True) for r in rows if len(r.tokens) > 1]
    tables = np.zeros((len(one), cfg.max_pages_per_seq), np.int32)
    for i, r in enumerate(one):
      tables[i, :len(r.pages)] = r.pages
    decode = DecodeRows(np.asarray([r.tokens[0] for r in one], np.int32),
                        np.full(len(one), -1, np.int32),
                        np.asarray([r.start for r in one], np.int32), tables)
    prefill = sum(ceil_div(len(c.tokens), cfg.prefill_tile) * cfg.prefill_tile for c in chunks)
    if chunks:
      shape = StepShape(config_lib.bucket(len(one), cfg.mixed_decode_buckets),
                        config_lib.bucket(prefill, cfg.prefill_token_buckets))
    else:
      shape = StepShape(config_lib.bucket(len(one), cfg.decode_buckets), 0)
    greedy = sampler_inputs.SampleRow(SamplingParams(temperature=0))
    rows_ = ([greedy] * len(one) + [None] * (shape.decode - len(one))
             + [greedy] * len(chunks))
    sampler = sampler_inputs.inputs_for(rows_, self.sample_rows(shape),
                                        self.model_config.vocab_size)
    return self.dispatch(shape, decode, chunks, sampler).output.tokens

