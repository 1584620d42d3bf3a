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
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from engine import roofline
from engine.config import EngineConfig
from engine.metrics import Metrics
from engine.planner import Planner
from engine.runner import Runner
from engine.sampling import SamplingParams
from engine.scheduler import Request, Scheduler
from model import transformer as transformer_lib
from model.config import ModelConfig

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]

__all__ = ["Engine", "EngineConfig", "SamplingParams", "RequestOutput",
           "CompletionOutput", "StreamOutput", "CapacityError"]


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
class RequestMetrics:
  """Seconds. queue_time: arrival to first scheduled; ttft: arrival to first
  token; tpot: mean time per output token after the first."""

  arrival_time: float
  queue_time: float | None = None
  ttft: float | None = None
  tpot: float | None = None
  e2e: float | None = None


@dataclasses.dataclass
class RequestOutput:
  request_id: str
  prompt: Any
  prompt_token_ids: list[int]
  outputs: list[CompletionOutput]
  finished: bool
  metrics: RequestMetrics
  error: str | None = None

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
class StreamOutput:
  """A piece of one completion: `text` and `token_ids` are new since the last one."""

  prompt_index: int
  request_id: str
  index: int
  text: str
  token_ids: list[int]
  finished: bool
  finish_reason: str | None
  error: str | None = None


