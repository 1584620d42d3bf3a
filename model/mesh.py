"""The device mesh: its two axes, its shape, and putting arrays onto it.

A mesh has two axes:

  data    replicas of the model. Every replica holds the whole model and the
          whole KV pool, and runs the whole step: the runner replicates a step's
          inputs and outputs over `data` (engine/runner.py), so a data axis
          larger than 1 computes the same step on each replica rather than
          splitting its rows.
  model   tensor parallelism (Megatron style): each device holds a slice of
          every large weight and of every KV head (model/sharding.py says which).

`MeshShape` is the pair of sizes, parsed from "data=2,model=4" or "2x4" and
resolved against the device count; `make_mesh` builds the mesh. `place` and
`host_to_global` put arrays into their shardings, within one process or across
several.

Nothing here knows about models: model/sharding.py maps a model's tensors onto
these axes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)


@dataclasses.dataclass(frozen=True)
class MeshShape:
  """Sizes of the (data, model) mesh axes; -1 means "all remaining devices"."""

  data: int = 1
  model: int = 1

  def __post_init__(self):
    for axis in MESH_AXES:
      size = getattr(self, axis)
      if size == 0 or size < -1:
        raise ValueError(f"mesh axis {axis} must be >= 1 (or -1), got {size}")
    if self.data == -1 and self.model == -1:
      raise ValueError("at most one mesh axis may be -1")

  @classmethod
  def parse(cls, text: str | None) -> "MeshShape":
    """"data=2,model=4", "model=8", "2x4" (data x model); "" or None is 1x1."""
    text = (text or "").strip()
    if not text:
      return cls()
    m = re.fullmatch(r"(-?\d+)\s*[x*]\s*(-?\d+)", text)
    if m:
      return cls(int(m[1]), int(m[2]))
    sizes = {}
    for part in text.split(","):
      name, eq, value = part.partition("=")
      name = name.strip()
      if not eq or name not in MESH_AXES or name in sizes:
        raise ValueError(f"bad mesh {text!r}: expected e.g. 'data=2,model=4' with axes "
                         f"{MESH_AXES}, each at most once")
      try:
        sizes[name] = int(value)
      except ValueError:
        raise ValueError(f"bad mesh {text!r}: size of {name} is not an integer") from None
    return cls(**sizes)

  def resolve(self, num_devices: int) -> "MeshShape":
    """Fills in a -1 axis from the device count."""
    known = (self.data if self.data != -1 else 1) * (self.model if self.model != -1 else 1)
    if -1 not in (self.data, self.model):
      return self
    if num_devices % known:
      raise ValueError(f"mesh {self}: {num_devices} devices do not divide by {known}")
    rest = num_devices // known
    return MeshShape(rest if self.data == -1 else self.data,
                     rest if self.model == -1 else self.model)

  @property
  def size(self) -> int:
    return self.data * self.model

  def __str__(self) -> str:
    return f"data={self.data},model={self.model}"


def make_mesh(shape: MeshShape | str | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, model) mesh over the first `shape.size` of `devices` (default: all
  global devices, so every process of a multi-host run builds the same mesh).

  The model axis varies fastest, so with 8 GPUs per host and model <= 8 each
  tensor-parallel group stays inside one host (NVLink), and data replicas span hosts.
  """
  if not isinstance(shape, MeshShape):
    shape = MeshShape.parse(shape)
  devices = list(jax.devices() if devices is None else devices)
  shape = shape.resolve(len(devices))
  if shape.size > len(devices):
    raise ValueError(f"mesh {shape} needs {shape.size} devices, {len(devices)} available")
  if jax.process_count() > 1 and shape.size != jax.device_count():
    raise ValueError(f"mesh {shape} has {shape.size} devices but the {jax.process_count()} "
                     f"processes have {jax.device_count()}: a multi-process mesh must use "
                     "every device, so that each process owns part of it")
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((shape.data, shape.model), MESH_AXES, axis_types=auto,
                       devices=devices[:shape.size])


def mesh_shape(mesh: Mesh | MeshShape) -> MeshShape:
  if isinstance(mesh, MeshShape):
    return mesh
  return MeshShape(mesh.shape[DATA], mesh.shape[MODEL])


def place(tree: Any, shardings: Any) -> Any:
  """Puts every array of `tree` into its sharding (no-op where it already is).

  Works across processes: a value every process holds in full (a host array, or
  a single-device array made the same way on each process) is copied in through
  the host, each process filling only its own devices' shards.
  """
  def one(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding and x.committed:
      return x
    if sharding.is_fully_addressable or (isinstance(x, jax.Array)
                                         and not x.is_fully_addressable):
      return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree.map(one, tree, shardings)


def host_to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array | np.ndarray:
  """A step input computed identically by every process, as a global array.

  In one process a numpy array goes to `jit` as is (it shards it); across
  processes jit refuses sharded numpy inputs, so each process builds its shards.
  """
  if sharding.is_fully_addressable:
    return x
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
