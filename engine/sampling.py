"""Sampling parameters (vLLM's meanings and ranges) and one jitted batched sampler.

Every per-request parameter travels to the device as a row of an array, so a new
combination of parameters never recompiles: the sampler is the second executable
of the step (engine/runner.py), and which optional work it does is decided on
the device from those arrays. A sequence's parameters are written once into a
`SamplingTable` (a column per parameter, a row per slot of the live batch) and a
step's inputs are gathers of its rows. Only a few shapes can change: the penalty
history (HISTORY_TOKENS pairs unless the step's penalized rows hold more), the
banned ids (BAN_WIDTH a row unless longer); each compiles its own sampler variant
the first time it is used. The allowed-token masks are always [R, ceil(V/32)].

Randomness: a row's key is `fold_in(PRNGKey(seed), token_index)`, where
`token_index` counts the request's own generated tokens; a row draws one uniform
number from it and takes the token where its cumulative distribution passes it.
A seeded request draws the same tokens whatever else shares its batch, and after
a preemption.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ridgeline.engine.grammar import GrammarSpec
from ridgeline.util import bucket_size

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
  # Log-probabilities of the prompt's tokens (vLLM's meaning): None, or k >= 0
  # alternatives per token besides the prompt's own; the first token has none.
  prompt_logprobs: int | None = None
  skip_special_tokens: bool = True
  include_stop_str_in_output: bool = False
  allowed_token_ids: Sequence[int] | None = None  # sample only among these
  # Output that must match a grammar (engine/grammar.py): a GrammarSpec, or
  # vLLM's form {"json": schema} / {"regex": ...} / {"choice": [...]} /
  # {"grammar": ...} / {"json_object": true}, turned into one here.
  structured_outputs: GrammarSpec | Mapping[str, Any] | None = None

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
    allowed = self.allowed_token_ids
    if allowed is not None:
      if not isinstance(allowed, (list, tuple, np.ndarray)):
        raise ValueError(f"allowed_token_ids must be a list of token ids, got {allowed!r}")
      allowed = tuple(int(t) if isinstance(t, np.integer) else t for t in allowed)
    object.__setattr__(self, "allowed_token_ids", allowed)
    if self.top_k == -1:
      object.__setattr__(self, "top_k", 0)
    object.__setattr__(self, "structured_outputs",
                       GrammarSpec.from_structured_outputs(self.structured_outputs))
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
                                        or not 0 <= self.max_tokens <= _INT32_MAX):
      bad("max_tokens", "an integer >= 1 (or None: up to the model length)")
    if self.max_tokens == 0 and self.prompt_logprobs is None:
      bad("max_tokens", "an integer >= 1 (0 only to score a prompt: with prompt_logprobs)")
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
    if self.prompt_logprobs is not None and (
        not is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
      bad("prompt_logprobs", f"an integer in [0, {MAX_LOGPROBS}] or None")
    if self.allowed_token_ids is not None and (
        not self.allowed_token_ids or not all(is_int(t) and t >= 0 for t in self.allowed_token_ids)):
      bad("allowed_token_ids", "a non-empty list of token ids >= 0, or None")
    for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
      if not isinstance(getattr(self, name), bool):
        bad(name, "true or false")

  @property
  def uses_penalties(self) -> bool:
    return (self.repetition_penalty != 1 or self.presence_penalty != 0
            or self.frequency_penalty != 0)

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
  """Per-row sampling state, host-built, padded to the step's sample rows R.

  Arrays rather than Python scalars so every value is data to the compiled step,
  not part of its cache key. Which work runs (penalties, bans, the random draw,
  the top-k/top-p thresholds, log-probabilities, allowed-token masks) is decided on
  the device from these arrays (`lax.cond`), so one compiled step serves every
  mix of parameters, and a row that uses none of them costs nothing extra.
  """

  temperature: np.ndarray  # [R] f32, 0 = greedy
  top_k: np.ndarray  # [R] i32, 0 = off (clamped to the vocabulary)
  top_p: np.ndarray  # [R] f32
  min_p: np.ndarray  # [R] f32
  repetition_penalty: np.ndarray  # [R] f32
  presence_penalty: np.ndarray  # [R] f32
  frequency_penalty: np.ndarray  # [R] f32
  seed: np.ndarray  # [R, 2] u32 (low, high words of the 64-bit seed)
  token_index: np.ndarray  # [R] i32, the sequence's own output position
  logprobs: np.ndarray  # [R] bool, the row wants log-probabilities
  banned: np.ndarray  # [R, NBAN] i32 ids that may not be sampled (min_tokens), -1 pad
  # The token history of the rows that use penalties, as H (row, id) pairs
  # (row -1: padding). An entry whose token the host has not read yet (the one
  # in flight) has id -1 and names the previous step's output row that holds it
  # in `history_src`; the runner fills it in on the device.
  history_rows: np.ndarray  # [H] i32
  history_ids: np.ndarray  # [H] i32
  history_src: np.ndarray  # [H] i32, -1: the id is known
  history_is_output: np.ndarray  # [H] bool
  # Allowed-token bitmasks (allowed_token_ids, structured outputs): bit t % 32 of
  # word t // 32 set when token t may be sampled. None when no row has one: the
  # runner then sends an all-zero array it keeps on the device, so masked and
  # unmasked steps share one compiled sampler.
  allowed: np.ndarray | None  # [R, ceil(V/32)] u32
  allowed_row: np.ndarray  # [R] i32 which mask a row uses, -1: none


class SamplerOutput(NamedTuple):
  tokens: jax.Array  # [R] i32
  logprob: jax.Array  # [R] f32 log-probability of the sampled token (0 unless asked)
  top_ids: jax.Array  # [R, MAX_LOGPROBS] i32
  top_logprobs: jax.Array  # [R, MAX_LOGPROBS] f32


BAN_WIDTH = 8  # banned ids per row in the standard step; longer lists widen it
# (row, id) pairs of penalty history in the standard step: the prompts and outputs
# of all its rows that use penalties; a longer history widens it (a new variant).
HISTORY_TOKENS = 4096
# Up to this many rows of a step with top-k/top-p are truncated on their own
# (gathered, then scattered back); more run over the whole batch.
TRUNCATE_ROWS = 8


@dataclasses.dataclass(frozen=True)
class History:
  """The penalty history of one sample row: its tokens so far and, if its last
  output token is still on the device, the previous step's output row that
  sampled it (`inflight_row`, -1: none)."""

  prompt: np.ndarray  # [P] i32
  output: np.ndarray  # [O] i32, the resolved output tokens
  inflight_row: int = -1


class SamplingTable:
  """Every started sequence's sampling parameters as columns, one row per slot.

  A sequence's parameters are written once, when it gets its slot (`set`); a
  step's `SamplerInputs` are then gathers of these columns by the step's rows
  (`inputs`), not a loop over Python objects: building them for 256 rows this
  way costs tens of microseconds, a per-row loop cost ~8 us a row.
  """

  _COLUMNS = (("temperature", np.float32, 0), ("top_k", np.int32, 0),
              ("top_p", np.float32, 1), ("min_p", np.float32, 0),
              ("repetition_penalty", np.float32, 1), ("presence_penalty", np.float32, 0),
              ("frequency_penalty", np.float32, 0), ("logprobs", bool, False))

  def __init__(self, capacity: int, vocab_size: int):
    self.vocab_size = vocab_size
    self.capacity = 0
    self.columns: dict[str, np.ndarray] = {}
    self.seed = np.zeros((0, 2), np.uint32)
    self.allowed: dict[int, np.ndarray] = {}  # slot -> [W] u32 mask of allowed_token_ids
    self.grow(capacity)

  def grow(self, capacity: int) -> None:
    for name, dtype, fill in self._COLUMNS:
      col = np.full(capacity, fill, dtype)
      col[:self.capacity] = self.columns.get(name, col[:0])
      self.columns[name] = col
    seed = np.zeros((capacity, 2), np.uint32)
    seed[:self.capacity] = self.seed
    self.seed, self.capacity = seed, capacity

  def set(self, slot: int, params: SamplingParams, seed: int) -> None:
    c = self.columns
    c["temperature"][slot] = params.temperature
    c["top_k"][slot] = min(params.top_k, self.vocab_size)
    c["top_p"][slot] = params.top_p
    c["min_p"][slot] = params.min_p
    c["repetition_penalty"][slot] = params.repetition_penalty
    c["presence_penalty"][slot] = params.presence_penalty
    c["frequency_penalty"][slot] = params.frequency_penalty
    c["logprobs"][slot] = params.logprobs is not None
    self.seed[slot] = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    self.allowed.pop(slot, None)
    if params.allowed_token_ids is not None:
      self.allowed[slot] = token_mask(params.allowed_token_ids, self.vocab_size)

  def inputs(self, row_slots: np.ndarray, token_index: np.ndarray,
             banned: np.ndarray | None = None, histories: dict[int, History] | None = None,
             history_width: int | None = None) -> SamplerInputs:
    """The inputs of R = len(row_slots) sample rows: row r samples for slot
    row_slots[r] (-1: a padding row, greedy and plain); token_index [R] the
    output position each row samples; banned [R, n] ids a row may not sample
    (-1 pad; None: none); histories: the penalty history of each penalized row
    (by row); history_width: the number of history pairs (default
    HISTORY_TOKENS; a longer history rounds up to a power of two)."""
    b = len(row_slots)
    live = row_slots >= 0
    at = np.where(live, row_slots, 0)
    cols = {}
    for name, dtype, fill in self._COLUMNS:
      cols[name] = np.where(live, self.columns[name][at], fill).astype(dtype)
    seed = np.where(live[:, None], self.seed[at], 0).astype(np.uint32)
    # Banned ids are left-packed in each row; the width is BAN_WIDTH unless a
    # row bans more.
    need = 0 if banned is None else int((banned >= 0).sum(axis=1).max(initial=0))
    width = bucket_size(need, BAN_WIDTH)
    ban = np.full((b, width), -1, np.int32)
    if banned is not None:
      n = min(width, banned.shape[1])
      ban[:, :n] = banned[:, :n]
    histories = histories or {}
    total = sum(len(h.prompt) + len(h.output) + (h.inflight_row >= 0)
                for h in histories.values())
    hist_width = history_width or HISTORY_TOKENS
    if total > hist_width:
      hist_width = bucket_size(total, 16)
    history_rows = np.full(hist_width, -1, np.int32)
    history_ids = np.full(hist_width, -1, np.int32)
    history_src = np.full(hist_width, -1, np.int32)
    is_output = np.zeros(hist_width, bool)
    k = 0
    for row, h in histories.items():
      n_prompt, n = len(h.prompt), len(h.prompt) + len(h.output)
      history_rows[k:k + n] = row
      history_ids[k:k + n_prompt] = h.prompt
      history_ids[k + n_prompt:k + n] = h.output
      is_output[k + n_prompt:k + n] = True
      k += n
      if h.inflight_row >= 0:  # the token in flight, filled in on the device
        history_rows[k], history_src[k], is_output[k] = row, h.inflight_row, True
        k += 1
    allowed, allowed_row = None, np.full(b, -1, np.int32)
    masked = [r for r in range(b) if live[r] and int(row_slots[r]) in self.allowed]
    if masked:
      allowed = np.zeros((b, -(-self.vocab_size // 32)), np.uint32)
      for r in masked:
        allowed[r] = self.allowed[int(row_slots[r])]
        allowed_row[r] = r
    return SamplerInputs(cols["temperature"], cols["top_k"], cols["top_p"], cols["min_p"],
                         cols["repetition_penalty"], cols["presence_penalty"],
                         cols["frequency_penalty"], seed, token_index.astype(np.int32),
                         cols["logprobs"], ban, history_rows, history_ids, history_src,
                         is_output, allowed, allowed_row)


def token_mask(token_ids: Sequence[int], vocab_size: int) -> np.ndarray:
  """[ceil(V/32)] u32: bit t % 32 of word t // 32 is set for each token t."""
  mask = np.zeros(-(-vocab_size // 32), np.uint32)
  ids = np.asarray(token_ids, np.int64)
  np.bitwise_or.at(mask, ids // 32, (1 << (ids % 32)).astype(np.uint32))
  return mask


@dataclasses.dataclass(frozen=True)
class SampleRow:
  """One sample row for `inputs_for` (tests and benchmarks): its parameters,
  seed, output position, banned ids and penalty history."""

  params: SamplingParams
  seed: int = 0
  token_index: int = 0
  banned: Sequence[int] = ()
  history: History | None = None


def inputs_for(rows: Sequence[SampleRow | None], num_rows: int, vocab_size: int
               ) -> SamplerInputs:
  """SamplerInputs of `num_rows` rows from explicit rows (None or missing: padding)."""
  table = SamplingTable(max(1, num_rows), vocab_size)
  slots = np.full(num_rows, -1, np.int64)
  index = np.zeros(num_rows, np.int32)
  banned = np.full((num_rows, max([len(r.banned) for r in rows if r] + [1])), -1, np.int32)
  histories = {}
  for i, r in enumerate(rows):
    if r is None:
      continue
    table.set(i, r.params, r.seed)
    slots[i], index[i] = i, r.token_index
    banned[i, :len(r.banned)] = r.banned
    if r.history is not None and r.params.uses_penalties:
      histories[i] = r.history
  return table.inputs(slots, index, banned, histories)


def sample(logits: jax.Array, inputs: SamplerInputs) -> SamplerOutput:
  """Samples one token per row of `logits` [R, V] (float32); traced inside the step.

  Each optional piece of work runs under a `lax.cond` on whether any row needs
  it, decided from the arrays: a draw costs a softmax and a cumulative sum over
  the vocabulary for every row, the top-k/top-p thresholds 64 more passes (over
  the truncating rows only when they are few), and a greedy batch needs
  neither. Greedy rows get the same tokens either way.
  """
  logits = logits.astype(jnp.float32)  # [R, V]
  batch, vocab = logits.shape
  rows = jnp.arange(batch)[:, None]
  cond = jax.lax.cond

  def penalize(x):
    valid = (inputs.history_rows >= 0) & (inputs.history_ids >= 0)  # the runner filled
    # in the ids of tokens in flight
    owner = jnp.where(valid, inputs.history_rows, 0)
    ids = jnp.where(valid, inputs.history_ids, 0)
    seen = jnp.zeros((batch, vocab), bool).at[owner, ids].max(valid)
    out_counts = jnp.zeros((batch, vocab), jnp.float32).at[owner, ids].add(
        (valid & inputs.history_is_output).astype(jnp.float32))
    rep = inputs.repetition_penalty[:, None]
    x = jnp.where(seen, jnp.where(x > 0, x / rep, x * rep), x)
    return (x - inputs.frequency_penalty[:, None] * out_counts
            - inputs.presence_penalty[:, None] * (out_counts > 0))

  def ban(x):
    valid = inputs.banned >= 0
    ids = jnp.where(valid, inputs.banned, 0)
    return jnp.where(jnp.zeros((batch, vocab), bool).at[rows, ids].max(valid), _NEG_INF, x)

  def restrict(x):
    words = inputs.allowed[jnp.maximum(inputs.allowed_row, 0)]  # [R, W]
    v = jnp.arange(vocab)
    bits = (words[:, v // 32] >> (v % 32).astype(jnp.uint32)) & 1  # [R, V]
    keep = (bits == 1) | (inputs.allowed_row[:, None] < 0)
    return jnp.where(keep, x, _NEG_INF)

  raw_logits = logits
  uses_penalties = jnp.any((inputs.repetition_penalty != 1) | (inputs.presence_penalty != 0)
                           | (inputs.frequency_penalty != 0))
  logits = cond(uses_penalties, penalize, lambda x: x, logits)
  logits = cond(jnp.any(inputs.banned >= 0), ban, lambda x: x, logits)
  if inputs.allowed is not None:
    logits = cond(jnp.any(inputs.allowed_row >= 0), restrict, lambda x: x, logits)

  greedy_tokens = _argmax(logits)
  random_rows = inputs.temperature > 0

  def draw_all(x):
    temperature = jnp.where(random_rows, inputs.temperature, 1.0)
    scaled = x / temperature[:, None]
    probs = jax.nn.softmax(scaled, axis=-1)
    # min_p: drop tokens whose probability is below min_p times the top one.
    keep = probs >= inputs.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)

    k = jnp.where(inputs.top_k > 0, jnp.minimum(inputs.top_k, vocab), vocab)
    cut = random_rows & ((inputs.top_k > 0) | (inputs.top_p < 1))  # rows that truncate

    def thresholds(rows_scaled, rows_probs, rows_k, rows_top_p):
      return _kth_largest(rows_scaled, rows_k), _top_p_threshold(rows_probs, rows_top_p)

    def truncate(keep):
      # top-k keeps the k largest logits, top-p the smallest set of most likely
      # tokens whose mass reaches p (the first token always): as thresholds found
      # by bisection, not a sort of the vocabulary (an argsort of [32, 49152]
      # took 360 ms on the 2-core CPU, more than the model's step). A few
      # truncating rows are gathered first, so a batch pays for them only.
      few = min(batch, TRUNCATE_ROWS)

      def some_rows(_):
        idx = jnp.argsort(~cut, stable=True)[:few]  # the truncating rows first
        kth, p_min = thresholds(scaled[idx], probs[idx], k[idx], inputs.top_p[idx])
        return (jnp.full((batch,), -jnp.inf).at[idx].set(kth),
                jnp.zeros((batch,), jnp.float32).at[idx].set(p_min))

      def all_rows(_):
        return thresholds(scaled, probs, k, inputs.top_p)

      kth, p_min = cond(jnp.sum(cut) <= few, some_rows, all_rows, None)
      keep &= (scaled >= kth[:, None]) | ~cut[:, None]
      return keep & ((probs >= p_min[:, None]) | (inputs.top_p[:, None] >= 1) | ~cut[:, None])

    keep = cond(jnp.any(cut), truncate, lambda k: k, keep)
    scaled = jnp.where(keep, scaled, _NEG_INF)

    # One uniform number per row, then the inverse of the row's cumulative
    # distribution (a categorical draw by Gumbel noise costs a random number per
    # vocabulary entry: 25 ms for [32, 49152] on the 2-core CPU, against 3).
    def uniform(seed_words, index):
      key = jax.random.wrap_key_data(seed_words, impl="threefry2x32")
      return jax.random.uniform(jax.random.fold_in(key, index))

    u = jax.vmap(uniform)(inputs.seed, inputs.token_index)  # [R] in [0, 1)
    weights = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))  # 0 where cut
    cdf = jnp.cumsum(weights, axis=-1)  # [R, V]
    # The first token whose cumulative weight passes u times the total. Its own
    # weight is > 0 in exact arithmetic; should rounding of the sum say otherwise
    # (a token cut by top-k/top-p/min_p), the row takes its most likely token.
    passed = cdf > (u * cdf[:, -1])[:, None]
    sampled = jnp.min(jnp.where(passed, jax.lax.broadcasted_iota(jnp.int32, cdf.shape, 1),
                                vocab), axis=-1)
    chosen = jnp.take_along_axis(weights, jnp.minimum(sampled, vocab - 1)[:, None], axis=-1)
    sampled = jnp.where((sampled < vocab) & (chosen[:, 0] > 0), sampled, greedy_tokens)
    return jnp.where(random_rows, sampled, greedy_tokens)

  tokens = cond(jnp.any(random_rows), draw_all, lambda x: greedy_tokens, logits)

  # Log-probabilities are reported for the model's own distribution (vLLM's
  # default "raw" logprobs), before penalties and truncation.
  def with_logprobs(x):
    raw = jax.nn.log_softmax(x, axis=-1)
    top_lp, top_ids = jax.lax.top_k(raw, MAX_LOGPROBS)
    return (jnp.take_along_axis(raw, tokens[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32),
            top_lp)

  def without_logprobs(x):
    return (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch, MAX_LOGPROBS), jnp.int32),
            jnp.zeros((batch, MAX_LOGPROBS), jnp.float32))

  logprob, top_ids, top_lp = cond(jnp.any(inputs.logprobs), with_logprobs, without_logprobs,
                                  raw_logits)
  return SamplerOutput(tokens, logprob, top_ids, top_lp)


def score(logits: jax.Array, targets: jax.Array, k: jax.Array
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Prompt log-probabilities: for each row of `logits` [S, V] the raw
  log-probability of `targets` [S] and the top max(k) alternatives (k [S], -1 on
  padding rows). The top-1 case (lm-eval's greedy check) is a max, not a top-k.
  Returns (logprob [S], top_ids [S, MAX_LOGPROBS], top_logprobs [S, ...])."""
  s = logits.shape[0]
  if s == 0:
    return (jnp.zeros((0,), jnp.float32), jnp.zeros((0, MAX_LOGPROBS), jnp.int32),
            jnp.zeros((0, MAX_LOGPROBS), jnp.float32))
  raw = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [S, V]
  target = jnp.take_along_axis(raw, targets[:, None], axis=-1)[:, 0]

  def top_many(x):
    lp, ids = jax.lax.top_k(x, MAX_LOGPROBS)
    return ids.astype(jnp.int32), lp

  def top_one(x):
    ids = jnp.zeros((s, MAX_LOGPROBS), jnp.int32).at[:, 0].set(_argmax(x))
    lp = jnp.zeros((s, MAX_LOGPROBS), jnp.float32).at[:, 0].set(jnp.max(x, axis=-1))
    return ids, lp

  top_ids, top_lp = jax.lax.cond(jnp.any(k > 1), top_many, top_one, raw)
  return target, top_ids, top_lp


def _ordered_bits(x: jax.Array) -> jax.Array:
  """float32 -> uint32 with the same order (the usual sign-flip of the bits)."""
  i = jax.lax.bitcast_convert_type(x, jnp.int32)
  i = i ^ ((i >> 31) & 0x7FFFFFFF)  # negatives: larger magnitude, smaller key
  return jax.lax.bitcast_convert_type(i, jnp.uint32) ^ jnp.uint32(0x80000000)


def _bisect(keys: jax.Array, enough) -> jax.Array:
  """Per row of uint32 `keys` [R, V], the largest t with enough(keys >= t, row)
  true, given that it holds at each row's smallest key and fails past its
  largest: 32 halvings of [min, max + 1], each one pass over the row."""
  lo = keys.min(axis=-1)
  hi = keys.max(axis=-1) + 1  # keys never reach 2**32 - 1 (that is a NaN)

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    ok = enough(keys >= mid[:, None])
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  return jax.lax.fori_loop(0, 32, halve, (lo, hi))[0]


def _kth_largest(x: jax.Array, k: jax.Array) -> jax.Array:
  """The k-th largest value of each row of x [R, V] (k [R], 1 <= k <= V)."""
  keys = _ordered_bits(x)
  t = _bisect(keys, lambda above: above.sum(axis=-1) >= k)
  return jnp.min(jnp.where(keys >= t[:, None], x, jnp.inf), axis=-1)


def _top_p_threshold(probs: jax.Array, top_p: jax.Array) -> jax.Array:
  """The smallest probability top-p keeps in each row: the largest v such that
  the tokens of probability >= v hold at least top_p of the mass."""
  keys = _ordered_bits(probs)
  t = _bisect(keys, lambda above: jnp.sum(jnp.where(above, probs, 0), axis=-1)
              >= jnp.minimum(top_p, 1))
  return jnp.min(jnp.where(keys >= t[:, None], probs, jnp.inf), axis=-1)


def _argmax(x: jax.Array) -> jax.Array:
  """jnp.argmax over the last axis (the first maximal entry), as two plain
  reductions: XLA's CPU argmax (a reduction over value-index pairs) is not
  vectorized and took 13 ms for [64, 49152] on the 2-core CPU."""
  top = jnp.max(x, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  first = jnp.min(jnp.where(x == top, iota, x.shape[-1]), axis=-1)
  return jnp.where(first < x.shape[-1], first, 0).astype(jnp.int32)  # NaN rows: 0
