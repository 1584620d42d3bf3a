"""Batch generation: a JSONL file of prompts in, a JSONL file of completions out.

  ridgeline-batch --input examples/prompts.jsonl --output out.jsonl
  ridgeline-batch --input in.jsonl --output out.jsonl \\
      --temperature 0.7 --top_p 0.95 --max_tokens 512 --seed 1 --max_batch 128
  (or, from a source tree: python scripts/batch_generate.py ...)

Each input line: {"id": ..., "prompt": "text" | [token ids]} or {"id": ..., "messages":
[...]}, optionally "sampling": {SamplingParams fields}; or an OpenAI batch-file line
({"custom_id": ..., "body": {"messages": [...], "max_tokens": ...}}). The job resumes
where it stopped when rerun with the same flags. One job at a time writes an
output (a lock, OUTPUT.lock, taken before anything is touched, --overwrite included).
--metrics_port serves the engine's Prometheus metrics while the job runs.

Two ways to use several processes:
- independent engines: run the job once per process with --process_count N and
  --process_index 0..N-1; each takes every N-th line (grain sharding) and writes
  OUTPUT.part-0000i-of-0000N, and the last one to finish merges the parts into OUTPUT
  (or run again with --merge --process_count N).
- one engine over several processes (--coordinator_address, --num_processes,
  --process_id; the mesh spans them): the processes run in lockstep, every one reads
  the whole input, and process 0 writes OUTPUT.

And one over many engines: --ray runs the job on a fleet of Ray actors
(frontends/fleet/), one engine per GPU (or per --ray_worker_cpus CPUs), requests routed by
prefix affinity then load, output committed block by block under OUTPUT.blocks/.
A local Ray instance by default; --ray_address joins a cluster (see docs/ray.md):

  python scripts/batch_generate.py --ray --input in.jsonl --output out.jsonl
  python scripts/batch_generate.py --ray --ray_address head:6379 --input in.parquet ...

Exit status: 0 when every line produced a completion, else the number of error
lines (capped at 125).
"""

import sys
import time

from absl import app, flags

from ridgeline.frontends import batch
from ridgeline.cli import _app, flags_common

flags.DEFINE_string("input", None, "Input JSONL file.", required=True)
flags.DEFINE_string("output", None, "Output JSONL file (resumed if it exists).", required=True)
# Default sampling for every line; a line's "sampling" object overrides these.
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "0 = off.")
flags.DEFINE_float("top_p", 1.0, "1 = off.")
flags.DEFINE_float("min_p", 0.0, "0 = off.")
flags.DEFINE_float("repetition_penalty", 1.0, "1 = off.")
flags.DEFINE_integer("max_tokens", 256, "Most new tokens per completion.")
flags.DEFINE_integer("n", 1, "Completions per prompt.")
flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")
flags.DEFINE_integer("logprobs", None, "Record the log-probability of each sampled token "
                     "and of this many top tokens.")
flags.DEFINE_integer("seed", 0, "Job seed: a line without its own seed gets one derived "
                     "from this and its id.")
# The job.
flags.DEFINE_integer("process_index", 0, "This process's shard of the input, for "
                     "independent processes (each with its own engine).")
flags.DEFINE_integer("process_count", 1, "Number of shards (independent processes).")
flags.DEFINE_bool("merge", False, "Only merge the parts of a finished multi-process job "
                  "into --output (needs --process_count); loads no model.")
flags.DEFINE_bool("auto_merge", True, "Merge the parts when the last one completes.")
flags.DEFINE_integer("max_in_flight", 0, "Most requests in the engine at once "
                     "(0: 4 x --max_batch).")
flags.DEFINE_bool("token_ids", True, "Write the generated token ids too.")
flags.DEFINE_bool("fsync", True, "fsync the output after each finished line (off: faster "
                  "on slow disks; an OS crash or power loss may then lose lines the OS had not "
                  "written, which a rerun recomputes).")
flags.DEFINE_bool("overwrite", False, "Delete an existing output (and its summary; process 0 "
                  "also the merged output) first, once this job holds the output's lock.")
flags.DEFINE_integer("metrics_port", None, "Serve the engine's Prometheus metrics at "
                     "http://METRICS_ADDR:PORT/metrics while the job runs (0: any free port).")
flags.DEFINE_string("metrics_addr", "127.0.0.1", "Address for --metrics_port (0.0.0.0 "
                    "exposes it to the network).")
flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")
flags.DEFINE_integer("show", 0, "Print this many completions at the end.")
# On Ray (frontends/fleet/).
flags.DEFINE_bool("ray", False, "Run on a fleet of engines on Ray.")
flags.DEFINE_string("ray_address", None, "Join this Ray cluster (host:port, or 'auto'); "
                    "default: start a local Ray instance.")
flags.DEFINE_integer("ray_num_cpus", None, "CPUs of the local Ray instance (default: all).")
flags.DEFINE_integer("ray_workers", 0, "Engines (0: one per GPU, or per --ray_worker_cpus "
                     "CPUs without GPUs).")
flags.DEFINE_float("ray_worker_cpus", 1, "CPUs each engine actor reserves.")
flags.DEFINE_float("ray_worker_gpus", None, "GPUs each engine actor reserves (default: 1 "
                   "when the cluster has GPUs, else 0).")
flags.DEFINE_bool("ray_ship_code", True, "Workers run this process's Ridgeline code: "
                  "from its directory locally, uploaded (py_modules) to a cluster. Turn off "
                  "when the nodes have the package installed.")
flags.DEFINE_integer("ray_max_restarts", -1, "Restarts of a dead engine actor (-1: no limit).")
flags.DEFINE_enum("routing", "prefix_affinity", ["prefix_affinity", "round_robin"],
                  "How requests are spread over the engines.")
flags.DEFINE_integer("block_size", 64, "Input lines per committed output block (--ray).")
flags.DEFINE_enum("input_format", None, ["jsonl", "parquet"],
                  "Default: parquet for a .parquet file or a directory, else jsonl.")
FLAGS = flags.FLAGS


def _run_on_ray() -> int:
  import shutil
  from ridgeline.frontends import fleet as fleet_lib
  if FLAGS.process_count > 1 or FLAGS.coordinator_address or FLAGS.mesh:
    raise app.UsageError("--ray runs one engine per actor on one device each; it does not "
                         "combine with --process_count, --coordinator_address or --mesh")
  # The output's lock first, as the single-process job takes it (never both at once).
  lock = batch.JobLock(FLAGS.output)
  try:
    if FLAGS.overwrite:
      lock.remove_outputs()
      shutil.rmtree(fleet_lib.block_dir(FLAGS.output), ignore_errors=True)
    return _fleet_job(fleet_lib)
  finally:
    lock.release()


def _fleet_job(fleet_lib) -> int:
  t0 = time.perf_counter()
  # The job's runtime_env: Ray uploads py_modules only at this level.
  runtime_env = (fleet_lib.code_runtime_env(ship=bool(FLAGS.ray_address))
                 if FLAGS.ray_ship_code else None)
  resources = fleet_lib.init_ray(FLAGS.ray_address, FLAGS.ray_num_cpus,
                                 log_to_driver=False, runtime_env=runtime_env)
  ray_s = time.perf_counter() - t0
  # The default model is converted once here, not in every actor.
  spec = flags_common.engine_spec().with_default_checkpoint()
  fleet = fleet_lib.Fleet(spec, num_workers=FLAGS.ray_workers or None,
                          num_gpus=FLAGS.ray_worker_gpus, num_cpus=FLAGS.ray_worker_cpus,
                          max_restarts=FLAGS.ray_max_restarts,
                          token_ids=FLAGS.token_ids)
  load_s = time.perf_counter() - t0 - ray_s
  shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU")}
  print(f"Ray up in {ray_s:.1f} s ({shown}); {len(fleet)} engines built in "
        f"{load_s:.1f} s; committing blocks under {fleet_lib.block_dir(FLAGS.output)}",
        file=sys.stderr)
  job = fleet_lib.FleetJob(
      input=FLAGS.input, output=FLAGS.output, default_sampling=_default_sampling(),
      seed=FLAGS.seed, block_size=FLAGS.block_size,
      max_in_flight=FLAGS.max_in_flight or None, input_format=FLAGS.input_format,
      progress=FLAGS.progress, fsync=FLAGS.fsync)
  summary = fleet_lib.run_job(fleet, job, fleet_lib.make_router(FLAGS.routing))
  summary["run"]["ray_init_s"] = round(ray_s, 3)
  summary["run"]["load_time_s"] = round(load_s, 3)
  if FLAGS.show:
    _show(FLAGS.output, FLAGS.show)
  print(batch.format_summary(summary))
  run = summary["run"]
  print(f"fleet         {run['workers']} engines, {run['routing']}, requests per engine "
        f"{run['requests_per_worker']}, restarts {run['worker_restarts']}")
  print(f"summary: {batch.summary_path(FLAGS.output)}")
  return min(summary["errors"], 125)


