"""What each quantization mode costs in accuracy and gives in bytes and speed.

  python scripts/quant_bench.py --out results/quant_cpu.json

On the default model (or --checkpoint), side by side in one run:
  - accuracy of int8 / int4 / fp8 weights against the float32 model: greedy
    agreement over --num_prompts x --max_tokens continuations, the mean
    log-prob gap per token, the max relative logit error, and perplexity on
    benchmarks/data/alice.txt (public domain: Lewis Carroll, 1865);
  - the 8-bit KV caches (int8, fp8) with float weights: greedy agreement;
  - weight and KV bytes (the memory report);
  - batch-1 decode tokens/s for float32 and int8 (and transformers on the same
    weights with --transformers), plus the compiled-HLO evidence of where a
    weight-only int8 matmul's bytes go on this backend (--hlo).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time

from absl import app, flags

from ridgeline.cli import flags_common  # noqa: E402,F401 (the shared model/engine flags)

flags.DEFINE_integer("num_prompts", 20, "Prompts for the greedy agreement.")
flags.DEFINE_integer("max_tokens", 32, "Tokens per continuation.")
flags.DEFINE_string("text", str(pathlib.Path(__file__).parent.parent / "benchmarks" / "data" /
                                "alice.txt"), "Text for perplexity.")
flags.DEFINE_integer("ppl_window", 256, "Perplexity window (tokens).")
flags.DEFINE_integer("speed_tokens", 64, "Decode tokens timed at batch 1.")
flags.DEFINE_bool("transformers", True, "Also time transformers (torch CPU) on the same GGUF.")
flags.DEFINE_bool("hlo", True, "Report the compiled HLO of one int8 weight-only matmul.")
flags.DEFINE_string("out", None, "Write the results here as JSON.")
flags.DEFINE_list("modes", ["int8", "int4", "fp8"], "Weight modes to measure.")
flags.DEFINE_list("kv_dtypes", ["int8", "fp8"], "KV cache dtypes to measure (empty: none).")
flags.DEFINE_bool("speed", True, "Measure batch-1 decode speed.")
flags.DEFINE_list("simulated_bits", [], "Also round the projections to symmetric blocks of "
                  "64 at these bit widths (kept float) and report greedy agreement: how "
                  "much accuracy agreement needs on this model.")
FLAGS = flags.FLAGS



def _decode_tok_s(model, tokenizer, n: int) -> float:
  """Batch-1 decode tokens/s: (time of n+1 tokens - time of 1 token) / n, after a
  warm-up of both (compilation excluded)."""
  from ridgeline.tools import quant_eval
  from ridgeline.engine.engine import Engine
  from ridgeline.engine.sampling import SamplingParams
  engine = Engine(model, tokenizer, quant_eval.engine_config(batch=1, max_len=256))
  prompt = "Tell me a story about a lighthouse keeper."

  def run(tokens):
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    t0 = time.perf_counter()
    engine.generate([prompt], params)
    return time.perf_counter() - t0

  run(n + 1), run(1)
  long = min(run(n + 1) for _ in range(2))
  short = min(run(1) for _ in range(2))
  return n / (long - short)


def _transformers_tok_s(tokenizer, n: int) -> float:
  """transformers' batch-1 decode tokens/s on the same GGUF, in its worker process
  (tools/bench/peer.py: in one process the two CPU thread pools compete)."""
  import numpy as np
  from ridgeline.tools.bench.peer import HFPeer, checkpoint_for_peer
  peer = HFPeer(checkpoint_for_peer(FLAGS.checkpoint), threads=os.cpu_count() or 1, repeats=2)
  try:
    ids = tokenizer.encode("Tell me a story about a lighthouse keeper.")
    return 1.0 / float(np.min(peer.decode_per_token([ids], n)))
  finally:
    peer.close()


def _symmetric_blocks(w, bits: int, block: int = 64):
  """`w` [in, out] rounded to `bits`-bit symmetric absmax blocks of `block` inputs
  (the rounding only: the result is float)."""
  import numpy as np
  w = np.asarray(w, np.float32)
  blocks = w.reshape(w.shape[0] // block, block, w.shape[1])
  scale = np.abs(blocks).max(axis=1, keepdims=True) / (2 ** (bits - 1) - 1)
  scale[scale == 0] = 1
  return (np.round(blocks / scale) * scale).reshape(w.shape)


def _gaussian_errors() -> dict:
  """rms relative weight error on Gaussian [1536, 576] weights (no grid): the
  affine blocks against symmetric blocks of the same bits."""
  import numpy as np
  from ridgeline.model import quant
  w = np.random.default_rng(0).standard_normal((1536, 576)).astype(np.float32)
  rms = lambda a: float(np.sqrt(np.mean((a - w) ** 2) / np.mean(w ** 2)))
  out = {m: rms(np.asarray(quant.dequantize(quant.quantize_weight(w, m)))) for m in quant.MODES}
  out["int8_symmetric_blocks_of_64"] = rms(_symmetric_blocks(w, 8, 64))
  out["int4_symmetric_blocks_of_32"] = rms(_symmetric_blocks(w, 4, 32))
  return out


def _hlo_evidence() -> dict:
  """One [1, 576] x [576, 1536] matmul (SmolLM2's gate) in float32 and int8
  weight-only: what XLA compiles it to, and how long each takes."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ridgeline.model import quant
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 1, 576)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((576, 1536)), jnp.float32)
  wq = quant.quantize_weight(w, "int8")
  f32 = jax.jit(lambda x, w: quant.einsum("btd,df->btf", x, w, jnp.float32))
  i8 = jax.jit(lambda x, w: quant.einsum("btd,df->btf", x, w, jnp.float32))
  out = {}
  for name, fn, weight in (("float32", f32, w), ("int8", i8, wq)):
    compiled = fn.lower(x, weight).compile()
    text = compiled.as_text()
    fn(x, weight).block_until_ready()
    times = []
    for _ in range(200):
      t0 = time.perf_counter()
      fn(x, weight).block_until_ready()
      times.append(time.perf_counter() - t0)
    ops = [line.strip() for line in text.splitlines()
           if ("fusion" in line or " dot(" in line or "custom-call" in line)
           and "=" in line and not line.strip().startswith("//")]
    out[name] = {"median_us": float(np.median(times)) * 1e6,
                 "ops": ops[:12]}
  return out


