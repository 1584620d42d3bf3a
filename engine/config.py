"""EngineConfig: how the engine lays out its cache and shapes its steps."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from ridgeline.util import bucket, ceil_div, power_of_two_buckets  # (bucket also re-exported)


class StepShape(NamedTuple):
  """A step's compiled shape: decode rows and prefill tokens, each a bucket."""

  decode: int
  prefill: int


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Cache layout and step shapes.

  page_size: tokens per KV page.
  num_pages: pages in the pool; None sizes it from a byte budget: `kv_cache_bytes`
    if set, else `memory_fraction` of the device memory minus what is already in
    use (the weights), else (devices that report no memory, like CPUs)
    `cpu_kv_cache_bytes`.
  max_batch: most sequences in one decode step. None (the default): sized to the
    device's ridge point by the Engine (planner.default_max_batch: hundreds of rows
    on an H100/H200, a few dozen on a CPU), bounded by what the KV pool holds.
  max_model_len: most tokens (prompt + output) of one sequence. None (the
    default): the model's own limit (max_position_embeddings), capped by what
    the KV pool holds; the Engine resolves it when it sizes the pool.
  prefill_chunk: most prompt tokens one step computes (all sequences together);
    longer prompts are prefilled in several chunks.
  max_prefill_batch: most sequences prefilled together in one step.
  kv_dtype: KV cache dtype (default: the model's compute dtype); "int8" or "fp8"
    for an 8-bit cache with per (token, head) scales (model/kv_quant.py).
  seed: seeds the engine's choice of seeds for requests that give none.
  max_waiting: bound of the waiting queue; submissions past it raise CapacityError.
  max_step_ms: latency bound the planner keeps each step under (by the roofline
    estimate); None for no bound.
  host_kv_cache_bytes: a host-memory tier under the device's KV pool
    (engine/kv_host.py): prefix pages the device evicts are kept there, up to this
    many bytes, and copied back on a later hit; None (the default): no tier.
  host_kv_policy: what a host hit does: "price" (copy back or recompute, whichever
    the roofline says is cheaper), "copy" (always copy back), "recompute" (never).
  batch_rows: work of priority > 0 (batch lines) starts only while fewer than this
    many sequences run: the rows past which a step gets slower for everyone (the
    ridge-sized batch of the device). None (the default): max_batch.
  """

  page_size: int = 16
  num_pages: int | None = None
  kv_cache_bytes: int | None = None
  memory_fraction: float = 0.9
  cpu_kv_cache_bytes: int = 512 * 2**20
  max_batch: int | None = None
  max_model_len: int | None = None
  prefill_chunk: int = 512
  max_prefill_batch: int = 8
  kv_dtype: str | None = None
  seed: int = 0
  max_waiting: int = 4096
  max_step_ms: float | None = None
  host_kv_cache_bytes: int | None = None
  host_kv_policy: str = "price"
  batch_rows: int | None = None

  def __post_init__(self):
    for field in ("page_size", "max_batch", "max_model_len", "prefill_chunk",
                  "max_prefill_batch", "cpu_kv_cache_bytes", "max_waiting", "batch_rows"):
      if getattr(self, field) is not None and getattr(self, field) < 1:
        raise ValueError(f"EngineConfig.{field} must be >= 1, got {getattr(self, field)}")
    if self.num_pages is not None and self.num_pages < 1:
      raise ValueError(f"EngineConfig.num_pages must be >= 1, got {self.num_pages}")
    if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
      raise ValueError(f"EngineConfig.kv_cache_bytes must be >= 1, got {self.kv_cache_bytes}")
    if self.kv_dtype is not None:
      from ridgeline.model import kv_quant
      try:
        kv_quant.qtype(self.kv_dtype)
      except TypeError:
        raise ValueError(f"EngineConfig.kv_dtype: unknown dtype {self.kv_dtype!r}; allowed: "
                         "a float dtype (float32, bfloat16, ...), int8 or fp8") from None
    if self.host_kv_cache_bytes is not None and self.host_kv_cache_bytes < 1:
      raise ValueError(f"EngineConfig.host_kv_cache_bytes must be >= 1 (or None: no host "
                       f"tier), got {self.host_kv_cache_bytes}")
    if self.host_kv_policy not in ("price", "copy", "recompute"):
      raise ValueError(f"EngineConfig.host_kv_policy must be 'price', 'copy' or 'recompute', "
                       f"got {self.host_kv_policy!r}")
    if not 0 < self.memory_fraction <= 1:
      raise ValueError(f"EngineConfig.memory_fraction must be in (0, 1], got "
                       f"{self.memory_fraction}")

  def _resolved(self, name: str):
    value = getattr(self, name)
    if value is None:
      raise ValueError(f"EngineConfig.{name} is None (sized by the Engine); use engine.config")
    return value

  @property
  def max_pages_per_seq(self) -> int:
    if self.max_model_len is None:
      raise ValueError("EngineConfig.max_model_len is None (the model's own limit): "
                       "the Engine resolves it; use engine.config")
    return ceil_div(self.max_model_len, self.page_size)

  # Step shapes. A step is one flat batch of tokens: a decode region of Bd rows
  # (one token each) and a prefill region of Tp tokens in tiles of
  # `prefill_tile`. Each region is padded up to a bucket; the shape of a step is
  # (Bd, Tp), and every such pair is one compiled variant, all compiled at
  # start-up (`Runner.warmup`). Steps that carry prefill work pad their decode
  # rows to coarser buckets (factors of 4): the prefill tokens dominate those
  # steps, and it keeps the variant count small.

  @property
  def prefill_tile(self) -> int:
    return min(16, self.prefill_chunk)

  @property
  def decode_buckets(self) -> tuple[int, ...]:
    """Decode rows of a step without prefill work: powers of two, and from 16 on
    the points half-way (24, 48, ...): a batch-33 step padded to 64 rows cost 295
    ms where 48 rows cost 253 (2-core CPU, 300-token contexts)."""
    max_batch = self._resolved("max_batch")
    powers = power_of_two_buckets(max_batch)
    halves = [3 * b // 2 for b in powers if b >= 16 and 3 * b // 2 < max_batch]
    return tuple(sorted(set(powers) | set(halves)))

  @property
  def mixed_decode_buckets(self) -> tuple[int, ...]:
    """Decode rows of a step that also prefills (0: none)."""
    return (0,) + geometric_buckets(self._resolved("max_batch"), 4, 4)

  @property
  def prefill_token_buckets(self) -> tuple[int, ...]:
    """Prefill tokens of a step: multiples of the tile, factors of 4 apart."""
    tile = self.prefill_tile
    top = ceil_div(self.prefill_chunk, tile) * tile
    return geometric_buckets(top, min(2 * tile, top), 4)

  @property
  def max_sample_rows(self) -> int:
    """Rows a step samples at most: every decode row and one per prefilled sequence."""
    return self._resolved("max_batch") + self.max_prefill_batch

  def step_shapes(self) -> list[StepShape]:
    """Every (decode rows, prefill tokens) a step can have."""
    shapes = [StepShape(b, 0) for b in self.decode_buckets]
    shapes += [StepShape(b, t) for t in self.prefill_token_buckets
               for b in self.mixed_decode_buckets]
    return shapes

  def sample_rows(self, shape: StepShape) -> int:
    """Sample rows of a step: one per decode row (padding included), then one per
    prefilled sequence the prefill region can hold, padded to a decode bucket
    (or max_sample_rows), so the samplers are few and shared between shapes.
    Decode row i samples into output row i, chunk j into row shape.decode + j."""
    tiles = shape.prefill // self.prefill_tile
    rows = shape.decode + (min(self.max_prefill_batch, tiles) if tiles else 0)
    return bucket(rows, self.decode_buckets + (self.max_sample_rows,))

  def max_step_variants(self) -> int:
    """Executables the standard steps compile: a model pass per shape and a
    sampler per number of sample rows."""
    shapes = self.step_shapes()
    return len(shapes) + len({self.sample_rows(s) for s in shapes})


def geometric_buckets(limit: int, start: int, factor: int) -> tuple[int, ...]:
  """start, factor*start, ... and finally `limit` itself."""
  out, b = [], start
  while b < limit:
    out.append(b)
    b *= factor
  out.append(limit)
  return tuple(out)