def _default_sampling() -> dict:
  d = dict(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
           min_p=FLAGS.min_p, repetition_penalty=FLAGS.repetition_penalty,
           max_tokens=FLAGS.max_tokens, n=FLAGS.n)
  if FLAGS.stop:
    d["stop"] = list(FLAGS.stop)
  if FLAGS.logprobs is not None:
    d["logprobs"] = FLAGS.logprobs
  return d


def _show(path: str, k: int) -> None:
  for r in batch.read_records(path)[:k]:
    view = batch.record_view(r)  # an OpenAI batch record keeps its answer in `response`
    print(f"### {view['id']} (line {view['line']})")
    if r.get("error"):
      print(f"[error] {r['error']}\n")
      continue
    text = r.get("text")
    if text is None:
      choice = r["response"]["body"]["choices"][0]
      text = choice["message"]["content"] if "message" in choice else choice["text"]
    print(text if len(text) <= 600 else text[:600] + " [...]")
    ttft = (view.get("metrics") or {}).get("ttft_s")
    print(f"[{view['completion_tokens']} tokens, {view['finish_reason']}"
          + (f", ttft {ttft * 1e3:.0f} ms" if ttft is not None else "") + "]\n")


def main(argv):
  del argv
  if FLAGS.ray:
    return _run_on_ray()
  if FLAGS.merge:
    if not FLAGS.process_count:
      raise app.UsageError("--merge needs --process_count")
    summary = batch.merge_parts(FLAGS.output, FLAGS.process_count)
    if FLAGS.show:
      _show(FLAGS.output, FLAGS.show)
    print(batch.format_summary(summary))
    return min(summary["errors"], 125)

  index, count = FLAGS.process_index, FLAGS.process_count
  lock = None
  if FLAGS.coordinator_address is None:
    # Take the output's lock before the minutes of loading a model: a second job
    # on this output stops at once, having touched nothing.
    lock = batch.JobLock(batch.BatchJob("", FLAGS.output, process_index=index,
                                        process_count=count).path)
  try:
    return _run(lock)
  finally:
    if lock is not None:
      lock.release()


def _run(lock):
  t0 = time.perf_counter()
  engine = flags_common.load_engine()
  load_time = time.perf_counter() - t0
  import jax
  lockstep = jax.process_count() > 1  # one engine over all the processes
  index, count = FLAGS.process_index, FLAGS.process_count
  if lockstep and count > 1:
    raise app.UsageError("--process_count shards the input over independent engines; with "
                         "--coordinator_address the processes already form one engine")
  leader = not lockstep or jax.process_index() == 0
  if FLAGS.metrics_port is not None and leader:
    server = engine.metrics.serve(FLAGS.metrics_port, FLAGS.metrics_addr)
    print(f"metrics: http://{FLAGS.metrics_addr}:{server.server_port}/metrics",
          file=sys.stderr, flush=True)
  job = batch.BatchJob(
      input=FLAGS.input, output=FLAGS.output, default_sampling=_default_sampling(),
      seed=FLAGS.seed, process_index=index, process_count=count,
      max_in_flight=FLAGS.max_in_flight or None, token_ids=FLAGS.token_ids,
      fsync=FLAGS.fsync, progress=FLAGS.progress, auto_merge=FLAGS.auto_merge,
      lockstep=lockstep, overwrite=FLAGS.overwrite)
  print(f"loaded in {load_time:.1f} s; " + (f"writing {job.path}" if leader else
        f"process {jax.process_index()} runs in lockstep; process 0 writes {job.path}"),
        file=sys.stderr)
  summary = batch.run_batch(engine, job, load_time_s=load_time, lock=lock)
  if not leader:
    return 0
  final = summary.get("merged", summary if count == 1 else None)
  if final is None:
    print(f"part {index} of {count} complete ({summary['requests']} lines); the last part "
          f"to finish merges, or run with --merge --process_count {count}", file=sys.stderr)
    final = summary
  if FLAGS.show:
    _show(final["output"], FLAGS.show)
  print(batch.format_summary(final))
  print(f"summary: {batch.summary_path(final['output'])}")
  if final["errors"]:
    print(f"{final['errors']} of {final['requests']} lines failed "
          f"(see the 'error' field in {final['output']})", file=sys.stderr)
  return min(final["errors"], 125)


def run():
  _app.run(main, __name__)


if __name__ == "__main__":
  run()