class Engine:
  """Offline and streaming generation over a paged KV cache."""

  def __init__(self, model: transformer_lib.Transformer, tokenizer=None,
               config: EngineConfig | None = None, kv_sharding=None,
               peaks: roofline.DevicePeaks | None = None, mesh=None):
    """`mesh` (model/sharding.make_mesh): shard weights and KV pages over it and
    split each step's rows over its data axis; None runs where the weights are.
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
    num_pages = self._size_pool(config, model.config, mesh)
    if config.max_model_len is None:  # the model's own limit, as far as the pool holds
      config = dataclasses.replace(
          config, max_model_len=min(max_pos, num_pages * config.page_size))
    self.config = config
    self.runner = Runner(model, config, num_pages, kv_sharding, mesh=mesh)
    eos_ids = list(tokenizer.eos_ids) if tokenizer is not None else []
    self.peaks = peaks or roofline.device_peaks()
    self.planner = Planner(model.config, config, self.peaks)
    self.metrics = Metrics(self.planner.ridge)
    self.scheduler = Scheduler(self.runner, config, eos_ids, self.planner, self.metrics)
    self._rng = np.random.default_rng(config.seed)
    self._ids = itertools.count()
    self._failed: dict[str, RequestOutput] = {}

  @staticmethod
  def _size_pool(config: EngineConfig, model_config: ModelConfig, mesh=None) -> int:
    """Pages in the pool; refuses a pool that cannot hold one full-length sequence
    (the scheduler relies on it: the oldest sequence can always run).

    Budgets are per device: on a mesh a page's bytes are split over the devices
    that shard the KV heads, so the same memory holds more pages.
    """
    if mesh is None:
      page_bytes = config.page_size * model_config.kv_bytes_per_token(config.kv_dtype)
    else:
      from model import sharding  # only needed on a mesh
      page_bytes = sharding.memory_report(model_config, mesh, page_size=config.page_size,
                                          kv_dtype=config.kv_dtype).kv_page_bytes_per_device
    if config.num_pages is not None:
      num_pages, budget, setting = config.num_pages, config.num_pages * page_bytes, "num_pages"
    else:
      stats = jax.local_devices()[0].memory_stats() or {}
      if config.kv_cache_bytes is not None:
        budget, setting = config.kv_cache_bytes, "kv_cache_bytes"
      elif "bytes_limit" in stats:
        budget = (config.memory_fraction * stats["bytes_limit"]
                  - stats.get("bytes_in_use", 0))
        setting = (f"memory_fraction (now {config.memory_fraction} of "
                   f"{stats['bytes_limit'] / 2**30:.1f} GiB, "
                   f"{stats.get('bytes_in_use', 0) / 2**30:.1f} GiB already in use)")
      else:
        budget, setting = config.cpu_kv_cache_bytes, "cpu_kv_cache_bytes"
      num_pages = int(max(budget, 0) // page_bytes)
    # max_model_len None: it becomes what the pool holds, which must be a page.
    need_pages = 1 if config.max_model_len is None else config.max_pages_per_seq
    if num_pages < need_pages:
      need = need_pages * page_bytes
      raise ValueError(
          f"the KV cache cannot hold one sequence of max_model_len={config.max_model_len} "
          f"tokens: that needs {need / 2**20:.1f} MiB ({need_pages} pages of "
          f"{page_bytes} bytes) and the pool gets {max(budget, 0) / 2**20:.1f} MiB; raise "
          f"{setting} or lower max_model_len")
    return num_pages

  @classmethod
  def from_checkpoint(cls, path: str, config: EngineConfig | None = None, mesh=None,
                      **kwargs) -> "Engine":
    """An engine over a checkpoint (orbax, .gguf or HF directory) and the tokenizer
    stored with it; on a mesh the weights are restored straight into their shardings."""
    from model.loading import load_model  # orbax is only needed when restoring
    model, tokenizer = load_model(path, mesh=mesh)
    return cls(model, tokenizer, config, mesh=mesh, **kwargs)

  # Requests -----------------------------------------------------------------

  def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                  request_id: str | None = None) -> str:
    """Queues one prompt; returns its request id. Never raises for bad input:
    a request that cannot run is recorded as failed (see `get_output`)."""
    request_id = request_id if request_id is not None else str(next(self._ids))
    if request_id in self.scheduler.requests or request_id in self._failed:
      raise ValueError(f"duplicate request_id {request_id!r}")
    waiting = len(self.scheduler.waiting)
    if waiting >= self.config.max_waiting:
      raise CapacityError(
          f"engine at capacity: {waiting} requests waiting (max_waiting="
          f"{self.config.max_waiting}), {len(self.scheduler.running)} running, KV cache "
          f"{100 * self.kv_utilization():.0f}% used; retry when requests finish")
    arrival = time.perf_counter()
    try:
      params = params if params is not None else SamplingParams()
      params.validate()
      prompt_ids = self._tokenize(prompt)
      max_tokens = self._check_length(prompt_ids, params)
      if params.stop and self.tokenizer is None:
        raise ValueError("stop strings need a tokenizer; use stop_token_ids")
    except (ValueError, TypeError) as e:
      self._failed[request_id] = RequestOutput(
          request_id, prompt, [], [CompletionOutput(0, "", [], "error")], True,
          RequestMetrics(arrival), error=str(e))
      return request_id
    seed = params.seed if params.seed is not None else int(self._rng.integers(2**63))
    tok = self.tokenizer
    self.scheduler.add(Request(
        request_id, prompt_ids, params, arrival, seed, max_tokens,
        detokenizer_factory=(lambda: tok.detokenizer(prompt_ids)) if tok else None))
    return request_id

  def _tokenize(self, prompt: Prompt) -> list[int]:
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ValueError("a text prompt needs a tokenizer; pass token ids instead")
      ids = self.tokenizer.encode(prompt)
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
      if self.tokenizer is None:
        raise ValueError("a chat prompt needs a tokenizer")
      for m in prompt:
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
          raise ValueError(f"each chat message needs string 'role' and 'content', got {m!r}")
      ids = self.tokenizer.encode_chat(list(prompt))
    elif isinstance(prompt, Sequence) and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
      ids = [int(t) for t in prompt]
      vocab = self.model_config.vocab_size
      bad = [t for t in ids if not 0 <= t < vocab]
      if bad:
        raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
    else:
      raise ValueError("a prompt must be a string, a list of token ids or a list of "
                       f"chat messages, got {type(prompt).__name__}")
    if not ids:
      raise ValueError("empty prompt")
    return ids

  def _check_length(self, prompt_ids: list[int], params: SamplingParams) -> int:
    limit = self.config.max_model_len
    if len(prompt_ids) >= limit:
      raise ValueError(f"prompt is {len(prompt_ids)} tokens; max_model_len is {limit}, "
                       "which must leave room for at least one generated token")
    room = limit - len(prompt_ids)
    return room if params.max_tokens is None else min(params.max_tokens, room)

  def abort(self, request_id: str) -> bool:
    """Stops a request; its pages are freed at once. Returns whether it was live."""
    return self.scheduler.abort(request_id)

  def has_unfinished(self) -> bool:
    return self.scheduler.has_work()

  def step(self):
    """One scheduler step; returns the per-sequence deltas it produced."""
    return self.scheduler.step()

  def get_output(self, request_id: str) -> RequestOutput:
    if request_id in self._failed:
      return self._failed[request_id]
    request = self.scheduler.requests[request_id]
    seqs = sorted(request.seqs, key=lambda s: s.index)
    outputs = [CompletionOutput(s.index, s.text, list(s.output_ids), s.finish_reason,
                                s.stop_reason,
                                list(s.logprobs) if request.params.logprobs is not None else None)
               for s in seqs]
    m = RequestMetrics(request.arrival_time)
    if request.first_scheduled_time is not None:
      m.queue_time = request.first_scheduled_time - request.arrival_time
    if request.first_token_time is not None:
      m.ttft = request.first_token_time - request.arrival_time
    if request.finish_time is not None:
      m.e2e = request.finish_time - request.arrival_time
      n_out = max(len(s.output_ids) for s in seqs)
      if n_out > 1 and request.first_token_time is not None:
        m.tpot = (request.finish_time - request.first_token_time) / (n_out - 1)
    return RequestOutput(request_id, None, list(request.prompt_ids), outputs,
                         request.finished, m)

  def release(self, request_id: str) -> None:
    """Forgets a finished request (its output can no longer be fetched)."""
    if self._failed.pop(request_id, None) is None:
      request = self.scheduler.requests[request_id]
      if not request.finished:
        raise ValueError(f"request {request_id!r} is still running")
      del self.scheduler.requests[request_id]

  # Batch APIs -------------------------------------------------------------------

  @staticmethod
  def _pair(prompts, params) -> tuple[list, list]:
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)):
      prompts = [prompts]
    if params is None or isinstance(params, SamplingParams):
      params = [params] * len(prompts)
    if len(params) != len(prompts):
      raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
    return list(prompts), list(params)

  def _run_batch(self, prompts, params) -> Iterator[tuple[int, str, list]]:
    """Submits prompts as the waiting queue has room and steps until all finish.

    Yields (prompt index, request id, deltas) whenever a request is submitted or a
    step produced deltas for it; the caller owns releasing finished requests.
    """
    prompts, params = self._pair(prompts, params)
    index: dict[str, int] = {}
    live: set[str] = set()
    submitted = 0
    try:
      while submitted < len(prompts) or live:
        while (submitted < len(prompts)
               and len(self.scheduler.waiting) < self.config.max_waiting):
          rid = self.add_request(prompts[submitted], params[submitted])
          index[rid] = submitted
          submitted += 1
          if rid in self._failed:
            yield index[rid], rid, []
          else:
            live.add(rid)
        if live:
          deltas = collections.defaultdict(list)
          for d in self.step():
            if d.request_id in live:
              deltas[d.request_id].append(d)
          for rid, ds in deltas.items():
            yield index[rid], rid, ds
          live = {rid for rid in live if not self.scheduler.requests[rid].finished}
    finally:
      for rid in live:  # the caller stopped early (e.g. a stream was closed)
        self.abort(rid)

  def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
               ) -> list[RequestOutput]:
    """Runs every prompt to completion; outputs in input order. Prompts beyond the
    waiting queue's bound are submitted as room frees up."""
    prompt_list, _ = self._pair(prompts, params)
    ids: dict[int, str] = {}
    for k, rid, _ in self._run_batch(prompts, params):
      ids[k] = rid
    outputs = []
    for k, prompt in enumerate(prompt_list):
      out = self.get_output(ids[k])
      out.prompt = prompt
      outputs.append(out)
      self.release(ids[k])
    return outputs

  def stream(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
             ) -> Iterator[StreamOutput]:
    """Yields text deltas as tokens are produced, for one prompt or many."""
    seen: set[str] = set()
    try:
      for k, rid, deltas in self._run_batch(prompts, params):
        seen.add(rid)
        if rid in self._failed:
          yield StreamOutput(k, rid, 0, "", [], True, "error", self._failed[rid].error)
        for d in deltas:
          yield StreamOutput(k, rid, d.index, d.text, d.token_ids, d.finished, d.finish_reason)
    finally:
      for rid in seen:
        self.release(rid)

  def num_free_pages(self) -> int:
    return self.scheduler.allocator.num_free

  def kv_utilization(self) -> float:
    return self.scheduler.allocator.utilization()
