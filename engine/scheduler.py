"""The host loop: admission, waiting and running sequences, steps, stops, preemption.

A request becomes one sequence (n sequences once its prompt is computed, for
`n > 1`). A sequence's tokens are `prompt + output`; `num_computed` of them have
K/V in the cache. What a sequence needs next follows from that one number:

  pending = len(tokens) - num_computed
  pending > 1   the sequence is prefilling: the next chunk of its tokens runs in
                a prefill step (a new prompt, or a preempted sequence recomputing)
  pending == 1  the sequence decodes: its last sampled token runs in a decode step

Each `step()` runs one decode step over every decoding sequence (continuous
batching: membership changes between any two steps), then one prefill step over
as many waiting chunks as the token budget allows, in arrival order (FCFS).
Sequences that reach the end of their pending tokens sample a token.

When a decoding sequence needs a page and none is free, the newest running
sequence is preempted: its pages are freed and it goes back to the front of the
queue with its generated tokens, to be recomputed later. Nothing is lost, and a
greedy output is unchanged.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable, Sequence

import jax
import numpy as np

from engine import kv_cache
from engine import roofline
from engine import sampling
from engine.config import EngineConfig
from engine.metrics import Metrics
from engine.planner import Planner
from engine.runner import Row, Runner
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
    return all(s.finish_reason is not None for s in self.seqs)


@dataclasses.dataclass(eq=False)
class Seq:
  """One completion of a request."""

  request: Request
  index: int
  seed: int
  detokenizer: object | None
  output_ids: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
  pages: list[int] = dataclasses.field(default_factory=list)
  page_keys: list[bytes] = dataclasses.field(default_factory=list)  # of full computed pages
  num_computed: int = 0
  text: str = ""
  emitted_chars: int = 0  # text already streamed
  emitted_tokens: int = 0
  finish_reason: str | None = None
  stop_reason: int | str | None = None
  arrival_order: int = 0

  @property
  def tokens(self) -> list[int]:
    return self.request.prompt_ids + self.output_ids

  @property
  def num_tokens(self) -> int:
    return len(self.request.prompt_ids) + len(self.output_ids)

  @property
  def pending(self) -> int:
    return self.num_tokens - self.num_computed


@dataclasses.dataclass
class Delta:
  """What one sequence produced since the last report."""

  request_id: str
  index: int
  text: str
  token_ids: list[int]
  finished: bool
  finish_reason: str | None


class Scheduler:
  """Runs sequences on a Runner; knows nothing about text beyond stop strings."""

  def __init__(self, runner: Runner, config: EngineConfig, eos_ids: Sequence[int],
               planner: Planner, metrics: Metrics):
    self.runner = runner
    self.config = config
    self.planner = planner
    self.metrics = metrics
    self.allocator = kv_cache.PageAllocator(runner.num_pages)
    self.eos_ids = list(eos_ids)
    self.waiting: collections.deque[Seq] = collections.deque()
    self.running: list[Seq] = []  # sequences holding pages, in arrival order
    self.requests: dict[str, Request] = {}
    self._arrivals = 0
    self.last_decode_batch = 0

  # Admission ----------------------------------------------------------------

  def add(self, request: Request) -> None:
    self.requests[request.request_id] = request
    self.metrics.prompt_tokens.inc(len(request.prompt_ids))
    seq = Seq(request, 0, request.seed, _detokenizer(request),
              arrival_order=self._next_arrival())
    request.seqs.append(seq)
    self.waiting.append(seq)

  def _next_arrival(self) -> int:
    self._arrivals += 1
    return self._arrivals

  def abort(self, request_id: str) -> bool:
    request = self.requests.get(request_id)
    if request is None or request.finished:
      return False
    for seq in request.seqs:
      if seq.finish_reason is None:
        self._finish(seq, "abort")
    return True

  def has_work(self) -> bool:
    return bool(self.waiting or self.running)

  # The step -------------------------------------------------------------------

  def step(self) -> list[Delta]:
    touched: list[Seq] = []
    evictions = self.allocator.evictions
    ready = [s for s in self.running if s.pending == 1]
    plan = self.planner.plan([s.num_computed for s in ready])
    decode = self._schedule_decode(ready[:plan.decode_batch])
    self.last_decode_batch = len(decode)
    if decode:
      touched += self._run("decode", decode, [1] * len(decode))
    prefill, chunks = self._schedule_prefill(plan.prefill_budget)
    if prefill:
      touched += self._run("prefill", prefill, chunks)
    self.metrics.evictions.inc(self.allocator.evictions - evictions)
    self.metrics.set_load(len(self.running), len(self.waiting), self.allocator.utilization())
    return [d for d in (self._delta(s) for s in dict.fromkeys(touched)) if d]

  def _schedule_decode(self, ready: list[Seq]) -> list[Seq]:
    scheduled = []
    # Membership by identity set: `seq in self.running` scans the list, which made
    # this loop quadratic (~5 ms a step at batch 512). Preemption only shrinks
    # `running`, so the set is rebuilt when its length changes.
    running, size = set(), -1
    for seq in ready:
      if len(self.running) != size:
        running, size = {id(s) for s in self.running}, len(self.running)
      if id(seq) in running and self._ensure_pages(seq, seq.num_tokens):
        scheduled.append(seq)
    # Making room may have preempted sequences scheduled earlier in this loop.
    running = {id(s) for s in self.running}
    return [s for s in scheduled if id(s) in running]

  def _schedule_prefill(self, budget: int) -> tuple[list[Seq], list[int]]:
    cfg = self.config
    rows, chunks = [], []
    # Sequences already running but mid-prompt go first, then the queue in order.
    candidates = [s for s in self.running if s.pending > 1] + list(self.waiting)
    for seq in candidates:
      if len(rows) == cfg.max_prefill_batch or budget == 0:
        break
      if seq not in self.running:
        if len(self.running) >= cfg.max_batch:
          break
        self._reuse_prefix(seq)
        chunk = min(seq.pending, cfg.prefill_chunk, budget)
        if not self._ensure_pages(seq, seq.num_computed + chunk, may_preempt=False):
          self._release(seq)
          break  # FCFS: a later, smaller request does not jump the queue
        self.waiting.remove(seq)
        self.running.append(seq)
        seq.request.first_scheduled_time = seq.request.first_scheduled_time or time.perf_counter()
      else:
        chunk = min(seq.pending, cfg.prefill_chunk, budget)
        if not self._ensure_pages(seq, seq.num_computed + chunk):
          continue
      rows.append(seq)
      chunks.append(chunk)
      budget -= chunk
    # Making room may have preempted sequences chosen earlier in this loop.
    kept = [(s, c) for s, c in zip(rows, chunks) if s in self.running]
    return [s for s, _ in kept], [c for _, c in kept]

  def _ensure_pages(self, seq: Seq, num_tokens: int, may_preempt: bool = True) -> bool:
    """Gives `seq` pages for its first `num_tokens` tokens.

    When the pool is exhausted and `may_preempt`, the newest running sequence is
    preempted until enough pages are free; if that is `seq` itself, `seq` is
    preempted and False returned. The engine guarantees the pool holds one
    sequence of the maximum model length, so the oldest sequence always runs.
    """
    need = kv_cache.pages_for(num_tokens, self.config.page_size) - len(seq.pages)
    while need > self.allocator.num_free:
      if not may_preempt or not self.running:
        return False
      victim = max(self.running, key=lambda s: s.arrival_order)
      self._preempt(victim)
      if victim is seq:
        return False
    if need > 0:
      seq.pages += self.allocator.allocate(need)
    return True

  def _preempt(self, seq: Seq) -> None:
    """Returns `seq` to the front of the queue; its full pages stay in the prefix
    cache, so the recomputation later reuses whatever was not evicted meanwhile."""
    self._release(seq)
    self.running.remove(seq)
    self.waiting.appendleft(seq)
    self.metrics.preemptions.inc()

  def _release(self, seq: Seq) -> None:
    # Last pages first, so the LRU evicts a sequence's tail before its prefix.
    self.allocator.free(reversed(seq.pages))
    seq.pages, seq.page_keys, seq.num_computed = [], [], 0

  def _reuse_prefix(self, seq: Seq) -> None:
    """Points a sequence about to start at the cached pages of its longest cached
    prefix. At least one token is left to compute: its logits are needed."""
    page_size = self.config.page_size
    tokens = seq.tokens
    key = b""
    for j in range((len(tokens) - 1) // page_size):
      key = kv_cache.page_hash(key, tokens[j * page_size:(j + 1) * page_size])
      page = self.allocator.lookup(key)
      if page is None:
        break
      self.allocator.acquire(page)
      seq.pages.append(page)
      seq.page_keys.append(key)
    seq.num_computed = len(seq.pages) * page_size
    self.metrics.prefix_queries.inc(len(tokens))
    self.metrics.prefix_hits.inc(seq.num_computed)

  def _publish_full_pages(self, seq: Seq) -> None:
    """Offers every newly completed page of `seq` to the prefix cache."""
    page_size = self.config.page_size
    tokens = seq.tokens
    for j in range(len(seq.page_keys), seq.num_computed // page_size):
      previous = seq.page_keys[-1] if seq.page_keys else b""
      key = kv_cache.page_hash(previous, tokens[j * page_size:(j + 1) * page_size])
      self.allocator.cache(seq.pages[j], key)
      seq.page_keys.append(key)

  def _run(self, kind: str, seqs: list[Seq], chunks: list[int]) -> list[Seq]:
    rows = [Row(s.tokens[s.num_computed:s.num_computed + c], s.num_computed, s.pages)
            for s, c in zip(seqs, chunks)]
    t0 = time.perf_counter()
    # Waiting for the step here costs no overlap: its tokens are read right after.
    logits = jax.block_until_ready(self.runner.step(rows))
    seconds = time.perf_counter() - t0
    self._record_step(kind, seqs, chunks, seconds)
    sample_rows = []  # (seq, logits row)
    for i, (seq, chunk) in enumerate(zip(seqs, chunks)):
      seq.num_computed += chunk
      self._publish_full_pages(seq)
      if seq.pending == 0:
        sample_rows.append((seq, i))
        if seq.request.params.n > 1 and not seq.request.forked:
          sample_rows += [(child, i) for child in self._fork(seq)]
    if sample_rows:
      self._sample(logits, sample_rows)
    return [s for s, _ in sample_rows]

  def _record_step(self, kind: str, seqs: list[Seq], chunks: list[int],
                   seconds: float) -> None:
    cost = self.planner.cost(kind, [(s.num_computed, c) for s, c in zip(seqs, chunks)])
    peaks, dtype = self.planner.peaks, self.planner.dtype
    self.metrics.on_step(kind, len(seqs), sum(chunks), cost.flops, cost.bytes, seconds,
                         roofline.mfu(cost, seconds, peaks, dtype),
                         roofline.mbu(cost, seconds, peaks))

  def _fork(self, parent: Seq) -> list[Seq]:
    """Creates the other n-1 samples of a request once its prompt is computed:
    they share the prompt's full pages and get a copy of its last partial page."""
    request = parent.request
    request.forked = True
    children = []
    page_size = self.config.page_size
    full = parent.num_computed // page_size
    partial = len(parent.pages) > full
    for k in range(1, request.params.n):
      child = Seq(request, k, _child_seed(request.seed, k),
                  _detokenizer(request),
                  num_computed=parent.num_computed, arrival_order=parent.arrival_order)
      self.allocator.share(parent.pages[:full])
      child.pages = list(parent.pages[:full])
      child.page_keys = list(parent.page_keys[:full])
      if partial:
        if self.allocator.num_free == 0:
          # No room for a private last page: the child recomputes its prompt later.
          self._release(child)
          request.seqs.append(child)
          self.waiting.append(child)
          continue
        (page,) = self.allocator.allocate(1)
        self.runner.copy_pages([parent.pages[full]], [page])
        child.pages.append(page)
      request.seqs.append(child)
      self.running.append(child)
      children.append(child)
    return children

  def _sample(self, logits: jax.Array, rows: list[tuple[Seq, int]]) -> None:
    # Rows are padded to a power of two so the sampler compiles once per bucket.
    padded = sampling.bucket_size(len(rows))
    inputs, use_pen, need_sort, want_lp = sampling.build_inputs(
        [(s.request.params, s.seed, len(s.output_ids), self._banned(s),
          s.request.prompt_ids, s.output_ids) for s, _ in rows], padded)
    # Padding rows read their own logits row (clamped), so a decode batch's index
    # is the identity and the sampler skips gathering rows (sampling.sample).
    index = np.minimum(np.arange(padded, dtype=np.int32), logits.shape[0] - 1)
    index[:len(rows)] = [i for _, i in rows]
    out = sampling.sample(logits, index, inputs, use_penalties=use_pen,
                          need_sort=need_sort, want_logprobs=want_lp)
    tokens, logprob, top_ids, top_lp = jax.device_get(
        (out.tokens, out.logprob, out.top_ids, out.top_logprobs))
    now = time.perf_counter()
    for j, (seq, _) in enumerate(rows):
      token = int(tokens[j])
      seq.output_ids.append(token)
      self.metrics.generated_tokens.inc()
      if seq.request.first_token_time is None:
        seq.request.first_token_time = now
      k = seq.request.params.logprobs
      if k is not None:
        entry = {token: float(logprob[j])}
        entry.update({int(t): float(v) for t, v in zip(top_ids[j, :k], top_lp[j, :k])})
        seq.logprobs.append(entry)
      self._check_stop(seq, token)

  def _banned(self, seq: Seq) -> list[int]:
    params = seq.request.params
    if len(seq.output_ids) >= params.min_tokens:
      return []
    return ([] if params.ignore_eos else self.eos_ids) + list(params.stop_token_ids)

  def _check_stop(self, seq: Seq, token: int) -> None:
    params = seq.request.params
    is_eos = token in self.eos_ids and not params.ignore_eos
    prev_len = len(seq.text)
    if not is_eos and seq.detokenizer is not None:
      seq.text += seq.detokenizer.push(token)
    if is_eos:
      return self._finish(seq, "stop")
    if token in params.stop_token_ids:
      seq.stop_reason = token
      return self._finish(seq, "stop")
    if params.stop and len(seq.output_ids) >= params.min_tokens:
      # A new match must end in the new text, so it starts at most
      # len(stop) - 1 characters before it.
      start = max(0, prev_len - max(len(s) for s in params.stop) + 1)
      hits = [(seq.text.find(s, start), s) for s in params.stop]
      hits = [(pos, s) for pos, s in hits if pos >= 0]
      if hits:
        pos, s = min(hits)
        seq.text = seq.text[:pos + (len(s) if params.include_stop_str_in_output else 0)]
        seq.stop_reason = s
        return self._finish(seq, "stop")
    if len(seq.output_ids) >= seq.request.max_tokens:
      return self._finish(seq, "length")
    if seq.num_tokens >= self.config.max_model_len:
      return self._finish(seq, "length")

  def _finish(self, seq: Seq, reason: str) -> None:
    seq.finish_reason = reason
    if seq.detokenizer is not None and reason != "stop":
      seq.text += seq.detokenizer.flush()
    self._release(seq)
    if seq in self.running:
      self.running.remove(seq)
    if seq in self.waiting:
      self.waiting.remove(seq)
    request = seq.request
    if request.finished:
      request.finish_time = now = time.perf_counter()
      n_out = max(len(s.output_ids) for s in request.seqs)
      first = request.first_token_time
      self.metrics.on_request_finished(
          first - request.arrival_time if first is not None else None,
          (now - first) / (n_out - 1) if first is not None and n_out > 1 else None,
          (request.first_scheduled_time - request.arrival_time
           if request.first_scheduled_time is not None else None))

  def _delta(self, seq: Seq) -> Delta | None:
    params = seq.request.params
    finished = seq.finish_reason is not None
    # Hold back text that may still turn out to be the start of a stop string.
    hold = 0 if finished or not params.stop else max(len(s) for s in params.stop) - 1
    upto = max(seq.emitted_chars, len(seq.text) - hold)
    text = seq.text[seq.emitted_chars:upto]
    token_ids = seq.output_ids[seq.emitted_tokens:]
    if not text and not token_ids and not finished:
      return None
    seq.emitted_chars = upto
    seq.emitted_tokens = len(seq.output_ids)
    return Delta(seq.request.request_id, seq.index, text, token_ids, finished,
                 seq.finish_reason)


def _detokenizer(request: Request):
  return request.detokenizer_factory() if request.detokenizer_factory else None


def _child_seed(seed: int, k: int) -> int:
  return (seed + k * 0x9E3779B97F4A7C15) % 2**63
