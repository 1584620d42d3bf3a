"""The conversation workload through the server, at a request rate
(scripts/benchmark.py --mode conversation_serve): the same question as
tools/bench/conversation.py (does the host KV tier turn recomputed history into
copies, and what does that do to time to first token?), asked the way users ask
it: chat completions over HTTP, each turn the whole conversation so far as
messages, arriving at a rate.

`users` conversations of `turns` turns: a first message of about `prompt` words,
greedy answers of `answer` tokens (ignore_eos), later messages of about `message`
words. Turn k of the workload (user k % users, round k // users) arrives at a
Poisson time of rate `rate`, and is sent then or, if the user's previous answer
has not come back yet, when it does (a user cannot ask before reading). One
server per policy (off, priced, always copy, always recompute), the same arrivals,
a device KV pool of `pool` of the conversations' final KV (estimated from the
words: a word is about a token, plus the chat template's tokens per message).

Reported per policy: TTFT p50 / p99 of the turns after the first (client-side,
from the request's send to its first content chunk), the achieved request rate,
output tokens/s, prefill tokens computed (from /metrics) and of them the prompt
tokens recomputed (computed beyond the tokens the server had never seen: each
prompt's tokens, by the server's /tokenize, past its longest common prefix with
any prompt sent before it, less the previous answer's tokens it continues), the
prefix cache's and the host tier's hit tokens, and whether the answers equal the
first policy's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
from typing import Callable, ContextManager

import httpx
import numpy as np
from prometheus_client import parser

from ridgeline.tools.bench.common import table
from ridgeline.util import ceil_div, percentiles

POLICIES = (("off", None), ("price", "price"), ("copy", "copy"), ("recompute", "recompute"))
# Words of about one token each in a Llama-family vocabulary.
WORDS = ("the time people way year day thing man world life hand part child eye woman "
         "place work week case point number group problem fact water room mother area "
         "money story month lot right study book word business issue side kind head house "
         "service friend father power hour game line end member law car city name team "
         "minute idea kid body back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air "
         "teacher force education").split()
TEMPLATE_TOKENS = 8  # the chat template's tokens around each message (an estimate)


@dataclasses.dataclass(frozen=True)
class ConversationServeConfig:
  users: int = 16
  turns: int = 4
  prompt: int = 256  # words of a user's first message
  answer: int = 32  # tokens of each answer
  message: int = 32  # words of each later message
  rate: float = 2.0  # turns arriving per second
  pool: float = 0.25  # the device KV pool as a share of the conversations' KV
  page_size: int = 16
  seed: int = 0

  def final_tokens(self) -> int:
    """About the tokens of one whole conversation (a word ~ a token)."""
    t = self.turns
    return (self.prompt + t * self.answer + (t - 1) * self.message
            + (2 * t) * TEMPLATE_TOKENS)

  def server_flags(self) -> list[str]:
    """The pool and the model length the workload needs."""
    per = ceil_div(self.final_tokens(), self.page_size)
    max_len = (per + 1) * self.page_size  # room for the estimate's error
    pages = max(per + 2, int(self.pool * self.users * per))
    return [f"--num_pages={pages}", f"--max_model_len={max_len}",
            f"--page_size={self.page_size}"]


def _text(rng: np.random.Generator, words: int) -> str:
  return " ".join(rng.choice(WORDS, words))


async def _turn(client: httpx.AsyncClient, model: str, messages: list, answer: int
                ) -> tuple[float, float, str, int]:
  """One streamed chat completion: (seconds to the first content, seconds in all,
  the answer's text, its prompt's tokens)."""
  body = {"model": model, "messages": messages, "max_tokens": answer, "temperature": 0,
          "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
  t0 = time.perf_counter()
  first, parts, prompt_tokens = None, [], 0
  async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
    if resp.status_code != 200:
      await resp.aread()
      raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
    async for line in resp.aiter_lines():
      if not line.startswith("data: ") or line == "data: [DONE]":
        continue
      chunk = json.loads(line[6:])
      if chunk.get("usage"):
        prompt_tokens = chunk["usage"]["prompt_tokens"]
      for choice in chunk.get("choices", []):
        text = choice["delta"].get("content")
        if text:
          first = first if first is not None else time.perf_counter() - t0
          parts.append(text)
  return first if first is not None else float("nan"), time.perf_counter() - t0, "".join(
      parts), prompt_tokens


async def _workload(cfg: ConversationServeConfig, url: str) -> dict:
  rng = np.random.default_rng(cfg.seed)
  firsts = [_text(rng, cfg.prompt) for _ in range(cfg.users)]
  later = [[_text(rng, cfg.message) for _ in range(cfg.turns)] for _ in range(cfg.users)]
  n = cfg.users * cfg.turns
  arrivals = np.cumsum(rng.exponential(1.0 / cfg.rate, n))
  async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
    model = (await client.get("/v1/models")).json()["data"][0]["id"]
    history = [[{"role": "user", "content": f}] for f in firsts]
    done = [asyncio.Event() for _ in range(n)]
    ttft, answers, prompt_tokens = [None] * n, [None] * n, [0] * n
    sent, order, sends = [None] * n, [0] * n, itertools.count()
    t0 = time.perf_counter()

    async def one(k: int) -> None:
      u, turn = k % cfg.users, k // cfg.users
      await asyncio.sleep(max(0.0, t0 + arrivals[k] - time.perf_counter()))
      if turn:
        await done[k - cfg.users].wait()  # the user read the previous answer
        history[u] += [{"role": "user", "content": later[u][turn]}]
      sent[k], order[k] = list(history[u]), next(sends)
      first, _, text, prompt_tokens[k] = await _turn(client, model, sent[k], cfg.answer)
      history[u] += [{"role": "assistant", "content": text}]
      ttft[k], answers[k] = first, text
      done[k].set()

    await asyncio.gather(*(one(k) for k in range(n)))
    wall = time.perf_counter() - t0
    metrics = (await client.get("/metrics")).text
    # Every prompt's token ids (the server's own template), in the order they were sent.
    ids = [(await client.post("/tokenize", json={"model": model, "messages": sent[k]})
            ).json()["tokens"] for k in sorted(range(n), key=order.__getitem__)]
  return {"ttft": ttft, "answers": answers, "prompt_tokens": prompt_tokens, "wall": wall,
          "metrics": metrics, "fresh_tokens": fresh_prompt_tokens(ids, cfg.answer)}


def _sample(text: str, name: str, labels: dict | None = None) -> float:
  for family in parser.text_string_to_metric_families(text):
    for s in family.samples:
      if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
        return float(s.value)
  return 0.0


def fresh_prompt_tokens(prompts: list[list[int]], answer: int) -> int:
  """Prompt tokens the server had never seen, over `prompts` (token ids, in the
  order they were sent): each prompt's tokens past its longest common prefix with
  any earlier one (another user's first message shares the template's system
  prompt; a later turn its whole history), less the `answer` tokens of the
  previous turn when it continues one (the server computed those decoding)."""
  fresh = 0
  for k, p in enumerate(prompts):
    common, continues = 0, False
    for q in prompts[:k]:
      n = min(len(p), len(q))
      lcp = next((i for i in range(n) if p[i] != q[i]), n)
      if lcp > common:
        common, continues = lcp, lcp == len(q)
    fresh += max(0, len(p) - common - (answer if continues else 0))
  return fresh


def run(cfg: ConversationServeConfig, serve: Callable[[list[str], str], ContextManager[str]],
        host_gb: float) -> dict:
  """Each policy against a fresh server (`serve(extra_flags, policy_name)` yields
  its URL)."""
  results, rows, reference = {}, [], None
  for name, policy in POLICIES:
    extra = cfg.server_flags() + ([] if policy is None else
                                  [f"--host_kv_cache_gb={host_gb}", f"--host_kv_policy={policy}"])
    with serve(extra, name) as url:
      out = asyncio.run(_workload(cfg, url))
    m = out["metrics"]
    later = [t for k, t in enumerate(out["ttft"]) if k >= cfg.users]
    t = percentiles(later)
    n = cfg.users * cfg.turns
    fresh = out["fresh_tokens"]
    res = {
        "ttft_s": t, "wall_s": out["wall"], "request_rate": n / out["wall"],
        "output_tok_s": n * cfg.answer / out["wall"],
        "prompt_tokens": int(sum(out["prompt_tokens"])),
        "prefill_tokens": int(_sample(m, "ridgeline_computed_tokens_total",
                                      {"kind": "prefill"})),
        "fresh_prompt_tokens": int(fresh),
        "prefix_hit_tokens": int(_sample(m, "ridgeline_prefix_cache_hits_tokens_total")),
        "host_hit_tokens": int(_sample(m, "ridgeline_kv_host_hit_tokens_total")),
        "host_loaded_tokens": int(_sample(m, "ridgeline_kv_host_loaded_tokens_total")),
        "host_recomputed_tokens": int(_sample(m, "ridgeline_kv_host_recomputed_tokens_total"))}
    res["recomputed_prompt_tokens"] = res["prefill_tokens"] - res["fresh_prompt_tokens"]
    if reference is None:
      reference = out["answers"]
    res["answers_equal_first_policy"] = out["answers"] == reference
    results[name] = res
    rows.append([name, f"{res['prefill_tokens']}", f"{res['recomputed_prompt_tokens']}",
                 f"{1e3 * t['p50']:.0f}", f"{1e3 * t['p99']:.0f}", f"{res['request_rate']:.2f}",
                 f"{res['output_tok_s']:.1f}", f"{res['prefix_hit_tokens']}",
                 f"{res['host_loaded_tokens']}" if policy else "-",
                 "yes" if res["answers_equal_first_policy"] else "NO"])
    print(f"{name}: TTFT p50 {1e3 * t['p50']:.0f} ms, prefill {res['prefill_tokens']} tokens",
          flush=True)
  off, price = results["off"], results["price"]
  summary = {"prefill_reduction": 1 - price["prefill_tokens"] / max(off["prefill_tokens"], 1),
             "recomputed_reduction": 1 - price["recomputed_prompt_tokens"] / max(
                 off["recomputed_prompt_tokens"], 1),
             "ttft_p50_speedup": off["ttft_s"]["p50"] / price["ttft_s"]["p50"],
             "throughput_ratio": price["output_tok_s"] / off["output_tok_s"]}
  return {"config": dataclasses.asdict(cfg), "policies": results, "rows": rows, **summary}


def format_table(res: dict) -> str:
  head = ["policy", "prefill tok", "recomputed tok", "TTFT p50 ms", "TTFT p99 ms", "req/s",
          "output tok/s", "prefix hit tok", "host copied tok", "answers = off"]
  rows = res["rows"]
  lines = [table(rows, head)]
  lines.append(f"priced tier vs off: prefill tokens -{res['prefill_reduction']:.0%}, recomputed "
               f"prompt tokens -{res['recomputed_reduction']:.0%} (target >= 80%), TTFT p50 "
               f"{res['ttft_p50_speedup']:.2f}x lower, throughput {res['throughput_ratio']:.2f}x")
  return "\n".join(lines)
