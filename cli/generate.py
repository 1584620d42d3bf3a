"""Generates text for a few prompts and reports tokens/s.

  ridgeline-generate --prompt "The capital of France is"
  ridgeline-generate --chat "What is the capital of France?" --temperature 0
  ridgeline-generate --input examples/prompts.jsonl --max_tokens 64
  (or, from a source tree: python scripts/generate.py ...)

Give at least one --prompt, --chat or --input. --input is JSONL, one object per
line: {"prompt": "text" | [token ids]} or {"messages": [{"role": "user", "content":
"..."}]}, optionally with "sampling": {...} (SamplingParams fields, overriding the
flags for that line), or an OpenAI batch-file line. With no --checkpoint or
--model, the default model is used (converted once into --cache_dir).
"""

import sys
import time

from absl import app, flags

from ridgeline.frontends import batch
from ridgeline.engine.sampling import SamplingParams
from ridgeline.cli import _app, flags_common

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


def _prompts() -> tuple[list, list[SamplingParams]]:
  """(prompts, their SamplingParams): the flags' prompts, then --input's lines."""
  default = dict(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                 max_tokens=FLAGS.max_tokens)
  if FLAGS.seed is not None:
    default["seed"] = FLAGS.seed
  params = SamplingParams(**default)
  prompts = list(FLAGS.prompt) + [[{"role": "user", "content": c}] for c in FLAGS.chat]
  all_params = [params] * len(prompts)
  if FLAGS.input:
    # The batch job's parser: the same formats, per-line "sampling" honoured.
    with open(FLAGS.input, "rb") as f:
      for number, raw in enumerate(f, 1):
        if not raw.strip():
          continue
        item = batch.parse_line(number, raw, default, seed=FLAGS.seed or 0)
        if item.error is not None:
          raise ValueError(f"{FLAGS.input} {item.error}")
        prompts.append(item.prompt)
        all_params.append(item.params)
  if not prompts:
    raise app.UsageError("no prompt: give --prompt TEXT, --chat MESSAGE or --input FILE.jsonl")
  return prompts, all_params


def _memory_report(config, mesh, num_pages=None):
  """Per-device weights and KV pages (model/sharding.py), against the device's memory."""
  import jax
  from ridgeline.model import sharding
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
    from ridgeline.model import sharding
    print("memory: " + _memory_report(flags_common.model_config(),
                                      sharding.MeshShape.parse(FLAGS.mesh)).summary())
    return
  prompts, params = _prompts()  # before loading: a bad input fails at once
  t0 = time.perf_counter()
  engine = flags_common.load_engine()
  print(f"loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
  print("memory: " + _memory_report(engine.model_config, engine.runner.mesh,
                                    engine.runner.num_pages).summary(), file=sys.stderr)
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


def run():
  _app.run(main, __name__)


if __name__ == "__main__":
  run()
