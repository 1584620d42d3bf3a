"""The live batch: every started sequence's state as arrays, one slot per sequence.

A step of a ridge-sized batch carries hundreds of rows, and the host must plan it,
build its inputs, read its tokens and find its stops in well under the device's
step time. Walking a Python object per row costs microseconds a row (the engine
this replaced spent ~30 us a row a step: a few ms at batch 256, more than an 8B
model's decode step on an H200). So the numbers a step needs live here as numpy
columns indexed by slot (vLLM V1's persistent batch is the model): token counts,
the tokens themselves, limits, stop ids and, through the KV-cache manager and
the sampling table, block tables and sampling parameters. A step's inputs are
gathers of these columns; reading its tokens is one scatter into `tokens` and a
few whole-array comparisons; Python runs per row only for the rows that need it
in that step (a page filled, text to stream, a stop string to check, log-probs
to record, a sequence finished).

A sequence gets a slot when it is first scheduled and keeps it until it has
finished and its last token in flight has been read: a preempted sequence keeps
its slot (its tokens stay here, its pages go), so the recomputation reads its
tokens from the same row, and a slot is never reused while a dispatched step
may still write a token into it.

Counts (per slot):
  n_prompt   prompt tokens
  n_out      output tokens read by the host (resolved)
  inflight   tokens sampled by dispatched steps, not read yet (0 or 1 at dispatch)
  computed   tokens whose K/V a dispatched step computes
  limit      most output tokens (max_tokens, already within the model length)
so a sequence has n_prompt + n_out + inflight tokens, and
  uncomputed = n_prompt + n_out + inflight - computed
is 1 for a sequence that decodes next, more for one that prefills (a new prompt or
a recomputation after preemption).
"""

from __future__ import annotations

import numpy as np

from ridgeline.engine.sampler_inputs import SamplingTable
from ridgeline.engine.kv_cache import KVCacheManager

_COUNTS = ("n_prompt", "n_out", "inflight", "computed", "limit", "min_tokens", "last_row",
           "logprobs", "priority")


class LiveBatch:
  """Per-slot state of the started sequences (see the module docstring).

  `tokens[slot, :n_prompt + n_out]` are a sequence's resolved tokens (prompt,
  then output); the array is as wide as `max_model_len` but allocated zeroed,
  so the memory behind it is only what sequences have written. `stop_ids[slot]`
  are the ids that end the sequence (EOS unless ignore_eos, and stop_token_ids;
  -1 pads), which are also the ids min_tokens bans. `order[slot]` is the arrival
  order and `priority[slot]` the request's priority (preemption takes the newest
  of the lowest priority, the largest value), `running[slot]` whether the sequence
  holds pages, `finished[slot]` whether it has ended (its slot is freed once
  nothing is in flight).
  """

  def __init__(self, capacity: int, max_model_len: int, kv: KVCacheManager,
               vocab_size: int):
    self.kv = kv
    self.width = max_model_len
    self.capacity = 0
    self.seqs: list = []
    self._free: list[int] = []
    for name in _COUNTS + ("order",):
      setattr(self, name, np.zeros(0, np.int64))
    self.running = np.zeros(0, bool)
    self.finished = np.zeros(0, bool)
    self.needs_text = np.zeros(0, bool)  # streams or has stop strings: text per token
    self.penalized = np.zeros(0, bool)
    self.constrained = np.zeros(0, bool)  # has a grammar (structured outputs)
    self.tokens = np.zeros((0, max_model_len), np.int32)
    self.stop_ids = np.full((0, 1), -1, np.int32)
    self.sampling = SamplingTable(1, vocab_size)
    self.grow(capacity)

  def grow(self, capacity: int) -> None:
    """More slots (doubling when full); rows keep their contents."""
    old = self.capacity
    for name in _COUNTS + ("order", "running", "finished", "needs_text", "penalized",
                 "constrained"):
      a = getattr(self, name)
      b = np.zeros(capacity, a.dtype)
      b[:old] = a
      setattr(self, name, b)
    used = int((self.n_prompt + self.n_out).max(initial=0))
    tokens = np.zeros((capacity, self.width), np.int32)  # zeroed pages: no memory yet
    tokens[:old, :used] = self.tokens[:, :used]
    self.tokens = tokens
    stop = np.full((capacity, self.stop_ids.shape[1]), -1, np.int32)
    stop[:old] = self.stop_ids
    self.stop_ids = stop
    self.seqs += [None] * (capacity - old)
    self._free = list(range(capacity - 1, old - 1, -1)) + self._free
    self.kv.grow(capacity)
    self.sampling.grow(capacity)
    self.capacity = capacity

  # Slots -------------------------------------------------------------------------

  def acquire(self, seq, prompt: np.ndarray, stop_ids: np.ndarray) -> int:
    """A slot for a sequence that starts: its prompt, limits and parameters."""
    if not self._free:
      self.grow(2 * self.capacity)
    slot = self._free.pop()
    p = seq.request.params
    n = len(prompt)
    self.seqs[slot] = seq
    self.tokens[slot, :n] = prompt
    for name, value in (("n_prompt", n), ("n_out", 0), ("inflight", 0), ("computed", 0),
                        ("limit", seq.request.max_tokens), ("min_tokens", p.min_tokens),
                        ("last_row", -1), ("order", seq.arrival_order),
                        ("logprobs", -1 if p.logprobs is None else p.logprobs),
                        ("priority", seq.request.priority)):
      getattr(self, name)[slot] = value
    self.running[slot] = self.finished[slot] = False
    self.needs_text[slot] = seq.out.needs_text
    self.penalized[slot] = p.uses_penalties
    self.constrained[slot] = seq.matcher is not None
    if len(stop_ids) > self.stop_ids.shape[1]:
      wider = np.full((self.capacity, len(stop_ids)), -1, np.int32)
      wider[:, :self.stop_ids.shape[1]] = self.stop_ids
      self.stop_ids = wider
    self.stop_ids[slot] = -1
    self.stop_ids[slot, :len(stop_ids)] = stop_ids
    self.sampling.set(slot, p, seq.seed)
    return slot

  def free(self, slot: int) -> None:
    self.seqs[slot] = None
    self.running[slot] = self.finished[slot] = False
    self._free.append(slot)

  # Views -----------------------------------------------------------------------------

  def num_tokens(self, slots: np.ndarray) -> np.ndarray:
    """Tokens of each sequence, the ones in flight included."""
    return self.n_prompt[slots] + self.n_out[slots] + self.inflight[slots]

  def uncomputed(self, slots: np.ndarray) -> np.ndarray:
    """Tokens of each sequence whose K/V no dispatched step computes: 1 for one
    that decodes next, more for one that prefills."""
    return self.num_tokens(slots) - self.computed[slots]

  def running_slots(self) -> np.ndarray:
    """Slots holding pages, by priority (the lowest value first), then oldest first."""
    slots = np.flatnonzero(self.running)
    return slots[np.lexsort((self.order[slots], self.priority[slots]))]

  def output_ids(self, slot: int) -> list[int]:
    n = int(self.n_prompt[slot])
    return self.tokens[slot, n:n + int(self.n_out[slot])].tolist()

  def resolved(self, slot: int) -> np.ndarray:
    """The slot's resolved tokens (prompt, then output)."""
    return self.tokens[slot, :int(self.n_prompt[slot] + self.n_out[slot])]
