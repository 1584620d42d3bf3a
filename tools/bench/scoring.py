"""The cost of asking for prompt log-probabilities: a scoring job against plain prefill.

Both run the same N fresh prompts of L tokens through `Engine.generate`, side by
side, alternating repetitions: plain prefill generates one token a prompt
(max_tokens 1: its prompt is computed and one token sampled); the scoring job
generates none and scores every prompt token (max_tokens 0, prompt_logprobs 0:
the LM head and a log-softmax at every prompt position, where plain prefill
computes them at the last one only). Reported in prompt tokens/s, with the ratio.
"""

from __future__ import annotations

import time

from ridgeline.tools.bench.common import Bench, Needs, summarize, table
from ridgeline.util import ceil_div


def _needs(o, config, peer: bool) -> Needs:
  n, length = o.scoring_prompts
  return Needs(max_len=length + 2, pages=n * ceil_div(length + 2, config.page_size),
               prefill_tokens=config.prefill_chunk)


def run_scoring(b: Bench) -> None:
  from ridgeline.engine.sampling import SamplingParams
  o, eng = b.options, b.engine
  n, length = o.scoring_prompts
  variants = {"prefill": SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
              "scoring": SamplingParams(max_tokens=0, prompt_logprobs=0)}
  times = {k: [] for k in variants}

  def run(name):
    prompts = b.prompts(n, length)  # fresh: no prefix-cache hits
    t0 = time.perf_counter()
    outs = eng.generate(prompts, variants[name])
    times[name].append(time.perf_counter() - t0)
    if name == "scoring":
      assert all(len(x.prompt_logprobs) == length for x in outs), "unscored prompt"

  for name in variants:  # warm-up: compiles their step shapes
    run(name)
    times[name].clear()
  for _ in range(o.repeats):
    for name in variants:
      run(name)
  rec = {"prompts": n, "prompt_len": length}
  rows = []
  for name in variants:
    s = summarize(times[name])
    rec[name] = {**s, "prompt_tokens_per_second": n * length / s["median"]}
    rows.append([name, f"{s['median']:.2f}", f"{rec[name]['prompt_tokens_per_second']:.0f}"])
  rec["ratio"] = (rec["scoring"]["prompt_tokens_per_second"]
                  / rec["prefill"]["prompt_tokens_per_second"])
  b.results["scoring"] = rec
  print(f"\nScoring {n} prompts of {length} tokens (median of {o.repeats}, alternating): "
        f"scoring / plain prefill = {rec['ratio']:.2f} (target >= 0.85)")
  print(table(rows, ["job", "seconds", "prompt tok/s"]))
