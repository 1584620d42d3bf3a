"""Requests and their sequences: what the scheduler runs, and what a caller's output is read from.

A request (`Request`: a prompt, its parameters, its priority) becomes one
sequence (`Seq`), and n of them once its prompt is computed (`n > 1`: the other
n - 1 share the prompt's pages, each with its own seed, `child_seed`). A started
sequence's numbers live in its slot of the live batch (engine/live_batch.py);
the `Seq` object holds what Python needs: its output's text side
(`outputs.CompletionState`), its grammar's matcher, and its tokens once it has
finished and given its slot back.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from ridgeline.engine import outputs
from ridgeline.engine.grammar import CompiledGrammar
from ridgeline.engine.grammar_matcher import Matcher
from ridgeline.engine.live_batch import LiveBatch
from ridgeline.engine.sampling_params import SamplingParams


@dataclasses.dataclass(eq=False)
class Request:
  request_id: str
  prompt_ids: list[int]
  params: SamplingParams
  arrival_time: float
  seed: int
  max_tokens: int
  detokenizer_factory: Callable[[], object] | None = None
  stream: bool = False  # deltas as tokens come (else one at the end)
  # vLLM's meaning: a lower value is served first (admitted first, preempted
  # last); 0 by default, batch work (the Batch API) below interactive requests.
  priority: int = 0
  grammar: CompiledGrammar | None = None  # params.structured_outputs compiled
  seqs: list["Seq"] = dataclasses.field(default_factory=list)
  forked: bool = False
  # Prompt log-probabilities by position (params.prompt_logprobs): position p's
  # entry is the log-probability of prompt token p + 1 (and alternatives).
  prompt_scores: dict[int, dict[int, float]] = dataclasses.field(default_factory=dict)
  scored_upto: int = 0  # prompt positions below this are scored (or being scored)
  first_scheduled_time: float | None = None
  first_token_time: float | None = None
  finish_time: float | None = None

  @property
  def finished(self) -> bool:
    return all(s.finished for s in self.seqs)

  def prompt_logprobs(self) -> list[dict[int, float] | None] | None:
    """vLLM's format: None for the first prompt token, then one entry a token;
    None until every prompt token is scored."""
    n = len(self.prompt_ids)
    if self.params.prompt_logprobs is None or len(self.prompt_scores) < n - 1:
      return None
    return [None] + [self.prompt_scores[p] for p in range(n - 1)]

  def metrics(self) -> outputs.RequestMetrics:
    n_out = max((s.num_output for s in self.seqs), default=0)
    return outputs.request_metrics(self.arrival_time, self.first_scheduled_time,
                                   self.first_token_time, self.finish_time, n_out)


@dataclasses.dataclass(eq=False)
class Seq:
  """One completion of a request: its slot in the live batch while it has one,
  its tokens kept here once it has finished."""

  request: Request
  index: int
  seed: int
  out: outputs.CompletionState
  batch: LiveBatch
  arrival_order: int = 0
  slot: int = -1
  final_ids: list[int] | None = None
  # Where the output is in its grammar (structured outputs): advanced by every
  # token the host reads, kept across preemption (the tokens are kept too).
  matcher: Matcher | None = None

  @property
  def finished(self) -> bool:
    return self.out.finished

  def output_view(self) -> np.ndarray | list[int]:
    """The output tokens read so far (a view of the live batch while it runs)."""
    if self.final_ids is not None:
      return self.final_ids
    if self.slot < 0:
      return []
    b, s = self.batch, self.slot
    n = int(b.n_prompt[s])
    return b.tokens[s, n:n + int(b.n_out[s])]

  @property
  def token_ids(self) -> list[int]:
    ids = self.output_view()
    return ids.tolist() if isinstance(ids, np.ndarray) else list(ids)

  @property
  def num_output(self) -> int:
    return len(self.output_view())

  @property
  def scores_prompt(self) -> bool:
    """Whether the sequence computes its prompt's log-probabilities (the first
    completion of a request that asks; the others share its prompt)."""
    return self.request.params.prompt_logprobs is not None and self.index == 0

  @property
  def inflight(self) -> int:
    return int(self.batch.inflight[self.slot]) if self.slot >= 0 else 0



def child_seed(seed: int, k: int) -> int:
  """The seed of a request's k-th completion (k >= 1; the first has the request's)."""
  return (seed + k * 0x9E3779B97F4A7C15) % 2**63
