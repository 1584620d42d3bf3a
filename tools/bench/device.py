"""The modes of the device alone: prefill, the paged-attention kernels, and the
calibration of the device's ceilings.

  prefill      one prompt of `prefill_tokens` through the runner (in prefill_chunk
               pieces): step time, tokens/s, MFU; and a few batched prefill shapes.
  kernels      the Pallas GPU paged-attention kernel against the XLA reference
               (max error) and their times; it runs before the engine is built, so
               that a kernel that fails its check is not used (`check_kernels`).
  calibration  measured copy bandwidth and matmul FLOP/s (what MFU and the
               rooflines are read against), before prefill or kernels.
"""

from __future__ import annotations

from ridgeline.engine import roofline
from ridgeline.tools.bench.common import (Bench, Needs, Options, fmt_bandwidth, fmt_flops, pct,
                                          summarize, trace_ops)
from ridgeline.util import ceil_div


def run_prefill(b: Bench) -> None:
  import jax
  from ridgeline.engine.runner import Row
  o, runner = b.options, b.engine.runner
  n, page, chunk = o.prefill_tokens, b.engine.config.page_size, b.engine.config.prefill_chunk
  tokens = b.prompts(1, n)[0]
  # One sequence, in chunks of prefill_chunk (one step when it holds the prompt).
  steps = [[Row(tokens[start:start + min(chunk, n - start)], start,
                list(range(ceil_div(start + min(chunk, n - start), page))))]
           for start in range(0, n, chunk)]
  run = lambda: [jax.block_until_ready(runner.run_rows(rows)) for rows in steps]
  s = summarize(roofline.time_calls(run, repeats=o.steps, warmup=o.warmup))
  if o.profile:
    s["profile"] = trace_ops(run, f"prefill {n} tokens")
  cost = roofline.prefill_cost(b.model_config, [(st, min(chunk, n - st))
                                                for st in range(0, n, chunk)])
  mfu = roofline.mfu(cost, s["median"], b.peaks, b.dtype)
  rec = {"tokens": n, "chunks": len(steps), **s, "tokens_per_second": n / s["median"],
         "flops": cost.flops, "intensity": cost.intensity,
         "flops_per_second": cost.flops / s["median"], "mfu": mfu}
  measured = b.results.get("measured", {}).get("matmul_flops")
  if measured:
    rec["of_measured_matmul"] = rec["flops_per_second"] / measured
  b.results["prefill"] = rec
  peak = b.peaks.peak_flops(b.dtype)
  print(f"\nPrefill of {n} tokens ({len(steps)} step(s)): {1e3 * s['median']:.1f} ms "
        f"(spread {pct(s['spread'])}), {rec['tokens_per_second']:.0f} tokens/s, "
        f"{fmt_flops(rec['flops_per_second'], peak)}, MFU {pct(mfu)} of "
        f"{fmt_flops(peak)}"
        + (f", {pct(rec['of_measured_matmul'])} of the measured matmul" if measured else ""))
  batched = []
  for rows_n, t in o.prefill_batch_shapes:
    shape = f"{rows_n}x{t}"
    per_seq = ceil_div(t, page)
    rows = [Row(p, 0, list(range(i * per_seq, (i + 1) * per_seq)))
            for i, p in enumerate(b.prompts(rows_n, t))]
    one = lambda: runner.run_rows(rows)
    st = summarize(roofline.time_calls(one, repeats=3))
    if o.profile:
      st["profile"] = trace_ops(lambda: jax.block_until_ready(one()),
                                f"prefill step {shape}", runs=1)
    cost = roofline.prefill_cost(b.model_config, [(0, t)] * rows_n)
    r = {"shape": shape, **st, "tokens_per_second": rows_n * t / st["median"],
         "flops_per_second": cost.flops / st["median"], "intensity": cost.intensity,
         "mfu": roofline.mfu(cost, st["median"], b.peaks, b.dtype)}
    batched.append(r)
    print(f"Prefill step {shape}: {1e3 * st['median']:.1f} ms, {r['tokens_per_second']:.0f} "
          f"tokens/s, MFU {pct(r['mfu'])}")
  if batched:
    b.results["prefill_batches"] = batched


