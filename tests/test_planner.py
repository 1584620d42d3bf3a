"""The roofline model and the planner, checked against hand computations."""

import math

import pytest

from ridgeline.configs import models
from ridgeline.engine import roofline
from ridgeline.engine.config import EngineConfig
from ridgeline.engine.planner import Planner

LLAMA8B = models.get("llama-3.1-8b")
H100 = roofline.PEAKS["H100"]


def test_device_table_and_ridge():
  assert H100.ridge_point("bfloat16") == pytest.approx(989.4e12 / 3.35e12)  # ~295 FLOP/B
  assert roofline.lookup("NVIDIA H100 80GB HBM3") is H100
  assert roofline.lookup("NVIDIA H200") is roofline.PEAKS["H200"]
  assert roofline.lookup("NVIDIA A100-SXM4-80GB") is roofline.PEAKS["A100"]
  assert roofline.lookup("NVIDIA L4") is roofline.PEAKS["L4"]
  assert roofline.lookup("NVIDIA L40S") is None
  assert H100.peak_flops("float8_e4m3fn") == pytest.approx(1978.9e12)


def test_step_cost_by_hand():
  c = LLAMA8B
  d, f, v, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_layers
  hd, h, kvh = c.head_dim, c.num_heads, c.num_kv_heads
  layer = d * h * hd + 2 * d * kvh * hd + h * hd * d + 3 * d * f
  # Weights read: every layer (plus its two norms), the final norm, the LM head, in bf16.
  assert roofline.weight_bytes(c) == 2 * (L * (layer + 2 * d) + d + v * d)
  # A decode step of 4 sequences with 100 cached tokens each.
  cost = roofline.decode_cost(c, [100] * 4)
  kv_token = 2 * L * kvh * hd * 2
  assert cost.flops == 2 * (L * layer * 4 + v * d * 4) + 4 * L * h * hd * 4 * 101
  assert cost.kv_read_bytes == 4 * 100 * kv_token
  assert cost.kv_write_bytes == 4 * kv_token
  # Prefill of 10 tokens after 6 cached: causal attention over 6..15 positions.
  cost = roofline.prefill_cost(c, [(6, 10)])
  assert cost.flops == 2 * (L * layer * 10 + v * d) + 4 * L * h * hd * (10 * 6 + 55)


def test_prefill_budget_reaches_the_ridge_for_llama8b_on_h100():
  planner = Planner(LLAMA8B, EngineConfig(max_model_len=8192, prefill_chunk=4096, max_batch=64), H100)
  ridge = H100.ridge_point("bfloat16")
  tokens = planner.ridge_tokens
  # bf16: ~2 FLOPs per 2 weight bytes per token, so the budget is ~ the ridge value.
  assert abs(tokens - ridge) / ridge <= 0.10, (tokens, ridge)
  assert roofline.prefill_cost(LLAMA8B, [(0, tokens)]).intensity >= ridge
  assert roofline.prefill_cost(LLAMA8B, [(0, tokens - 1)]).intensity < ridge
  # A decode batch below max_batch (and the ridge): admit a whole chunk.
  assert planner.decode_ridge_batch(50) > 256
  plan = planner.plan([50] * 8)
  assert plan.decode_batch == 8 and plan.target_intensity == pytest.approx(ridge)
  assert plan.prefill_budget == 4096
  assert planner.plan([]).prefill_budget == 4096
  # A full decode batch: prefill only up to the ridge, rounded up to a token bucket.
  full = Planner(LLAMA8B, EngineConfig(max_model_len=8192, prefill_chunk=4096, max_batch=8),
                 H100)
  assert full.plan([50] * 8).prefill_budget == 512


def test_long_context_decode_is_memory_bound():
  planner = Planner(LLAMA8B, EngineConfig(max_model_len=131072, max_batch=256), H100)
  # 256 sequences of 32k tokens: the KV reads dwarf the weights; no batch reaches the ridge.
  cost = planner.cost([(32768, 1)] * 256)
  assert cost.kv_read_bytes > 10 * cost.weight_bytes
  assert cost.intensity < planner.ridge / 10
  # Short contexts at the same batch are far closer to the ridge.
  assert planner.cost([(128, 1)] * 256).intensity > 20 * cost.intensity


def test_latency_bound_caps_batch_and_budget():
  cfg = EngineConfig(max_model_len=8192, max_batch=256, prefill_chunk=4096, max_step_ms=20)
  planner = Planner(LLAMA8B, cfg, H100)
  plan = planner.plan([8000] * 256)
  assert 1 <= plan.decode_batch < 256
  est = roofline.decode_cost(LLAMA8B, [8000] * plan.decode_batch).time_lower_bound(
      H100, "bfloat16")
  assert est <= 0.020
  assert planner.plan([]).prefill_budget < 4096


def test_mfu_mbu():
  cost = roofline.StepCost(flops=989.4e12 * 0.5, weight_bytes=3.35e12 * 0.25, kv_read_bytes=0,
                           kv_write_bytes=0)
  assert roofline.mfu(cost, 1.0, H100, "bfloat16") == pytest.approx(0.5)
  assert roofline.mbu(cost, 1.0, H100) == pytest.approx(0.25)


def test_calibrate_measures_this_device():
  peaks = roofline.calibrate()
  assert peaks.measured
  assert peaks.peak_flops("float32") > 1e9 and peaks.bandwidth > 1e9
  assert math.isfinite(peaks.ridge_point("float32"))
  assert roofline.calibrate() is peaks  # cached
