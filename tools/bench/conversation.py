"""The conversation workload (the seed's ChatGPT): many users, each holding a
multi-turn conversation whose history grows every turn, on a KV pool smaller
than all the live conversations, with the host tier off, priced, and forced to
always copy back or always recompute (engine/kv_host.py).

Every user's first message is `conversation_prompt` tokens; each turn the model
answers `conversation_answer` tokens (greedy, ignore_eos) and the user adds
`conversation_message` more; the next prompt is the whole history. Users take
their turns in rounds, in a new random order each round, all of a round's
requests arriving together (the think time is the rest of the round), so by a
user's next turn the others' turns have pushed its pages out of a pool sized to
`conversation_pool` of the conversations' final KV. Each policy runs the same
turns on a fresh engine (same weights, same pool, the same compiled shapes from
the persistent cache), side by side in one process, `repeats` times, every other
pass in reverse order.

Reported per policy: prompt tokens recomputed (prefill tokens computed beyond
the tokens never seen before), TTFT p50 / p99 of the turns after the first,
output tokens/s over the whole workload, the tiers' hit rates, bytes moved, and
the price rule's choices; greedy outputs are checked equal across policies.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ridgeline.tools.bench.common import Bench, table
from ridgeline.util import ceil_div, percentiles

POLICIES = (("off", None), ("price", "price"), ("copy", "copy"), ("recompute", "recompute"))


def run_conversation(b: Bench) -> None:
  from ridgeline.engine.engine import Engine
  from ridgeline.engine.sampling import SamplingParams
  o = b.options
  users, turns = o.conversation_users, o.conversation_turns
  first, answer, message = o.conversation_prompt, o.conversation_answer, o.conversation_message
  final = first + turns * answer + (turns - 1) * message
  base = b.engine.config
  page = base.page_size
  pages = max(ceil_div(final, page) + 1, int(o.conversation_pool * users * ceil_div(final, page)))
  host_bytes = 4 * users * ceil_div(final, page) * b.engine.runner.page_bytes  # room for all
  rng = np.random.default_rng(o.seed)
  openers = b.prompts(users, first, seed=1000)
  messages = b.prompts(users * turns, message, seed=1001)
  orders = [rng.permutation(users) for _ in range(turns)]
  params = SamplingParams(temperature=0, max_tokens=answer, ignore_eos=True)
  config = dataclasses.replace(base, num_pages=pages,
                               max_model_len=ceil_div(final + 8, page) * page)
  rows, results, outputs = [], {}, {}
  print(f"\nConversations: {users} users x {turns} turns ({first} + {answer} per answer + "
        f"{message} per message tokens; final {final}), a device pool of {pages} pages "
        f"({pages * page} tokens, {pages * page / (users * final):.0%} of the conversations' "
        f"KV); host tier {host_bytes / 2**20:.0f} MiB")

  def run_policy(policy) -> dict:
    """The whole workload on a fresh engine: its seconds, the TTFTs of the turns
    after the first, every answer, the prompt tokens never seen before, and what
    the engine counted (the engine itself is dropped: its pools are large)."""
    engine = Engine(b.model, b.tokenizer, dataclasses.replace(
        config, host_kv_cache_bytes=None if policy is None else host_bytes,
        host_kv_policy=policy or "price"), peaks=b.engine.peaks)
    engine.warmup()  # every shape (from the persistent cache after the first engine)
    history = [list(p) for p in openers]
    new_tokens = sum(len(h) for h in history)
    ttft, produced = [], []
    t0 = time.perf_counter()
    for turn, order in enumerate(orders):
      outs = engine.generate([history[u] for u in order], params)
      for u, out in zip(order, outs):
        history[u] = history[u] + out.token_ids
        produced.append(out.token_ids)
        if turn:
          ttft.append(out.metrics.ttft)
        if turn + 1 < turns:
          history[u] += messages[u * turns + turn]
          new_tokens += answer + message
    wall = time.perf_counter() - t0
    return {"wall": wall, "ttft": ttft, "produced": produced, "new_tokens": new_tokens,
            "snap": engine.metrics.snapshot(),
            "prefill": engine.metrics.registry.get_sample_value(
                "ridgeline_computed_tokens_total", {"kind": "prefill"}) or 0,
            "copy_latency_s": engine.planner.copy_latency,
            "prefill_efficiency": engine.planner.prefill_efficiency,
            "hits": [p._asdict() for p in list(engine.planner.prices)[:8]]}

  # `repeats` passes over the policies, every other one in reverse order (the
  # machine's drift falls on all alike); each policy's seconds and TTFTs pooled.
  runs: dict[str, list] = {name: [] for name, _ in POLICIES}
  for k in range(max(1, o.repeats)):
    for name, policy in (POLICIES if k % 2 == 0 else POLICIES[::-1]):
      runs[name].append(run_policy(policy))
  for name, policy in POLICIES:
    last = runs[name][-1]  # counts from the last pass
    produced, new_tokens, snap, prefill = (last[k] for k in ("produced", "new_tokens", "snap",
                                                             "prefill"))
    wall = sum(r["wall"] for r in runs[name])
    ttft = [t for r in runs[name] for t in r["ttft"]]
    # Answers are computed once by decode rows; a prompt token computed twice
    # (prefill of history the cache lost) is a recomputation.
    recomputed = int(prefill - new_tokens + users * (turns - 1) * answer)
    pc = snap["prefix_cache"]
    tier = pc["host_tier"]
    t = percentiles(ttft)
    device_hits = (pc["hit_tokens"] - tier["loaded_tokens"]) / max(pc["queried_tokens"], 1)
    res = {"wall_s": wall, "output_tok_s": len(runs[name]) * users * turns * answer / wall,
           "passes": len(runs[name]),
           "prefill_tokens": int(prefill), "recomputed_prompt_tokens": recomputed,
           "ttft_s": t, "device_hit_rate": device_hits, "host_tier": tier,
           "price": {"host_hit_tokens": tier["hit_tokens"], "copied": tier["loaded_tokens"],
                     "recomputed": tier["recomputed_tokens"],
                     **{k: last[k] for k in ("copy_latency_s", "prefill_efficiency",
                                             "hits")}},
           "preemptions": snap["preemptions"]}
    results[name], outputs[name] = res, produced
    rows.append([name, f"{recomputed}", f"{1e3 * t['p50']:.0f}", f"{1e3 * t['p99']:.0f}",
                 f"{res['output_tok_s']:.1f}", f"{res['device_hit_rate']:.1%}",
                 f"{tier['hit_rate']:.1%}" if policy else "-",
                 f"{tier['bytes_to_host'] / 2**20:.0f} / {tier['bytes_to_device'] / 2**20:.0f}"
                 if policy else "-"])
  assert all(r["produced"] == outputs["off"] for rs in runs.values() for r in rs), (
      "a policy changed an output")
  off, price = results["off"], results["price"]
  summary = {
      "recomputed_reduction": 1 - price["recomputed_prompt_tokens"] / max(
          off["recomputed_prompt_tokens"], 1),
      "ttft_p50_speedup": off["ttft_s"]["p50"] / price["ttft_s"]["p50"],
      "throughput_ratio": price["output_tok_s"] / off["output_tok_s"],
      "price_vs_copy": price["output_tok_s"] / results["copy"]["output_tok_s"],
      "price_vs_recompute": price["output_tok_s"] / results["recompute"]["output_tok_s"]}
  b.results["conversation"] = {"users": users, "turns": turns, "pages": pages,
                               "final_tokens": final, "policies": results, **summary}
  print(table(rows, ["policy", "recomputed prompt tok", "TTFT p50 ms", "TTFT p99 ms",
                     "output tok/s", "device hits", "host hits", "MiB to host / back"]))
  p = results["price"]["price"]
  example = p["hits"][0] if p["hits"] else None
  print(f"price rule: {p['copied']} host-hit tokens copied back, {p['recomputed']} recomputed; "
        f"measured copy latency {1e6 * p['copy_latency_s']:.0f} us, prefill at "
        f"{p['prefill_efficiency']:.1%} of the roofline" + (
            f"; e.g. {example['tokens']} tokens after {example['context']}: copy "
            f"{1e3 * example['copy_s']:.2f} ms vs recompute {1e3 * example['recompute_s']:.2f} ms"
            if example else ""))
  print(f"price vs off: recomputed prompt tokens -{summary['recomputed_reduction']:.0%} "
        f"(target >= 80%), TTFT p50 {summary['ttft_p50_speedup']:.2f}x lower (target >= 2x), "
        f"throughput {summary['throughput_ratio']:.2f}x (target >= 1); price vs always-copy "
        f"{summary['price_vs_copy']:.2f}x, vs always-recompute "
        f"{summary['price_vs_recompute']:.2f}x (target: never below 0.95); greedy outputs "
        "identical under every policy")
