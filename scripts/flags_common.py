"""Flags shared by the scripts: where the model comes from and how the engine is shaped.

Scripts parse flags and pass plain values to the library; nothing below the
scripts reads flags or the environment.
"""

from __future__ import annotations

import os

from absl import flags
from absl import logging

from engine.config import EngineConfig

flags.DEFINE_string("checkpoint", None,
                    "Orbax checkpoint directory, .gguf file or Hugging Face directory. "
                    "Default: the default model (SmolLM2-135M-Instruct).")
flags.DEFINE_string("model", None, "A preset from configs/models.py, with random weights.")
flags.DEFINE_string("cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "ridgeline"),
                    "Where the default model is converted to once.")
flags.DEFINE_string("dtype", None, "Weight and compute dtype (default: the checkpoint's).")
flags.DEFINE_integer("page_size", 16, "Tokens per KV-cache page.")
flags.DEFINE_integer("num_pages", None, "KV-cache pages (default: from --kv_cache_mb).")
flags.DEFINE_integer("kv_cache_mb", 512, "KV-cache budget in MiB when --num_pages is unset.")
flags.DEFINE_integer("max_batch", 64, "Most sequences in one decode step.")
flags.DEFINE_integer("max_model_len", 2048, "Most tokens (prompt + output) per sequence.")
flags.DEFINE_integer("prefill_chunk", 512, "Most prompt tokens per sequence per step.")
flags.DEFINE_integer("max_prefill_batch", 8, "Most sequences prefilled in one step.")
flags.DEFINE_string("compilation_cache_dir", None,
                    "Persist compiled steps here (JAX's persistent compilation cache).")

FLAGS = flags.FLAGS


def engine_config() -> EngineConfig:
  return EngineConfig(
      page_size=FLAGS.page_size, num_pages=FLAGS.num_pages,
      kv_cache_bytes=FLAGS.kv_cache_mb * 2**20, max_batch=FLAGS.max_batch,
      max_model_len=FLAGS.max_model_len, prefill_chunk=FLAGS.prefill_chunk,
      max_prefill_batch=FLAGS.max_prefill_batch)


def load_engine():
  """Builds the Engine the flags describe."""
  from engine.engine import Engine
  from engine.runner import enable_compilation_cache
  from model.loading import load_model
  logging.set_verbosity(logging.WARNING)  # orbax logs every read at INFO
  if FLAGS.compilation_cache_dir:
    enable_compilation_cache(FLAGS.compilation_cache_dir)
  model, tokenizer = load_model(FLAGS.checkpoint, FLAGS.model, FLAGS.cache_dir, FLAGS.dtype)
  return Engine(model, tokenizer, engine_config())
