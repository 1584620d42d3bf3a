"""An OpenAI-compatible server over one engine (FastAPI + uvicorn).

  ridgeline-serve                        # the default model on 127.0.0.1:8000
  ridgeline-serve --model tiny --port 8001
  ridgeline-serve --host 0.0.0.0 --api_key "$KEY"
  (or, from a source tree: python scripts/serve.py ...)

Endpoints: POST /v1/chat/completions, POST /v1/completions (streaming or not),
GET /v1/models, GET /health (200 once warmed up), GET /metrics (Prometheus).
"""

from absl import flags, logging

from ridgeline.cli import _app, flags_common

flags_common.define_http_flags(__name__, "Most requests in flight before HTTP 429 "
                               "(default: the engine's waiting-queue bound).")
flags.DEFINE_string("batch_dir", None, "Enables OpenAI's Batch API (/v1/files, /v1/batches): "
                    "uploaded files, batches and their journals live here; a server started "
                    "again over the same directory resumes its batches.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import uvicorn
  from ridgeline.frontends.server import create_app
  # Compiled on the engine thread (--precompile), before /health says ready.
  engine = flags_common.load_engine(precompile="none")
  logging.set_verbosity(logging.INFO)
  if FLAGS.api_key is None:
    if FLAGS.host not in ("127.0.0.1", "localhost", "::1"):
      logging.warning("serving on %s WITHOUT an API key: anyone who can reach it can use "
                      "it; pass --api_key", FLAGS.host)
    else:
      logging.info("no --api_key: serving on %s only (local clients); pass --api_key to "
                   "serve other hosts", FLAGS.host)
  application = create_app(engine, model_name=FLAGS.served_model_name, api_key=FLAGS.api_key,
                           max_pending=FLAGS.max_pending, retry_after_s=FLAGS.retry_after,
                           warmup=FLAGS.precompile, batch_dir=FLAGS.batch_dir)
  server = application.state.server
  logging.info("serving %s on http://%s:%d/v1 (max_model_len %d, max_batch %d, %d requests "
               "in flight before 429)", server.model_name, FLAGS.host, FLAGS.port,
               engine.config.max_model_len, engine.config.max_batch, server.max_pending)
  uvicorn.run(application, host=FLAGS.host, port=FLAGS.port, log_level="info")


def run():
  _app.run(main, __name__)


if __name__ == "__main__":
  run()
