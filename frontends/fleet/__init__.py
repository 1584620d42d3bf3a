"""Ridgeline on Ray: one batch job over many engines, routed by prefix, then by load;
and a fleet of servers behind one routing endpoint.

```python
fleet_lib.init_ray()                          # local; init_ray("host:6379") joins a cluster
fleet = fleet_lib.Fleet(fleet_lib.EngineSpec(checkpoint="ckpt/"), num_workers=None)
summary = fleet_lib.run_job(fleet, fleet_lib.FleetJob("in.jsonl", "out.jsonl"))
```

The parts, each readable alone:

- routing.py (pure: no Ray, no engine): a prompt's prefix as a hash chain of its
  leading blocks, and the routers: `PrefixAffinity` sends requests that share a
  prompt prefix to the engine that saw it last, unless that engine is the most
  loaded; otherwise to the engine with the most free capacity. `RoundRobin` is the
  baseline.
- worker.py: `EngineWorker`, the Ray actor owning one Engine (built from an
  `EngineSpec`, engine/build.py, which Ray keeps to rebuild it after a crash): one
  per accelerator (`num_gpus=1`, Ray sets CUDA_VISIBLE_DEVICES) or, on CPUs, one
  per `num_cpus` CPUs.
- pool.py: `Fleet`, N workers with Ray's restarts and retries, so a request running
  on a dead engine is rerun from its prompt; `init_ray` and `code_runtime_env`.
- job.py: `run_job`, the batch job over a fleet: input blocks routed request by
  request, each block of output committed exactly once through the batch package's
  block journal (frontends/batch/blocks.py); a rerun skips committed blocks.
- serve.py (and asgi.py): `serve_fleet`, N replicas of the OpenAI server on Ray
  Serve behind an ingress that routes with the same rule and answers 429 itself.
"""

from __future__ import annotations

from ridgeline.engine.build import EngineSpec
from ridgeline.frontends.batch.blocks import block_dir
from ridgeline.frontends.fleet.routing import (
    EngineLoad, PrefixAffinity, RoundRobin, make_router, prefix_blocks)
from ridgeline.frontends.fleet.worker import EngineWorker
from ridgeline.frontends.fleet.pool import Fleet, code_runtime_env, init_ray
from ridgeline.frontends.fleet.job import FleetJob, run_job
from ridgeline.frontends.fleet.serve import ServerReplica, request_prompt, serve_fleet

__all__ = ["EngineLoad", "RoundRobin", "PrefixAffinity", "prefix_blocks", "make_router",
           "EngineSpec", "EngineWorker", "Fleet", "FleetJob", "run_job", "init_ray",
           "code_runtime_env", "block_dir", "serve_fleet", "ServerReplica",
           "request_prompt"]
