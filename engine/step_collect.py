"""A step's collection: its tokens read into the live batch, stops found, text and deltas made.

Reading a step is one transfer (`Runner.read`) and one scatter of its tokens
into the live batch's `tokens`; EOS, stop ids and max_tokens are then found
with whole-array comparisons, and the grammars of constrained rows advance by
their tokens (engine/grammar_rows.py). Python runs per row only for the rows
that need it in that step (`_handle`): a page filled (published to the prefix
cache), text to stream or stop strings to check, log-probabilities to record, a
first token, a finish. A stop is seen one step late (the step after it was
dispatched before it was read): the sequence's row in that step is computed and
its token dropped, so no output ever holds a token past its stop.

`_finish` ends a sequence: its text (made once, for those that did not stream),
its pages freed, its slot freed once nothing of it is in flight, and its request
listed in the step's `finished` once every sequence of it has ended.

`Collect` is a part of `Scheduler` (engine/scheduler.py), kept apart.
"""

from __future__ import annotations

import time

import numpy as np

from ridgeline.engine import grammar_rows
from ridgeline.engine import outputs
from ridgeline.engine import roofline
from ridgeline.engine.sequences import Seq
from ridgeline.engine.step_dispatch import DispatchedStep, ScoredChunk


class Collect:
  """Reads a Scheduler's dispatched steps (see the module docstring)."""

  def _collect(self, step: DispatchedStep) -> tuple[list[outputs.StreamOutput], float]:
    """Reads a dispatched step's tokens into the live batch; returns the deltas
    and the seconds the host waited for the device."""
    t0 = time.perf_counter()
    tokens, logprobs, scores = self.runner.read(step.sampled)
    now = time.perf_counter()
    seconds = now - max(self._last_ready, step.sampled.dispatched_at)
    self._last_ready = now
    self._measured[step.shape] = seconds
    if step.kind != "decode":
      self.planner.observe_step(step.cost, seconds)
    peaks, dtype = self.planner.peaks, self.planner.dtype
    self.metrics.on_step(step.kind, step.decode_rows, step.tokens, step.cost.flops,
                         step.cost.bytes, seconds, roofline.mfu(step.cost, seconds, peaks, dtype),
                         roofline.mbu(step.cost, seconds, peaks))
    b, ps = self.batch, self.config.page_size
    b.inflight[step.slots] -= 1
    alive = ~b.finished[step.slots]  # else stopped on an earlier token, or aborted
    slots, rows = step.slots[alive], step.rows[alive]
    tok = tokens[rows]
    at = b.n_prompt[slots] + b.n_out[slots]
    b.tokens[slots, at] = tok
    b.n_out[slots] += 1
    self.metrics.generated_tokens.inc(len(slots))
    stop = (b.stop_ids[slots] == tok[:, None]).any(axis=1)
    length = b.n_out[slots] >= b.limit[slots]
    filled = np.minimum(b.computed[slots], at + 1) // ps > self.kv.num_keys[slots]
    done, rejected = self._advance_grammars(slots, tok)
    special = (stop | length | filled | (b.n_out[slots] == 1) | b.needs_text[slots]
               | (b.logprobs[slots] >= 0) | done | rejected)
    deltas = []
    for i in np.flatnonzero(special):
      seq = self._handle(int(slots[i]), int(tok[i]), int(rows[i]), bool(stop[i] | done[i]),
                         bool(length[i]), now, logprobs, bool(rejected[i]))
      if seq is not None and (seq.request.stream or seq.finished):
        d = seq.out.delta(seq.request.request_id, seq.index, seq.output_view())
        if d is not None:
          deltas.append(d)
    if step.scores:
      self._record_scores(step.scores, scores)
    for seq in step.ends:  # scoring only: done once its prompt is scored
      if not seq.finished:
        self._finish(seq, "length")
        deltas.append(seq.out.delta(seq.request.request_id, seq.index, seq.output_view()))
    for s in [s for s in self._to_free if b.inflight[s] == 0]:
      self._to_free.discard(s)
      b.free(s)
    return deltas, now - t0


  def _advance_grammars(self, slots: np.ndarray, tokens: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Per row read: whether its grammar has ended, and whether it refused the
    token (`grammar_rows.advance`); False for the rows without a grammar."""
    done = np.zeros(len(slots), bool)
    rejected = np.zeros(len(slots), bool)
    constrained = np.flatnonzero(self.batch.constrained[slots])
    if not len(constrained):
      return done, rejected
    t0 = time.perf_counter()
    matchers = [self.batch.seqs[s].matcher for s in slots[constrained]]
    done[constrained], rejected[constrained] = grammar_rows.advance(matchers,
                                                                    tokens[constrained])
    self.grammar_seconds += time.perf_counter() - t0
    return done, rejected

  @staticmethod
  def _record_scores(chunks: list[ScoredChunk], scores: tuple) -> None:
    """Prompt log-probabilities of a step's scored positions, into their requests
    (by position: a chunk scored twice, around a preemption, writes the same).
    An entry is the prompt token's log-probability, then its top k alternatives."""
    logprob, top_ids, top_lp = scores
    at = 0
    for request, first, targets, k in chunks:
      for i, target in enumerate(targets.tolist()):
        row = at + i
        entry = {target: float(logprob[row])}
        for t, v in zip(top_ids[row, :k].tolist(), top_lp[row, :k].tolist()):
          entry.setdefault(t, v)
        request.prompt_scores[first + i] = entry
      at += len(targets)

  def _handle(self, slot: int, token: int, row: int, stop: bool, length: bool, now: float,
              logprobs, rejected: bool = False) -> Seq | None:
    """The per-row work of a row that needs it; returns the sequence if it has
    something to emit (new text, or its end). `stop`: a stop id, or the end of
    the sequence's grammar; `rejected`: its grammar refused the token."""
    b = self.batch
    seq = b.seqs[slot]
    out, request = seq.out, seq.request
    if request.first_token_time is None:
      request.first_token_time = now
    k = int(b.logprobs[slot])
    if k >= 0:
      logprob, top_ids, top_lp = logprobs
      entry = {token: float(logprob[row])}
      entry.update({int(t): float(v) for t, v in zip(top_ids[row, :k], top_lp[row, :k])})
      out.logprobs.append(entry)
    if rejected:
      out.fail(f"token {token} was sampled outside the grammar of structured_outputs "
               f"({seq.matcher.error or 'refused by the matcher'})")
      self._finish(seq, "error")
      return seq
    eos = stop and token in self.eos_ids and not request.params.ignore_eos
    reason = "stop" if stop else None
    if stop and not eos and token in b.stop_ids[slot]:
      out.stop_reason = token  # a stop id (EOS leaves it None)
    try:
      if b.needs_text[slot]:
        reason = out.push(token, int(b.n_out[slot]), eos, stop and not eos) or reason
    except Exception as e:  # noqa: BLE001 -- e.g. a detokenizer error: this sequence only
      out.fail(f"{type(e).__name__} while handling token {token}: {e}")
      reason = "error"
    if reason is None and length:
      reason = "length"
    if reason is not None:
      self._finish(seq, reason, eos)
      return seq
    upto = int(min(b.computed[slot], b.n_prompt[slot] + b.n_out[slot]))
    if upto // self.config.page_size > self.kv.num_keys[slot]:  # a page filled
      self.kv.publish(slot, b.tokens[slot], upto)
    return seq if b.needs_text[slot] else None

  def _finish(self, seq: Seq, reason: str, eos: bool = False) -> None:
    """Ends a sequence: its text (once, if it was not made token by token), its
    pages freed, its slot freed once nothing of it is in flight."""
    b = self.batch
    slot = seq.slot
    ids = b.output_ids(slot) if slot >= 0 else []
    if reason != "error":  # (an error was recorded by the caller)
      try:
        seq.out.finish(reason, ids, eos)
      except Exception as e:  # noqa: BLE001 -- a detokenizer error: this sequence only
        seq.out.fail(f"{type(e).__name__} while decoding the output: {e}")
    seq.final_ids = ids
    if slot >= 0:
      b.finished[slot] = True
      if b.running[slot]:
        self.kv.release(slot)
        b.computed[slot] = 0
        b.running[slot] = False
        self.num_running -= 1
      if b.inflight[slot]:
        self._to_free.add(slot)
      else:
        b.free(slot)
      seq.slot = -1
    if seq in self.waiting:
      self.waiting.remove(seq)
    request = seq.request
    if request.finished:
      if reason != "abort":
        self._ended.append(request.request_id)
      request.finish_time = time.perf_counter()
      m = request.metrics()
      self.metrics.on_request_finished(m.ttft, m.tpot, m.queue_time)

