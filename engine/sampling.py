"""Sampling parameters (vLLM's meanings and ranges) and one jitted batched sampler.

Every per-request parameter travels to the device as a row of an array, so a new
combination of parameters never recompiles. Only three facts about a whole batch
are static, because they switch work on or off for every row: whether any row
uses penalties, whether any row needs the sorted distribution (top-k or top-p),
and whether any row wants log-probabilities. That makes at most 8 sampler
variants per batch bucket, and in practice 1 or 2.

Randomness: a row's key is `fold_in(PRNGKey(seed), token_index)`, where
`token_index` counts the request's own generated tokens. A seeded request draws
the same tokens whatever else shares its batch, and after a preemption.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from engine.util import bucket_size  # noqa: F401 (the scheduler calls sampling.bucket_size)

MAX_LOGPROBS = 20
_NEG_INF = -jnp.inf
_INT32_MAX = 2**31 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to generate one completion; fields and ranges follow vLLM.

  Frozen: built (and normalised, and validated) once; the engine never changes
  it. `dataclasses.replace(params, seed=...)` makes a changed copy.

  A `seed` of None means the engine picks one at admission; the request is then
  still reproducible within that run (it depends on no other request).
  `max_tokens` None: until a stop or the model length. A request whose prompt plus
  `max_tokens` exceeds the engine's max_model_len fails (vLLM's rule), naming both.
  `top_k` 0 or -1, or any value >= the vocabulary size: all tokens.
  `stop` a string or a list of strings; `stop_token_ids` token ids below the
  vocabulary size (checked by the engine, which knows it).
  `skip_special_tokens`: leave special tokens (EOS, chat markers) out of the text.
  """

  n: int = 1
  max_tokens: int | None = None
  min_tokens: int = 0
  temperature: float = 1.0
  top_k: int = 0  # 0 or -1: all tokens
  top_p: float = 1.0
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  seed: int | None = None
  stop: Sequence[str] | str | None = None
  stop_token_ids: Sequence[int] | None = None
  ignore_eos: bool = False
  logprobs: int | None = None
  skip_special_tokens: bool = True
  include_stop_str_in_output: bool = False

  def __post_init__(self):
    # Normalise once (frozen: through object.__setattr__), then validate.
    stop = self.stop
    if stop is None:
      stop = ()
    elif isinstance(stop, str):
      stop = (stop,)
    elif isinstance(stop, (list, tuple)):
      stop = tuple(stop)
    else:
      raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    object.__setattr__(self, "stop", stop)
    ids = self.stop_token_ids
    if ids is None:
      ids = ()
    elif isinstance(ids, (list, tuple, np.ndarray)):
      ids = tuple(int(t) if isinstance(t, np.integer) else t for t in ids)
    else:
      raise ValueError(f"stop_token_ids must be a list of token ids, got {ids!r}")
    object.__setattr__(self, "stop_token_ids", ids)
    if self.top_k == -1:
      object.__setattr__(self, "top_k", 0)
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first parameter outside its allowed range."""
    def bad(name, allowed):
      raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

    def is_int(v):
      return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    # Every integer below reaches an int32 device array (or a count of them).
    if not is_int(self.n) or not 1 <= self.n <= _INT32_MAX:
      bad("n", "an integer >= 1")
    if self.max_tokens is not None and (not is_int(self.max_tokens)
                                        or not 1 <= self.max_tokens <= _INT32_MAX):
      bad("max_tokens", "an integer >= 1 (or None: up to the model length)")
    if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= _INT32_MAX:
      bad("min_tokens", "an integer >= 0")
    if self.max_tokens is not None and self.min_tokens > self.max_tokens:
      bad("min_tokens", f"<= max_tokens ({self.max_tokens})")
    if not _finite32(self.temperature) or self.temperature < 0:
      bad("temperature", "a finite number >= 0 (0 = greedy)")
    if not is_int(self.top_k) or self.top_k < 0:
      bad("top_k", "an integer >= 1, or 0 / -1 for all tokens")
    if not _finite32(self.top_p) or not 0 < self.top_p <= 1:
      bad("top_p", "in (0, 1]")
    if not _finite32(self.min_p) or not 0 <= self.min_p <= 1:
      bad("min_p", "in [0, 1]")
    if (not _finite32(self.repetition_penalty) or self.repetition_penalty <= 0
        or np.float32(self.repetition_penalty) == 0):
      bad("repetition_penalty", "a number > 0 (1 = off)")
    if not _finite32(self.presence_penalty) or not -2 <= self.presence_penalty <= 2:
      bad("presence_penalty", "in [-2, 2]")
    if not _finite32(self.frequency_penalty) or not -2 <= self.frequency_penalty <= 2:
      bad("frequency_penalty", "in [-2, 2]")
    if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
      bad("seed", "an integer in [0, 2**63) or None")
    if not all(isinstance(s, str) and s for s in self.stop):
      bad("stop", "a string or a list of non-empty strings")
    if not all(is_int(t) and 0 <= t <= _INT32_MAX for t in self.stop_token_ids):
      bad("stop_token_ids", "a list of token ids in [0, 2**31)")
    if self.logprobs is not None and (not is_int(self.logprobs)
                                      or not 0 <= self.logprobs <= MAX_LOGPROBS):
      bad("logprobs", f"an integer in [0, {MAX_LOGPROBS}] or None")
    for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
      if not isinstance(getattr(self, name), bool):
        bad(name, "true or false")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  @property
  def uses_penalties(self) -> bool:
    return (self.repetition_penalty != 1 or self.presence_penalty != 0
            or self.frequency_penalty != 0)

  @property
  def needs_sort(self) -> bool:
    return not self.greedy and (self.top_k > 0 or self.top_p < 1)

  @classmethod
  def from_dict(cls, d: dict) -> "SamplingParams":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown sampling parameters {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)


def _finite32(x) -> bool:
  """A real number that stays finite as the float32 the sampler computes in."""
  if not isinstance(x, (int, float, np.number)) or isinstance(x, bool):
    return False
  return bool(abs(x) <= _FLOAT32_MAX)


class SamplerInputs(NamedTuple):
  """Per-row sampling state, host-built, padded to the batch bucket.

  Arrays rather than Python scalars so every value is data to the compiled
  sampler, not part of its cache key.
  """

  temperature: np.ndarray  # [B] f32, 0 = greedy
  top_k: np.ndarray  # [B] i32, 0 = off
  top_p: np.ndarray  # [B] f32
  min_p: np.ndarray  # [B] f32
  repetition_penalty: np.ndarray  # [B] f32
  presence_penalty: np.ndarray  # [B] f32
  frequency_penalty: np.ndarray  # [B] f32
  seed: np.ndarray  # [B] u32 x2 (low, high words of the 64-bit seed): [B, 2]
  token_index: np.ndarray  # [B] i32, the request's own output position
  banned: np.ndarray  # [B, NBAN] i32 ids that may not be sampled (min_tokens), -1 pad
  history: np.ndarray  # [B, L] i32 prompt+output ids for penalties, -1 pad ([B, 1] if unused)
  history_is_output: np.ndarray  # [B, L] bool


class SamplerOutput(NamedTuple):
  tokens: jax.Array  # [B] i32
  logprob: jax.Array  # [B] f32 log-probability of the sampled token (NaN unless want_logprobs)
  top_ids: jax.Array  # [B, MAX_LOGPROBS] i32 (or [B, 0])
  top_logprobs: jax.Array  # [B, MAX_LOGPROBS] f32 (or [B, 0])


def build_inputs(rows: Sequence[tuple[SamplingParams, int, int, Sequence[int], Sequence[int],
                                      Sequence[int]]],
                 batch_size: int) -> tuple[SamplerInputs, bool, bool, bool]:
  """Packs rows into padded arrays and decides the three static switches.

  Each row is (params, seed, token_index, banned_ids, prompt_ids, output_ids).
  Returns (inputs, use_penalties, need_sort, want_logprobs).
  """
  b = batch_size
  temperature = np.zeros(b, np.float32)
  top_k = np.zeros(b, np.int32)
  top_p = np.ones(b, np.float32)
  min_p = np.zeros(b, np.float32)
  rep = np.ones(b, np.float32)
  pres = np.zeros(b, np.float32)
  freq = np.zeros(b, np.float32)
  seed = np.zeros((b, 2), np.uint32)
  token_index = np.zeros(b, np.int32)
  use_penalties = any(p.uses_penalties for p, *_ in rows)
  need_sort = any(p.needs_sort for p, *_ in rows)
  want_logprobs = any(p.logprobs is not None for p, *_ in rows)
  banned_width = bucket_size(max([len(r[3]) for r in rows] + [1]))
  banned = np.full((b, banned_width), -1, np.int32)
  hist_width = 1
  if use_penalties:
    hist_width = bucket_size(max(len(r[4]) + len(r[5]) for r in rows if r[0].uses_penalties), 16)
  history = np.full((b, hist_width), -1, np.int32)
  is_output = np.zeros((b, hist_width), bool)
  # Whole columns at once: a per-row loop cost ~8 us a row (2 ms at batch 256).
  n = len(rows)
  params = [r[0] for r in rows]
  temperature[:n] = [p.temperature for p in params]
  top_k[:n] = [p.top_k for p in params]
  top_p[:n] = [p.top_p for p in params]
  min_p[:n] = [p.min_p for p in params]
  rep[:n] = [p.repetition_penalty for p in params]
  pres[:n] = [p.presence_penalty for p in params]
  freq[:n] = [p.frequency_penalty for p in params]
  seeds = [r[1] for r in rows]
  seed[:n, 0] = [x & 0xFFFFFFFF for x in seeds]
  seed[:n, 1] = [(x >> 32) & 0xFFFFFFFF for x in seeds]
  token_index[:n] = [r[2] for r in rows]
  for i, (p, s, idx, ban, prompt_ids, output_ids) in enumerate(rows):
    if ban:
      banned[i, :len(ban)] = ban
    if use_penalties and p.uses_penalties:
      n_prompt = len(prompt_ids)
      history[i, :n_prompt] = prompt_ids
      history[i, n_prompt:n_prompt + len(output_ids)] = output_ids
      is_output[i, n_prompt:n_prompt + len(output_ids)] = True
  inputs = SamplerInputs(temperature, top_k, top_p, min_p, rep, pres, freq, seed,
                         token_index, banned, history, is_output)
  return inputs, use_penalties, need_sort, want_logprobs


def sample(logits: jax.Array, row_index: jax.Array, inputs: SamplerInputs, *,
           use_penalties: bool, need_sort: bool, want_logprobs: bool) -> SamplerOutput:
  """Samples one token per row: row i draws from `logits[row_index[i]]`.

  logits: [N, V] float32 from a model step; row_index: [B] int32 (several rows
  may read the same logits, as the n samples of one prompt do).

  A batch whose rows are all greedy (known on the host, from the temperatures)
  runs a variant without the random draw: drawing costs a random number per
  vocabulary entry per row (measured on the 2-core CPU at batch 64 over a
  49152-token vocabulary: 118 ms, most of a decode step), and greedy rows
  discard it. Greedy rows get the same tokens either way. Likewise the ban
  mask is built only when some row bans tokens, and log-probabilities are
  computed only when some row wants them.
  """
  any_random = bool(np.any(np.asarray(inputs.temperature) > 0))
  any_banned = bool(np.any(np.asarray(inputs.banned) >= 0))
  # When row i reads logits row i (a decode step), the [N, V] row gather is
  # skipped: it cost 3.4 ms at batch 64 on the CPU.
  identity = (isinstance(row_index, np.ndarray) and row_index.shape[0] == logits.shape[0]
              and np.array_equal(row_index, np.arange(row_index.shape[0])))
  return _sample(logits, None if identity else row_index, inputs,
                 use_penalties=use_penalties, need_sort=need_sort and any_random,
                 want_logprobs=want_logprobs, any_random=any_random, any_banned=any_banned)


@functools.partial(jax.jit, static_argnames=("use_penalties", "need_sort", "want_logprobs",
                                             "any_random", "any_banned"))
def _sample(logits: jax.Array, row_index: jax.Array, inputs: SamplerInputs, *,
            use_penalties: bool, need_sort: bool, want_logprobs: bool,
            any_random: bool, any_banned: bool) -> SamplerOutput:
  if row_index is not None:
    logits = logits[row_index]
  logits = logits.astype(jnp.float32)  # [B, V]
  batch, vocab = logits.shape
  rows = jnp.arange(batch)[:, None]

  # Log-probabilities are reported for the model's own distribution (vLLM's
  # default "raw" logprobs), before penalties and truncation.
  raw_logprobs = jax.nn.log_softmax(logits, axis=-1) if want_logprobs else None

  if use_penalties:
    valid = inputs.history >= 0
    ids = jnp.where(valid, inputs.history, 0)
    seen = jnp.zeros((batch, vocab), bool).at[rows, ids].max(valid)
    out_counts = jnp.zeros((batch, vocab), jnp.float32).at[rows, ids].add(
        (valid & inputs.history_is_output).astype(jnp.float32))
    rep = inputs.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = (logits - inputs.frequency_penalty[:, None] * out_counts
              - inputs.presence_penalty[:, None] * (out_counts > 0))

  if any_banned:
    banned_valid = inputs.banned >= 0
    banned_ids = jnp.where(banned_valid, inputs.banned, 0)
    ban_mask = jnp.zeros((batch, vocab), bool).at[rows, banned_ids].max(banned_valid)
    logits = jnp.where(ban_mask, _NEG_INF, logits)

  greedy_tokens = _argmax(logits)
  if not any_random:
    return _output(greedy_tokens, raw_logprobs, want_logprobs)

  temperature = jnp.where(inputs.temperature > 0, inputs.temperature, 1.0)
  scaled = logits / temperature[:, None]
  probs = jax.nn.softmax(scaled, axis=-1)
  # min_p: drop tokens whose probability is below min_p times the top one.
  keep = probs >= inputs.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
  if need_sort:
    order = jnp.argsort(-scaled, axis=-1)  # [B, V] descending
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    # top-p keeps the smallest prefix whose mass reaches p (the first token always).
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    # Rows with top_p = 1 keep everything: float rounding can make the running
    # mass reach 1 before the tail, and such a row must not depend on whether
    # another row of its batch needed the sort.
    keep_sorted = (mass_before < inputs.top_p[:, None]) | (inputs.top_p[:, None] >= 1)
    k = jnp.where(inputs.top_k > 0, inputs.top_k, vocab)
    keep_sorted &= rank < k[:, None]
    keep &= jnp.zeros((batch, vocab), bool).at[rows, order].set(keep_sorted)
  scaled = jnp.where(keep, scaled, _NEG_INF)

  def draw(seed_words, index, row_logits):
    key = jax.random.wrap_key_data(seed_words, impl="threefry2x32")
    key = jax.random.fold_in(key, index)
    return jax.random.categorical(key, row_logits).astype(jnp.int32)

  sampled = jax.vmap(draw)(inputs.seed, inputs.token_index, scaled)
  tokens = jnp.where(inputs.temperature > 0, sampled, greedy_tokens)
  return _output(tokens, raw_logprobs, want_logprobs)


def _argmax(x: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis (the first maximal entry), as two plain
  reductions: XLA's CPU argmax (a reduction over value-index pairs) is not
  vectorized and took 13 ms for [64, 49152] on the 2-core CPU."""
  top = jnp.max(x, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  first = jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1)
  return jnp.where(first < x.shape[-1], first, 0).astype(jnp.int32)  # NaN rows: 0


def _output(tokens, raw_logprobs, want_logprobs: bool) -> SamplerOutput:
  batch = tokens.shape[0]
  if not want_logprobs:
    nothing = jnp.zeros((batch, 0), jnp.float32)
    return SamplerOutput(tokens, jnp.full((batch,), jnp.nan, jnp.float32),
                         nothing.astype(jnp.int32), nothing)
  logprob = jnp.take_along_axis(raw_logprobs, tokens[:, None], axis=-1)[:, 0]
  top_logprobs, top_ids = jax.lax.top_k(raw_logprobs, MAX_LOGPROBS)
  return SamplerOutput(tokens, logprob, top_ids.astype(jnp.int32), top_logprobs)
