"""A step's dispatch: its shape, its inputs, its model pass, then (after the read) its sampler.

The planner (engine/planner.py) sizes each step: every ready decode row first
(a sequence with one uncomputed token whose output is not full), then prefill
chunks in order of priority, then arrival (engine/admission.py), up to the token
budget; a prompt of a higher priority that starts now runs without the decode
rows of lower ones. The step's shape is a bucket each for decode rows and
prefill tokens (`StepShape`); a shape not compiled yet runs padded into one that
is until the padding has cost what compiling it would (`Runner.shape_for`,
`compile_later`).

`_launch` builds the step from the live batch's columns (no Python per decode
row: gathers and masks), dispatches its model pass and advances the counts as
if its tokens were read: `computed` and `inflight` grow, and `last_row` names
the output row that samples each sequence's next token, which the next step's
decode row (and penalty history) reads on the device before the host does.
The sampler is dispatched later (`_sample`), once the host has read the step
before and the constrained rows' grammars have seen its tokens
(engine/grammar_rows.py fills their masks).

`Dispatch` is a part of `Scheduler` (engine/scheduler.py), kept apart; what it
dispatched is a `DispatchedStep`, read back by engine/step_collect.py.
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple

import numpy as np

from ridgeline.engine import config as config_lib
from ridgeline.engine import grammar_rows
from ridgeline.engine import roofline
from ridgeline.engine.admission import PrefillChunk
from ridgeline.engine.config import StepShape
from ridgeline.engine.runner import Forwarded, Sampled
from ridgeline.engine.sampler_inputs import History, SamplerInputs
from ridgeline.engine.sequences import Request, Seq
from ridgeline.engine.step_inputs import Chunk, DecodeRows
from ridgeline.util import ceil_div


class ScoredChunk(NamedTuple):
  """The prompt positions a chunk scores (prompt log-probabilities): from
  `first`, one per target (the token after each position), with the top `k`
  alternatives; written into `request.prompt_scores` when the step is read."""

  request: Request
  first: int
  targets: np.ndarray
  k: int


@dataclasses.dataclass
class DispatchedStep:
  """A dispatched step and what its sampled rows belong to. Its model pass is
  dispatched first (`forwarded`), its sampler (`sampled`) once the host has read
  the step before and filled the masks of the constrained rows (`constrained`:
  (sample row, sequence) pairs; `sampler` the rest of the sampler's inputs)."""

  forwarded: Forwarded
  sampler: SamplerInputs
  constrained: list[tuple[int, Seq]]
  shape: StepShape
  slots: np.ndarray  # [k] slot of every sample row that is read
  rows: np.ndarray  # [k] its output row
  kind: str
  decode_rows: int
  tokens: int
  cost: roofline.StepCost
  # Prompt scoring: the chunks that score, in the order of the step's score
  # rows; and the sequences that end with this step (scoring only, max_tokens 0).
  scores: list[ScoredChunk] = dataclasses.field(default_factory=list)
  ends: list[Seq] = dataclasses.field(default_factory=list)
  sampled: Sampled | None = None


class Dispatch:
  """Plans and dispatches a Scheduler's steps (see the module docstring)."""


  def _dispatch(self) -> DispatchedStep | None:
    cfg, b = self.config, self.batch
    run = b.running_slots()
    uncomputed = b.uncomputed(run)
    ready = run[(uncomputed == 1) & (b.n_out[run] + b.inflight[run] < b.limit[run])]
    # A prompt of a higher priority that starts now (mid-prompt, or first in the
    # queue with a batch slot and pages for its first chunk) gets a step without
    # the lower-priority decode rows: its first token does not wait behind a
    # batch job's full decode step; they resume the step after. (A prompt that
    # cannot start does not hold them back: they are what frees the pages.)
    if len(ready):
      urgent = int(b.priority[run[uncomputed > 1]].min(initial=2**62))
      head = self.waiting[0] if self.waiting else None
      if (head is not None and not head.inflight and self.num_running < cfg.max_batch
          and self.kv.num_free * cfg.page_size
          >= min(len(head.request.prompt_ids), cfg.prefill_chunk)):
        urgent = min(urgent, head.request.priority)
      if urgent < int(b.priority[ready].max()):
        ready = ready[b.priority[ready] <= urgent]
    plan = self.planner.plan(b.computed[ready])
    self._make_decode_room(ready[:plan.decode_batch])
    chunks = self._schedule_prefill(plan.prefill_budget // cfg.prefill_tile or 1, [])
    # Decode rows were chosen first; making room for a chunk may not preempt them,
    # but one preempted for another decode row is dropped here.
    decode = ready[:plan.decode_batch]
    decode = decode[b.running[decode]]
    if not len(decode) and not chunks:
      self.last_kind = None
      return None
    tile = cfg.prefill_tile
    prefill = 0
    if chunks:
      used = sum(ceil_div(c, tile) for _, c in chunks)
      prefill = config_lib.bucket(used * tile, cfg.prefill_token_buckets)
      if prefill > used * tile:  # padding would run anyway: fill it with real work
        chunks = self._schedule_prefill(prefill // tile - used, chunks)
        used = sum(ceil_div(c, tile) for _, c in chunks)
        prefill = config_lib.bucket(used * tile, cfg.prefill_token_buckets)
    buckets = cfg.mixed_decode_buckets if chunks else cfg.decode_buckets
    shape = StepShape(config_lib.bucket(len(decode), buckets), prefill)
    run_as = self.runner.shape_for(shape)
    if run_as != shape:
      # Run padded until the padding has cost what compiling the step's own shape
      # costs, then compile that in the background. The padding's cost: the
      # padded shape's measured step time (its roofline time until measured)
      # times the share of its roofline time that is padding.
      context = float(b.computed[decode].mean()) if len(decode) else 0.0
      padded = self.planner.shape_seconds(run_as, context)
      share = 1 - self.planner.shape_seconds(shape, context) / padded if padded else 0.0
      self._padding[shape] += share * self._measured.get(run_as, padded)
      if self._padding[shape] >= self.runner.compile_seconds:
        self.runner.compile_later(shape)
      shape = run_as
    self.last_decode_batch = len(decode)
    self.last_kind = "decode" if not chunks else ("prefill" if not len(decode) else "mixed")
    return self._launch(decode, chunks, shape)

  def _launch(self, decode: np.ndarray, chunks: list[PrefillChunk],
              shape: StepShape) -> DispatchedStep:
    b, kv = self.batch, self.kv
    d = len(decode)
    n_tok = b.num_tokens(decode)
    known = b.inflight[decode] == 0
    last = b.tokens[decode, np.maximum(n_tok - 1, 0)]
    rows = DecodeRows(np.where(known, last, 0).astype(np.int32),
                      np.where(known, -1, b.last_row[decode]).astype(np.int32),
                      (n_tok - 1).astype(np.int32), kv.tables[decode])
    chunk_rows, scores, ends = [], [], []
    for s, c in chunks:
      start = int(b.computed[s])
      seq = b.seqs[s]
      last = start + c == b.num_tokens(s)
      chunk = Chunk(b.tokens[s, start:start + c], start, kv.pages(s),
                    last and b.limit[s] > 0)
      if seq.scores_prompt:  # positions up to the prompt's last but one
        request = seq.request
        first = max(start, request.scored_upto)
        upto = min(start + c, int(b.n_prompt[s]) - 1)
        if upto > first:
          k = request.params.prompt_logprobs
          chunk.score_start, chunk.score_k = first, k
          chunk.score_targets = b.tokens[s, first + 1:upto + 1].copy()
          scores.append(ScoredChunk(request, first, chunk.score_targets, k))
          request.scored_upto = upto
      if last and b.limit[s] == 0:
        ends.append(seq)
      chunk_rows.append(chunk)
    sampled = [(shape.decode + j, s) for j, ((s, _), ch) in enumerate(zip(chunks, chunk_rows))
               if ch.sample]
    sampler, constrained = self._sampler_inputs(decode, sampled, shape)
    cost_rows = np.concatenate([np.stack([n_tok - 1, np.ones(d, np.int64)], 1),
                                np.asarray([(b.computed[s], c) for s, c in chunks],
                                           np.int64).reshape(-1, 2)])
    forwarded = self.runner.forward(shape, rows, chunk_rows)
    if self.kv_window is not None:
      # Pages the window has passed for good (the dispatched step has read them;
      # a later step that reuses them runs after it).
      slots = np.concatenate([decode, np.asarray([s for s, _ in chunks], np.int64)])
      pos = b.computed[slots] + 1 - self.kv_window
      passed = np.maximum(pos, 0) // self.config.page_size > kv.released[slots]
      for s, p in zip(slots[passed], pos[passed]):
        kv.release_before(int(s), int(p))
    b.computed[decode] += 1
    b.inflight[decode] += 1
    b.last_row[decode] = np.arange(d)
    for s, c in chunks:
      b.computed[s] += c
      kv.publish(s, b.tokens[s], int(min(b.computed[s], b.n_prompt[s] + b.n_out[s])))
    for row, s in sampled:
      b.inflight[s] += 1
      b.last_row[s] = row
      request = b.seqs[s].request
      if request.params.n > 1 and not request.forked:
        self._fork(s)
    tokens = d + sum(c for _, c in chunks)
    read_slots = np.concatenate([decode, np.asarray([s for _, s in sampled], np.int64)])
    read_rows = np.concatenate([np.arange(d), np.asarray([r for r, _ in sampled], np.int64)])
    return DispatchedStep(forwarded, sampler, constrained, shape, read_slots, read_rows,
                          self.last_kind, d, tokens, self.planner.cost(cost_rows), scores,
                          ends)

  def _sampler_inputs(self, decode: np.ndarray, sampled: list[tuple[int, int]],
                      shape: StepShape) -> tuple[SamplerInputs, list[tuple[int, Seq]]]:
    """The step's sample rows: gathers of the live batch's columns, and the
    (row, sequence) pairs of its constrained rows (masks filled later). The output
    position counts the token in flight too: a seeded sequence draws the same key
    for its k-th token however the steps fell, and min_tokens bans the stop ids
    up to the same position (a preempted sequence that recomputes samples with
    nothing in flight; the ban must end where it would have)."""
    b = self.batch
    row_slots = np.full(self.runner.sample_rows(shape), -1, np.int64)
    row_slots[:len(decode)] = decode
    for row, s in sampled:
      row_slots[row] = s
    live = row_slots >= 0
    at = np.where(live, row_slots, 0)
    index = np.where(live, b.n_out[at] + b.inflight[at], 0)
    banned = np.where((live & (index < b.min_tokens[at]))[:, None], b.stop_ids[at], -1)
    histories = {}
    for row in np.flatnonzero(live & b.penalized[at]):
      s = int(row_slots[row])
      n = int(b.n_prompt[s])
      histories[int(row)] = History(
          b.tokens[s, :n], b.tokens[s, n:n + int(b.n_out[s])],
          int(b.last_row[s]) if b.inflight[s] else -1)
    constrained = [(int(r), b.seqs[row_slots[r]])
                   for r in np.flatnonzero(live & b.constrained[at])]
    return b.sampling.inputs(row_slots, index, banned, histories), constrained

  def _sample(self, step: DispatchedStep) -> Sampled:
    """Dispatches a step's sampler. A constrained row's mask is its grammar's
    after every token read so far, the one just read included (its row in this
    step samples the token after it); a row that also has allowed_token_ids gets
    both masks' intersection. A sequence that finished meanwhile has its row
    sampled freely (and its token dropped)."""
    sampler = step.sampler
    rows = [(r, seq) for r, seq in step.constrained if not seq.finished]
    if rows:
      t0 = time.perf_counter()
      sampler = grammar_rows.masked(sampler, [r for r, _ in rows],
                                    [seq.matcher for _, seq in rows], self.runner.mask_words)
      self.grammar_seconds += time.perf_counter() - t0
      self.masked_rows += len(rows)
    return self.runner.sample(step.forwarded, sampler)

