"""The host loop: admission, waiting and running sequences, one step per iteration.

A request becomes one sequence (n sequences once its prompt is computed, for
`n > 1`). A started sequence holds a slot of the live batch
(engine/live_batch.py), where its tokens, counts and limits are numpy columns;
what it needs next follows from them:

  pending = n_prompt + n_out + inflight - computed
  pending > 1   the sequence is prefilling: its next chunk runs in the prefill
                region of a step (a new prompt, or a preempted sequence recomputing)
  pending == 1  the sequence decodes: its last token runs as a decode row

Each `step()` plans and dispatches step N+1's model pass, then reads step N's
tokens, then dispatches step N+1's sampler, so the device always has the next
step queued while the host checks stops and emits text (JetStream and vLLM's
async scheduling do the same). Between the two halves the host advances the
grammars of constrained sequences (structured outputs) by the tokens just read
and fills their rows of the sampler's allowed-token mask, while the model pass
runs: a grammar sees every token before the mask of the next one is made. A
decode row whose token is still on the device names the output row of step N
that sampled it; the device fills it in. A stop (EOS, a stop string) is
therefore seen one step late: the sequence's row in step N+1 is computed and
its token dropped; no output ever holds a token past its stop. max_tokens and the model length are
known in advance, so those rows are never dispatched. A penalty history takes
the token in flight the same way (sampling.History), so the host never waits
for a step before dispatching the next.

The host's work per step does not grow by Python statements per row: the decode
rows are a mask over the live batch's columns, their inputs are gathers, reading
their tokens is one scatter, and EOS, stop ids and max_tokens are found with
whole-array comparisons. Python runs per row only for the rows that need it in
that step: a page filled (published to the prefix cache), text to stream or stop
strings to check, log-probabilities to record, a first token, a finish.

The planner (engine/planner.py) sizes each step: every ready decode row first,
then prefill chunks in order of priority, then arrival (FCFS), up to the token
budget. When a decoding sequence needs a page and none is free, the newest
running sequence of the lowest priority is preempted: its pages are freed (full
ones stay in the prefix cache) and it goes back to the front of its priority's
queue with its generated tokens, to be recomputed later. Low-priority work
(priority > 0, batch lines) is admitted only while a reserve of free pages stays
for interactive requests. Nothing is lost, and a greedy output is unchanged.
Pages, prefix lookups (and the host tier under them, engine/kv_host.py),
publishing and forks go through the KV-cache manager (engine/kv_cache.py); text
and stop strings through engine/outputs.py.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from typing import Callable, Sequence

import numpy as np

from ridgeline.engine import config as config_lib
from ridgeline.engine import grammar as grammar_lib
from ridgeline.engine import kv_cache
from ridgeline.engine import outputs
from ridgeline.engine import roofline
from ridgeline.engine import sampling
from ridgeline.engine.config import EngineConfig, StepShape
from ridgeline.engine.live_batch import LiveBatch
from ridgeline.engine.metrics import Metrics
from ridgeline.engine.planner import Planner
from ridgeline.engine.runner import Chunk, DecodeRows, Forwarded, Pending, Runner
from ridgeline.engine.sampling import SamplingParams
from ridgeline.util import ceil_div


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
  grammar: grammar_lib.CompiledGrammar | None = None  # params.structured_outputs compiled
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
  out: outputs.Completion
  batch: LiveBatch
  arrival_order: int = 0
  slot: int = -1
  final_ids: list[int] | None = None
  # Where the output is in its grammar (structured outputs): advanced by every
  # token the host reads, kept across preemption (the tokens are kept too).
  matcher: grammar_lib.Matcher | None = None

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
  def inflight(self) -> int:
    return int(self.batch.inflight[self.slot]) if self.slot >= 0 else 0


@dataclasses.dataclass
class _Step:
  """A dispatched step and what its sampled rows belong to. Its model pass is
  dispatched first (`forwarded`), its sampler (`pending`) once the host has read
  the step before and filled the masks of the constrained rows (`constrained`:
  (sample row, sequence) pairs; `sampler` the rest of the sampler's inputs)."""

  forwarded: Forwarded
  sampler: sampling.SamplerInputs
  constrained: list
  shape: StepShape
  slots: np.ndarray  # [k] slot of every sample row that is read
  rows: np.ndarray  # [k] its output row
  kind: str
  decode_rows: int
  tokens: int
  cost: roofline.StepCost
  # Prompt scoring: (request, first position, targets, k) per chunk, in the order
  # of the step's score rows; and the sequences that end with this step (scoring
  # only, max_tokens 0).
  scores: list = dataclasses.field(default_factory=list)
  ends: list = dataclasses.field(default_factory=list)
  pending: Pending | None = None


class Scheduler:
  """Runs sequences on a Runner; knows nothing about text beyond `outputs`."""

  def __init__(self, runner: Runner, config: EngineConfig, eos_ids: Sequence[int],
               planner: Planner, metrics: Metrics):
    self.runner = runner
    self.config = config
    self.planner = planner
    self.metrics = metrics
    self.kv = kv_cache.KVCacheManager(runner.num_pages, config.page_size,
                                      config.max_pages_per_seq)
    if config.host_kv_cache_bytes is not None:
      from ridgeline.engine.kv_host import HostTier
      self.kv.attach_host(HostTier(config.host_kv_cache_bytes // runner.page_bytes,
                                   runner.page_bytes),
                          runner.save_pages, runner.load_pages, planner.prefer_copy)
    self.batch = LiveBatch(config.max_batch, config.max_model_len, self.kv,
                           runner.model_config.vocab_size)
    # Keys older than this many positions are never read again (None: they are).
    self.kv_window = runner.model_config.kv_window
    self.eos_ids = frozenset(int(t) for t in eos_ids)
    self.waiting: collections.deque[Seq] = collections.deque()
    self.num_running = 0  # sequences holding pages
    self.requests: dict[str, Request] = {}
    self._arrivals = 0
    self._inflight: _Step | None = None
    self._to_free: set[int] = set()  # finished slots with a token still in flight
    self._ended: list[str] = []  # requests finished since the last step returned
    # Free pages low-priority work may not take: room for one sequence of the
    # model length, at most an eighth of the pool.
    self.page_reserve = min(config.max_pages_per_seq, runner.num_pages // 8)
    self._padding: collections.Counter = collections.Counter()  # seconds run padded, by shape
    self._measured: dict[StepShape, float] = {}  # the last step time of each shape run
    self._last_ready = 0.0
    self.last_decode_batch = 0  # decode rows of the step dispatched last
    self.last_kind: str | None = None  # "decode", "prefill", "mixed"; None: no step
    # Structured outputs: host seconds in grammars (masks filled, tokens
    # accepted), and the constrained rows whose masks were filled.
    self.grammar_seconds = 0.0
    self.masked_rows = 0

  @property
  def allocator(self) -> kv_cache.PageAllocator:
    return self.kv.allocator

  # Admission ----------------------------------------------------------------

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
    out = outputs.Completion(request.params, request.detokenizer_factory, request.stream)
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

  def abort(self, request_id: str) -> bool:
    request = self.requests.get(request_id)
    if request is None or request.finished:
      return False
    for seq in request.seqs:
      if not seq.finished:
        self._finish(seq, "abort")
    return True

  def has_work(self) -> bool:
    return bool(self.waiting or self.num_running or self._inflight)

  # The step -------------------------------------------------------------------

  def step(self) -> outputs.StepResult:
    """Dispatches the next step's model pass, reads the previous step, then
    dispatches the next step's sampler (its grammar masks filled from the tokens
    just read). Returns the deltas it produced (for streaming sequences as their
    tokens come, and one for every sequence that finished) and the requests that
    ended."""
    t0 = time.perf_counter()
    evictions = self.allocator.evictions
    tier = self._tier_counts()
    gathered = self.kv.host.unsettled if self.kv.host is not None else 0
    new = self._dispatch()
    deltas, wait = self._collect(self._inflight) if self._inflight is not None else ([], 0.0)
    if gathered:
      self.kv.host.settle(gathered)  # gathered before the step just read was dispatched
    if new is not None:
      new.pending = self._sample(new)
    self._inflight = new
    self.metrics.evictions.inc(self.allocator.evictions - evictions)
    if tier is not None:
      self._count_tier(tier)
    self.metrics.set_load(self.num_running, len(self.waiting), self.kv.utilization())
    self.metrics.on_host_step(time.perf_counter() - t0, wait)
    ended, self._ended = self._ended, []
    return outputs.StepResult(deltas, ended)

  def _tier_counts(self) -> tuple | None:
    host = self.kv.host
    return None if host is None else (host.pages_in, host.pages_out, host.evictions)

  def _count_tier(self, before: tuple) -> None:
    """The host tier's page moves of this step, into the metrics."""
    d = [a - b for a, b in zip(self._tier_counts(), before)]
    m, page = self.metrics, self.kv.host.page_bytes
    m.host_bytes.labels("to_host").inc(d[0] * page)
    m.host_bytes.labels("to_device").inc(d[1] * page)
    m.host_evictions.inc(d[2])
    m.host_pages.set(len(self.kv.host))

  def _dispatch(self) -> _Step | None:
    cfg, b = self.config, self.batch
    run = b.running_slots()
    pending = b.num_tokens(run) - b.computed[run]
    ready = run[(pending == 1) & (b.n_out[run] + b.inflight[run] < b.limit[run])]
    # A prompt of a higher priority that starts now (mid-prompt, or first in the
    # queue with a batch slot and pages for its first chunk) gets a step without
    # the lower-priority decode rows: its first token does not wait behind a
    # batch job's full decode step; they resume the step after. (A prompt that
    # cannot start does not hold them back: they are what frees the pages.)
    if len(ready):
      urgent = int(b.priority[run[pending > 1]].min(initial=2**62))
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

  def _make_decode_room(self, decode: np.ndarray) -> None:
    """Pages for the decode rows that cross a page boundary this step (one row
    in page_size), oldest first; may preempt the newest running sequences."""
    b = self.batch
    n_tok = b.num_tokens(decode)
    crossing = self.kv.num_pages[decode] * self.config.page_size < n_tok
    for slot, n in zip(decode[crossing], n_tok[crossing]):
      if b.running[slot]:  # not preempted for an older row meanwhile
        self._make_room(int(slot), int(n))

  def _schedule_prefill(self, tiles: int, chosen: list[tuple[int, int]]
                        ) -> list[tuple[int, int]]:
    """Adds prompt chunks of at most `tiles` prefill tiles in all to `chosen`
    ((slot, tokens) pairs)."""
    cfg, b = self.config, self.batch
    tile = cfg.prefill_tile
    chosen = list(chosen)
    taken = {s for s, _ in chosen}
    # By priority; within one, sequences already running but mid-prompt go first,
    # then the queue in order (a queued sequence whose last token is still in
    # flight waits for it). Every queued candidate but the last is admitted, so a
    # few are enough.
    run = b.running_slots()
    pending = b.num_tokens(run) - b.computed[run]
    # (A scoring-only sequence, max_tokens 0, prefills its last prompt token too.)
    mid_prompt = run[(pending > 1) | ((pending == 1) & (b.limit[run] == 0))]
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
          chosen = [(s, c) for s, c in chosen if s != victim]
        slot = seq.slot if not new else self._start(seq)
        # A cached prefix has no logits: a request that scores its prompt reuses
        # pages only up to the positions it has scored (none, the first time).
        limit = seq.request.scored_upto if self._scores(seq) else None
        b.computed[slot] = self.kv.reuse_prefix(slot, b.resolved(slot), limit)
      slot = seq.slot
      chunk = min(int(b.num_tokens(slot) - b.computed[slot]), tiles * tile)
      # Low-priority work (priority > 0: batch lines) starts only while the pool
      # keeps a reserve for interactive requests after its whole prompt.
      held_back = fresh and seq.request.priority > 0 and (
          self.kv.num_free - self.kv.pages_needed(slot, int(b.num_tokens(slot)))
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
      chosen.append((slot, chunk))
      tiles -= ceil_div(chunk, tile)
    # Making room may have preempted sequences chosen earlier in this loop.
    return [(s, c) for s, c in chosen if b.running[s]]

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

  def _launch(self, decode: np.ndarray, chunks: list[tuple[int, int]],
              shape: StepShape) -> _Step:
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
      if self._scores(seq):  # positions up to the prompt's last but one
        request = seq.request
        first = max(start, request.scored_upto)
        upto = min(start + c, int(b.n_prompt[s]) - 1)
        if upto > first:
          k = request.params.prompt_logprobs
          chunk.score_start, chunk.score_k = first, k
          chunk.score_targets = b.tokens[s, first + 1:upto + 1].copy()
          scores.append((request, first, chunk.score_targets, k))
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
    return _Step(forwarded, sampler, constrained, shape, read_slots, read_rows,
                 self.last_kind, d, tokens, self.planner.cost(cost_rows), scores, ends)

  @staticmethod
  def _scores(seq: Seq) -> bool:
    """Whether the sequence computes its prompt's log-probabilities (the first
    completion of a request that asks; the others share its prompt)."""
    return seq.request.params.prompt_logprobs is not None and seq.index == 0

  def _sampler_inputs(self, decode: np.ndarray, sampled: list[tuple[int, int]],
                      shape: StepShape) -> tuple[sampling.SamplerInputs, list]:
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
      histories[int(row)] = sampling.History(
          b.tokens[s, :n], b.tokens[s, n:n + int(b.n_out[s])],
          int(b.last_row[s]) if b.inflight[s] else -1)
    constrained = [(int(r), b.seqs[row_slots[r]])
                   for r in np.flatnonzero(live & b.constrained[at])]
    return b.sampling.inputs(row_slots, index, banned, histories), constrained

  def _sample(self, step: _Step) -> Pending:
    """Dispatches a step's sampler. A constrained row's mask is its grammar's
    after every token read so far, the one just read included (its row in this
    step samples the token after it); a row that also has allowed_token_ids gets
    both masks' intersection. A sequence that finished meanwhile has its row
    sampled freely (and its token dropped)."""
    sampler = step.sampler
    rows = [(r, seq) for r, seq in step.constrained if not seq.finished]
    if rows:
      t0 = time.perf_counter()
      masks = (sampler.allowed.copy() if sampler.allowed is not None else
               np.zeros((len(sampler.allowed_row), self.runner.mask_words), np.uint32))
      static = sampler.allowed_row.copy()
      index = [r for r, _ in rows]
      grammar_lib.fill_rows([seq.matcher for _, seq in rows], masks, index)
      both = [r for r in index if static[r] >= 0]
      if both:
        masks[both] &= sampler.allowed[static[both]]
      allowed_row = sampler.allowed_row.copy()
      allowed_row[index] = index
      sampler = sampler._replace(allowed=masks, allowed_row=allowed_row)
      self.grammar_seconds += time.perf_counter() - t0
      self.masked_rows += len(rows)
    return self.runner.sample(step.forwarded, sampler)

  def _fork(self, parent: int) -> None:
    """Creates the other n-1 samples of a request once its prompt is dispatched:
    they share the prompt's full pages (all but the last token's) and compute the
    rest themselves, each drawing its own first token."""
    b = self.batch
    request = b.seqs[parent].request
    request.forked = True
    for k in range(1, request.params.n):
      child = self._new_seq(request, k, _child_seed(request.seed, k))
      child.arrival_order = b.seqs[parent].arrival_order
      slot = self._start(child)
      b.computed[slot] = self.kv.fork(parent, slot, len(request.prompt_ids) - 1)
      b.running[slot] = True
      self.num_running += 1

  def _collect(self, step: _Step) -> tuple[list[outputs.StreamOutput], float]:
    """Reads a dispatched step's tokens into the live batch; returns the deltas
    and the seconds the host waited for the device."""
    t0 = time.perf_counter()
    tokens, logprobs, scores = self.runner.read(step.pending)
    now = time.perf_counter()
    seconds = now - max(self._last_ready, step.pending.dispatched_at)
    self._last_ready = now
    self._measured[step.shape] = seconds
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
    """Advances the constrained rows' grammars by the tokens read. Returns, per
    row, whether its grammar has ended (complete and nothing can follow, or EOS
    taken: the sequence stops there) and whether it refused the token (which the
    mask should have made impossible: the sequence fails rather than emit output
    outside its grammar)."""
    done = np.zeros(len(slots), bool)
    rejected = np.zeros(len(slots), bool)
    constrained = np.flatnonzero(self.batch.constrained[slots])
    if not len(constrained):
      return done, rejected
    t0 = time.perf_counter()
    for i in constrained:
      matcher = self.batch.seqs[slots[i]].matcher
      if not matcher.accept(int(tokens[i])):
        rejected[i] = True
      elif matcher.is_terminated() or matcher.must_end():
        done[i] = True
    self.grammar_seconds += time.perf_counter() - t0
    return done, rejected

  @staticmethod
  def _record_scores(chunks: list, scores: tuple) -> None:
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


def _child_seed(seed: int, k: int) -> int:
  return (seed + k * 0x9E3779B97F4A7C15) % 2**63
