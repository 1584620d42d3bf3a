"""What a completion shows its caller: tokens, text, stops, deltas and timings.

One `Completion` per sequence turns sampled tokens into output: it detokenizes
incrementally, finds stop tokens and stop strings (also across token
boundaries), enforces max_tokens and the model length, and hands out deltas
that never show text a stop string may still claim. The timing formulas (TTFT,
TPOT, queue time, end to end) live here too, so the engine's per-request
metrics and the Prometheus histograms cannot disagree.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from engine.sampling import SamplingParams


@dataclasses.dataclass
class StreamOutput:
  """A piece of one completion: `text` and `token_ids` are new since the last one."""

  request_id: str
  index: int
  text: str
  token_ids: list[int]
  finished: bool
  finish_reason: str | None
  error: str | None = None
  prompt_index: int | None = None  # set by `Engine.stream`: the prompt's position


@dataclasses.dataclass(eq=False)
class Completion:
  """The output side of one sequence."""

  params: SamplingParams
  eos_ids: Sequence[int]
  max_tokens: int
  detokenizer: object | None = None
  token_ids: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
  text: str = ""
  finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
  stop_reason: int | str | None = None
  error: str | None = None
  emitted_chars: int = 0  # text already handed out in deltas
  emitted_tokens: int = 0

  @property
  def finished(self) -> bool:
    return self.finish_reason is not None

  def banned_ids(self) -> list[int]:
    """Token ids the next sample may not be (stops, while min_tokens is unmet)."""
    p = self.params
    if len(self.token_ids) >= p.min_tokens:
      return []
    return ([] if p.ignore_eos else list(self.eos_ids)) + list(p.stop_token_ids)

  def append(self, token: int, logprobs: dict[int, float] | None, total_tokens: int,
             max_model_len: int) -> str | None:
    """Adds a sampled token; returns the finish reason if it ends the sequence.
    `total_tokens`: prompt + output tokens after this one."""
    self.token_ids.append(token)
    if logprobs is not None:
      self.logprobs.append(logprobs)
    p = self.params
    is_eos = token in self.eos_ids and not p.ignore_eos
    prev_len = len(self.text)
    if not is_eos and self.detokenizer is not None:
      self.text += self.detokenizer.push(token)
    if is_eos:
      return self.finish("stop")
    if token in p.stop_token_ids:
      self.stop_reason = token
      return self.finish("stop")
    if p.stop and len(self.token_ids) >= p.min_tokens:
      # A new match must end in the new text, so it starts at most
      # len(stop) - 1 characters before it.
      start = max(0, prev_len - max(len(s) for s in p.stop) + 1)
      hits = [(self.text.find(s, start), s) for s in p.stop]
      hits = [(pos, s) for pos, s in hits if pos >= 0]
      if hits:
        pos, s = min(hits)
        self.text = self.text[:pos + (len(s) if p.include_stop_str_in_output else 0)]
        self.stop_reason = s
        return self.finish("stop")
    if len(self.token_ids) >= self.max_tokens or total_tokens >= max_model_len:
      return self.finish("length")
    return None

  def finish(self, reason: str) -> str:
    self.finish_reason = reason
    if self.detokenizer is not None and reason != "stop":
      self.text += self.detokenizer.flush()
    return reason

  def fail(self, error: str) -> None:
    """Ends the sequence with an error (the rest of the batch runs on)."""
    self.error = error
    self.finish_reason = "error"

  def delta(self, request_id: str, index: int) -> StreamOutput | None:
    """New tokens and text since the last delta, or None if there are none."""
    finished = self.finished
    # Hold back text that may still turn out to be the start of a stop string.
    hold = 0 if finished or not self.params.stop else max(len(s) for s in self.params.stop) - 1
    upto = max(self.emitted_chars, len(self.text) - hold)
    text = self.text[self.emitted_chars:upto]
    token_ids = self.token_ids[self.emitted_tokens:]
    if not text and not token_ids and not finished:
      return None
    self.emitted_chars = upto
    self.emitted_tokens = len(self.token_ids)
    return StreamOutput(request_id, index, text, token_ids, finished, self.finish_reason)


@dataclasses.dataclass
class RequestMetrics:
  """Seconds. queue_time: arrival to first scheduled; ttft: arrival to first
  token; tpot: mean time per output token after the first; e2e: arrival to the
  end of the last completion."""

  arrival_time: float
  queue_time: float | None = None
  ttft: float | None = None
  tpot: float | None = None
  e2e: float | None = None


def request_metrics(arrival: float, first_scheduled: float | None, first_token: float | None,
                    finished: float | None, num_output_tokens: int) -> RequestMetrics:
  """The one place the latency formulas live."""
  m = RequestMetrics(arrival)
  if first_scheduled is not None:
    m.queue_time = first_scheduled - arrival
  if first_token is not None:
    m.ttft = first_token - arrival
  if finished is not None:
    m.e2e = finished - arrival
    if num_output_tokens > 1 and first_token is not None:
      m.tpot = (finished - first_token) / (num_output_tokens - 1)
  return m
