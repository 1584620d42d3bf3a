"""Admission and preemption: which sequences hold pages and rows, in what order.

Requests wait in one queue ordered by priority (vLLM's meaning: a lower value is
served first), first come first served within a priority. Each step the prefill
region takes chunks of the sequences already running but mid-prompt, then of the
queue in order (`_schedule_prefill`): a queued sequence gets a slot of the live
batch, reuses the pages of its cached prefix (`kv.reuse_prefix`) and is admitted
if the pool has room for its chunk; FCFS: a later, smaller request does not jump
the queue. Low-priority work (priority > 0, batch lines) is admitted only while
a reserve of free pages stays for interactive requests, and while the batch has
fewer than `batch_rows` rows (EngineConfig: the rows past which a step slows
down for everyone).

When a decoding sequence needs a page and none is free, the newest running
sequence of the lowest priority is preempted (`_make_room`, `_preempt`): its
pages are freed (full ones stay in the prefix cache) and it goes back to the
front of its priority's queue with its generated tokens, to be recomputed later;
a full batch likewise yields its newest lowest-priority row to a request of a
higher priority. Nothing is lost, and a greedy output is unchanged. A request of
n > 1 forks into n sequences once its prompt is dispatched (`_fork`).

`Admission` is a part of `Scheduler` (engine/scheduler.py), kept apart; it reads
and changes the scheduler's queue, live batch, KV-cache manager, running count
and metrics.
"""

from __future__ import annotations

import itertools
import time
from typing import NamedTuple

import numpy as np

from ridgeline.engine import outputs
from ridgeline.engine.sampling_params import SamplingParams
from ridgeline.engine.sequences import Request, Seq, child_seed
from ridgeline.util import ceil_div


class PrefillChunk(NamedTuple):
  """A step's chunk of one sequence's prompt (or recomputation): `tokens`
  tokens from its first not computed yet."""

  slot: int
  tokens: int