def prefill_needs(o: Options, config, peer: bool) -> Needs:
  page = config.page_size
  needs = Needs(max_len=o.prefill_tokens + 1, pages=ceil_div(o.prefill_tokens, page))
  for rows_n, t in o.prefill_batch_shapes:
    needs |= Needs(max_len=t + 1, pages=rows_n * ceil_div(t, page))
  return needs


def check_kernels(c, page: int) -> dict:
  """The Pallas GPU paged-attention kernel against the XLA reference, on random
  pools shaped like model config `c`'s, at a few decode batches and contexts."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ridgeline.model import attention
  dtype = jnp.dtype(c.compute_dtype)
  out = []
  platform_ = jax.devices()[0].platform
  impl = "pallas_gpu" if platform_ == "gpu" else "pallas_gpu_interpret"
  if not attention.pallas_gpu_available():
    print("\nkernels: Pallas GPU ops not importable here")
    return {"impl": impl, "error": "pallas gpu ops not importable", "ok": False}
  small = platform_ != "gpu"
  for batch, ctx in ([(1, 64), (2, 64)] if small else [(1, 4096), (8, 4096), (64, 1024)]):
    nb = ceil_div(ctx, page)
    rng = np.random.default_rng(batch)
    shape = (batch * nb + 1, page, c.num_kv_heads, c.head_dim)
    kp = jnp.asarray(rng.standard_normal(shape), dtype)
    vp = jnp.asarray(rng.standard_normal(shape), dtype)
    q = jnp.asarray(rng.standard_normal((batch, c.num_heads, c.head_dim)), dtype)
    tables = jnp.asarray(rng.permutation(batch * nb).reshape(batch, nb), jnp.int32)
    lens = jnp.asarray(rng.integers(ctx // 2, ctx + 1, batch), jnp.int32)
    layout = attention.StepLayout(tables, lens, jnp.zeros((0, nb), jnp.int32),
                                  jnp.zeros((0,), jnp.int32))  # decode rows only
    args = (q, kp, vp, lens - 1, layout)
    fns = {name: jax.jit(lambda *a, impl=name: attention.attend(*a, impl=impl))
           for name in ("xla", impl)}
    ref = fns["xla"](*args).astype(jnp.float32)
    rec = {"batch": batch, "context": ctx}
    try:
      got = fns[impl](*args).astype(jnp.float32)
      rec["relative_error"] = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
      for name, f in fns.items():
        rec[name + "_seconds"] = float(np.median(
            roofline.time_calls(f, *args, repeats=3 if small else 20)))
      kv_bytes = 2 * float(jnp.sum(lens)) * c.num_kv_heads * c.head_dim * dtype.itemsize
      rec["pallas_bytes_per_second"] = kv_bytes / rec[impl + "_seconds"]
    except Exception as e:  # report, and let the rest of the run go on
      rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    out.append(rec)
    print(f"kernels B={batch} ctx={ctx}: " + ", ".join(
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()
        if k not in ("batch", "context")), flush=True)
  ok = all(p.get("relative_error", 1.0) < 1e-2 for p in out)
  return {"impl": impl, "points": out, "ok": ok}


def run_calibration(b: Bench) -> None:
  """Measured ceilings on this device: copy bandwidth and a large matmul."""
  import jax
  gpu = jax.devices()[0].platform == "gpu"
  copy = roofline.measure_copy_bandwidth(mib=4096 if gpu else 256)
  n = 8192 if gpu else 1024
  mm = 2 * n ** 3 / roofline.measure_matmul_seconds(n, n, n, b.dtype)
  b.results["measured"] = {"copy_bandwidth": copy, "matmul_flops": mm, "matmul_size": n}
  print(f"measured: copy {fmt_bandwidth(copy)} (read + write), {n}^3 {b.dtype} matmul "
        f"{fmt_flops(mm)}")
