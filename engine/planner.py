"""The batcher: sizes every step against the device's ridge point.

A step that reads all the weights to compute a handful of tokens wastes the chip:
its arithmetic intensity (FLOPs per byte) is far below the ridge point, where the
device stops waiting on memory. Each step is one forward pass over one token
budget (decode rows and prefill chunks together); the planner picks, before
each step,

- the decode batch: every sequence ready to decode (more rows cost almost nothing
  while memory-bound), cut to `max_batch` and to the step-latency bound;
- the prefill token budget. While the decode batch is below `max_batch`, the
  budget is a whole chunk: admitting new sequences is what moves decoding toward
  (and on CPUs past) the ridge. Once the decode batch is full, the budget is just enough
  prompt tokens for a prefill pass of its own to reach the ridge (`ridge_tokens`,
  rounded up to a compiled token bucket): more would only delay the decoders.
  Either way the budget respects the latency bound.

When the ridge cannot be reached -- too little work waiting, or decode steps whose
KV reads grow with their context -- the planner runs what there is and the step
is recorded as memory-bound rather than padded with useless work.

Costs are the roofline model's (`engine/roofline.py`); the time of a step is
estimated as max(FLOPs / peak, bytes / bandwidth), a lower bound.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import NamedTuple, Sequence

from ridgeline.engine import config as config_lib
from ridgeline.engine import roofline
from ridgeline.engine.config import EngineConfig
from ridgeline.model.config import ModelConfig


# The default decode batch (`default_max_batch`): the context a typical request of
# a batch job decodes at (prompt and answer of a few hundred tokens each), the
# largest default, and the most where the peaks are measured (a CPU).
TYPICAL_CONTEXT = 512
MAX_DEFAULT_BATCH = 1024
MEASURED_DEVICE_BATCH = 64


def default_max_batch(model_config: ModelConfig, peaks: roofline.DevicePeaks,
                      pool_tokens: int, kv_dtype=None,
                      context: int = TYPICAL_CONTEXT) -> int:
  """The decode batch a device should run by default: the fewest rows whose decode
  step reaches the ridge at `context` tokens (rounded up to a step bucket: a power
  of two or 1.5 times one), but no more than the KV pool holds at that context
  (rounded down), at most MAX_DEFAULT_BATCH.

  From the table: Llama-3.1-8B bf16 on an H100 cannot reach the ridge at 512
  tokens (its KV reads grow with the batch as fast as the math), so its pool
  decides: 768 rows; on an H200 1,024; on an A100 the ridge, 512.

  Where the peaks are measured (a CPU) at most MEASURED_DEVICE_BATCH, and the
  pool does not bound it: there the host and the "device" share the same cores
  (rows past the ridge only slow each step; the default model reaches its fp32
  ridge near 96 rows), and the pool is a setting (`cpu_kv_cache_bytes`), not the
  device's memory: a batch that outgrows it preempts and recomputes.
  """
  ridge = peaks.ridge_point(roofline.matmul_dtype(model_config, peaks))
  one = roofline.decode_cost(model_config, [context], kv_dtype)
  per_seq_bytes = one.bytes - one.weight_bytes
  # intensity(b) = b * flops / (weights + b * per_seq): solve for the ridge.
  denominator = one.flops - ridge * per_seq_bytes
  need = ridge * one.weight_bytes / denominator if denominator > 0 else float("inf")
  steps = sorted({v for k in range(12) for v in (1 << k, 3 << k >> 1)} - {0})
  up = next((v for v in steps if v >= need), float("inf"))
  room = max(1, pool_tokens // context)
  down = max(v for v in steps if v <= max(room, 1))
  if peaks.measured:
    return int(min(up, MEASURED_DEVICE_BATCH))
  return int(min(up, down, MAX_DEFAULT_BATCH))


class Price(NamedTuple):
  """One priced host-tier hit: its position and size (tokens), the estimates
  (seconds) and the choice."""

  context: int
  tokens: int
  copy_s: float
  recompute_s: float
  copied: bool


@dataclasses.dataclass(frozen=True)
class Plan:
  decode_batch: int
  prefill_budget: int
  target_intensity: float


class Planner:
  def __init__(self, model_config: ModelConfig, config: EngineConfig,
               peaks: roofline.DevicePeaks):
    self.model_config = model_config
    self.config = config
    self.peaks = peaks
    self.dtype = roofline.matmul_dtype(model_config, peaks)  # fp8 peaks for W8A8
    self.ridge = peaks.ridge_point(self.dtype)
    self.copy_latency = 0.0  # seconds a host-tier copy costs besides its bytes
    # The share of the roofline that steps computing prompt tokens achieve here
    # (observe_step); 1 until one has run.
    self.prefill_efficiency = 1.0
    self.prefill_steps_observed = 0
    self.prices: collections.deque[Price] = collections.deque(maxlen=4096)  # the latest

  @functools.cached_property
  def ridge_tokens(self) -> int:
    """Fewest prefill tokens (one fresh sequence) whose step reaches the ridge;
    the largest chunk considered (64k) if none does."""
    lo, hi = 1, 65536
    if self._prefill_intensity(hi) < self.ridge:
      return hi
    while lo < hi:
      mid = (lo + hi) // 2
      if self._prefill_intensity(mid) >= self.ridge:
        hi = mid
      else:
        lo = mid + 1
    return lo

  def _prefill_intensity(self, tokens: int) -> float:
    return roofline.prefill_cost(self.model_config, [(0, tokens)],
                                 self.config.kv_dtype).intensity

  def decode_ridge_batch(self, context: float) -> float:
    """Fewest sequences of `context` cached tokens whose decode step reaches the
    ridge; infinity when none does (KV reads grow as fast as the math)."""
    one = roofline.decode_cost(self.model_config, [context], self.config.kv_dtype)
    per_seq_bytes = one.bytes - one.weight_bytes

    def intensity(b):
      # A decode step's FLOPs and KV bytes grow linearly with the batch at one
      # context: O(1) per probe instead of costing a b-long list (the search
      # took ~5 ms a step on the CPU, a fifth of a batch-1 decode step).
      return b * one.flops / (one.weight_bytes + b * per_seq_bytes)
    hi = 1 << 16
    if intensity(hi) < self.ridge:
      return float("inf")
    lo = 1
    while lo < hi:
      mid = (lo + hi) // 2
      if intensity(mid) >= self.ridge:
        hi = mid
      else:
        lo = mid + 1
    return lo

  def _seconds(self, cost: roofline.StepCost) -> float:
    return cost.time_lower_bound(self.peaks, self.dtype)

  def plan(self, decode_contexts: Sequence[int]) -> Plan:
    """decode_contexts: cached tokens of each sequence ready to decode, oldest first."""
    cfg = self.config
    limit = cfg.max_step_ms / 1e3 if cfg.max_step_ms else float("inf")
    batch = min(len(decode_contexts), cfg.max_batch)
    while batch > 1 and self._seconds(roofline.decode_cost(
        self.model_config, decode_contexts[:batch], cfg.kv_dtype)) > limit:
      batch -= 1
    if batch < cfg.max_batch:
      # Room in the batch: admit a whole chunk. Past the ridge in theory a step's
      # FLOP/s are flat, but not on a CPU (XLA's fp32 matmuls: a 1024^3 one runs at
      # 314 GFLOP/s on the 2-core VM, a step of 96 tokens at about a third of it),
      # and trickling prompts in at the ridge's few tokens a step kept a 64-request
      # batch job in 135 mixed steps at 0.33 s each (0.66x transformers); a whole
      # chunk a step fills the batch in a few efficient steps.
      budget = cfg.prefill_chunk
    else:
      budget = config_lib.bucket(min(self.ridge_tokens, cfg.prefill_chunk),
                                 cfg.prefill_token_buckets)
    while budget > cfg.prefill_token_buckets[0] and self._seconds(roofline.prefill_cost(
        self.model_config, [(0, budget)], cfg.kv_dtype)) > limit:
      budget //= 2
    return Plan(batch, max(budget, 1), self.ridge)

  def observe_step(self, cost: roofline.StepCost, seconds: float) -> None:
    """A step that computed prompt tokens took `seconds`: folds its share of the
    roofline (lower bound / measured) into `prefill_efficiency` (an exponential
    average over the last ~10 such steps)."""
    if seconds > 0 and cost.flops > 0:
      achieved = min(1.0, self._seconds(cost) / seconds)
      self.prefill_efficiency = achieved if not self.prefill_steps_observed else (
          0.9 * self.prefill_efficiency + 0.1 * achieved)
      self.prefill_steps_observed += 1

  def prefer_copy(self, context: int, tokens: int, rest: int) -> bool:
    """A host-tier hit of `tokens` prompt tokens after `context` cached ones, with
    `rest` more to compute after them: copy its pages back (True) or recompute
    them? The copy: the pages' bytes over the host link, plus the fixed cost of
    a copy (`copy_latency`, measured by Engine.warmup: a one-page round trip's
    dispatches and synchronisation; 0 until measured). The recompute: what
    those tokens add to the prefill step that computes the rest anyway (its
    roofline time with them, minus without: their FLOPs, their K/V and the
    attention reads they add, the weights being read once either way; the
    whole step's when nothing else would run), over the share of the roofline
    this device's prefill steps achieve (`prefill_efficiency`, measured as
    they run: the bound alone made a 2-core CPU recompute what it copies back
    faster). `host_kv_policy` "copy" or "recompute" forces the answer."""
    policy = self.config.host_kv_policy
    if policy != "price":
      return policy == "copy"
    copy = (self.copy_latency
            + tokens * self.kv_bytes_per_token / self.peaks.host_link_bandwidth)
    with_them = self._seconds(self.cost([(context, tokens + rest)]))
    without = self._seconds(self.cost([(context + tokens, rest)])) if rest else 0.0
    recompute = (with_them - without) / self.prefill_efficiency
    self.prices.append(Price(context, tokens, copy, recompute, copy < recompute))
    return copy < recompute

  @functools.cached_property
  def kv_bytes_per_token(self) -> float:
    return self.model_config.kv_bytes_per_token(self.config.kv_dtype)

  def shape_seconds(self, shape, context: float) -> float:
    """Roofline seconds of a step of `shape` (decode rows at `context` tokens,
    prefill tokens as one fresh chunk)."""
    rows = [(context, 1)] * shape.decode + ([(0, shape.prefill)] if shape.prefill else [])
    return self._seconds(self.cost(rows)) if rows else 0.0

  def cost(self, rows: Sequence[tuple[int, int]]) -> roofline.StepCost:
    """The roofline cost of a step that ran `rows` of (cached prefix, new tokens):
    decode rows are (context, 1), prefill chunks (start, length)."""
    return roofline.step_rows_cost(self.model_config, rows, self.config.kv_dtype)
