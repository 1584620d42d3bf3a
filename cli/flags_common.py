"""Flags shared by the scripts: where the model comes from and how the engine is shaped.

Scripts parse flags and pass plain values to the library; nothing below the
scripts reads flags or the environment.
"""

from __future__ import annotations

from absl import flags
from absl import logging

from ridgeline.engine.config import EngineConfig
from ridgeline.model import default_model
from ridgeline.cli import _app  # noqa: F401 (--verbose)

flags.DEFINE_string("checkpoint", None,
                    "Orbax checkpoint directory, .gguf file or Hugging Face directory. "
                    "Default: the default model (SmolLM2-135M-Instruct).")
flags.DEFINE_string("model", None, "A preset from configs/models.py, with random weights.")
flags.DEFINE_string("cache_dir", default_model.DEFAULT_CACHE_DIR,
                    "Where the default model is converted to once, and (in "
                    f"{default_model.COMPILATION_CACHE_SUBDIR}/) compiled steps are kept.")
flags.DEFINE_string("dtype", None, "Weight and compute dtype (default: the checkpoint's).")
flags.DEFINE_enum("quantize", None, ["int8", "int4", "fp8"],
                  "Quantize the per-layer projections at load (model/quant.py): int8 or int4 "
                  "weight-only, fp8 (e4m3; W8A8 on GPUs with fp8 matrix units).")
flags.DEFINE_string("kv_cache_dtype", None,
                    "KV cache dtype: a float dtype, or int8 / fp8 for an 8-bit cache with "
                    "per (token, head) scales (about 2x the tokens of bf16). Default: the "
                    "compute dtype.")
flags.DEFINE_integer("page_size", 16, "Tokens per KV-cache page.")
flags.DEFINE_integer("num_pages", None, "KV-cache pages (default: from --kv_cache_mb).")
flags.DEFINE_integer("kv_cache_mb", 512, "KV-cache budget in MiB on a CPU when --num_pages is "
                     "unset (accelerators use --memory_fraction of their memory).")
flags.DEFINE_float("memory_fraction", 0.9, "Fraction of accelerator memory for weights + KV cache.")
flags.DEFINE_integer("max_batch", None, "Most sequences in one decode step (default: sized "
                     "to the device's ridge point, bounded by the KV pool: hundreds of rows "
                     "on an H100/H200, 64 on a CPU).")
flags.DEFINE_integer("max_model_len", None, "Most tokens (prompt + output) per sequence "
                     "(default: the model's max_position_embeddings, capped by what the "
                     "KV cache holds).")
flags.DEFINE_float("host_kv_cache_gb", None, "A host-memory tier under the device's KV "
                   "cache of this many GiB: evicted prefix pages are kept there and copied "
                   "back on a later hit (engine/kv_host.py). Default: none.")
flags.DEFINE_enum("host_kv_policy", "price", ["price", "copy", "recompute"],
                  "A host-tier hit: copy back or recompute, whichever the roofline prices "
                  "cheaper (price), or always one of them.")
flags.DEFINE_integer("batch_rows", None, "Batch work (priority > 0: Batch API lines) starts "
                     "only while fewer sequences than this run: the rows past which every "
                     "step slows down. Default: --max_batch.")
flags.DEFINE_integer("prefill_chunk", 512, "Most prompt tokens per sequence per step.")
flags.DEFINE_integer("max_prefill_batch", 8, "Most sequences prefilled in one step.")
flags.DEFINE_enum("precompile", "background", ["all", "background", "none"],
                  "Step variants compiled at start-up: 'all' (in parallel, before any "
                  "request); 'background' (the two every step fits in, then each other "
                  "one the first time a step needs it, in a background thread, the step "
                  "running padded meanwhile); 'none' (each one when first needed, the "
                  "step waiting for it).")
flags.DEFINE_string("compilation_cache_dir", None,
                    "Persist compiled steps here (JAX's persistent compilation cache), so "
                    "a second run skips compiling. Default: --cache_dir/"
                    f"{default_model.COMPILATION_CACHE_SUBDIR}; 'none' turns it off.")
flags.DEFINE_string("mesh", None,
                    "Device mesh, e.g. 'data=2,model=4' (or '2x4'; -1 = the remaining "
                    "devices): weights and KV pages sharded over `model`; each `data` "
                    "replica runs the whole step (the batch is not split over `data`). "
                    "Default: one device (all devices, over `model`, when "
                    "--num_processes > 1).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for a multi-process (multi-host) run.")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")

FLAGS = flags.FLAGS


