"""Benchmarks and the roofline report (the library: tools/bench/).

  # decode steps at fixed batch sizes and contexts, beside transformers
  python scripts/benchmark.py --mode decode --batch_sizes 1,2,4,8,16,32,64 --contexts 128 \
      --compare hf --compare_batches 1,64
  # an offline workload (every request generates exactly its output length)
  python scripts/benchmark.py --mode throughput --workloads 128:128,sharegpt --num_requests 64
  # time to first token and per output token under Poisson arrivals
  python scripts/benchmark.py --mode latency --rates 0.5,1,2 --num_requests 16
  # the host's own cost of a step at 64/256/1,024 rows (the device's step stubbed
  # out), with and without text, beside the whole engine
  python scripts/benchmark.py --model tiny --mode host --host_tokenizer default
  # JSON validity with and without schema constraints, and their throughput cost
  python scripts/benchmark.py --mode structured --repeats 3
  # multi-turn conversations on a small KV pool, the host tier off / priced / forced
  python scripts/benchmark.py --mode conversation
  # a Batch API batch beside interactive Poisson traffic at half capacity (a server)
  python scripts/benchmark.py --mode batch_api --batch_lines 2000
  # draw a saved run's roofline figure again (no model, no device time)
  python scripts/benchmark.py --replot benchmarks/results/cpu_smollm2_fp32.json \
      --plot docs/roofline_cpu.png

Modes (comma-separated, run in one process on one engine; tools/bench/modes.py
says what each measures): host, scoring, structured, conversation, decode, throughput, latency,
prefill, ttft, kernels; and serve, batch_api, conversation_serve, which run against
server processes (tools/serve_bench.py, tools/bench/batch_api.py,
tools/bench/conversation_serve.py).

--compare hf runs Hugging Face transformers' `generate` (torch, the same weights,
prompts and lengths, greedy, --threads threads) in the same run and prints our/HF
ratios. Every timed figure is the median of repetitions after a warm-up, with its
spread ((max - min) / median). Results go to --output (JSON) and --plot (PNG: the
device's roof, the measured steps under it, and a caption saying how far each is
from its roof and why).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

from absl import app, flags

from ridgeline.tools.bench import modes as modes_lib
from ridgeline.tools.bench.common import Options
from ridgeline.cli import _app, flags_common

D = Options  # the defaults live in the library's Options
_list = lambda values: [str(v) for v in values]

flags.DEFINE_list("mode", ["decode"], "Comma-separated modes: "
                  f"{', '.join(modes_lib.MODES)}; serve, batch_api, conversation_serve "
                  "(server processes).")
flags.DEFINE_list("batch_sizes", _list(D.batch_sizes), "decode: batch sizes.")
flags.DEFINE_list("contexts", _list(D.contexts), "decode: context lengths (tokens already cached).")
flags.DEFINE_integer("steps", D.steps, "decode/prefill: timed steps per point (after --warmup).")
flags.DEFINE_integer("warmup", D.warmup, "Untimed runs before timing each point.")
flags.DEFINE_integer("repeats", D.repeats, "Repetitions of generate-level and workload timings.")
flags.DEFINE_integer("engine_tokens_limit", D.engine_tokens_limit,
                     "decode: also time whole engine steps at points whose batch x context "
                     "is at most this (their prompts must be prefilled first).")
flags.DEFINE_enum("compare", "none", ["none", "hf"], "Peer to run side by side.")
flags.DEFINE_list("compare_batches", _list(D.compare_batches),
                  "decode: batch sizes compared with the peer.")
flags.DEFINE_integer("compare_prompt_len", D.compare_prompt_len,
                     "decode comparison: prompt tokens.")
flags.DEFINE_integer("new_tokens", D.new_tokens, "decode comparison: tokens generated per request.")
flags.DEFINE_integer("threads", os.cpu_count(), "torch threads for the peer (XLA's CPU "
                     "client uses every core).")
flags.DEFINE_list("workloads", _list(D.workloads),
                  "throughput: IN:OUT token lengths, or 'sharegpt'.")
flags.DEFINE_integer("num_requests", D.num_requests, "throughput/latency: requests per run.")
flags.DEFINE_integer("warmup_requests", D.warmup_requests,
                     "throughput: requests in the warm-up run (default: --max_batch).")
flags.DEFINE_string("sharegpt_file", D.sharegpt_file, "throughput: (prompt, output) length pairs.")
flags.DEFINE_list("rates", [f"{r:g}" for r in D.rates], "latency: request rates (requests/s).")
flags.DEFINE_integer("latency_input", D.latency_input, "latency: prompt tokens per request.")
flags.DEFINE_integer("latency_output", D.latency_output, "latency: output tokens per request.")
flags.DEFINE_integer("prefill_tokens", D.prefill_tokens, "prefill: prompt tokens.")
flags.DEFINE_list("prefill_batch_shapes", [], "prefill: also time steps of BxT (B fresh "
                  "prompts of T tokens in one step), e.g. 512x128.")
flags.DEFINE_integer("ttft_prompt_len", D.ttft_prompt_len, "ttft: prompt tokens.")
flags.DEFINE_enum("attention", None, ["xla", "pallas_gpu", "auto"],
                  "Attention implementation (default: the model's, 'auto').")
flags.DEFINE_float("temperature", D.temperature, "Sampling temperature of every request "
                   "(0 = greedy).")
flags.DEFINE_integer("seed", D.seed, "Seed for the random prompts and arrivals.")
flags.DEFINE_string("output", "benchmark_results.json", "JSON results file.")
flags.DEFINE_string("plot", None, "Roofline PNG (default: --output, or --replot, with .png).")
flags.DEFINE_string("replot", None, "Only draw the roofline figure of this saved results "
                    "JSON (to --plot), then exit: no model, no benchmark.")
flags.DEFINE_string("label", "", "Free text stored with the results (e.g. the machine).")
flags.DEFINE_bool("calibrate", D.calibrate, "Measure copy bandwidth and a large matmul first "
                  "(always done for prefill and kernels).")
flags.DEFINE_bool("profile", D.profile, "decode/prefill: trace a few steps of each point "
                  "(jax.profiler) and print where the time goes, op by op.")
flags.DEFINE_bool("cprofile", D.cprofile, "decode: profile the host side of the engine steps "
                  "(cProfile) and print the top functions.")

FLAGS = flags.FLAGS


def _ints(name: str) -> tuple[int, ...]:
  try:
    values = tuple(int(v) for v in FLAGS[name].value)
  except ValueError:
    raise app.UsageError(f"--{name}: expected comma-separated integers, got "
                         f"{','.join(FLAGS[name].value)!r}") from None
  if not values or min(values) < 1:
    raise app.UsageError(f"--{name}: expected positive integers, got {values}")
  return values


def _shapes() -> tuple[tuple[int, int], ...]:
  shapes = []
  for shape in FLAGS.prefill_batch_shapes:
    try:
      rows, tokens = (int(x) for x in shape.split("x"))
    except ValueError:
      raise app.UsageError(f"--prefill_batch_shapes: {shape!r} is not BxT (e.g. 512x128)") from None
    shapes.append((rows, tokens))
  return tuple(shapes)


def _workload(text: str, flag: str = "--host_workload") -> tuple[int, int]:
  try:
    a, b = (int(x) for x in text.split(":"))
  except ValueError:
    raise app.UsageError(f"{flag}: {text!r} is not two numbers A:B (e.g. 128:128)") from None
  return a, b


def options() -> Options:
  try:
    rates = tuple(float(r) for r in FLAGS.rates)
  except ValueError:
    raise app.UsageError(f"--rates: expected numbers, got {','.join(FLAGS.rates)!r}") from None
  if not rates or min(rates) <= 0:
    raise app.UsageError("--rates: request rates must be positive")
  return Options(
      batch_sizes=_ints("batch_sizes"), contexts=_ints("contexts"), steps=FLAGS.steps,
      warmup=FLAGS.warmup, repeats=FLAGS.repeats, engine_tokens_limit=FLAGS.engine_tokens_limit,
      compare_batches=_ints("compare_batches"), compare_prompt_len=FLAGS.compare_prompt_len,
      new_tokens=FLAGS.new_tokens, workloads=tuple(FLAGS.workloads),
      num_requests=FLAGS.num_requests, warmup_requests=FLAGS.warmup_requests,
      sharegpt_file=FLAGS.sharegpt_file, rates=rates, latency_input=FLAGS.latency_input,
      latency_output=FLAGS.latency_output, prefill_tokens=FLAGS.prefill_tokens,
      prefill_batch_shapes=_shapes(), ttft_prompt_len=FLAGS.ttft_prompt_len,
      temperature=FLAGS.temperature, seed=FLAGS.seed, calibrate=FLAGS.calibrate,
      profile=FLAGS.profile, cprofile=FLAGS.cprofile, host_batches=_ints("host_batches"),
      host_workload=_workload(FLAGS.host_workload), host_tokenizer=FLAGS.host_tokenizer,
      host_engine=FLAGS.host_engine,
      scoring_prompts=_workload(FLAGS.scoring_prompts, "--scoring_prompts"),
      **{name: FLAGS[name].value for name in _NUMBER_FLAGS},
      compilation_cache_dir=flags_common.compilation_cache_dir())


flags.DEFINE_list("host_batches", _list(D.host_batches), "host: batch sizes (rows a step).")
flags.DEFINE_string("host_workload", ":".join(map(str, D.host_workload)),
                    "host: PROMPT:OUTPUT tokens of every request.")
flags.DEFINE_string("host_tokenizer", None, "host: also time the host with this tokenizer's "
                    "text (a .gguf, tokenizer.json or HF directory; 'default': the default "
                    "model's); the bench model's own tokenizer is used when it has one.")
flags.DEFINE_bool("host_engine", D.host_engine, "host: also time the whole engine.")
flags.DEFINE_string("scoring_prompts", ":".join(map(str, D.scoring_prompts)),
                    "scoring: PROMPTS:TOKENS, how many prompts of how many tokens.")
# Plain numeric options of the structured and conversation modes: name -> help
# (their defaults are Options').
_NUMBER_FLAGS = {
    "structured_schemas": "structured: how many of the 20 JSON schemas to ask for.",
    "structured_prompts": "structured: subjects per schema (at most 10).",
    "structured_batch": "structured: rows of the cost run (a quarter constrained).",
    "structured_tokens": "structured: output tokens per row of the cost run.",
    "structured_max_tokens": "structured: max_tokens of the validity runs.",
    "conversation_users": "conversation: users.",
    "conversation_turns": "conversation: turns each.",
    "conversation_prompt": "conversation: tokens of a user's first message.",
    "conversation_answer": "conversation: tokens of each answer.",
    "conversation_message": "conversation: tokens of each later message.",
    "conversation_pool": "conversation: the device KV pool as a share of the "
                         "conversations' KV.",
}
for _name, _help in _NUMBER_FLAGS.items():
  _default = getattr(D, _name)
  (flags.DEFINE_float if isinstance(_default, float) else flags.DEFINE_integer)(
      _name, _default, _help)
flags.DEFINE_string("url", None, "serve, batch_api: a running server to target (default: "
                    "start one).")
flags.DEFINE_integer("batch_lines", 2000, "batch_api: lines of the queued batch.")
flags.DEFINE_float("conversation_rate", 2.0, "conversation_serve: turns arriving per second.")
flags.DEFINE_float("conversation_host_gb", 2.0, "conversation_serve: the host tier's GiB.")


def run_serve() -> None:
  """`vllm bench serve`-style: starts the server (cli/serve.py) with the same
  model and engine flags (or targets --url) and streams Poisson arrivals at each
  --rates value over HTTP (tools/serve_bench.py)."""
  from ridgeline.tools import serve_bench
  cfg = serve_bench.ServeBenchConfig(
      url=FLAGS.url, rates=[float(r) for r in FLAGS.rates], num_requests=FLAGS.num_requests,
      input_len=FLAGS.latency_input, output_len=FLAGS.latency_output, seed=FLAGS.seed)
  serve_bench.main(cfg, _server_flags(), FLAGS.output, FLAGS.label)


def _server_flags() -> list[str]:
  """The model and engine flags given on this command line, for the server."""
  from ridgeline.tools import serve_bench
  return [f"--{n}={FLAGS[n].value}" for n in serve_bench.SERVER_FLAGS if FLAGS[n].present]


def _start_server(extra: list[str], name: str):
  """A server process (cli/serve.py) with this command line's flags and `extra`,
  its log beside --output as NAME.server.log; a context manager yielding its URL."""
  from ridgeline.tools import serve_bench
  command, env = serve_bench.server_command()
  cmd = [*command, *_server_flags(), *extra]
  log = str(pathlib.Path(FLAGS.output).with_suffix(f".{name}.server.log"))
  print(f"starting the server: {' '.join(cmd)} (log: {log})", flush=True)
  return serve_bench.start_server(cmd, log_path=log, env=env)


def _write_results(key: str, res: dict) -> None:
  out = pathlib.Path(FLAGS.output)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({key: res, "command": sys.argv, "label": FLAGS.label}, indent=1,
                            default=float))
  print(f"\nresults: {out}")


def run_batch_api() -> None:
  """Interactive Poisson traffic at half the server's capacity, with and without a
  queued Batch API batch, and the batch alone (tools/bench/batch_api.py); starts
  the server with --batch_dir in a temporary directory unless --url is given."""
  import contextlib
  import tempfile
  from ridgeline.tools.bench import batch_api
  with contextlib.ExitStack() as stack:
    url = FLAGS.url
    if not url:
      root = stack.enter_context(tempfile.TemporaryDirectory(prefix="ridgeline-batches-"))
      url = stack.enter_context(_start_server([f"--batch_dir={root}"], "batch_api"))
    res = batch_api.run(batch_api.BatchApiBenchConfig(
        url=url, batch_lines=FLAGS.batch_lines, num_requests=FLAGS.num_requests,
        input_len=FLAGS.latency_input, output_len=FLAGS.latency_output, seed=FLAGS.seed))
  print(batch_api.format_table(res))
  _write_results("batch_api", res)


def run_conversation_serve() -> None:
  """The conversation workload as chat completions over HTTP at a rate, one server
  per host-tier policy (tools/bench/conversation_serve.py)."""
  from ridgeline.tools.bench import conversation_serve as cs
  cfg = cs.ConversationServeConfig(
      users=FLAGS.conversation_users, turns=FLAGS.conversation_turns,
      prompt=FLAGS.conversation_prompt, answer=FLAGS.conversation_answer,
      message=FLAGS.conversation_message, rate=FLAGS.conversation_rate,
      pool=FLAGS.conversation_pool, page_size=FLAGS.page_size, seed=FLAGS.seed)
  res = cs.run(cfg, _start_server, FLAGS.conversation_host_gb)
  print(cs.format_table(res))
  _write_results("conversation_serve", res)


def main(argv):
  del argv
  if FLAGS.replot:
    from ridgeline.tools.bench import plots
    try:
      print(f"roofline plot: {plots.replot(FLAGS.replot, FLAGS.plot)}")
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    return
  modes = [m.strip() for m in FLAGS.mode]
  if "serve" in modes:  # its engine runs in the server process, not in this one
    run_serve()
  if "batch_api" in modes:  # the same
    run_batch_api()
  if "conversation_serve" in modes:  # the same, one server per policy
    run_conversation_serve()
  modes = [m for m in modes if m not in ("serve", "batch_api", "conversation_serve")]
  if not modes:
    return
  try:
    modes = modes_lib.check_modes(modes)
  except ValueError as e:
    raise app.UsageError(f"--mode: {e} (or serve, batch_api, conversation_serve)") from None
  opts = options()
  peer = None
  if FLAGS.compare == "hf":
    from ridgeline.tools.bench import peer as peer_lib
    try:
      path = peer_lib.checkpoint_for_peer(FLAGS.checkpoint)
    except ValueError as e:
      raise app.UsageError(f"--compare hf: {e}") from None
  from ridgeline.engine.loading import load_model
  flags_common.enable_compilation_cache()
  t0 = time.perf_counter()
  model, tokenizer = load_model(FLAGS.checkpoint, FLAGS.model, FLAGS.cache_dir, FLAGS.dtype,
                                quantize=FLAGS.quantize)
  load_s = time.perf_counter() - t0
  if FLAGS.compare == "hf":
    peer = peer_lib.HFPeer(path, FLAGS.threads, FLAGS.repeats)
  try:
    modes_lib.run(modes, opts, model, tokenizer, flags_common.engine_config(),
                  output=FLAGS.output, plot=FLAGS.plot, peer=peer, attention=FLAGS.attention,
                  load_seconds=load_s, label=FLAGS.label,
                  command=" ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]))
  finally:
    if peer is not None:
      peer.close()


def run():
  _app.run(main, __name__)


if __name__ == "__main__":
  run()
