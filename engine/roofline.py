"""The roofline: device peaks, the FLOPs and bytes of a step, and what they imply.

An accelerator's ridge point is its peak FLOP/s over its memory bandwidth: the
arithmetic intensity (FLOPs per byte moved) above which a step is limited by math
rather than by memory. A decode step at batch B reads every weight once and does
about 2 FLOPs per weight per sequence, so its intensity is about B / bytes-per-weight
(plus the KV cache it reads): far below the ridge at small B. The planner uses
these numbers to size steps; the metrics report them for every step.

Peaks come from a table for known accelerators (dense, no sparsity) and from
`calibrate()` -- a measured matmul and a measured streaming read -- for CPUs and
anything else.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from ridgeline.model.config import ModelConfig

TERA = 1e12


@dataclasses.dataclass(frozen=True)
class DevicePeaks:
  """Peak dense FLOP/s by dtype, memory bandwidth (bytes/s) and memory size."""

  name: str
  flops: dict  # dtype name -> FLOP/s
  bandwidth: float
  memory_bytes: float
  measured: bool = False
  # Host <-> device copies (bytes/s, one direction): what the KV cache's host
  # tier pays to bring a page back (engine/kv_host.py). None: the device
  # memory's own bandwidth (a CPU, where "device" memory is host memory).
  host_bandwidth: float | None = None

  @property
  def host_link_bandwidth(self) -> float:
    return self.host_bandwidth if self.host_bandwidth is not None else self.bandwidth

  def peak_flops(self, dtype) -> float:
    name = jnp.dtype(dtype).name
    if name in self.flops:
      return self.flops[name]
    if name in ("float8_e4m3fn", "float8_e5m2") and "float8" in self.flops:
      return self.flops["float8"]
    raise ValueError(f"{self.name}: no peak FLOP/s known for {name}")

  def ridge_point(self, dtype) -> float:
    """FLOPs per byte at which the device stops waiting on memory."""
    return self.peak_flops(dtype) / self.bandwidth


# Dense peaks from the vendors' datasheets (SXM parts; sparsity not counted).
# fp32 is the non-tensor-core rate, which is what an fp32 matmul gets by default.
# Host links: PCIe Gen5 x16 (H100/H200) 64 GB/s a direction, Gen4 x16 (A100, L4)
# 32 GB/s; GH200's NVLink-C2C 450 GB/s a direction.
PCIE5, PCIE4, NVLINK_C2C = 64e9, 32e9, 450e9
PEAKS: dict[str, DevicePeaks] = {
    "H100": DevicePeaks("NVIDIA H100 SXM", {"bfloat16": 989.4 * TERA, "float16": 989.4 * TERA,
                                             "float8": 1978.9 * TERA, "float32": 66.9 * TERA},
                        3.35e12, 80e9, host_bandwidth=PCIE5),
    "H200": DevicePeaks("NVIDIA H200 SXM", {"bfloat16": 989.4 * TERA, "float16": 989.4 * TERA,
                                             "float8": 1978.9 * TERA, "float32": 66.9 * TERA},
                        4.8e12, 141e9, host_bandwidth=PCIE5),
    "GH200": DevicePeaks("NVIDIA GH200", {"bfloat16": 989.4 * TERA, "float16": 989.4 * TERA,
                                          "float8": 1978.9 * TERA, "float32": 66.9 * TERA},
                         4.0e12, 96e9, host_bandwidth=NVLINK_C2C),
    "A100": DevicePeaks("NVIDIA A100 80GB SXM", {"bfloat16": 312 * TERA, "float16": 312 * TERA,
                                                  "float32": 19.5 * TERA},
                        2.039e12, 80e9, host_bandwidth=PCIE4),
    "L4": DevicePeaks("NVIDIA L4", {"bfloat16": 121 * TERA, "float16": 121 * TERA,
                                     "float8": 242.5 * TERA, "float32": 30.3 * TERA},
                      300e9, 24e9, host_bandwidth=PCIE4),
}


def time_calls(fn, *args, repeats: int, warmup: int = 1, calls: int = 1,
               sync=jax.block_until_ready) -> list[float]:
  """Wall seconds per call of `fn(*args)`, one figure per repetition.

  `warmup` untimed calls first (the first compiles). Each of the `repeats`
  repetitions makes `calls` calls back to back and waits (`sync`) only on the
  last one's result, so with calls > 1 the host dispatches call i+1 while the
  device runs call i: the device's time per call rather than dispatch to result.
  `sync` is the identity for work that is done when it returns (torch on a CPU).
  """
  for _ in range(warmup):
    sync(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(calls - 1):
      fn(*args)
    sync(fn(*args))
    times.append((time.perf_counter() - t0) / calls)
  return times


def lookup(device_kind: str) -> DevicePeaks | None:
  """The table entry whose key appears in a jax `device_kind` string, if any."""
  for key, peaks in PEAKS.items():
    if re.search(rf"\b{key}\b", device_kind.upper()):  # "L4" must not match "L40S"
      return peaks
  return None


def device_peaks(device=None, calibrate_if_unknown: bool = True) -> DevicePeaks:
  """Peaks of `device` (default: the first device): the table, else measured."""
  device = device or jax.devices()[0]
  known = lookup(device.device_kind)
  if known is not None:
    return known
  if not calibrate_if_unknown:
    raise ValueError(f"no table entry for {device.device_kind!r}")
  return calibrate(device)


@functools.lru_cache(maxsize=None)
def calibrate(device=None, matmul_size: int = 1024, stream_mib: int = 256,
              repeats: int = 5) -> DevicePeaks:
  """Measures this device: float32 (and bfloat16) matmul FLOP/s and the bandwidth of
  a streaming read. Memoized per device, so it runs once per process."""
  device = device or jax.devices()[0]
  n = matmul_size

  def best_time(fn, *args):
    return min(time_calls(fn, *args, repeats=repeats))

  flops = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    # Several chained matmuls per call so dispatch overhead does not count.
    chain = jax.jit(lambda x: functools.reduce(lambda acc, _: acc @ x * 1e-3, range(4), x))
    flops[jnp.dtype(dtype).name] = 4 * 2 * n**3 / best_time(chain, a)
  elems = stream_mib * 2**20 // 4
  x = jax.device_put(jnp.ones((elems,), jnp.float32), device)
  read = jax.jit(lambda v: jnp.sum(v))
  bandwidth = elems * 4 / best_time(read, x)
  memory = getattr(device, "memory_stats", lambda: None)() or {}
  return DevicePeaks(f"measured {device.device_kind}", flops, bandwidth,
                     float(memory.get("bytes_limit", 0)), measured=True)


# The cost of a step ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepCost:
  flops: float
  weight_bytes: float
  kv_read_bytes: float
  kv_write_bytes: float

  @property
  def bytes(self) -> float:
    return self.weight_bytes + self.kv_read_bytes + self.kv_write_bytes

  @property
  def intensity(self) -> float:
    return self.flops / self.bytes if self.bytes else 0.0

  def time_lower_bound(self, peaks: DevicePeaks, dtype) -> float:
    """Roofline time: the slower of doing the math and moving the bytes."""
    return max(self.flops / peaks.peak_flops(dtype), self.bytes / peaks.bandwidth)


def _layer_matmul_params(c: ModelConfig) -> int:
  """Weights one token multiplies by in a layer: attention and the dense MLP, or
  the router and the num_experts_per_tok experts it is routed to."""
  d = c.hidden_size
  q = c.num_heads * c.head_dim
  kv = c.num_kv_heads * c.head_dim
  return d * q + 2 * d * kv + q * d + c.mlp_params_per_layer(active=True)


def experts_read(c: ModelConfig, tokens: float) -> float:
  """Expected distinct experts a layer reads for `tokens` tokens, each choosing
  num_experts_per_tok of num_experts (uniform routing): E * (1 - (1 - k/E)^n).
  One decode token reads k experts; a batch of 64 reads nearly all of them."""
  if not c.is_moe:
    return 0.0
  e, k = c.num_experts, c.num_experts_per_tok
  return e * (1.0 - (1.0 - k / e) ** max(tokens, 0.0))


def weight_bytes(c: ModelConfig, tokens: float | None = None) -> float:
  """Bytes of weights one step reads: every layer, the norms and the LM head
  (the embedding table itself is only gathered from, a few rows per token).
  An MoE layer reads only the experts its `tokens` tokens are routed to (None:
  all of them, the worst case). A quantized model counts its stored dtypes: the
  projections' int8 / int4 (half a byte) / fp8 values plus their scales and
  block minimums (model/quant.py)."""
  if c.quantization:
    from ridgeline.model import quant
    layout = quant.stored_layout(c)
    head = "embed" if c.tie_word_embeddings else "lm_head"
    return float(sum(quant.nbytes(shape, dtype) for name, (shape, dtype) in layout.items()
                     if name.startswith("layers.") or name in ("final_norm", head)))
  itemsize = jnp.dtype(c.param_dtype).itemsize
  d = c.hidden_size
  per_layer = _layer_matmul_params(c) + (4 if c.sandwich_norms else 2) * d
  if c.is_moe:
    read = c.num_experts if tokens is None else experts_read(c, tokens)
    per_layer += (read - c.num_experts_per_tok) * 3 * d * c.expert_size
  return itemsize * (c.num_layers * per_layer + d + c.vocab_size * d)


def matmul_dtype(c: ModelConfig, peaks: "DevicePeaks") -> str:
  """The dtype the projections multiply in, whose peak sets the ridge point: fp8
  for an fp8-quantized model on a device with fp8 matrix units (W8A8, see
  model/quant.py), else the compute dtype (weight-only int8/int4 upcast into a
  compute-dtype matmul: fewer bytes, the same FLOP/s)."""
  if c.quantization == "fp8" and "float8" in peaks.flops:
    return "float8_e4m3fn"
  return c.compute_dtype


def step_cost(c: ModelConfig, *, new_tokens: int, logit_rows: int,
              attended: float, kv_read_tokens: float, kv_dtype=None) -> StepCost:
  """FLOPs and bytes of one forward step.

  Args:
    new_tokens: tokens run through the network (decode rows + prefill tokens).
    logit_rows: rows the LM head runs on (one per sequence).
    attended: sum over new tokens of the number of positions each attends to.
    kv_read_tokens: cached tokens whose K/V the step reads (sum over sequences).
  """
  matmul = 2 * (c.num_layers * _layer_matmul_params(c) * new_tokens
                + c.vocab_size * c.hidden_size * logit_rows)
  attention = 4 * c.num_layers * c.num_heads * c.head_dim * attended
  kv_per_token = c.kv_bytes_per_token(kv_dtype)
  return StepCost(matmul + attention, weight_bytes(c, new_tokens),
                  kv_per_token * kv_read_tokens, kv_per_token * new_tokens)


def step_rows_cost(c: ModelConfig, rows, kv_dtype=None) -> StepCost:
  """One step over (prefix_len, new_tokens) rows: each row's new tokens attend
  causally to its cached prefix and to themselves, and each row computes one
  row of logits. A decode row is (context, 1)."""
  rows = np.asarray(rows, np.float64).reshape(-1, 2)
  prefix, n = rows[:, 0], rows[:, 1]
  return step_cost(c, new_tokens=int(n.sum()), logit_rows=len(rows),
                   attended=float(np.sum(n * prefix + n * (n + 1) / 2)),
                   kv_read_tokens=float(prefix.sum()), kv_dtype=kv_dtype)


def decode_cost(c: ModelConfig, context_lens, kv_dtype=None) -> StepCost:
  """A decode step: one new token per sequence, each with its context length
  (tokens already cached before this step)."""
  return step_rows_cost(c, [(ctx, 1) for ctx in context_lens], kv_dtype)


def prefill_cost(c: ModelConfig, chunks, kv_dtype=None) -> StepCost:
  """Prefill of (prefix_len, chunk_len) pairs."""
  return step_rows_cost(c, list(chunks), kv_dtype)


def mfu(cost: StepCost, seconds: float, peaks: DevicePeaks, dtype) -> float:
  """Model FLOPs utilization: achieved FLOP/s over the device's peak."""
  return cost.flops / seconds / peaks.peak_flops(dtype) if seconds > 0 else 0.0


