"""The sampler: one jitted, batched function of the logits and the rows' parameters.

It is the second executable of the step (engine/runner.py), traced once per
shape of its inputs (engine/sampler_inputs.py): which optional work it does
(penalties, bans, allowed-token masks, the random draw, top-k/top-p/min-p,
log-probabilities) is decided on the device from those arrays, so one compiled
sampler serves every mix of parameters and a greedy batch pays for none of it.

Randomness: a row's key is `fold_in(PRNGKey(seed), token_index)`, where
`token_index` counts the request's own generated tokens; a row draws one uniform
number from it and takes the token where its cumulative distribution passes it.
A seeded request draws the same tokens whatever else shares its batch, and after
a preemption.

`score` is the model pass's prompt scoring (prompt log-probabilities).
`SamplingParams` and MAX_LOGPROBS are re-exported from here, where the
frontends, tools and scripts import them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ridgeline.engine.sampler_inputs import SamplerInputs
from ridgeline.engine.sampling_params import MAX_LOGPROBS, SamplingParams

__all__ = ["MAX_LOGPROBS", "SamplingParams", "SamplerOutput", "TRUNCATE_ROWS", "sample",
           "score"]

_NEG_INF = -jnp.inf


class SamplerOutput(NamedTuple):
  tokens: jax.Array  # [R] i32
  logprob: jax.Array  # [R] f32 log-probability of the sampled token (0 unless asked)
  top_ids: jax.Array  # [R, MAX_LOGPROBS] i32
  top_logprobs: jax.Array  # [R, MAX_LOGPROBS] f32


# Up to this many rows of a step with top-k/top-p are truncated on their own
# (gathered, then scattered back); more run over the whole batch.
TRUNCATE_ROWS = 8


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
