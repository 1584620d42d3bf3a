"""Generates text for a few prompts and reports tokens/s.

  python scripts/generate.py --prompt "The capital of France is"
  python scripts/generate.py --chat "What is the capital of France?" --temperature 0
  python scripts/generate.py --input examples/prompts.jsonl --max_tokens 64

With no --checkpoint or --model, the default model is used (converted once into
--cache_dir).
"""

import json
import sys
import time

from absl import app, flags

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import flags_common  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402

flags.DEFINE_multi_string("prompt", [], "A plain-text prompt (repeatable).")
flags.DEFINE_multi_string("chat", [], "A user message, sent through the chat template (repeatable).")
flags.DEFINE_string("input", None, "A JSONL file of {'prompt': ...} or {'messages': [...]} lines.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "0 = off.")
flags.DEFINE_float("top_p", 1.0, "1 = off.")
flags.DEFINE_integer("seed", None, "Sampling seed.")
flags.DEFINE_integer("max_tokens", 64, "Most new tokens per prompt.")
flags.DEFINE_integer("repeat", 1, "Run the whole generation this many times (the first "
                     "run includes compilation).")
flags.DEFINE_bool("show_token_ids", False, "Also print each completion's token ids.")
flags.DEFINE_bool("memory_report", False, "Only print the per-device memory of weights and KV "
                  "pages for --model/--checkpoint on --mesh, without loading any weights.")
flags.DEFINE_float("device_memory_gib", None, "Memory of one device for the memory report "
                   "(default: what the runtime reports; 80 for an H100).")
FLAGS = flags.FLAGS


def _prompts():
  prompts = list(FLAGS.prompt) + [[{"role": "user", "content": c}] for c in FLAGS.chat]
  if FLAGS.input:
    with open(FLAGS.input) as f:
      for line in f:
        if line.strip():
          row = json.loads(line)
          body = row.get("body", row)
          prompts.append(body.get("messages") or body.get("prompt"))
  return prompts or ["What is the capital of France?"]


def _memory_report(config, mesh, num_pages=None):
  """Per-device weights and KV pages (model/sharding.py), against the device's memory."""
  import jax
  from model import sharding
  device_bytes = (None if FLAGS.device_memory_gib is None
                  else int(FLAGS.device_memory_gib * 2**30))
  if device_bytes is None and not FLAGS.memory_report:
    stats = jax.local_devices()[0].memory_stats() or {}
    device_bytes = stats.get("bytes_limit")
  return sharding.memory_report(
      config, mesh if mesh is not None else sharding.MeshShape(), page_size=FLAGS.page_size,
      device_bytes=device_bytes, memory_fraction=FLAGS.memory_fraction, num_pages=num_pages,
      max_model_len=FLAGS.max_model_len, kv_dtype=FLAGS.kv_cache_dtype)


def main(argv):
  del argv
  if FLAGS.memory_report:  # shapes only: no devices, no weights
    from model import sharding
    print("memory: " + _memory_report(flags_common.model_config(),
                                      sharding.MeshShape.parse(FLAGS.mesh)).summary())
    return
  t0 = time.perf_counter()
  engine = flags_common.load_engine()
  print(f"loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
  print("memory: " + _memory_report(engine.model_config, engine.runner.mesh,
                                    engine.runner.num_pages).summary(), file=sys.stderr)
  params = SamplingParams(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                          seed=FLAGS.seed, max_tokens=FLAGS.max_tokens)
  prompts = _prompts()
  for run in range(FLAGS.repeat):
    t0 = time.perf_counter()
    outputs = engine.generate(prompts, params)
    wall = time.perf_counter() - t0
    if run == 0:
      for prompt, out in zip(prompts, outputs):
        shown = prompt if isinstance(prompt, str) else prompt[-1]["content"] if isinstance(
            prompt[0], dict) else prompt
        print(f"### {shown!r}")
        print(out.text if out.error is None else f"[error] {out.error}")
        if FLAGS.show_token_ids:
          print(f"token_ids: {out.token_ids}")
        print(f"[{len(out.token_ids)} tokens, {out.finish_reason}]\n")
    n_out = sum(len(o.token_ids) for o in outputs)
    print(f"run {run + 1}: {len(prompts)} prompts, {n_out} tokens in {wall:.2f} s = "
          f"{n_out / wall:.1f} tokens/s" + (" (includes compilation)" if run == 0 else ""))


if __name__ == "__main__":
  app.run(main)