def mbu(cost: StepCost, seconds: float, peaks: DevicePeaks) -> float:
  """Memory bandwidth utilization: achieved bytes/s over the device's peak."""
  return cost.bytes / seconds / peaks.bandwidth if seconds > 0 else 0.0


# Measured ceilings for benchmarks ------------------------------------------------
# (Additions for scripts/benchmark.py: the peaks above say what the device could
# do at best; these say what a plain copy and the model's own matmul shapes do.)


@functools.lru_cache(maxsize=None)
def measure_copy_bandwidth(device=None, mib: int = 1024, repeats: int = 5) -> float:
  """Bytes/s of a device-to-device copy, counting the bytes read and written
  (the way GPU vendors and METHOD.md count it)."""
  device = device or jax.devices()[0]
  elems = mib * 2**20 // 4
  x = jax.device_put(jnp.arange(elems, dtype=jnp.float32), device)
  # One read and one write per element, into the donated input's buffer: a fresh
  # output buffer would time the page faults of its first touch on a CPU.
  copy = jax.jit(lambda v: v + 1.0, donate_argnums=0)
  buf = [x]

  def step():  # each call reads the buffer the last one wrote (the input is donated)
    buf[0] = copy(buf[0])
    return buf[0]

  times = time_calls(step, repeats=repeats)
  return 2 * elems * 4 / float(np.median(times))


