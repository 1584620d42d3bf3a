"""A multi-turn chat through the engine, reporting what the prefix cache saved.

  python scripts/conversation_demo.py --turns 10

Each turn re-sends the whole conversation (as a chat client does); the engine
reuses the cached pages of everything up to the last full page and computes only
the rest. Prints, per turn, the prompt length, the tokens computed and the tokens
served from the cache, then the totals.
"""

from absl import flags

from ridgeline.engine.sampling import SamplingParams
from ridgeline.cli import _app, flags_common

flags.DEFINE_integer("turns", 10, "Conversation turns.")
flags.DEFINE_integer("max_tokens", 48, "Most new tokens per answer.")
FLAGS = flags.FLAGS

QUESTIONS = [
    "Hi! I want to learn about the solar system. Where should I start?",
    "Tell me about the Sun.", "What about Mercury?", "And Venus?", "Why is Mars red?",
    "How big is Jupiter?", "What are Saturn's rings made of?", "Tell me about Uranus.",
    "And Neptune?", "Thanks! Can you summarize what we discussed?",
]


def main(argv):
  del argv
  engine = flags_common.load_engine()
  registry = engine.metrics.registry

  def value(name, **labels):
    return registry.get_sample_value(name, labels) or 0.0

  messages = [{"role": "system", "content": "You are a friendly astronomy tutor."}]
  params = SamplingParams(temperature=0, max_tokens=FLAGS.max_tokens)
  total_prompt = total_computed = 0
  print(f"{'turn':>4} {'prompt':>7} {'computed':>9} {'cached':>7}")
  for turn in range(FLAGS.turns):
    messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
    before = value("ridgeline_computed_tokens_total", kind="prefill")
    hits_before = value("ridgeline_prefix_cache_hits_tokens_total")
    out = engine.generate([messages], params)[0]
    computed = value("ridgeline_computed_tokens_total", kind="prefill") - before
    hits = value("ridgeline_prefix_cache_hits_tokens_total") - hits_before
    n_prompt = len(out.prompt_token_ids)
    total_prompt += n_prompt
    total_computed += computed
    print(f"{turn + 1:>4} {n_prompt:>7} {int(computed):>9} {int(hits):>7}")
    messages.append({"role": "assistant", "content": out.text})
  snap = engine.metrics.snapshot()["prefix_cache"]
  print(f"prefix-cache hit rate {snap['hit_rate']:.1%}; prefill tokens computed "
        f"{int(total_computed)} of {total_prompt} ({total_prompt - total_computed:.0f} saved, "
        f"{(total_prompt - total_computed) / total_prompt:.1%})")


def run():
  _app.run(main, __name__)


if __name__ == "__main__":
  run()
