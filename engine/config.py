"""EngineConfig: how the engine lays out its cache and shapes its steps."""

from __future__ import annotations

import dataclasses


def power_of_two_buckets(limit: int, start: int = 1) -> tuple[int, ...]:
  """start, 2*start, 4*start, ... and finally `limit` itself (if not a power)."""
  out, b = [], start
  while b < limit:
    out.append(b)
    b *= 2
  out.append(limit)
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Cache layout and step shapes.

  page_size: tokens per KV page.
  num_pages: pages in the pool; None sizes it from a byte budget: `kv_cache_bytes`
    if set, else `memory_fraction` of the device memory minus what is already in
    use (the weights), else (devices that report no memory, like CPUs)
    `cpu_kv_cache_bytes`.
  max_batch: most sequences in one decode step.
  max_model_len: most tokens (prompt + output) of one sequence.
  prefill_chunk: most prompt tokens one sequence computes per step; longer
    prompts are prefilled in several chunks.
  max_prefill_batch: most sequences prefilled together in one step.
  kv_dtype: KV cache dtype (default: the model's compute dtype); "int8" or "fp8"
    for an 8-bit cache with per (token, head) scales (model/kv_quant.py).
  seed: seeds the engine's choice of seeds for requests that give none.
  max_waiting: bound of the waiting queue; submissions past it raise CapacityError.
  max_step_ms: latency bound the planner keeps each step under (by the roofline
    estimate); None for no bound.
  """

  page_size: int = 16
  num_pages: int | None = None
  kv_cache_bytes: int | None = None
  memory_fraction: float = 0.9
  cpu_kv_cache_bytes: int = 512 * 2**20
  max_batch: int = 64
  max_model_len: int = 2048
  prefill_chunk: int = 512
  max_prefill_batch: int = 8
  kv_dtype: str | None = None
  seed: int = 0
  max_waiting: int = 4096
  max_step_ms: float | None = None

  def __post_init__(self):
    for field in ("page_size", "max_batch", "max_model_len", "prefill_chunk",
                  "max_prefill_batch", "cpu_kv_cache_bytes", "max_waiting"):
      if getattr(self, field) < 1:
        raise ValueError(f"EngineConfig.{field} must be >= 1, got {getattr(self, field)}")
    if self.num_pages is not None and self.num_pages < 1:
      raise ValueError(f"EngineConfig.num_pages must be >= 1, got {self.num_pages}")
    if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
      raise ValueError(f"EngineConfig.kv_cache_bytes must be >= 1, got {self.kv_cache_bytes}")
    if self.kv_dtype is not None:
      from model import kv_quant
      try:
        kv_quant.qtype(self.kv_dtype)
      except TypeError:
        raise ValueError(f"EngineConfig.kv_dtype: unknown dtype {self.kv_dtype!r}; allowed: "
                         "a float dtype (float32, bfloat16, ...), int8 or fp8") from None
    if not 0 < self.memory_fraction <= 1:
      raise ValueError(f"EngineConfig.memory_fraction must be in (0, 1], got "
                       f"{self.memory_fraction}")

  @property
  def max_pages_per_seq(self) -> int:
    return -(-self.max_model_len // self.page_size)

  # Shape buckets: every step is padded up to one of these, so the number of
  # compiled variants is bounded by the product of the bucket counts.

  @property
  def decode_batch_buckets(self) -> tuple[int, ...]:
    return power_of_two_buckets(self.max_batch)

  @property
  def prefill_batch_buckets(self) -> tuple[int, ...]:
    return power_of_two_buckets(self.max_prefill_batch)

  @property
  def prefill_token_buckets(self) -> tuple[int, ...]:
    return power_of_two_buckets(self.prefill_chunk, start=min(16, self.prefill_chunk))

  @property
  def block_buckets(self) -> tuple[int, ...]:
    return power_of_two_buckets(self.max_pages_per_seq)

  def max_step_variants(self) -> int:
    """Upper bound on compiled model-step variants (decode + prefill)."""
    blocks = len(self.block_buckets)
    decode = len(self.decode_batch_buckets) * blocks
    prefill = len(self.prefill_batch_buckets) * len(self.prefill_token_buckets) * blocks
    return decode + prefill


def bucket(n: int, buckets: tuple[int, ...]) -> int:
  for b in buckets:
    if n <= b:
      return b
  raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