@functools.lru_cache(maxsize=None)
def measure_matmul_seconds(m: int, k: int, n: int, dtype: str = "float32", device=None,
                           repeats: int = 5) -> float:
  """Median seconds of one [m, k] x [k, n] matmul in `dtype` on `device`."""
  device = device or jax.devices()[0]
  # Random operands made on the device (zeros can run faster than real data).
  make = jax.jit(lambda key: (jax.random.normal(key, (m, k), dtype),
                              jax.random.normal(jax.random.fold_in(key, 1), (k, n), dtype)),
                 out_shardings=jax.sharding.SingleDeviceSharding(device))
  a, b = make(jax.random.PRNGKey(0))
  return float(np.median(time_calls(jax.jit(jnp.matmul), a, b, repeats=repeats)))


def matmul_shapes(c: ModelConfig) -> list[tuple[int, int, int]]:
  """(k, n, count) of the weight matmuls in one forward pass over one token."""
  d = c.hidden_size
  f = c.expert_size if c.is_moe else c.intermediate_size
  mlps = c.num_experts_per_tok if c.is_moe else 1  # one token's experts
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  layer = [(d, q, 1), (d, kv, 2), (q, d, 1), (d, f, 2 * mlps), (f, d, mlps)]
  if c.is_moe:
    layer.append((d, c.num_experts, 1))  # the router
  return [(k, n, cnt * c.num_layers) for k, n, cnt in layer] + [(d, c.vocab_size, 1)]


def decode_matmul_seconds(c: ModelConfig, batch: int, device=None) -> float:
  """The measured matmul roofline of a decode step: the time of its weight
  matmuls at `batch` rows, each shape timed alone at the device's real speed
  for that shape (attention, norms and host work not counted)."""
  dtype = jnp.dtype(c.compute_dtype).name
  return sum(cnt * measure_matmul_seconds(batch, k, n, dtype, device)
             for k, n, cnt in matmul_shapes(c))
