"""Writes benchmarks/sharegpt_lengths.json: (prompt, output) token lengths shaped
like the ShareGPT workload that vLLM's and SGLang's benchmarks sample.

Only lengths are shipped, and they are synthetic: no conversation text, nothing
downloaded. They are drawn from two log-normal distributions (prompt, output)
with a fixed seed, then filtered the way vLLM's ShareGPT sampler filters real
conversations (prompt and output at least 4 tokens, prompt at most 1024, prompt
plus output at most 2048). The parameters are fitted to the published summary
of 1,000 ShareGPT requests under a Llama tokenizer that SGLang's bench_serving
prints (215,196 input and 198,343 output tokens: means of about 215 and 198),
with long right tails and medians well below the means, as in the real data.

  python scripts/make_sharegpt_lengths.py            # rewrite the shipped file
  python scripts/make_sharegpt_lengths.py --check    # verify it is reproducible
"""

import argparse
import json
import pathlib
import sys

import numpy as np

OUT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "sharegpt_lengths.json"
COUNT = 1000
SEED = 20261126
# log-normal (median, sigma) for prompt and output lengths, in tokens.
PROMPT = (140.0, 1.60)
OUTPUT = (125.0, 1.05)
TARGET_MEANS = (215.0, 198.0)


def make() -> dict:
  rng = np.random.default_rng(SEED)
  pairs = []
  while len(pairs) < COUNT:
    p = int(round(rng.lognormal(np.log(PROMPT[0]), PROMPT[1])))
    o = int(round(rng.lognormal(np.log(OUTPUT[0]), OUTPUT[1])))
    if p < 4 or o < 4 or p > 1024 or p + o > 2048:
      continue  # vLLM's ShareGPT filter
    pairs.append((p, o))
  prompts = np.array([p for p, _ in pairs])
  outputs = np.array([o for _, o in pairs])
  return {
      "description": "Synthetic ShareGPT-like (prompt_len, output_len) pairs in tokens; "
                     "made by scripts/make_sharegpt_lengths.py (log-normal fit to ShareGPT's "
                     "published means, vLLM's length filter). Lengths only, no text.",
      "seed": SEED,
      "prompt_lognormal": {"median": PROMPT[0], "sigma": PROMPT[1]},
      "output_lognormal": {"median": OUTPUT[0], "sigma": OUTPUT[1]},
      "target_means": {"prompt": TARGET_MEANS[0], "output": TARGET_MEANS[1]},
      "stats": {
          "count": len(pairs),
          "prompt_mean": round(float(prompts.mean()), 1),
          "prompt_median": float(np.median(prompts)),
          "prompt_p99": round(float(np.percentile(prompts, 99)), 1),
          "output_mean": round(float(outputs.mean()), 1),
          "output_median": float(np.median(outputs)),
          "output_p99": round(float(np.percentile(outputs, 99)), 1),
      },
      "lengths": [[p, o] for p, o in pairs],
  }


def dumps(data: dict) -> str:
  head = {k: v for k, v in data.items() if k != "lengths"}
  body = ",\n".join(f"  [{p}, {o}]" for p, o in data["lengths"])
  text = json.dumps(head, indent=2)
  return text[:-2] + ',\n  "lengths": [\n' + body.replace("\n  ", "\n    ") .replace("  [", "    [", 1) + "\n  ]\n}\n"


def load(path=OUT) -> list[tuple[int, int]]:
  return [tuple(x) for x in json.loads(pathlib.Path(path).read_text())["lengths"]]


def main(argv):
  parser = argparse.ArgumentParser(
      prog="make_sharegpt_lengths.py", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--check", action="store_true",
                      help=f"only verify that {OUT.name} is what this script makes "
                           "(exit 1 if not); writes nothing")
  args = parser.parse_args(argv)  # --help prints and exits 0 before anything is written
  data = make()
  text = dumps(data)
  assert json.loads(text)["lengths"] == data["lengths"]
  if args.check:
    same = OUT.exists() and OUT.read_text() == text
    print("up to date" if same else f"{OUT} differs from what this script makes")
    return 0 if same else 1
  OUT.parent.mkdir(parents=True, exist_ok=True)
  OUT.write_text(text)
  print(f"wrote {OUT}: {json.dumps(data['stats'])}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
