"""The host loop: admission, waiting and running sequences, one step per iteration.

A request becomes one sequence (n sequences once its prompt is computed, for
`n > 1`). A sequence's tokens are `prompt + output`; `num_computed` of them have
their K/V computed (or being computed by a dispatched step), and `inflight`
more have been sampled by a dispatched step that the host has not read yet.
What a sequence needs next follows from those numbers:

  pending = prompt + output + inflight - num_computed
  pending > 1   the sequence is prefilling: its next chunk runs in the prefill
                region of a step (a new prompt, or a preempted sequence recomputing)
  pending == 1  the sequence decodes: its last token runs as a decode row

Each `step()` plans and dispatches step N+1, then reads step N's tokens, so the
device always has the next step queued while the host checks stops and emits
text (JetStream and vLLM's async scheduling do the same). A decode row whose
token is still on the device names the output row of step N that sampled it;
the device fills it in. A stop (EOS, a stop string) is therefore seen one step
late: the sequence's row in step N+1 is computed and its token dropped; no
output ever holds a token past its stop. max_tokens and the model length are
known in advance, so those rows are never dispatched. A penalty history takes
the token in flight the same way (sampling.SamplerInputs), so the host never
waits for a step before dispatching the next.

The planner (engine/planner.py) sizes each step: every ready decode row first,
then prefill chunks in arrival order (FCFS) up to the token budget. When a
decoding sequence needs a page and none is free, the newest running sequence is
preempted: its pages are freed (full ones stay in the prefix cache) and it goes
back to the front of the queue with its generated tokens, to be recomputed
later. Nothing is lost, and a greedy output is unchanged. Pages, prefix lookups,
publishing and forks go through the KV-cache manager (engine/kv_cache.py);
tokens, text and stops through engine/outputs.py.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable, Sequence

from engine import config as config_lib
from engine import kv_cache
from engine import outputs
from engine import roofline
from engine.config import EngineConfig
from engine.metrics import Metrics
from engine.planner import Planner
from engine.runner import Chunk, DecodeRow, Pending, Runner
from engine.sampling import SamplingParams


@dataclasses.dataclass(eq=False)
class Request:
  request_id: str
  prompt_ids: list[int]
  params: SamplingParams
  arrival_time: float
  seed: int
  max_tokens: int
  detokenizer_factory: Callable[[], object] | None = None
  seqs: list["Seq"] = dataclasses.field(default_factory=list)
  forked: bool = False
  first_scheduled_time: float | None = None
  first_token_time: float | None = None
  finish_time: float | None = None

  @property
  def finished(self) -> bool:
    return all(s.finished for s in self.seqs)

  def metrics(self) -> outputs.RequestMetrics:
    n_out = max((len(s.out.token_ids) for s in self.seqs), default=0)
    return outputs.request_metrics(self.arrival_time, self.first_scheduled_time,
                                   self.first_token_time, self.finish_time, n_out)


@dataclasses.dataclass(eq=False)
class Seq:
  """One completion of a request."""

  request: Request
  index: int
  seed: int
  out: outputs.Completion
  arrival_order: int = 0
  pages: list[int] = dataclasses.field(default_factory=list)
  page_keys: list[bytes] = dataclasses.field(default_factory=list)  # of full computed pages
  num_computed: int = 0
  inflight: int = 0  # sampled by dispatched steps, not yet read
  last_row: int = -1  # the output row of the latest step that samples for it

  @property
  def finished(self) -> bool:
    return self.out.finished

  @property
  def tokens(self) -> list[int]:
    """The resolved tokens."""
    return self.request.prompt_ids + self.out.token_ids

  @property
  def last_token(self) -> int:
    """The latest resolved token (without building `tokens`)."""
    return self.out.token_ids[-1] if self.out.token_ids else self.request.prompt_ids[-1]

  @property
  def num_tokens(self) -> int:
    return len(self.request.prompt_ids) + len(self.out.token_ids) + self.inflight

  @property
  def pending(self) -> int:
    return self.num_tokens - self.num_computed


@dataclasses.dataclass
class _Step:
  """A dispatched step and what its rows belong to."""

  pending: Pending
  rows: list[tuple[Seq, int]]  # (sequence, output row) of every sample that is read
  kind: str
  decode_rows: int
  tokens: int
  cost: roofline.StepCost


class Scheduler:
  """Runs sequences on a Runner; knows nothing about text beyond `outputs`."""

  def __init__(self, runner: Runner, config: EngineConfig, eos_ids: Sequence[int],
               planner: Planner, metrics: Metrics):
    self.runner = runner
    self.config = config
    self.planner = planner
    self.metrics = metrics
    self.kv = kv_cache.KVCacheManager(runner.num_pages, config.page_size)
    # Keys older than this many positions are never read again (None: they are).
    self.kv_window = runner.model_config.kv_window
    self.eos_ids = list(eos_ids)
    self.waiting: collections.deque[Seq] = collections.deque()
    self.running: list[Seq] = []  # sequences holding pages, in arrival order
    self.requests: dict[str, Request] = {}
    self._arrivals = 0
    self._inflight: _Step | None = None
    self._last_ready = 0.0
    self.last_decode_batch = 0

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
    self.waiting.append(seq)

  def _new_seq(self, request: Request, index: int, seed: int) -> Seq:
    detok = request.detokenizer_factory() if request.detokenizer_factory else None
    seq = Seq(request, index, seed, outputs.Completion(request.params, self.eos_ids,
                                                       request.max_tokens, detok))
    request.seqs.append(seq)
    return seq

  def abort(self, request_id: str) -> bool:
    request = self.requests.get(request_id)
    if request is None or request.finished:
      return False
    for seq in request.seqs:
      if not seq.finished:
        seq.out.finish("abort")
        self._finish(seq)
    return True

  def has_work(self) -> bool:
    return bool(self.waiting or self.running or self._inflight)

  # The step -------------------------------------------------------------------

  def step(self) -> list[outputs.StreamOutput]:
    """Dispatches the next step, then reads the previous one; returns its deltas."""
    touched: list[Seq] = []
    evictions = self.allocator.evictions
    new = self._dispatch()
    if self._inflight is not None:
      touched += self._collect(self._inflight)
    self._inflight = new
    self.metrics.evictions.inc(self.allocator.evictions - evictions)
    self.metrics.set_load(len(self.running), len(self.waiting), self.kv.utilization())
    deltas = (s.out.delta(s.request.request_id, s.index) for s in dict.fromkeys(touched))
    return [d for d in deltas if d is not None]

  def _can_grow(self, seq: Seq) -> bool:
    """Whether another token may be sampled (known before any token is read)."""
    return (len(seq.out.token_ids) + seq.inflight < seq.request.max_tokens
            and seq.num_tokens < self.config.max_model_len)

  def _dispatch(self) -> _Step | None:
    cfg = self.config
    ready = [s for s in self.running if s.pending == 1 and self._can_grow(s)]
    plan = self.planner.plan([s.num_computed for s in ready])
    decode = self._schedule_decode(ready[:plan.decode_batch])
    chunks = self._schedule_prefill(plan.prefill_budget // cfg.prefill_tile or 1, [])
    # Decode rows were chosen first; making room for a chunk may not preempt them,
    # but one preempted for another decode row is dropped here.
    running = {id(s) for s in self.running}
    decode = [s for s in decode if id(s) in running]
    if not decode and not chunks:
      return None
    tile = cfg.prefill_tile
    prefill = 0
    if chunks:
      used = sum(-(-c // tile) for _, c in chunks)
      prefill = config_lib.bucket(used * tile, cfg.prefill_token_buckets)
      if prefill > used * tile:  # padding would run anyway: fill it with real work
        chunks = self._schedule_prefill(prefill // tile - used, chunks)
        used = sum(-(-c // tile) for _, c in chunks)
        prefill = config_lib.bucket(used * tile, cfg.prefill_token_buckets)
    buckets = cfg.mixed_decode_buckets if chunks else cfg.decode_buckets
    shape = (config_lib.bucket(len(decode), buckets), prefill)
    self.last_decode_batch = len(decode)
    return self._launch(decode, chunks, shape)

  def _schedule_decode(self, ready: list[Seq]) -> list[Seq]:
    scheduled = []
    # Membership by identity set: `seq in self.running` scans the list, which made
    # this loop quadratic (~5 ms a step at batch 512). Preemption only shrinks
    # `running`, so the set is rebuilt when its length changes.
    running, size = set(), -1
    for seq in ready:
      if len(self.running) != size:
        running, size = {id(s) for s in self.running}, len(self.running)
      if id(seq) in running and self._make_room(seq, seq.num_tokens):
        scheduled.append(seq)
    return scheduled

  def _schedule_prefill(self, tiles: int, chosen: list[tuple[Seq, int]]
                        ) -> list[tuple[Seq, int]]:
    """Adds prompt chunks of at most `tiles` prefill tiles in all to `chosen`."""
    cfg = self.config
    tile = cfg.prefill_tile
    chosen = list(chosen)
    taken = {id(s) for s, _ in chosen}
    # Sequences already running but mid-prompt go first, then the queue in order.
    candidates = [s for s in self.running if s.pending > 1 and id(s) not in taken]
    candidates += [s for s in self.waiting if not s.inflight]
    for seq in candidates:
      if len(chosen) == cfg.max_prefill_batch or tiles <= 0:
        break
      fresh = seq not in self.running
      if fresh:
        if len(self.running) >= cfg.max_batch:
          break
        hit = self.kv.reuse_prefix(seq, seq.tokens)
        self.metrics.prefix_queries.inc(len(seq.tokens))
        self.metrics.prefix_hits.inc(hit)
      chunk = min(seq.pending, tiles * tile)
      if not self._make_room(seq, seq.num_computed + chunk, may_preempt=not fresh):
        if fresh:
          self.kv.release(seq)
          break  # FCFS: a later, smaller request does not jump the queue
        continue
      if fresh:
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.request.first_scheduled_time = (seq.request.first_scheduled_time
                                            or time.perf_counter())
      chosen.append((seq, chunk))
      tiles -= -(-chunk // tile)
    # Making room may have preempted sequences chosen earlier in this loop.
    running = {id(s) for s in self.running}
    return [(s, c) for s, c in chosen if id(s) in running]

  def _make_room(self, seq: Seq, num_tokens: int, may_preempt: bool = True) -> bool:
    """Gives `seq` pages for its first `num_tokens` tokens.

    When the pool is exhausted and `may_preempt`, the newest running sequence is
    preempted until enough pages are free; if that is `seq` itself, `seq` is
    preempted and False returned. The engine guarantees the pool holds one
    sequence of the maximum model length, so the oldest sequence always runs.
    """
    while not self.kv.allocate(seq, num_tokens):
      if not may_preempt or not self.running:
        return False
      victim = max(self.running, key=lambda s: s.arrival_order)
      self._preempt(victim)
      if victim is seq:
        return False
    return True

  def _preempt(self, seq: Seq) -> None:
    """Returns `seq` to the front of the queue; its full pages stay in the prefix
    cache, so the recomputation later reuses whatever was not evicted meanwhile.
    A token it has in flight is still read (it was computed from intact pages);
    until then it is not prefilled again."""
    self.kv.release(seq)
    self.running.remove(seq)
    self.waiting.appendleft(seq)
    self.metrics.preemptions.inc()

  def _launch(self, decode: list[Seq], chunks: list[tuple[Seq, int]],
              shape: tuple[int, int]) -> _Step:
    decode_rows = []
    for s in decode:
      known = s.inflight == 0
      decode_rows.append(DecodeRow(s.last_token if known else 0, -1 if known else s.last_row,
                                   s.num_tokens - 1, s.pages))
    chunk_rows = []
    for s, c in chunks:
      start = s.num_computed
      chunk_rows.append(Chunk(s.tokens[start:start + c], start, s.pages,
                              start + c == s.num_tokens))
    decode_samples = [self._sample_row(s) for s in decode]
    chunk_samples = [self._sample_row(s) if c.sample else None
                     for (s, _), c in zip(chunks, chunk_rows)]
    cost_rows = ([(s.num_tokens - 1, 1) for s in decode]
                 + [(s.num_computed, c) for s, c in chunks])
    pending = self.runner.dispatch(decode_rows, chunk_rows, decode_samples, chunk_samples,
                                   shape)
    rows = []
    if self.kv_window is not None:
      # Pages the window has passed for good (the dispatched step has read them;
      # a later step that reuses them runs after it).
      for s in decode + [s for s, _ in chunks]:
        self.kv.release_before(s, s.num_computed + 1 - self.kv_window)
    for i, s in enumerate(decode):
      s.num_computed += 1
      s.inflight += 1
      s.last_row = i
      rows.append((s, i))
    for j, ((s, c), row) in enumerate(zip(chunks, chunk_rows)):
      s.num_computed += c
      self.kv.publish(s, s.tokens)
      if row.sample:
        s.inflight += 1
        s.last_row = shape[0] + j
        rows.append((s, shape[0] + j))
        if s.request.params.n > 1 and not s.request.forked:
          self._fork(s)
    kind = "decode" if not chunks else ("prefill" if not decode else "mixed")
    tokens = len(decode) + sum(c for _, c in chunks)
    return _Step(pending, rows, kind, len(decode), tokens, self.planner.cost(cost_rows))

  def _sample_row(self, seq: Seq):
    # The output position counts the token in flight too: a seeded sequence draws
    # the same key for its k-th token however the steps fell.
    # A token in flight is in the penalty history as the output row that holds it.
    return (seq.request.params, seq.seed, len(seq.out.token_ids) + seq.inflight,
            seq.out.banned_ids(), seq.request.prompt_ids, seq.out.token_ids,
            seq.last_row if seq.inflight else -1)

  def _fork(self, parent: Seq) -> None:
    """Creates the other n-1 samples of a request once its prompt is dispatched:
    they share the prompt's full pages (all but the last token's) and compute the
    rest themselves, each drawing its own first token."""
    request = parent.request
    request.forked = True
    for k in range(1, request.params.n):
      child = self._new_seq(request, k, _child_seed(request.seed, k))
      child.arrival_order = parent.arrival_order
      self.kv.fork(parent, child, len(request.prompt_ids) - 1)
      self.running.append(child)

  def _collect(self, step: _Step) -> list[Seq]:
    """Reads a dispatched step's tokens into its sequences; returns those touched."""
    tokens, logprobs = self.runner.read(step.pending)
    now = time.perf_counter()
    seconds = now - max(self._last_ready, step.pending.dispatched_at)
    self._last_ready = now
    peaks, dtype = self.planner.peaks, self.planner.dtype
    self.metrics.on_step(step.kind, step.decode_rows, step.tokens, step.cost.flops,
                         step.cost.bytes, seconds, roofline.mfu(step.cost, seconds, peaks, dtype),
                         roofline.mbu(step.cost, seconds, peaks))
    touched = []
    for seq, row in step.rows:
      seq.inflight -= 1
      if seq.finished:
        continue  # stopped on an earlier token, or aborted: this one is dropped
      token = int(tokens[row])
      k = seq.request.params.logprobs
      entry = None
      if k is not None:
        logprob, top_ids, top_lp = logprobs
        entry = {token: float(logprob[row])}
        entry.update({int(t): float(v) for t, v in zip(top_ids[row, :k], top_lp[row, :k])})
      if seq.request.first_token_time is None:
        seq.request.first_token_time = now
      self.metrics.generated_tokens.inc()
      total = len(seq.request.prompt_ids) + len(seq.out.token_ids) + 1
      try:
        ended = seq.out.append(token, entry, total, self.config.max_model_len) is not None
      except Exception as e:  # noqa: BLE001 -- e.g. a detokenizer error: this sequence only
        seq.out.fail(f"{type(e).__name__} while handling token {token}: {e}")
        ended = True
      if ended:
        self._finish(seq)
      elif (min(seq.num_computed, seq.num_tokens - seq.inflight) // self.config.page_size
            > len(seq.page_keys)):  # a page filled: publish it (rarely, so `tokens` is built)
        self.kv.publish(seq, seq.tokens)
      touched.append(seq)
    return touched

  def _finish(self, seq: Seq) -> None:
    self.kv.release(seq)
    if seq in self.running:
      self.running.remove(seq)
    if seq in self.waiting:
      self.waiting.remove(seq)
    request = seq.request
    if request.finished:
      request.finish_time = time.perf_counter()
      m = request.metrics()
      self.metrics.on_request_finished(m.ttft, m.tpot, m.queue_time)


def _child_seed(seed: int, k: int) -> int:
  return (seed + k * 0x9E3779B97F4A7C15) % 2**63
