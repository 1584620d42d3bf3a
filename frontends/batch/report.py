"""The job's report: the engine's own counters over the run, and the summary text.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable

from ridgeline import util


_PERCENTILES = util.PERCENTILES


_COUNTERS = (("preemptions", "ridgeline_preemptions_total"),
             ("prefix_cache_evictions", "ridgeline_prefix_cache_evictions_total"),
             ("prefix_cache_hit_tokens", "ridgeline_prefix_cache_hits_tokens_total"),
             ("prompt_tokens", "ridgeline_prompt_tokens_total"),
             ("generation_tokens", "ridgeline_generation_tokens_total"))


def engine_counts(engine) -> collections.Counter:
  """The engine's counters now (its metrics registry: the one source of truth)."""
  registry = engine.metrics.registry
  return collections.Counter({k: registry.get_sample_value(name) or 0.0
                              for k, name in _COUNTERS})


def _fmt_pct(d: dict | None, scale: float = 1e3, unit: str = "ms") -> str:
  if not d:
    return "n/a"
  return " / ".join(f"{d[f'p{p}'] * scale:.1f}" for p in _PERCENTILES) + f" {unit}"


def _flat(d: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flat(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def format_summary(summary: dict) -> str:
  """The summary for people."""
  s = summary
  run = s.get("run", {})
  noop = run.get("rerun_noop")
  lines = [f"requests      {s['requests']} ({s['ok']} ok, {s['errors']} errors)" + (
      "; all already in the output (the figures below are from the run that wrote them)"
      if noop else f"; {run.get('skipped', 0)} were already done" if run.get("skipped") else ""),
           f"tokens        in {s['prompt_tokens']}, out {s['output_tokens']}",
           f"throughput    {run.get('output_tokens_per_s', 0):.1f} output tokens/s "
           f"({run.get('output_tokens', 0)} tokens in {run.get('wall_time_s', 0):.1f} s"
           + (f", after {run['load_time_s']:.1f} s loading" if "load_time_s" in run else "")
           + ")"]
  if "decode_batch_mean" in run:
    lines.append(f"decode batch  mean {run['decode_batch_mean']:.1f}, "
                 f"max {run['decode_batch_max']}")
    lines.append(f"KV cache      utilization mean {run['kv_utilization_mean']:.1%}, "
                 f"max {run['kv_utilization_max']:.1%}")
  lines += [f"TTFT          p50 / p90 / p99 {_fmt_pct(s.get('ttft_s'))}",
            f"TPOT          p50 / p90 / p99 {_fmt_pct(s.get('tpot_s'))}",
            f"preemptions   {run.get('preemptions', 0)}"]
  engine = s.get("engine")
  if not engine:
    lines.append("engine        no engine metrics (prefix cache, intensity, MFU/MBU): n/a")
  else:
    pc = engine.get("prefix_cache") or {}
    if "hit_rate" in pc:
      lines.append(f"prefix cache  hit rate {pc['hit_rate']:.1%} ({pc.get('hit_tokens', 0)} of "
                   f"{pc.get('queried_tokens', 0)} prompt tokens), "
                   f"evictions {pc.get('evictions', 0)}")
    steps = engine.get("steps") or {}
    if "ridge_point" in engine and steps:
      kinds = "; ".join(
          f"{kind} {st.get('achieved_intensity', 0):.1f} FLOP/B, MFU "
          f"{st.get('mfu', 0):.2%}, MBU {st.get('mbu', 0):.2%}"
          for kind, st in steps.items())
      lines.append(f"roofline      ridge {engine['ridge_point']:.1f} FLOP/B; {kinds}")
    if not pc and not steps:
      lines.append("engine        " + ", ".join(
          f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
          for k, v in _flat(engine) if isinstance(v, (int, float, str))))
  if s.get("scored"):
    sc = s["scored"]
    lines.append(f"scored        {sc['tokens']} prompt tokens of {sc['lines']} lines"
                 + (f"; perplexity {s['perplexity']:.4f}" if "perplexity" in s
                    else "; perplexity n/a (not every line was scored)"))
  if s.get("finish_reasons"):
    lines.append("finish        " + ", ".join(f"{k} {v}" for k, v in s["finish_reasons"].items()))
  return "\n".join(lines)
