"""What quantization costs in accuracy: greedy agreement, log-prob gap, perplexity.

Used by tests/test_quant.py (small sizes) and scripts/quant_bench.py (the full
20 prompts x 32 tokens, perplexity on benchmarks/data/alice.txt, speed).

- `greedy`: greedy continuations through the real Engine (paged cache,
  scheduler), `ignore_eos` so every continuation has the same length.
- `agreement`: the fraction of continuations identical token for token to the
  reference's (one differing token makes the whole continuation differ).
- `logprob_gap`: teacher-forced on the reference's continuations, the mean over
  tokens of log p_ref(token) - log p_quant(token) (natural log).
- `perplexity`: exp of the mean next-token negative log-likelihood over a text,
  scored in non-overlapping windows.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ridgeline.engine.config import EngineConfig
from ridgeline.engine.sampling import SamplingParams
from ridgeline.model import transformer as transformer_lib

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "Water boils at a temperature of",
    "The largest planet in our solar system is",
    "In computer science, a linked list is",
    "The French Revolution began in",
    "Photosynthesis is the process by which",
    "A good way to learn a new language is",
    "The theory of relativity was developed by",
    "def fibonacci(n):\n",
    "The main ingredients of bread are",
    "The human heart has four chambers:",
    "Shakespeare wrote many plays, including",
    "The speed of light in a vacuum is",
    "My favourite season is autumn because",
    "The Great Wall of China was built to",
    "An apple a day",
    "The quick brown fox",
)


def engine_config(max_len: int = 256, batch: int = 32) -> EngineConfig:
  return EngineConfig(page_size=16, num_pages=batch * (max_len // 16) + 8,
                      max_model_len=max_len, max_batch=batch, prefill_chunk=64,
                      max_prefill_batch=8)


def greedy(model, tokenizer, prompts: Sequence[str], max_tokens: int,
           config: EngineConfig | None = None) -> list[list[int]]:
  """Greedy continuations of `prompts` (token ids), through an Engine."""
  from ridgeline.engine.engine import Engine
  engine = Engine(model, tokenizer, config or engine_config())
  params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
  outs = engine.generate(list(prompts), params)
  bad = [o.error for o in outs if getattr(o, "error", None)]
  if bad:
    raise RuntimeError(f"generation failed: {bad[0]}")
  return [list(o.token_ids) for o in outs]


def agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> float:
  return float(np.mean([list(a) == list(b) for a, b in zip(reference, other)]))


def token_logprobs(model, sequences: Sequence[Sequence[int]], page_size: int = 16
                   ) -> list[np.ndarray]:
  """log p(token t | tokens < t) for t >= 1 of each sequence: one forward over the
  batch (whole sequences, contiguous pages), float32."""
  lengths = [len(s) for s in sequences]
  tokens = np.zeros((len(sequences), max(lengths)), np.int32)
  for i, s in enumerate(sequences):
    tokens[i, :len(s)] = s
  logits = transformer_lib.score(model, tokens, page_size, lengths)  # [B, T, V]
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  logp = np.asarray(jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], axis=-1)[..., 0])
  return [logp[i, :n - 1] for i, n in enumerate(lengths)]


def logprob_gap(reference_model, model, prompts_ids: Sequence[Sequence[int]],
                continuations: Sequence[Sequence[int]]) -> float:
  """Mean over continuation tokens of log p_ref - log p_model (teacher-forced on
  the reference's continuations)."""
  seqs = [list(p) + list(c) for p, c in zip(prompts_ids, continuations)]
  ref = token_logprobs(reference_model, seqs)
  got = token_logprobs(model, seqs)
  gaps = [r[len(p) - 1:] - g[len(p) - 1:] for r, g, p in zip(ref, got, prompts_ids)]
  return float(np.mean(np.concatenate(gaps)))


def perplexity(model, token_ids: Sequence[int], window: int = 256, batch: int = 4) -> float:
  """exp(mean NLL) of `token_ids`, in non-overlapping windows of `window` tokens
  (each window's first token is context only)."""
  ids = list(token_ids)
  windows = [ids[i:i + window] for i in range(0, len(ids) - 1, window)]
  windows = [w for w in windows if len(w) > 1]
  nll = []
  for i in range(0, len(windows), batch):
    for lp in token_logprobs(model, windows[i:i + batch]):
      nll.append(-lp)
  return float(np.exp(np.mean(np.concatenate(nll))))


def max_logit_error(reference_model, model, prompts_ids: Sequence[Sequence[int]]) -> float:
  """Relative max logit error over whole prompts (one forward, all positions)."""
  lengths = [len(p) for p in prompts_ids]
  tokens = np.zeros((len(prompts_ids), max(lengths)), np.int32)
  for i, p in enumerate(prompts_ids):
    tokens[i, :len(p)] = p
  outs = [np.asarray(transformer_lib.score(m, tokens, 16, lengths))
          for m in (reference_model, model)]
  mask = np.arange(max(lengths))[None, :] < np.asarray(lengths)[:, None]
  ref, got = outs[0][mask], outs[1][mask]
  return float(np.abs(got - ref).max() / np.abs(ref).max())
