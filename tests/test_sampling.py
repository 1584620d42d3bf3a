"""The sampler's truncation (top-k, top-p, min_p) against a sort-based reference:
the thresholds found by bisection keep exactly the tokens the sort keeps."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from ridgeline.engine import sampler_inputs
from ridgeline.engine import sampling


def _reference_keep(logits, temperature, top_k, top_p, min_p):
  """The sort-based definition (vLLM's): over the tempered distribution, top-k
  keeps the k highest, top-p the shortest prefix of the sorted tokens whose mass
  reaches p, min_p the tokens of at least min_p times the top probability."""
  scaled = logits / temperature
  probs = np.exp(scaled - scaled.max())
  probs /= probs.sum()
  order = np.argsort(-scaled, kind="stable")
  keep = np.zeros(scaled.shape, bool)
  mass_before = np.cumsum(probs[order]) - probs[order]
  ranked = np.ones(scaled.shape, bool)
  if top_p < 1:
    ranked &= mass_before < top_p
  if top_k > 0:
    ranked &= np.arange(scaled.size) < top_k
  keep[order] = ranked
  return keep & (probs >= min_p * probs.max())


@pytest.mark.parametrize("seed", range(4))
def test_thresholds_keep_what_the_sort_keeps(seed):
  rng = np.random.default_rng(seed)
  rows, vocab = 6, 3000
  logits = (rng.standard_normal((rows, vocab)) * rng.uniform(0.5, 6, (rows, 1))).astype(np.float32)
  logits[0, :50] += 40  # a row whose nucleus is its first few tokens
  top_k = np.array([0, 1, 7, 500, vocab, 40], np.int32)
  top_p = np.array([0.9, 1.0, 0.5, 0.999, 0.3, 0.95], np.float32)
  x = jnp.asarray(logits)
  probs = jax.nn.softmax(x, axis=-1)
  k = jnp.where(top_k > 0, np.minimum(top_k, vocab), vocab)
  kth = np.asarray(sampling._kth_largest(x, jnp.asarray(k)))
  p_min = np.asarray(sampling._top_p_threshold(probs, jnp.asarray(top_p)))
  for r in range(rows):
    got = (logits[r] >= kth[r]) & ((np.asarray(probs[r]) >= p_min[r]) | (top_p[r] >= 1))
    ref = _reference_keep(logits[r].astype(np.float64), 1.0, top_k[r], top_p[r], 0.0)
    # The float32 mass and the float64 reference can disagree only on the one
    # token where the running mass crosses p.
    assert (got != ref).sum() <= 1, (r, got.sum(), ref.sum())
    if top_k[r] > 0:
      assert got.sum() <= top_k[r]
    assert got[np.argmax(logits[r])]


def test_sampled_tokens_stay_inside_the_truncated_set():
  rng = np.random.default_rng(0)
  vocab, rows = 512, 16
  logits = jnp.asarray(rng.standard_normal((1, vocab)) * 3, jnp.float32).repeat(rows, 0)
  cases = [sampling.SamplingParams(temperature=1.0, top_k=5, seed=i) for i in range(8)] + [
      sampling.SamplingParams(temperature=1.0, top_p=0.3, seed=i) for i in range(8)]
  inputs = sampler_inputs.inputs_for([sampler_inputs.SampleRow(p, p.seed) for p in cases], rows, vocab)
  tokens = np.asarray(jax.jit(sampling.sample)(logits, inputs).tokens)
  row = np.asarray(logits[0], np.float64)
  top5 = _reference_keep(row, 1.0, 5, 1.0, 0.0)
  nucleus = _reference_keep(row, 1.0, 0, 0.3, 0.0)
  assert all(top5[t] for t in tokens[:8]) and all(nucleus[t] for t in tokens[8:])
  # Seeded: the same seeds give the same tokens alone and in a larger batch.
  again = sampler_inputs.inputs_for([sampler_inputs.SampleRow(p, p.seed) for p in cases[:3]], 4, vocab)
  alone = np.asarray(jax.jit(sampling.sample)(logits[:4], again).tokens)
  assert list(alone[:3]) == list(tokens[:3])
  # A few truncating rows among untruncated ones (they are truncated on their own).
  few = [sampling.SamplingParams(temperature=1.0, top_k=5, seed=i) for i in range(3)] + [
      sampling.SamplingParams(temperature=1.0, seed=100 + i) for i in range(13)]
  inputs = sampler_inputs.inputs_for([sampler_inputs.SampleRow(p, p.seed) for p in few], rows, vocab)
  mixed = np.asarray(jax.jit(sampling.sample)(logits, inputs).tokens)
  assert list(mixed[:3]) == list(tokens[:3])  # as in the batch where every row truncated
  assert not all(top5[t] for t in mixed[3:])  # the others draw from the whole vocabulary


def test_draws_follow_the_distribution():
  probs = np.zeros(32)
  probs[:5] = [0.5, 0.25, 0.125, 0.0625, 0.0625]
  logits = np.log(np.maximum(probs, 1e-30)).astype(np.float32)
  logits[5:] = -np.inf
  rows = 4000
  params = [sampling.SamplingParams(temperature=1.0, seed=i) for i in range(rows)]
  inputs = sampler_inputs.inputs_for([sampler_inputs.SampleRow(p, p.seed) for p in params], rows, 32)
  tokens = np.asarray(jax.jit(sampling.sample)(jnp.asarray(logits)[None].repeat(rows, 0),
                                               inputs).tokens)
  freq = np.bincount(tokens, minlength=32) / rows
  assert freq[5:].sum() == 0  # never a token of probability 0
  np.testing.assert_allclose(freq, probs, atol=0.03)


def test_allowed_tokens_hold_for_a_vocabulary_of_one_mask_word():
  vocab = 32  # the whole mask is one uint32 word per row
  logits = jnp.asarray(np.arange(vocab, dtype=np.float32))[None].repeat(2, 0)
  rows = [sampler_inputs.SampleRow(sampling.SamplingParams(temperature=0, allowed_token_ids=[3, 5])),
          sampler_inputs.SampleRow(sampling.SamplingParams(temperature=0))]
  tokens = np.asarray(jax.jit(sampling.sample)(logits, sampler_inputs.inputs_for(rows, 2, vocab)).tokens)
  assert list(tokens) == [5, vocab - 1]