def main(argv):
  del argv
  import jax
  from ridgeline.tools import quant_eval
  from ridgeline.model import quant, sharding
  from ridgeline.model import transformer as transformer_lib
  from ridgeline.engine.loading import load_model

  t_start = time.perf_counter()
  model, tokenizer = load_model(FLAGS.checkpoint, FLAGS.model, FLAGS.cache_dir, FLAGS.dtype)
  prompts = list(quant_eval.PROMPTS[:FLAGS.num_prompts])
  prompt_ids = [tokenizer.encode(p) for p in prompts]
  text_ids = tokenizer.encode(pathlib.Path(FLAGS.text).read_text())
  results = {"command": " ".join(sys.argv), "model": model.config.name,
             "jax": jax.__version__, "device": jax.devices()[0].device_kind,
             "prompts": len(prompts), "max_tokens": FLAGS.max_tokens,
             "text": os.path.basename(FLAGS.text), "text_tokens": len(text_ids)}
  print(f"{len(prompts)} prompts x {FLAGS.max_tokens} tokens; {len(text_ids)} text tokens",
        flush=True)

  ref = quant_eval.greedy(model, tokenizer, prompts, FLAGS.max_tokens)
  float_params = transformer_lib.to_params(model)
  rows = [{"mode": "float32", "agreement": 1.0, "logprob_gap": 0.0, "max_logit_error": 0.0,
           "perplexity": quant_eval.perplexity(model, text_ids, FLAGS.ppl_window),
           "weight_bytes": sharding.memory_report(model.config, "model=1").weight_bytes}]
  print(rows[-1], flush=True)
  for mode in FLAGS.modes:
    config = model.config.replace(quantization=mode)
    qmodel = transformer_lib.from_params(config, quant.quantize_params(float_params, mode))
    out = quant_eval.greedy(qmodel, tokenizer, prompts, FLAGS.max_tokens)
    rows.append({
        "mode": mode, "agreement": quant_eval.agreement(ref, out),
        "logprob_gap": quant_eval.logprob_gap(model, qmodel, prompt_ids, ref),
        "max_logit_error": quant_eval.max_logit_error(model, qmodel, prompt_ids),
        "perplexity": quant_eval.perplexity(qmodel, text_ids, FLAGS.ppl_window),
        "weight_bytes": sharding.memory_report(config, "model=1").weight_bytes})
    print(rows[-1], flush=True)
    del qmodel
  results["weights"] = rows
  results["gaussian_weight_rms_error"] = _gaussian_errors()
  print(results["gaussian_weight_rms_error"], flush=True)

  simulated = []
  for bits in map(int, FLAGS.simulated_bits):
    params = dict(float_params, layers=[
        {n: (_symmetric_blocks(v, bits) if n in quant.QUANTIZED else v) for n, v in layer.items()}
        for layer in float_params["layers"]])
    out = quant_eval.greedy(transformer_lib.from_params(model.config, params), tokenizer,
                            prompts, FLAGS.max_tokens)
    simulated.append({"bits": bits, "agreement": quant_eval.agreement(ref, out)})
    print(simulated[-1], flush=True)
  results["simulated_symmetric_blocks_of_64"] = simulated

  kv_rows = []
  for kv in FLAGS.kv_dtypes:
    cfg = dataclasses.replace(quant_eval.engine_config(), kv_dtype=kv)
    out = quant_eval.greedy(model, tokenizer, prompts, FLAGS.max_tokens, cfg)
    same = dict(device_bytes=2**30, page_size=16)
    tokens = sharding.memory_report(model.config, "model=1", kv_dtype=kv, **same).kv_tokens
    kv_rows.append({
        "kv_dtype": kv, "agreement": quant_eval.agreement(ref, out),
        "tokens_per_GiB_vs_float32": tokens / sharding.memory_report(
            model.config, "model=1", **same).kv_tokens,
        "tokens_per_GiB_vs_bfloat16": tokens / sharding.memory_report(
            model.config, "model=1", kv_dtype="bfloat16", **same).kv_tokens})
    print(kv_rows[-1], flush=True)
  results["kv_cache"] = kv_rows

  if not FLAGS.speed:
    FLAGS.transformers = FLAGS.hlo = False
  speed = ({"float32": _decode_tok_s(model, tokenizer, FLAGS.speed_tokens)}
           if FLAGS.speed else {})
  int8 = transformer_lib.from_params(model.config.replace(quantization="int8"),
                                     quant.quantize_params(float_params, "int8"))
  if FLAGS.speed:
    speed["int8"] = _decode_tok_s(int8, tokenizer, FLAGS.speed_tokens)
  print(speed, flush=True)
  if FLAGS.transformers:
    speed["transformers_float32"] = _transformers_tok_s(tokenizer, FLAGS.speed_tokens)
    print(speed, flush=True)
  results["decode_tok_s_batch1"] = speed
  if FLAGS.hlo:
    results["int8_matmul_hlo"] = _hlo_evidence()
    print(json.dumps(results["int8_matmul_hlo"], indent=1), flush=True)
  results["seconds"] = time.perf_counter() - t_start
  if FLAGS.out:
    pathlib.Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(FLAGS.out).write_text(json.dumps(results, indent=1))
  print(json.dumps({k: v for k, v in results.items() if k != "int8_matmul_hlo"}, indent=1))


if __name__ == "__main__":
  app.run(main)
