"""A fleet of OpenAI-compatible servers on Ray Serve, behind one endpoint.

  python scripts/serve_fleet.py --replicas 2                  # local Ray, 127.0.0.1:8000
  python scripts/serve_fleet.py --ray_address head:6379 --replicas 8 --host 0.0.0.0 \\
      --api_key "$KEY" --checkpoint /shared/ckpt

Each replica is scripts/serve.py's server (frontends/server.py) over its own engine, on
one GPU (or --replica_cpus CPUs). The ingress routes a request to the replica that
last saw its prompt prefix unless that replica is the most loaded, else to the one
with the most free capacity (requests in flight per batch, KV-cache use), and answers
429 with Retry-After when every replica holds --max_pending requests.

Endpoints: the server's /v1/*, GET /health, GET /metrics (the fleet view: routing,
in flight and KV use per replica), GET /replicas/I/metrics (replica I's own), GET
/fleet (JSON). Runs until interrupted.
"""

import time

from absl import flags, logging

from ridgeline.cli import _app, flags_common

flags_common.define_http_flags(__name__, "Requests in flight per replica before it counts "
                               "as full (default: the engine's waiting-queue bound).")
flags.DEFINE_integer("replicas", 2, "Server replicas (engines).")
flags.DEFINE_string("ray_address", None, "Join this Ray cluster; default: a local Ray.")
flags.DEFINE_integer("ray_num_cpus", None, "CPUs of the local Ray instance (default: all).")
flags.DEFINE_float("replica_cpus", 1, "CPUs each replica reserves.")
flags.DEFINE_float("replica_gpus", None, "GPUs each replica reserves (default: 1 when the "
                   "cluster has GPUs, else 0).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from ridgeline.frontends import fleet as fleet_lib
  logging.set_verbosity(logging.INFO)
  if FLAGS.api_key is None and FLAGS.host not in ("127.0.0.1", "localhost", "::1"):
    logging.warning("serving on %s WITHOUT an API key; pass --api_key", FLAGS.host)
  t0 = time.perf_counter()
  fleet_lib.init_ray(FLAGS.ray_address, FLAGS.ray_num_cpus,
                     runtime_env=fleet_lib.code_runtime_env(ship=bool(FLAGS.ray_address)))
  # The default model is converted once here, not in every replica.
  spec = flags_common.engine_spec().with_default_checkpoint()
  fleet_lib.serve_fleet(spec, FLAGS.replicas, host=FLAGS.host, port=FLAGS.port,
                        model_name=FLAGS.served_model_name, max_pending=FLAGS.max_pending,
                        retry_after_s=FLAGS.retry_after, api_key=FLAGS.api_key,
                        num_cpus=FLAGS.replica_cpus, num_gpus=FLAGS.replica_gpus)
  logging.info("%d replicas behind http://%s:%d/v1, up in %.1f s", FLAGS.replicas, FLAGS.host,
               FLAGS.port, time.perf_counter() - t0)
  try:
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    from ray import serve
    serve.shutdown()


def run():
  _app.run(main, __name__)


if __name__ == "__main__":
  run()
