"""The roofline figure of a benchmark run, with a caption that says what it shows.

Left: achieved FLOP/s against arithmetic intensity under the device's roof, with
the decode tokens/s those FLOP/s amount to on the right-hand axis. Right: the same
steps as tokens/s against batch size, under the roof's tokens/s. Below: how far
each measured point is from its roof and which roof it is under (memory or
compute), the peer's figures where one ran, and prefill.

Everything is computed from a results dict (what `modes.run` saves), so a saved
results JSON can be drawn again (`replot`) without a device.
"""

from __future__ import annotations

import json
import os
import pathlib
import textwrap

from ridgeline.tools.bench.common import flops_unit, fmt_bandwidth, fmt_flops


def _roof(peak: float, bw: float, intensity: float) -> float:
  return min(peak, bw * intensity)


def _where(intensity: float, ridge: float) -> str:
  return "memory-bound" if intensity < ridge else "compute-bound"


def _of_roof(flops_per_second: float, intensity: float, peak: float, bw: float) -> float:
  """Achieved over the roof at that intensity: MBU left of the ridge, MFU right."""
  return flops_per_second / _roof(peak, bw, intensity)


def _plain(v, _pos=None) -> str:
  return f"{v:g}"


def _num(x: float) -> str:
  """3 significant digits, without exponents for the magnitudes a caption shows."""
  return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def caption(results: dict) -> list[str]:
  """What the reader should conclude, one paragraph per item."""
  from ridgeline.engine import roofline
  from ridgeline.model.config import ModelConfig
  cfg = ModelConfig.from_dict(results["model"])
  peaks, dtype = results["peaks"], results["model"]["compute_dtype"]
  peak, bw = peaks["flops"][dtype], peaks["bandwidth"]
  ridge = peak / bw
  measured = results.get("measured", {})
  copy = measured.get("copy_bandwidth")
  source = ("measured on this machine (roofline.calibrate: a 1024^3 matmul and a streaming "
            "read)" if peaks.get("measured") else f"from the {peaks['name']} datasheet")
  out = [f"How to read: the black roof is the most a step can achieve at its arithmetic "
         f"intensity (FLOPs per byte moved): min({fmt_flops(peak)} {dtype} peak, "
         f"{fmt_bandwidth(bw)} x intensity), {source}. Left of the ridge ({ridge:.1f} "
         f"FLOP/byte) a step is memory-bound: its roof is the bandwidth, and % of roof is "
         f"the memory-bandwidth utilization. Right of it a step is compute-bound: % of roof "
         f"is the FLOP utilization. A decode step at batch B reads every weight once, so "
         f"its intensity (and its roof) grows with B."]
  decode = results.get("decode", [])
  if decode:
    ctx = min(p["context"] for p in decode)
    per_token = roofline.decode_cost(cfg, [ctx]).flops
    out[0] += (f" The left plot's right-hand axis is decode tokens/s: FLOP/s over the "
               f"{_num(per_token / 1e9)} GFLOP of one token at context {ctx}.")
  if copy:
    text = (f"Dotted: the roof at the measured device-to-device copy bandwidth, "
            f"{fmt_bandwidth(copy)} (bytes read and written; {100 * copy / bw:.0f}% of the "
            f"roof's bandwidth)")
    out.append(text + (": what a memory-bound step can expect in practice." if copy < bw else
                       ", above the roof here: the roof's bandwidth is a streaming read."))
  for ctx in sorted({p["context"] for p in decode}):
    pts = [p for p in decode if p["context"] == ctx]
    parts = []
    for p in pts:
      frac = _of_roof(p["flops_per_second"], p["intensity"], peak, bw)
      where = _where(p["intensity"], ridge)
      part = (f"B={p['batch']} {_num(p['tokens_per_second'])} tok/s = {100 * frac:.0f}% of "
              f"its roof ({where}, {_num(p['intensity'])} FLOP/B")
      mm = p.get("rooflines", {}).get("matmul_tokens_per_second")
      if where == "memory-bound" and copy:
        part += f"; {100 * p['bytes_per_second'] / copy:.0f}% of the measured copy"
      if where == "compute-bound" and mm:
        # The peak is for large matmuls; the step's own matmul shapes, timed alone,
        # say how much of the gap is the shapes rather than the rest of the step.
        part += f"; {100 * p['tokens_per_second'] / mm:.0f}% of its measured-matmul roof"
      parts.append(part + ")")
    fracs = [(_of_roof(p["flops_per_second"], p["intensity"], peak, bw), p["batch"]) for p in pts]
    best, worst = max(fracs), min(fracs)
    crossing = [p["batch"] for p in pts if p["intensity"] >= ridge]
    text = f"Decode steps, context {ctx} (the jitted step alone, dots): " + "; ".join(parts) + "."
    if len(pts) > 1:
      text += (f" Closest to its roof: B={best[1]} ({100 * best[0]:.0f}%); furthest: "
               f"B={worst[1]} ({100 * worst[0]:.0f}%).")
    if best[0] > 1.05:
      load = results.get("machine", {}).get("load_average_before")
      text += (" A point above 100% of its roof means the roof was measured too low: the "
               "calibration got less of the machine than the step did"
               + (f" (load average {load[0]:.1f} before the run)" if load else "") + ".")
    if crossing and len(crossing) < len(pts):
      text += (f" From B={crossing[0]} the step is past the ridge: a larger batch no longer "
               f"raises its roof, only its share of it.")
    piped = [p for p in pts if "pipelined" in p
             and p["pipelined"]["tokens_per_second"] > 1.15 * p["tokens_per_second"]]
    if piped:
      share = lambda d, i: 100 * _of_roof(d["flops_per_second"], i, peak, bw)
      text += (" Steps issued back to back (crosses: the device's time per step, the "
               "host's dispatch overlapped) are faster: " + ", ".join(
                   f"B={p['batch']} {_num(p['pipelined']['tokens_per_second'])} tok/s = "
                   f"{share(p['pipelined'], p['intensity']):.0f}%"
                   for p in piped) + " of the roof; the difference is host time per step "
               "(dispatch, inputs) that a step waited on alone pays.")
    eng = [p for p in pts if "engine" in p]
    if eng:
      text += (" Whole engine steps (squares: scheduler, sampler and host work included) "
               "against the step alone: " + ", ".join(
                   f"B={p['batch']} "
                   f"{p['engine']['tokens_per_second'] / p['tokens_per_second']:.2f}x"
                   for p in eng) + ".")
    out.append(text)
  compare = results.get("compare_decode", [])
  if compare:
    c0 = compare[0]
    roof = lambda c, who: 100 * c[who]["tokens_per_second"] / c["peak_roofline_tokens_per_second"]
    out.append(f"Side by side through whole generate calls (same weights, {c0['prompt_len']}-token "
               f"prompts, {c0['new_tokens']} new tokens, greedy; per-token decode time): "
               + "; ".join(f"B={c['batch']}: transformers (red) "
                           f"{_num(c['hf']['tokens_per_second'])} "
                           f"tok/s = {roof(c, 'hf'):.0f}% of the roof, ours (green) "
                           f"{_num(c['ours']['tokens_per_second'])} = {roof(c, 'ours'):.0f}%, "
                           f"{c['ratio']:.2f}x" for c in compare) + ".")
  pf = results.get("prefill")
  if pf:
    cost = roofline.prefill_cost(cfg, _prefill_chunks(pf, results))
    frac = _of_roof(pf["flops_per_second"], cost.intensity, peak, bw)
    text = (f"Prefill of {pf['tokens']} tokens (diamond): "
            f"{fmt_flops(pf['flops_per_second'], peak)}, "
            f"{_num(pf['tokens_per_second'])} tok/s = {100 * frac:.0f}% of its roof "
            f"({_where(cost.intensity, ridge)}, {_num(cost.intensity)} FLOP/B)")
    if pf.get("of_measured_matmul"):
      text += (f"; {100 * pf['of_measured_matmul']:.0f}% of a measured "
               f"{measured.get('matmul_size', '')}^3 matmul")
    out.append(text + ".")
  return out