class Admission:
  """The queue, admission and preemption of a Scheduler (see the module docstring)."""

  def add(self, request: Request) -> None:
    self.requests[request.request_id] = request
    self.metrics.prompt_tokens.inc(len(request.prompt_ids))
    seq = self._new_seq(request, 0, request.seed)
    self._arrivals += 1
    seq.arrival_order = self._arrivals
    self._enqueue(seq)

  def _enqueue(self, seq: Seq, front: bool = False) -> None:
    """Into the queue by priority: after the waiting sequences of its priority
    (or before them, `front`: a preempted sequence), FCFS within a priority."""
    p = seq.request.priority
    w = self.waiting
    if not front and (not w or w[-1].request.priority <= p):
      w.append(seq)  # the common case: every request of one priority
      return
    at = next((i for i, x in enumerate(w)
               if (x.request.priority >= p if front else x.request.priority > p)), len(w))
    w.insert(at, seq)

  def _new_seq(self, request: Request, index: int, seed: int) -> Seq:
    out = outputs.CompletionState(request.params, request.detokenizer_factory, request.stream)
    seq = Seq(request, index, seed, out, self.batch)
    if request.grammar is not None:
      seq.matcher = request.grammar.matcher()
    request.seqs.append(seq)
    return seq

  def _stop_ids(self, params: SamplingParams) -> np.ndarray:
    """Ids that end a sequence (and that min_tokens bans)."""
    eos = () if params.ignore_eos else sorted(self.eos_ids)
    return np.asarray(list(dict.fromkeys([*eos, *params.stop_token_ids])), np.int32)

  def _start(self, seq: Seq) -> int:
    seq.slot = self.batch.acquire(seq, np.asarray(seq.request.prompt_ids, np.int32),
                                  self._stop_ids(seq.request.params))
    return seq.slot


  def _make_decode_room(self, decode: np.ndarray) -> None:
    """Pages for the decode rows that cross a page boundary this step (one row
    in page_size), oldest first; may preempt the newest running sequences."""
    b = self.batch
    n_tok = b.num_tokens(decode)
    crossing = self.kv.num_pages[decode] * self.config.page_size < n_tok
    for slot, n in zip(decode[crossing], n_tok[crossing]):
      if b.running[slot]:  # not preempted for an older row meanwhile
        self._make_room(int(slot), int(n))

  def _schedule_prefill(self, tiles: int, chosen: list[PrefillChunk]) -> list[PrefillChunk]:
    """Adds prompt chunks of at most `tiles` prefill tiles in all to `chosen`."""
    cfg, b = self.config, self.batch
    tile = cfg.prefill_tile
    chosen = list(chosen)
    taken = {c.slot for c in chosen}
    # By priority; within one, sequences already running but mid-prompt go first,
    # then the queue in order (a queued sequence whose last token is still in
    # flight waits for it). Every queued candidate but the last is admitted, so a
    # few are enough.
    run = b.running_slots()
    uncomputed = b.uncomputed(run)
    # (A scoring-only sequence, max_tokens 0, prefills its last prompt token too.)
    mid_prompt = run[(uncomputed > 1) | ((uncomputed == 1) & (b.limit[run] == 0))]
    queued = itertools.islice((s for s in self.waiting if not s.inflight),
                              cfg.max_prefill_batch + 1)
    candidates = sorted([b.seqs[s] for s in mid_prompt if s not in taken] + list(queued),
                        key=lambda seq: seq.request.priority)  # stable: FCFS within one
    for seq in candidates:
      if len(chosen) == cfg.max_prefill_batch or tiles <= 0:
        break
      fresh = seq.slot < 0 or not b.running[seq.slot]
      new = seq.slot < 0
      if fresh:
        if self.num_running >= cfg.max_batch:
          # The batch is full: a request of a higher priority takes the row of
          # the newest running sequence of the lowest (recomputed later, its full
          # pages kept in the prefix cache); otherwise it waits.
          victim = int(b.running_slots()[-1])
          if b.priority[victim] <= seq.request.priority:
            break
          self._preempt(victim)
          chosen = [c for c in chosen if c.slot != victim]
        slot = seq.slot if not new else self._start(seq)
        # A cached prefix has no logits: a request that scores its prompt reuses
        # pages only up to the positions it has scored (none, the first time).
        limit = seq.request.scored_upto if seq.scores_prompt else None
        b.computed[slot] = self.kv.reuse_prefix(slot, b.resolved(slot), limit)
      slot = seq.slot
      chunk = min(int(b.num_tokens(slot) - b.computed[slot]), tiles * tile)
      # Low-priority work (priority > 0: batch lines) starts only while the pool
      # keeps a reserve for interactive requests after its whole prompt, and while
      # the batch is below `batch_rows` (past them every row's step gets slower).
      held_back = fresh and seq.request.priority > 0 and (
          self.num_running >= self.batch_rows
          or self.kv.num_free - self.kv.pages_needed(slot, int(b.num_tokens(slot)))
          < self.page_reserve)
      if held_back or not self._make_room(slot, int(b.computed[slot]) + chunk,
                                          may_preempt=not fresh):
        if fresh:
          self.kv.release(slot)
          b.computed[slot] = 0
          if new:  # a queued sequence holds no slot
            b.free(slot)
            seq.slot = -1
          break  # FCFS: a later, smaller request does not jump the queue
        continue
      if fresh:
        self.waiting.remove(seq)
        b.running[slot] = True
        self.num_running += 1
        self.metrics.prefix_queries.inc(int(b.n_prompt[slot] + b.n_out[slot]))
        self.metrics.prefix_hits.inc(int(b.computed[slot]))
        if self.kv.host is not None:  # counted once a lookup's sequence is admitted
          hit, loaded, recomputed = self.kv.last_host
          self.metrics.host_hits.inc(hit)
          self.metrics.host_loaded.inc(loaded)
          self.metrics.host_declined.inc(recomputed)
        seq.request.first_scheduled_time = (seq.request.first_scheduled_time
                                            or time.perf_counter())
      chosen.append(PrefillChunk(slot, chunk))
      tiles -= ceil_div(chunk, tile)
    # Making room may have preempted sequences chosen earlier in this loop.
    return [c for c in chosen if b.running[c.slot]]

  def _make_room(self, slot: int, num_tokens: int, may_preempt: bool = True) -> bool:
    """Gives `slot` pages for its first `num_tokens` tokens.

    When the pool is exhausted and `may_preempt`, the newest running sequence of
    the lowest priority is preempted until enough pages are free; if that is
    this one, it is preempted and False returned. The engine guarantees the pool
    holds one sequence of the maximum model length, so the first sequence in
    (priority, arrival) order always runs.
    """
    b = self.batch
    while not self.kv.allocate(slot, num_tokens):
      if not may_preempt or not self.num_running:
        return False
      victim = int(b.running_slots()[-1])  # the newest of the lowest priority
      self._preempt(victim)
      if victim == slot:
        return False
    return True

  def _preempt(self, slot: int) -> None:
    """Returns a sequence to the front of the queue, keeping its slot (and so its
    tokens); its full pages stay in the prefix cache, so the recomputation later
    reuses whatever was not evicted meanwhile. A token it has in flight is still
    read (it was computed from intact pages); until then it is not prefilled again."""
    b = self.batch
    self.kv.release(slot)
    b.computed[slot] = 0
    b.running[slot] = False
    self.num_running -= 1
    self._enqueue(b.seqs[slot], front=True)
    self.metrics.preemptions.inc()

  def _fork(self, parent: int) -> None:
    """Creates the other n-1 samples of a request once its prompt is dispatched:
    they share the prompt's full pages (all but the last token's) and compute the
    rest themselves, each drawing its own first token."""
    b = self.batch
    request = b.seqs[parent].request
    request.forked = True
    for k in range(1, request.params.n):
      child = self._new_seq(request, k, child_seed(request.seed, k))
      child.arrival_order = b.seqs[parent].arrival_order
      slot = self._start(child)
      b.computed[slot] = self.kv.fork(parent, slot, len(request.prompt_ids) - 1)
      b.running[slot] = True
      self.num_running += 1

