"""An OpenAI-compatible server over one engine (FastAPI + uvicorn).

  python scripts/serve.py                        # the default model on 127.0.0.1:8000
  python scripts/serve.py --model tiny --port 8001
  python scripts/serve.py --host 0.0.0.0 --api_key "$KEY"

Endpoints: POST /v1/chat/completions, POST /v1/completions (streaming or not),
GET /v1/models, GET /health (200 once warmed up), GET /metrics (Prometheus).
"""

import sys

from absl import app, flags, logging

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import flags_common  # noqa: E402

flags.DEFINE_string("host", "127.0.0.1", "Address to bind. Without --api_key keep it local.")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_string("api_key", None, "If set, /v1/* require 'Authorization: Bearer KEY'.")
flags.DEFINE_string("served_model_name", None, "Model name in /v1/models and requests "
                    "(default: the model config's name).")
flags.DEFINE_integer("max_pending", None, "Most requests in flight before HTTP 429 "
                     "(default: the engine's waiting-queue bound).")
flags.DEFINE_integer("retry_after", 1, "Retry-After seconds sent with 429.")
flags.DEFINE_bool("warmup", True, "Compile before /health reports ready.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import uvicorn
  from engine.server import create_app
  engine = flags_common.load_engine()
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
                           warmup=FLAGS.warmup)
  server = application.state.server
  logging.info("serving %s on http://%s:%d/v1 (max_model_len %d, max_batch %d, %d requests "
               "in flight before 429)", server.model_name, FLAGS.host, FLAGS.port,
               engine.config.max_model_len, engine.config.max_batch, server.max_pending)
  uvicorn.run(application, host=FLAGS.host, port=FLAGS.port, log_level="info")


if __name__ == "__main__":
  app.run(main)
