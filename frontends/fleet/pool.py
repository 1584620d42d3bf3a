"""The pool: N EngineWorker actors on Ray (`Fleet`), and starting Ray for them.

An actor that dies is restarted by Ray (`max_restarts`) and the calls it had not
answered are sent again to the new one (`max_task_retries`), so a request running
on a dead engine is rerun from its prompt. Workers run the Ridgeline code this
process runs (`code_runtime_env`): from its directory on one machine, uploaded to
the nodes of a cluster.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile

from ridgeline.engine.build import EngineSpec
from ridgeline.frontends.fleet.worker import EngineWorker


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs) -> dict:
  """ray.init for a job: `address` joins a running cluster; None starts a local
  one (with `num_cpus`, no dashboard: it starts faster and uses less memory).
  Returns the cluster's resources."""
  import ray
  if not ray.is_initialized():
    if address:
      ray.init(address=address, **kwargs)
    else:
      ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
  return ray.cluster_resources()


def code_runtime_env(ship: bool = False) -> dict:
  """A runtime_env whose workers run the Ridgeline code this process runs.

  ship=False: workers import it from the same place (one machine): the folder
  that holds an installed `ridgeline` goes first on their PYTHONPATH (a source
  tree's editable install needs nothing).
  ship=True: Ray uploads the package (`py_modules`) to every node of a cluster,
  for a checkout that the nodes do not have installed (Ray takes this only as
  the job's runtime_env: `init_ray(..., runtime_env=...)`): a staged copy named
  `ridgeline`, laid out as it installs.
  """
  import ridgeline.engine  # the package this process runs
  source = pathlib.Path(ridgeline.engine.__file__).resolve().parent.parent
  installed = source.name == "ridgeline"
  if not ship:  # a source tree runs through its editable install, as here
    return {"env_vars": {"PYTHONPATH": str(source.parent)} if installed else {}}
  stage = pathlib.Path(tempfile.mkdtemp(prefix="ridgeline-ship-")) / "ridgeline"
  for floor in ("util", "model", "configs", "engine", "frontends"):
    shutil.copytree(source / floor, stage / floor,
                    ignore=shutil.ignore_patterns("__pycache__"))
  return {"py_modules": [str(stage)]}


class Fleet:
  """N EngineWorker actors, with the resources and retries of a fleet.

  num_workers: default one per GPU of the cluster, or CPUs // num_cpus without GPUs.
  num_gpus: per worker; default 1 when the cluster has GPUs, else 0.
  max_restarts / max_task_retries: Ray's actor fault tolerance (-1: without limit).
  """

  def __init__(self, spec: EngineSpec, num_workers: int | None = None,
               num_gpus: float | None = None, num_cpus: float = 1,
               max_restarts: int = -1, max_task_retries: int = -1,
               runtime_env: dict | None = None, token_ids: bool = True):
    import ray
    if not ray.is_initialized():
      raise RuntimeError("Ray is not initialized: call fleet.init_ray() (or ray.init()) first")
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    if num_gpus is None:
      num_gpus = 1 if gpus else 0
    if num_workers is None:
      # Without GPUs, one CPU stays unreserved: Ray Data's read tasks (Parquet
      # input) need one, and would wait forever behind actors holding them all.
      num_workers = (int(gpus // num_gpus) if num_gpus else
                     int((resources.get("CPU", 1) - 1) // num_cpus) if num_cpus else 1)
      num_workers = max(num_workers, 1)
    self.spec = spec
    actor = ray.remote(EngineWorker).options(
        num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=max_restarts,
        max_task_retries=max_task_retries, runtime_env=runtime_env)
    self.workers = [actor.remote(spec, token_ids) for _ in range(num_workers)]
    # Waits until every engine is built (and fails if one cannot be); the decode
    # batch is the engines' own (sized to their device unless the spec sets it).
    self.max_batch = min(load["max_batch"] for load in self.loads())

  def __len__(self) -> int:
    return len(self.workers)

  def loads(self, timeout: float | None = None) -> list[dict]:
    import ray
    return ray.get([w.load.remote() for w in self.workers], timeout=timeout)

  def reset(self) -> list[dict]:
    import ray
    return ray.get([w.reset.remote() for w in self.workers])

  def shutdown(self) -> None:
    import ray
    for w in self.workers:
      ray.kill(w)
    self.workers = []