def define_http_flags(module_name: str, max_pending_help: str) -> None:
  """The HTTP flags of the two server commands (serve, serve_fleet), registered as
  the calling command's own, so its --help lists them there."""
  kw = {"module_name": module_name}
  flags.DEFINE_string("host", "127.0.0.1", "Address to bind. Without --api_key keep it local.",
                      **kw)
  flags.DEFINE_integer("port", 8000, "Port to listen on.", **kw)
  flags.DEFINE_string("api_key", None, "If set, /v1/* require 'Authorization: Bearer KEY'.",
                      **kw)
  flags.DEFINE_string("served_model_name", None, "Model name in /v1/models and requests "
                      "(default: the model config's name).", **kw)
  flags.DEFINE_integer("max_pending", None, max_pending_help, **kw)
  flags.DEFINE_integer("retry_after", 1, "Retry-After seconds sent with 429.", **kw)


def compilation_cache_dir() -> str | None:
  """The --compilation_cache_dir to use (None: off)."""
  value = FLAGS.compilation_cache_dir
  if value is None:
    return default_model.default_compilation_cache_dir(FLAGS.cache_dir)
  return None if value.strip().lower() in ("", "none", "off") else value


def enable_compilation_cache() -> str | None:
  from ridgeline.engine.runner import enable_compilation_cache as enable
  path = compilation_cache_dir()
  if path:
    enable(path)
  return path


def engine_config() -> EngineConfig:
  return EngineConfig(
      page_size=FLAGS.page_size, num_pages=FLAGS.num_pages,
      cpu_kv_cache_bytes=FLAGS.kv_cache_mb * 2**20, max_batch=FLAGS.max_batch,
      max_model_len=FLAGS.max_model_len, prefill_chunk=FLAGS.prefill_chunk,
      max_prefill_batch=FLAGS.max_prefill_batch, memory_fraction=FLAGS.memory_fraction,
      kv_dtype=FLAGS.kv_cache_dtype,
      host_kv_cache_bytes=(None if FLAGS.host_kv_cache_gb is None
                           else int(FLAGS.host_kv_cache_gb * 2**30)),
      host_kv_policy=FLAGS.host_kv_policy, batch_rows=FLAGS.batch_rows)


def init_distributed() -> None:
  """Joins the multi-process run the flags describe; call before any other JAX call.

  Every process then runs the same program over the global mesh. On CPUs the
  cross-process collectives go through gloo.
  """
  given = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
  if all(v is None for v in given):
    return
  if any(v is None for v in given):
    raise ValueError("a multi-process run needs all of --coordinator_address, "
                     "--num_processes and --process_id")
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def make_mesh():
  """The --mesh flag as a Mesh, or None for the plain one-device engine."""
  import jax
  from ridgeline.model import sharding
  if FLAGS.mesh is None:
    return sharding.make_mesh(sharding.MeshShape(1, -1)) if jax.process_count() > 1 else None
  return sharding.make_mesh(FLAGS.mesh)


def engine_spec(mesh=None):
  """The EngineSpec the flags describe (engine/build.py); `mesh`: the Mesh to build
  it on (make_mesh()), for the commands that take --mesh."""
  from ridgeline.engine.build import EngineSpec
  return EngineSpec(checkpoint=FLAGS.checkpoint, preset=FLAGS.model, cache_dir=FLAGS.cache_dir,
                    dtype=FLAGS.dtype, quantize=FLAGS.quantize, config=engine_config(),
                    compilation_cache_dir=compilation_cache_dir(), mesh=mesh)


def load_engine(precompile: str | None = None):
  """Builds the Engine the flags describe (joining a multi-process run first) and
  compiles its step variants as `precompile` (default: --precompile) says."""
  init_distributed()
  engine = engine_spec(mesh=make_mesh()).build()
  precompile = FLAGS.precompile if precompile is None else precompile
  if precompile != "none":
    seconds = engine.warmup(background=precompile == "background")
    logging.warning("compiled %d step variants in %.1f s%s", len(engine.runner.variants),
                    seconds, " (the others as steps need them, in the background)"
                    if precompile == "background" else "")
  return engine


def model_config():
  """The ModelConfig the flags name, without reading any weights (for reports)."""
  import os
  from ridgeline.configs import models
  from ridgeline.model import checkpoint
  if FLAGS.model:
    config = models.get(FLAGS.model)
  elif FLAGS.checkpoint and checkpoint.is_checkpoint(FLAGS.checkpoint):
    config = checkpoint.load_config(FLAGS.checkpoint)
  elif FLAGS.checkpoint:
    raise ValueError(f"--checkpoint {FLAGS.checkpoint}: a report without loading weights "
                     "needs an orbax checkpoint or --model; convert it first")
  else:
    cached = os.path.join(FLAGS.cache_dir, default_model.CHECKPOINT_NAME)
    config = (checkpoint.load_config(cached) if checkpoint.is_checkpoint(cached)
              else models.get("smollm2-135m"))  # the default model's shapes, float32
  if FLAGS.dtype:
    config = config.replace(param_dtype=FLAGS.dtype, compute_dtype=FLAGS.dtype)
  if FLAGS.quantize and not config.quantization:
    config = config.replace(quantization=FLAGS.quantize)
  return config