def _prefill_chunks(pf: dict, results: dict) -> list[tuple[int, int]]:
  n = pf["tokens"]
  chunk = results.get("engine_config", {}).get("prefill_chunk", n) or n
  return [(st, min(chunk, n - st)) for st in range(0, n, chunk)]


def roofline(results: dict, path: str | os.PathLike) -> None:
  """Draws `results` (a benchmark run's dict) as a PNG at `path`."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  from matplotlib import ticker
  from ridgeline.engine import roofline as rl
  from ridgeline.model.config import ModelConfig

  cfg = ModelConfig.from_dict(results["model"])
  peaks, dtype = results["peaks"], results["model"]["compute_dtype"]
  peak, bw = peaks["flops"][dtype], peaks["bandwidth"]
  ridge = peak / bw
  scale, unit = flops_unit(peak)
  measured = results.get("measured", {})
  copy = measured.get("copy_bandwidth")
  decode = results.get("decode", [])
  contexts = sorted({p["context"] for p in decode})
  compare = results.get("compare_decode", [])
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  peer_color, ours_gen_color = "tab:red", "tab:green"

  lines = caption(results)
  wrapped = [textwrap.fill(t, 230) for t in lines]
  n_lines = sum(w.count("\n") + 1 for w in wrapped) + len(wrapped) - 1
  cap_in = 0.16 * n_lines + 0.3
  fig = plt.figure(figsize=(15, 6.2 + cap_in))
  top = 1 - 0.55 / fig.get_figheight()
  bottom = (cap_in + 0.6) / fig.get_figheight()
  grid = fig.add_gridspec(1, 2, left=0.05, right=0.98, top=top, bottom=bottom, wspace=0.3)
  ax, bx = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])

  # Left: the roofline ---------------------------------------------------------------------
  xs_all = [p["intensity"] for p in decode]
  if "prefill" in results:
    xs_all.append(rl.prefill_cost(cfg, _prefill_chunks(results["prefill"], results)).intensity)
  lo = min([0.1] + [x / 3 for x in xs_all])
  hi = max([ridge * 30] + [x * 3 for x in xs_all])
  xs = np.logspace(np.log10(lo), np.log10(hi), 300)
  ax.loglog(xs, np.minimum(peak, bw * xs) / scale, "k-", lw=2,
            label=f"roof: {fmt_flops(peak)} {dtype}, {fmt_bandwidth(bw)}")
  if copy:
    ax.loglog(xs, np.minimum(peak, copy * xs) / scale, ":", color="gray",
              label=f"measured copy {fmt_bandwidth(copy)}")
  ax.axvline(ridge, color="gray", ls="--", lw=1)
  ax.axvspan(lo, ridge, color="tab:blue", alpha=0.04)
  ax.axvspan(ridge, hi, color="tab:orange", alpha=0.04)
  ys = [p["flops_per_second"] for p in decode]  # the peer's points sit near ours
  ymin = (min(ys) / 4 if ys else peak / 1e3) / scale
  ymin = min(ymin, bw * lo / scale)
  ax.text(ridge / 1.1, ymin * 1.4, "<- memory-bound", ha="right", color="gray", fontsize=8)
  ax.text(ridge * 1.1, ymin * 1.4, "compute-bound ->", ha="left", color="gray", fontsize=8)
  ax.text(ridge, ymin * 2.6, f"ridge {ridge:.1f} FLOP/byte", ha="center", color="gray",
          fontsize=8, bbox=dict(fc="white", ec="none", alpha=0.8))
  for i, ctx in enumerate(contexts):
    pts = [p for p in decode if p["context"] == ctx]
    col = colors[i % len(colors)]
    ax.loglog([p["intensity"] for p in pts], [p["flops_per_second"] / scale for p in pts],
              "o-", color=col, label=f"decode step alone, ctx {ctx}")
    for p in pts:
      frac = _of_roof(p["flops_per_second"], p["intensity"], peak, bw)
      ax.annotate(f"B={p['batch']}: {100 * frac:.0f}%",
                  (p["intensity"], p["flops_per_second"] / scale),
                  textcoords="offset points", xytext=(-5, 7), ha="right", fontsize=7.5, color=col)
    eng = [p for p in pts if "engine" in p]
    if eng:
      ax.loglog([p["engine"]["intensity"] for p in eng],
                [p["engine"]["flops_per_second"] / scale for p in eng], "s", mfc="none",
                color=col, label=f"whole engine step, ctx {ctx}")
  for c in compare:
    ctx = c["prompt_len"] + c["new_tokens"] / 2  # the average context while decoding
    cost = rl.decode_cost(cfg, [ctx] * c["batch"])
    per_token = cost.flops / c["batch"]
    for who, color, marker in (("hf", peer_color, "v"), ("ours", ours_gen_color, "^")):
      ax.loglog([cost.intensity], [c[who]["tokens_per_second"] * per_token / scale], marker,
                color=color, ms=8,
                label=(("transformers generate" if who == "hf" else "ours, generate")
                       if c is compare[0] else None))
  if "prefill" in results:
    pf = results["prefill"]
    cost = rl.prefill_cost(cfg, _prefill_chunks(pf, results))
    frac = _of_roof(pf["flops_per_second"], cost.intensity, peak, bw)
    ax.loglog([cost.intensity], [pf["flops_per_second"] / scale], "D", color="tab:purple",
              label=f"prefill {pf['tokens']} tokens")
    ax.annotate(f"{100 * frac:.0f}%", (cost.intensity, pf["flops_per_second"] / scale),
                textcoords="offset points", xytext=(6, -3), fontsize=7, color="tab:purple")
  ax.set_xlim(lo, hi)
  ax.set_ylim(bottom=ymin)
  ax.set_xlabel("arithmetic intensity (FLOP/byte)")
  ax.set_ylabel(f"achieved {unit}")
  ax.set_title("Roofline: how close each step is to its roof", fontsize=10)
  for axis in (ax.xaxis, ax.yaxis):
    axis.set_major_formatter(ticker.FuncFormatter(_plain))
  ax.grid(True, which="both", alpha=0.25)
  ax.legend(fontsize=7.5, loc="upper left")
  if contexts:
    # Decode tokens/s on the right-hand axis: FLOP/s over the FLOPs of one token at
    # this context (exact for this context's decode points; within a few percent
    # for the others, attention being a small part of a token's FLOPs).
    per_token = rl.decode_cost(cfg, [contexts[0]]).flops
    sec = ax.secondary_yaxis("right", functions=(lambda f: f * scale / per_token,
                                                 lambda t: t * per_token / scale))
    sec.set_ylabel(f"decode tokens/s at ctx {contexts[0]}")
    sec.yaxis.set_major_formatter(ticker.FuncFormatter(_plain))

  # Right: tokens/s against batch ------------------------------------------------------------
  batches = [p["batch"] for p in decode] + [c["batch"] for c in compare]
  if batches:
    bs = np.unique(np.round(np.logspace(0, np.log2(max(batches) * 2), 60, base=2)))
    for i, ctx in enumerate(contexts):
      col = colors[i % len(colors)]
      costs = [rl.decode_cost(cfg, [ctx] * int(b)) for b in bs]
      roof_tps = [b / max(c.flops / peak, c.bytes / bw) for b, c in zip(bs, costs)]
      bx.loglog(bs, roof_tps, "-", color="black" if i == 0 else col, lw=2 if i == 0 else 1,
                label=f"roof, ctx {ctx}")
      if copy:
        copy_tps = [b / max(c.flops / peak, c.bytes / copy) for b, c in zip(bs, costs)]
        bx.loglog(bs, copy_tps, ":", color="gray",
                  label="roof at the measured copy bandwidth" if i == 0 else None)
      pts = [p for p in decode if p["context"] == ctx]
      bx.loglog([p["batch"] for p in pts], [p["tokens_per_second"] for p in pts], "o-",
                color=col, label=f"decode step alone, ctx {ctx}")
      bx.loglog([p["batch"] for p in pts], [p["pipelined"]["tokens_per_second"] for p in pts],
                "x", color=col, alpha=0.7, label=f"steps back to back (device time), ctx {ctx}")
      for p in pts:
        bx.annotate(_num(p["tokens_per_second"]), (p["batch"], p["tokens_per_second"]),
                    textcoords="offset points", xytext=(-7, 2), ha="right", fontsize=7,
                    color=col)
      eng = [p for p in pts if "engine" in p]
      if eng:
        bx.loglog([p["batch"] for p in eng], [p["engine"]["tokens_per_second"] for p in eng],
                  "s", mfc="none", color=col, label=f"whole engine step, ctx {ctx}")
    if compare:
      other = {"hf": "ours", "ours": "hf"}  # the higher of the two is labelled above
      for who, color, marker, name in (("hf", peer_color, "v", "transformers generate"),
                                       ("ours", ours_gen_color, "^", "ours, generate")):
        bx.loglog([c["batch"] for c in compare], [c[who]["tokens_per_second"] for c in compare],
                  marker, color=color, ms=8,
                  label=f"{name} (ctx ~{compare[0]['prompt_len'] + compare[0]['new_tokens'] // 2})")
        for c in compare:
          tps = c[who]["tokens_per_second"]
          bx.annotate(_num(tps), (c["batch"], tps), textcoords="offset points",
                      xytext=(8, 2 if tps >= c[other[who]]["tokens_per_second"] else -10),
                      fontsize=7, color=color)
    bx.set_xscale("log", base=2)
    for axis in (bx.xaxis, bx.yaxis):
      axis.set_major_formatter(ticker.FuncFormatter(_plain))
    lo_y, hi_y = bx.get_ylim()
    # Less than a decade shows only minor ticks on a log axis: label them plainly too.
    bx.yaxis.set_minor_formatter(ticker.FuncFormatter(_plain) if hi_y / lo_y < 10
                                 else ticker.NullFormatter())
    bx.set_xlabel("batch size (sequences per decode step)")
    bx.set_ylabel("decode tokens/s")
    bx.set_title("Decode throughput against batch size, under the roof's tokens/s", fontsize=10)
    bx.grid(True, which="both", alpha=0.25)
    bx.legend(fontsize=7.5, loc="best")
  else:
    bx.axis("off")

  label = f" - {results['label']}" if results.get("label") else ""
  fig.suptitle(f"{results['model']['name']} ({dtype}) on {results['machine']['device_kind']}, "
               f"{results['date'][:10]}{label}", fontsize=12)
  fig.text(0.06, cap_in / fig.get_figheight(), "\n\n".join(wrapped), fontsize=8,
           va="top", ha="left", wrap=False)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def replot(results_path: str | os.PathLike, png_path: str | os.PathLike | None = None
           ) -> pathlib.Path:
  """Draws a saved results JSON again (default: beside it, as .png)."""
  results_path = pathlib.Path(results_path)
  try:
    results = json.loads(results_path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"{results_path}: not a readable results JSON ({e})") from None
  missing = [k for k in ("model", "peaks", "machine", "date") if k not in results]
  if missing:
    raise ValueError(f"{results_path}: not a benchmark results file (no {', '.join(missing)})")
  if "decode" not in results and "prefill" not in results:
    raise ValueError(f"{results_path}: has neither decode nor prefill results to plot")
  png = pathlib.Path(png_path) if png_path else results_path.with_suffix(".png")
  roofline(results, png)
  return png
