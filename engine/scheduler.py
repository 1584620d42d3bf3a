"""The host loop: admission, waiting and running sequences, one step per iteration.

A request becomes one sequence (n sequences once its prompt is computed, for
`n > 1`). A started sequence holds a slot of the live batch
(engine/live_batch.py), where its tokens, counts and limits are numpy columns;
what it needs next follows from them:

  uncomputed = n_prompt + n_out + inflight - computed
  uncomputed > 1   the sequence is prefilling: its next chunk runs in the prefill
                   region of a step (a new prompt, or a preempted sequence
                   recomputing)
  uncomputed == 1  the sequence decodes: its last token runs as a decode row

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
its token dropped; no output ever holds a token past its stop. max_tokens and
the model length are known in advance, so those rows are never dispatched. A
penalty history takes the token in flight the same way (sampler_inputs.History),
so the host never waits for a step before dispatching the next.

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
for interactive requests and the batch is below `batch_rows`. Nothing is lost,
and a greedy output is unchanged.
Pages, prefix lookups (and the host tier under them, engine/kv_host.py),
publishing and forks go through the KV-cache manager (engine/kv_cache.py); text
and stop strings through engine/outputs.py.

The scheduler's parts live in their own modules, as parts of the one class
(they share its queue, live batch and counts): admission and preemption
(engine/admission.py), a step's planning and dispatch (engine/step_dispatch.py),
its reading (engine/step_collect.py), the grammars' part (engine/grammar_rows.py);
requests and sequences are engine/sequences.py. This module holds the state and
the step that ties them together.
"""

from __future__ import annotations

import collections
import time
from typing import NamedTuple, Sequence

from ridgeline.engine import kv_cache
from ridgeline.engine import outputs
from ridgeline.engine.admission import Admission
from ridgeline.engine.config import EngineConfig, StepShape
from ridgeline.engine.live_batch import LiveBatch
from ridgeline.engine.metrics import Metrics
from ridgeline.engine.planner import Planner
from ridgeline.engine.runner import Runner
from ridgeline.engine.sequences import Request, Seq
from ridgeline.engine.step_collect import Collect
from ridgeline.engine.step_dispatch import Dispatch, DispatchedStep

__all__ = ["Scheduler"]


class TierCounts(NamedTuple):
  """The host tier's running counts of page moves (engine/kv_host.py)."""

  pages_in: int  # pages copied into the host tier
  pages_out: int  # pages copied back to the device
  evictions: int


class Scheduler(Admission, Dispatch, Collect):
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
    self._inflight: DispatchedStep | None = None
    self._to_free: set[int] = set()  # finished slots with a token still in flight
    self._ended: list[str] = []  # requests finished since the last step returned
    # Free pages low-priority work may not take: room for one sequence of the
    # model length, at most an eighth of the pool.
    self.page_reserve = min(config.max_pages_per_seq, runner.num_pages // 8)
    # ... and only while the batch has fewer rows than this.
    self.batch_rows = config.batch_rows or config.max_batch
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
    new = self._dispatch()
    deltas, wait = self._collect(self._inflight) if self._inflight is not None else ([], 0.0)
    if new is not None:
      new.sampled = self._sample(new)
    self._inflight = new
    self.metrics.evictions.inc(self.allocator.evictions - evictions)
    if tier is not None:
      self._count_tier(tier)
    self.metrics.set_load(self.num_running, len(self.waiting), self.kv.utilization())
    self.metrics.on_host_step(time.perf_counter() - t0, wait)
    ended, self._ended = self._ended, []
    return outputs.StepResult(deltas, ended)

  def _tier_counts(self) -> TierCounts | None:
    host = self.kv.host
    return None if host is None else TierCounts(host.pages_in, host.pages_out, host.evictions)

  def _count_tier(self, before: TierCounts) -> None:
    """The host tier's page moves of this step, into the metrics."""
    now = self._tier_counts()
    m, page = self.metrics, self.kv.host.page_bytes
    m.host_bytes.labels("to_host").inc((now.pages_in - before.pages_in) * page)
    m.host_bytes.labels("to_device").inc((now.pages_out - before.pages_out) * page)
    m.host_evictions.inc(now.evictions - before.evictions)
    m.host_pages.set(len(self.kv.host))
