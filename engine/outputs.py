"""What a completion shows its caller: tokens, text, stops, deltas and timings.

One `CompletionState` per sequence turns sampled tokens into text: incrementally for
the sequences that stream or have stop strings (found also across token
boundaries), once at the end for the others; it hands out deltas that never
show text a stop string may still claim. The timing formulas (TTFT,
TPOT, queue time, end to end) live here too, so the engine's per-request
metrics and the Prometheus histograms cannot disagree.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from ridgeline.engine.sampling_params import SamplingParams


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


@dataclasses.dataclass(frozen=True)
class StepResult:
  """What one engine step produced. `deltas`: for streaming sequences as their
  tokens come, and one for every sequence that finished. `finished`: the ids of
  the requests that ended in this step (every sequence done, by a finish or an
  error; not those aborted by the caller), each once: their outputs are complete
  (`Engine.get_output`, then `release`)."""

  deltas: list[StreamOutput]
  finished: list[str]


@dataclasses.dataclass(eq=False)
class CompletionState:
  """The output side of one sequence that Python holds while it runs (mutable;
  a caller gets a snapshot of it, `CompletionOutput` in engine/engine.py): text,
  the finish, the log-probabilities asked for, and what deltas have handed out. The tokens
  themselves live in the live batch (engine/live_batch.py) while the sequence
  runs; EOS, stop ids and max_tokens are found there with array operations.

  Text is made where someone reads it: a sequence that streams or has stop
  strings (`needs_text`) is detokenized as each token comes (`push`), the others
  once, when they finish (`finish` with their tokens): the same text either way.
  """

  params: SamplingParams
  detokenizer_factory: Callable[[], object] | None = None
  stream: bool = False
  text: str = ""
  finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
  stop_reason: int | str | None = None
  error: str | None = None
  logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
  emitted_chars: int = 0  # text already handed out in deltas
  emitted_tokens: int = 0
  _detokenizer: object | None = None

  @property
  def finished(self) -> bool:
    return self.finish_reason is not None

  @property
  def needs_text(self) -> bool:
    """Text per token: for a stream, or to find stop strings."""
    return self.detokenizer_factory is not None and (self.stream or bool(self.params.stop))

  @property
  def detokenizer(self):
    if self._detokenizer is None and self.detokenizer_factory is not None:
      self._detokenizer = self.detokenizer_factory()
    return self._detokenizer

  def push(self, token: int, num_output: int, eos: bool, stop_id: bool) -> str | None:
    """Adds the text of a new token (`needs_text` sequences); returns "stop" if
    a stop string ends the sequence. `num_output`: output tokens with this one;
    `eos`: the token is an EOS that ends it (no text), `stop_id`: a stop id."""
    p = self.params
    prev_len = len(self.text)
    if not eos:
      self.text += self.detokenizer.push(token)
    if eos or stop_id or not p.stop or num_output < p.min_tokens:
      return None
    # A new match must end in the new text, so it starts at most
    # len(stop) - 1 characters before it.
    start = max(0, prev_len - max(len(s) for s in p.stop) + 1)
    hits = [(self.text.find(s, start), s) for s in p.stop]
    hits = [(pos, s) for pos, s in hits if pos >= 0]
    if not hits:
      return None
    pos, s = min(hits)
    self.text = self.text[:pos + (len(s) if p.include_stop_str_in_output else 0)]
    self.stop_reason = s
    return "stop"

  def finish(self, reason: str, token_ids: Sequence[int] = (), ended_by_eos: bool = False
             ) -> None:
    """Ends the sequence. One without text so far gets it now, in one decode of
    `token_ids` (its output; a final EOS adds no text). A stop keeps back an
    unfinished character (as the token-by-token text does), other ends flush it."""
    self.finish_reason = reason
    if self.detokenizer_factory is None or reason == "error":
      return
    if not self.needs_text:
      ids = token_ids[:-1] if ended_by_eos else token_ids
      if len(ids):
        text = self.detokenizer.extend(ids)
        self.text += text.rstrip("\ufffd") if reason == "stop" else text
        return
    if reason != "stop":
      self.text += self.detokenizer.flush()

  def fail(self, error: str) -> None:
    """Ends the sequence with an error (the rest of the batch runs on)."""
    self.error = error
    self.finish_reason = "error"

  def delta(self, request_id: str, index: int, token_ids: Sequence[int]
            ) -> StreamOutput | None:
    """New tokens and text since the last delta, or None if there are none.
    `token_ids`: the sequence's output tokens so far."""
    finished = self.finished
    # Hold back text that may still turn out to be the start of a stop string.
    hold = 0 if finished or not self.params.stop else max(len(s) for s in self.params.stop) - 1
    upto = max(self.emitted_chars, len(self.text) - hold)
    text = self.text[self.emitted_chars:upto]
    new_ids = list(token_ids[self.emitted_tokens:])
    if not text and not new_ids and not finished:
      return None
    self.emitted_chars = upto
    self.emitted_tokens = len(token_ids)
    return StreamOutput(request_id, index, text, new_ids, finished, self.finish_reason)


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
