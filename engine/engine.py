"""The public API: Engine, SamplingParams, RequestOutput.

```python
engine = Engine.from_checkpoint(path, EngineConfig(max_batch=32))
outputs = engine.generate(["Hello", [{"role": "user", "content": "Hi"}]],
                          SamplingParams(temperature=0, max_tokens=64))
for delta in engine.stream("Tell me a story", SamplingParams(max_tokens=32)):
  print(delta.text, end="")
```

Prompts are strings, token-id lists or chat message lists. A prompt that cannot
run (empty, too long, bad token ids, invalid parameters) fails alone: its output
has `finish_reason == "error"` and an `error` message; the rest of the batch runs.

Everything is built on one iterator, `Engine.iterate(requests)`: requests go in
(lazily: an input of any length is pulled only as the waiting queue has room),
finished outputs (and, with `stream=True`, deltas) come out as they happen.
`generate`, `stream`, the batch job and the server are loops over it or over its
parts (`add_request`, `step`, `abort`).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ridgeline.engine import roofline
from ridgeline.engine.config import EngineConfig
from ridgeline.engine.metrics import Metrics
from ridgeline.engine import planner as planner_lib
from ridgeline.engine.planner import Planner
from ridgeline.engine.runner import Runner
from ridgeline.engine.sampling import SamplingParams
from ridgeline.engine.outputs import RequestMetrics, StepResult, StreamOutput
from ridgeline.engine.requests import Prompt, RequestChecker, pool_pages
from ridgeline.engine.scheduler import Scheduler
from ridgeline.engine.sequences import Request
from ridgeline.model import default_model
from ridgeline.model import transformer as transformer_lib
from ridgeline.model.config import ModelConfig

__all__ = ["Engine", "EngineConfig", "SamplingParams", "RequestOutput", "RequestMetrics",
           "CompletionOutput", "StreamOutput", "GenerationRequest", "CapacityError"]


_DEFAULT_COMPILATION_CACHE = default_model.default_compilation_cache_dir()


class CapacityError(RuntimeError):
  """The waiting queue is full: the request was not accepted (nothing was kept)."""


@dataclasses.dataclass
class CompletionOutput:
  index: int
  text: str
  token_ids: list[int]
  finish_reason: str | None  # "stop" | "length" | "abort" | "error"
  stop_reason: int | str | None = None
  logprobs: list[dict[int, float]] | None = None


@dataclasses.dataclass
class RequestOutput:
  request_id: str
  prompt: Any
  prompt_token_ids: list[int]
  outputs: list[CompletionOutput]
  finished: bool
  metrics: RequestMetrics
  error: str | None = None
  # SamplingParams.prompt_logprobs: None for the first prompt token, then a
  # {token id: log-probability} per prompt token (its own first, then the top k).
  prompt_logprobs: list[dict[int, float] | None] | None = None

  # The first (usually only) completion, for convenience.
  @property
  def text(self) -> str:
    return self.outputs[0].text

  @property
  def token_ids(self) -> list[int]:
    return self.outputs[0].token_ids

  @property
  def finish_reason(self) -> str | None:
    return self.outputs[0].finish_reason


@dataclasses.dataclass
class GenerationRequest:
  """One input of `Engine.iterate`; request_id None: the engine picks one."""

  prompt: Any
  params: SamplingParams | None = None
  request_id: str | None = None
  priority: int = 0


class Engine:
  """Offline and streaming generation over a paged KV cache."""

  def __init__(self, model: transformer_lib.Transformer, tokenizer=None,
               config: EngineConfig | None = None,
               peaks: roofline.DevicePeaks | None = None, mesh=None):
    """`mesh` (model/sharding.make_mesh): shard weights and KV pages over its model
    axis (each data replica computes the whole step); None: a 1x1 mesh where the
    weights are.
    In a multi-process run, pass the same `peaks` to every process (measured
    peaks differ per host, and the planner's choices must not)."""
    config = config or EngineConfig()
    self.model_config: ModelConfig = model.config
    self.tokenizer = tokenizer
    max_pos = model.config.max_position_embeddings
    if config.max_model_len is not None and config.max_model_len > max_pos:
      raise ValueError(
          f"max_model_len ({config.max_model_len}) exceeds the model's "
          f"max_position_embeddings ({max_pos})")
    num_pages = pool_pages(config, model.config, mesh)
    if config.max_model_len is None:  # the model's own limit, as far as the pool holds
      config = dataclasses.replace(
          config, max_model_len=min(max_pos, num_pages * config.page_size))
    self.peaks = peaks or roofline.device_peaks()
    if config.max_batch is None:  # sized to the ridge, as far as the pool holds
      config = dataclasses.replace(config, max_batch=planner_lib.default_max_batch(
          model.config, self.peaks, num_pages * config.page_size, config.kv_dtype))
    self.config = config
    self.checker = RequestChecker(model.config, config, tokenizer)
    self.runner = Runner(model, config, num_pages, mesh=mesh)
    eos_ids = list(tokenizer.eos_ids) if tokenizer is not None else []
    self.planner = Planner(model.config, config, self.peaks)
    self.metrics = Metrics(self.planner.ridge)
    self.scheduler = Scheduler(self.runner, config, eos_ids, self.planner, self.metrics)
    self._rng = np.random.default_rng(config.seed)
    self._ids = itertools.count()
    self._failed: dict[str, RequestOutput] = {}

  @classmethod
  def from_checkpoint(cls, path: str, config: EngineConfig | None = None, mesh=None, *,
                      compilation_cache_dir: str | None = _DEFAULT_COMPILATION_CACHE,
                      **kwargs) -> "Engine":
    """An engine over a checkpoint (orbax, .gguf or HF directory) and the tokenizer
    stored with it; on a mesh the weights are restored straight into their shardings.

    compilation_cache_dir: persist compiled steps there (JAX's persistent
    compilation cache, process-wide), so a second process skips compiling; the
    default is ~/.cache/ridgeline/jax_cache, None leaves JAX's setting alone.
    """
    from ridgeline.engine.build import EngineSpec  # the one builder (engine/build.py)
    return EngineSpec(checkpoint=path, config=config if config is not None else EngineConfig(),
                      mesh=mesh, compilation_cache_dir=compilation_cache_dir,
                      **kwargs).build()

  # Requests -----------------------------------------------------------------

  def check_request(self, prompt: Prompt, params: SamplingParams
                    ) -> tuple[list[int], SamplingParams, int, object]:
    """Every check a request passes before it is queued, without queueing it:
    returns its prompt ids, the params it runs with, its most output tokens and
    its compiled grammar (or None); raises ValueError naming the problem. Safe
    to call from any thread (it reads the tokenizer and the config only), e.g.
    to validate a Batch API upload while the engine runs."""
    return self.checker.check(prompt, params)

  def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                  request_id: str | None = None, *, stream: bool = False,
                  priority: int = 0) -> str:
    """Queues one prompt; returns its request id. Never raises for bad input:
    a request that cannot run is recorded as failed (see `get_output`).

    priority (vLLM's meaning): a lower value is admitted first and preempted
    last; requests with priority > 0 (batch work) start only while the KV pool
    keeps a reserve for the others.

    stream: `step()` hands out this request's deltas as its tokens come (text
    decoded token by token); otherwise one delta per completion when it
    finishes, its text decoded once."""
    request_id = request_id if request_id is not None else str(next(self._ids))
    if request_id in self.scheduler.requests or request_id in self._failed:
      raise ValueError(f"duplicate request_id {request_id!r}")
    waiting = len(self.scheduler.waiting)
    if waiting >= self.config.max_waiting:
      raise CapacityError(
          f"engine at capacity: {waiting} requests waiting (max_waiting="
          f"{self.config.max_waiting}), {self.scheduler.num_running} running, KV cache "
          f"{100 * self.kv_utilization():.0f}% used; retry when requests finish")
    arrival = time.perf_counter()
    try:
      params = params if params is not None else SamplingParams()
      if not isinstance(priority, (int, np.integer)) or isinstance(priority, bool) or not (
          -2**62 <= priority < 2**62):
        raise ValueError(f"priority must be an integer (lower is served first), got {priority!r}")
      prompt_ids, params, max_tokens, grammar = self.check_request(prompt, params)
    except (ValueError, TypeError, UnicodeError) as e:
      self._failed[request_id] = RequestOutput(
          request_id, prompt, [], [CompletionOutput(0, "", [], "error")], True,
          RequestMetrics(arrival), error=str(e))
      return request_id
    seed = params.seed if params.seed is not None else int(self._rng.integers(2**63))
    tok = self.tokenizer
    skip = params.skip_special_tokens
    self.scheduler.add(Request(
        request_id, prompt_ids, params, arrival, seed, max_tokens,
        detokenizer_factory=(lambda: tok.detokenizer(prompt_ids, skip)) if tok else None,
        stream=stream, grammar=grammar, priority=priority))
    return request_id

  def abort(self, request_id: str) -> bool:
    """Stops a request; its pages are freed at once. Returns whether it was live."""
    return self.scheduler.abort(request_id)

  def has_unfinished(self) -> bool:
    return self.scheduler.has_work()

  def step(self) -> StepResult:
    """One scheduler step: the deltas it produced (those of streaming requests
    as they come, and one for every completion that finished) and the ids of
    the requests that ended in it."""
    return self.scheduler.step()

  def warmup(self, background: bool = False) -> float:
    """Compiles the step shapes now, so that no request waits for a compilation;
    returns the seconds it took (little with a warm persistent cache).

    background=False: every shape (in parallel threads). background=True: the two
    shapes every step fits in; a step whose own shape is not compiled yet runs
    padded into one of them while its own compiles in a background thread, so
    the engine starts sooner and compiles only the shapes its work uses
    (`Runner.shape_for`). With a host KV tier, its page copies too."""
    t0 = time.perf_counter()
    self.runner.warmup(background=background)
    if self.config.host_kv_cache_bytes is not None:
      self.planner.copy_latency = self.runner.warm_copies()
    return time.perf_counter() - t0

  def get_output(self, request_id: str) -> RequestOutput:
    if request_id in self._failed:
      return self._failed[request_id]
    request = self.scheduler.requests[request_id]
    seqs = sorted(request.seqs, key=lambda s: s.index)
    want_lp = request.params.logprobs is not None
    outputs = [CompletionOutput(s.index, self._text_so_far(s), s.token_ids,
                                s.out.finish_reason, s.out.stop_reason,
                                list(s.out.logprobs) if want_lp else None)
               for s in seqs]
    errors = [s.out.error for s in seqs if s.out.error]
    return RequestOutput(request_id, None, list(request.prompt_ids), outputs,
                         request.finished, request.metrics(),
                         error=errors[0] if errors else None,
                         prompt_logprobs=request.prompt_logprobs())

  def _text_so_far(self, seq) -> str:
    """A completion's text; one that is still running and makes its text only
    at the end is decoded now (for this caller only)."""
    out = seq.out
    if out.finished or out.needs_text or out.detokenizer_factory is None:
      return out.text
    return out.detokenizer_factory().extend(seq.token_ids)

  def release(self, request_id: str) -> None:
    """Forgets a finished request (its output can no longer be fetched)."""
    if self._failed.pop(request_id, None) is None:
      request = self.scheduler.requests[request_id]
      if not request.finished:
        raise ValueError(f"request {request_id!r} is still running")
      del self.scheduler.requests[request_id]

  # The iterator ----------------------------------------------------------------

  def iterate(self, requests: Iterable[GenerationRequest], *, stream: bool = False,
              max_live: int | None = None) -> Iterator[RequestOutput | StreamOutput]:
    """Runs requests and yields what they produce, as it happens.

    `requests` is consumed lazily, as the waiting queue has room. Every request
    ends with exactly one `RequestOutput` (finished, in completion order, its
    `prompt` set, the request then released); with `stream=True` its
    `StreamOutput` deltas come before it. A request that cannot run yields its
    error output at once. If the caller stops iterating, the requests still
    running are aborted and released. `max_live` bounds the requests taken from
    `requests` and not yet finished (default: the waiting queue's bound).
    """
    source = iter(requests)
    exhausted = False
    live: dict[str, GenerationRequest] = {}
    try:
      while not exhausted or live:
        while (not exhausted and len(self.scheduler.waiting) < self.config.max_waiting
               and (max_live is None or len(live) < max_live)):
          req = next(source, None)
          if req is None:
            exhausted = True
            break
          rid = self.add_request(req.prompt, req.params, req.request_id, stream=stream,
                                 priority=req.priority)
          if rid in self._failed:
            out = self.get_output(rid)
            out.prompt = req.prompt
            self.release(rid)
            if stream:
              yield StreamOutput(rid, 0, "", [], True, "error", out.error)
            yield out
          else:
            live[rid] = req
        if not live:
          if not exhausted:  # the queue is full of other callers' requests
            self.step()
          continue
        result = self.step()
        if stream:
          yield from (d for d in result.deltas if d.request_id in live)
        for rid in result.finished:
          if rid not in live:
            continue  # a request of another caller of add_request
          out = self.get_output(rid)
          out.prompt = live.pop(rid).prompt
          self.release(rid)
          yield out
    finally:
      for rid in live:  # the caller stopped early (e.g. a stream was closed)
        self.abort(rid)
        self.release(rid)

  @staticmethod
  def _requests(prompts, params) -> list[GenerationRequest]:
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
      prompts = [prompts]
    if params is None or isinstance(params, SamplingParams):
      params = [params] * len(prompts)
    if len(params) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
    return [GenerationRequest(p, sp) for p, sp in zip(prompts, params)]

  def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
               ) -> list[RequestOutput]:
    """Runs every prompt to completion; outputs in input order."""
    requests = self._requests(prompts, params)
    order = {}
    for k, r in enumerate(requests):
      r.request_id = f"generate-{next(self._ids)}"
      order[r.request_id] = k
    outputs: list[RequestOutput | None] = [None] * len(requests)
    for out in self.iterate(requests):
      outputs[order[out.request_id]] = out
    return outputs

  def stream(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
             ) -> Iterator[StreamOutput]:
    """Yields text deltas as tokens are produced, for one prompt or many;
    `prompt_index` says whose."""
    requests = self._requests(prompts, params)
    order = {}
    for k, r in enumerate(requests):
      r.request_id = f"stream-{next(self._ids)}"
      order[r.request_id] = k
    for out in self.iterate(requests, stream=True):
      if isinstance(out, StreamOutput):
        out.prompt_index = order[out.request_id]
        yield out

  def num_free_pages(self) -> int:
    return self.scheduler.allocator.num_free

  def kv_utilization(self) -> float:
    return self.scheduler.allocator.utilization()
