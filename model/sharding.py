"""Where every parameter and cache page lives on the (data, model) mesh.

The mesh (model/mesh.py) has two axes: `data`, replicas of the model that each
hold everything and run the whole step (the runner replicates a step's inputs
and outputs over it), and `model`, tensor parallelism. Only `model` splits
anything.

Every array dimension has a *logical* name (`PARAM_AXES`, `KV_AXES`);
`ShardingRules` maps logical names to mesh axes, and `plan` resolves the rules
for one model on one mesh shape:

  q/k/v, gate/up   column-parallel: output features (whole heads) over `model`
  o, down          row-parallel: input features over `model`, so each layer does
                   one all-reduce after attention and one after the MLP
  embed, lm_head   over the vocabulary (the embedding gather becomes a masked
                   local gather plus an all-reduce; logits come out sharded and
                   are gathered for the sampler), or over the width when the
                   vocabulary does not divide
  KV pages         by KV head over `model`, like k/v; replicated over `data`
                   (every replica holds the whole pool; the host allocator is
                   not aware of replicas)
  step rows        replicated: every device sees the whole flat batch

A dimension whose size does not divide its mesh axis is replicated instead, and
`Plan.notes` says so (the memory report prints them). KV heads fewer than (or
not dividing) `model` replicate k, v and the pools. Query heads shard when they
divide `model` and each device's heads are whole GQA groups (K % model == 0) or
all share one KV head (model % K == 0), so splitting [H] into [K, G] needs no
communication; otherwise q and o are replicated too.

`plan` and `memory_report` are arithmetic on shapes and need no devices (size
Llama-3.1-70B on 8 H100s from a laptop). The `*_shardings` functions build
shardings on a real mesh (model/mesh.py's `make_mesh`, `place` and
`host_to_global`, re-exported here, build the mesh and fill arrays on it); the
runner traces its step under `rules_in_effect`, which lets the model pin an
array to its logical sharding with `constrain` without knowing about meshes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ridgeline.util import ceil_div
from ridgeline.model import kv_quant
from ridgeline.model import params as params_lib
from ridgeline.model import quant
from ridgeline.model.config import ModelConfig
# The mesh's names, re-exported: callers build meshes through this module.
from ridgeline.model.mesh import (
    DATA, MESH_AXES, MODEL, MeshShape, host_to_global, make_mesh, mesh_shape, place)

__all__ = ["DATA", "MODEL", "MESH_AXES", "MeshShape", "make_mesh", "mesh_shape", "place",
           "host_to_global", "PARAM_AXES", "KV_AXES", "ShardingRules", "Plan", "plan",
           "param_shardings", "state_shardings", "rules_in_effect", "rules_key", "constrain",
           "MemoryReport", "memory_report"]

_HIDDEN, _KV_HEADS = ("hidden",), ("kv_heads",)
_EXPERT_IN = ("experts", "hidden", "expert_mlp")
# Logical axes of each canonical parameter (per-layer names for layer tensors).
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "table_width"),
    "lm_head": ("table_width", "vocab"),
    **dict.fromkeys(("final_norm", "attn_norm", "mlp_norm", "post_attn_norm",
                     "post_mlp_norm"), _HIDDEN),
    "q": ("hidden", "q_heads"),
    "k": ("hidden", "kv_heads"),
    "v": ("hidden", "kv_heads"),
    "q_bias": ("q_heads",),
    "k_bias": _KV_HEADS,
    "v_bias": _KV_HEADS,
    "o": ("q_heads", "hidden"),
    "gate": ("hidden", "mlp"),
    "up": ("hidden", "mlp"),
    "down": ("mlp", "hidden"),
    "q_norm": ("head_dim",),
    "k_norm": ("head_dim",),
    "router": ("hidden", "router_experts"),  # small: replicated
    "experts_gate": _EXPERT_IN,
    "experts_up": _EXPERT_IN,
    "experts_down": ("experts", "expert_mlp", "hidden"),
}
# One K or V page pool: [pages, page_size, kv_heads, head_dim].
KV_AXES = ("pages", "page_slot", "kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Logical axis -> mesh axis (None: replicated). Axes not named are replicated.

  `vocab` and `table_width` are alternatives for the embedding table: the width
  is used only when the vocabulary does not divide the axis.
  """

  q_heads: str | None = MODEL
  kv_heads: str | None = MODEL
  mlp: str | None = MODEL
  vocab: str | None = MODEL
  table_width: str | None = MODEL
  # MoE: whole experts over `model` (expert parallelism) when the expert count
  # divides it, else each expert's width over `model` (tensor parallelism within
  # experts), like the dense MLP's.
  experts: str | None = MODEL
  expert_mlp: str | None = MODEL


# The plan: rules resolved for one model on one mesh shape ------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which logical axes are sharded over which mesh axis, for one model and mesh."""

  mesh: MeshShape
  axes: Mapping[str, str | None]  # logical axis -> mesh axis or None
  notes: tuple[str, ...] = ()  # what was replicated against the rules, and why

  def spec(self, logical: Sequence[str]) -> P:
    return P(*(self.axes.get(a) for a in logical))

  def param_specs(self, config: ModelConfig) -> params_lib.Params:
    """A PartitionSpec for every tensor of the canonical tree."""
    return _map_names(config, lambda name: self.spec(PARAM_AXES[_leaf(name)]))

  def kv_spec(self) -> P:
    return self.spec(KV_AXES)

  def shards(self, spec: P) -> int:
    """How many distinct pieces an array with `spec` is cut into."""
    sizes = {DATA: self.mesh.data, MODEL: self.mesh.model}
    return math.prod(sizes[a] for a in spec if a is not None)


def plan(config: ModelConfig, mesh: Mesh | MeshShape,
         rules: ShardingRules = ShardingRules()) -> Plan:
  """Resolves `rules` for `config` on `mesh`: an axis whose size does not divide
  its mesh axis is replicated, and the reason recorded in `notes`."""
  shape = mesh_shape(mesh)
  sizes = {DATA: shape.data, MODEL: shape.model, None: 1}
  axes: dict[str, str | None] = {}
  notes: list[str] = []

  def assign(logical: str, ok: bool, note: str) -> bool:
    target = getattr(rules, logical)
    if ok or sizes[target] == 1:
      axes[logical] = target
      return True
    axes[logical] = None
    notes.append(note)
    return False

  heads, kv_heads = config.num_heads, config.num_kv_heads
  mk, mq = sizes[rules.kv_heads], sizes[rules.q_heads]
  assign("kv_heads", kv_heads % mk == 0,
         f"k, v and KV pages replicated ({kv_heads} KV heads, {rules.kv_heads}={mk})")
  # Each device's query heads must be whole GQA groups (K % mq == 0) or all share
  # one KV head (mq % K == 0): then the [H] -> [K, G] split needs no communication.
  whole_groups = kv_heads % mq == 0 or mq % kv_heads == 0
  assign("q_heads", heads % mq == 0 and whole_groups,
         f"q and o replicated ({heads} query heads, {kv_heads} KV heads, "
         f"{rules.q_heads}={mq}: " + ("heads do not divide" if heads % mq else
                                       "would split GQA groups") + ")")
  assign("mlp", config.intermediate_size % sizes[rules.mlp] == 0,
         f"gate, up and down replicated (intermediate size {config.intermediate_size}, "
         f"{rules.mlp}={sizes[rules.mlp]})")
  if config.is_moe:
    me = sizes[rules.experts]
    axes["expert_mlp"] = None
    if config.num_experts % me == 0:
      axes["experts"] = rules.experts
      if me > 1:
        notes.append(f"experts: expert parallelism, {config.num_experts // me} of "
                     f"{config.num_experts} experts per device ({rules.experts}={me})")
    else:
      axes["experts"] = None
      mf = sizes[rules.expert_mlp]
      if assign("expert_mlp", config.expert_size % mf == 0,
                f"experts replicated (neither {config.num_experts} experts nor expert width "
                f"{config.expert_size} divides {rules.expert_mlp}={mf})"):
        notes.append(f"experts: tensor parallelism within experts ({config.num_experts} "
                     f"experts do not divide {rules.experts}={me}; width "
                     f"{config.expert_size} split {mf} ways)")
  mv = sizes[rules.vocab]
  axes["table_width"] = None
  if not assign("vocab", config.vocab_size % mv == 0,
                f"embed/lm_head sharded over the width (vocab {config.vocab_size} does not "
                f"divide {rules.vocab}={mv})"):
    if not assign("table_width", config.hidden_size % sizes[rules.table_width] == 0,
                  f"embed/lm_head replicated (neither vocab {config.vocab_size} nor "
                  f"width {config.hidden_size} divides {rules.vocab}={mv})"):
      notes.pop(-2)  # the "sharded over the width" note did not come true
  return Plan(shape, axes, tuple(notes))


def _leaf(name: str) -> str:
  return name.rsplit(".", 1)[-1]


def _map_names(config: ModelConfig, fn) -> params_lib.Params:
  names = params_lib.flatten(params_lib.param_shapes(config))
  return params_lib.unflatten({n: fn(n) for n in names}, config)


# Shardings on a concrete mesh ------------------------------------------------------------


def param_shardings(config: ModelConfig, mesh: Mesh,
                    rules: ShardingRules = ShardingRules()) -> params_lib.Params:
  """NamedShardings for the canonical tree: pass to `checkpoint.restore` or
  `loading.load_model(shardings=...)` to read each tensor straight onto its devices."""
  specs = plan(config, mesh, rules).param_specs(config)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def state_shardings(state: Any, shardings: params_lib.Params) -> Any:
  """Shardings for an `nnx.split` state of the Transformer, from a canonical tree
  of shardings (`param_shardings`): each parameter by its name ("layers.3.q"),
  anything else (the RoPE table) replicated on the same devices."""
  flat = params_lib.flatten(shardings)
  first = next(iter(flat.values()))
  rest = NamedSharding(first.mesh, P()) if isinstance(first, NamedSharding) else first

  def one(path, leaf):
    name = ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path
                    if getattr(k, "name", None) != "value")
    base, _, field = name.rpartition(".")
    if name not in flat and field in quant.STORED_FIELDS and base in flat:
      # A field of a quantized weight (a qwix QArray, model/quant.py): sharded
      # like the weight where its shape divides.
      return quant.leaf_sharding(flat[base], leaf.shape)
    return flat.get(name, rest)

  return jax.tree_util.tree_map_with_path(one, state)


# Constraints inside the model ------------------------------------------------------------

_active = threading.local()


@contextlib.contextmanager
def rules_in_effect(mesh: Mesh, plan: Plan):
  """While tracing a step inside this context, `constrain` pins arrays to `plan`'s
  shardings on `mesh` (the runner wraps its step in it; the model never sees a mesh)."""
  previous = getattr(_active, "value", None)
  _active.value = (mesh, plan)
  try:
    yield
  finally:
    _active.value = previous


def rules_key() -> tuple | None:
  """A hashable name of the rules in effect (None outside `rules_in_effect`): a
  function traced once and reused (a nested jit) keys its cache on it, since
  `constrain` bakes the rules into what it traces."""
  active = getattr(_active, "value", None)
  if active is None:
    return None
  mesh, p = active
  return mesh, tuple(sorted(p.axes.items()))


def constrain(x: jax.Array, logical_axes: Sequence[str]) -> jax.Array:
  """`x` sharded as its logical axes say under the rules in effect; unchanged
  outside `rules_in_effect` (a single device, or no mesh)."""
  active = getattr(_active, "value", None)
  if active is None:
    return x
  mesh, p = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, p.spec(logical_axes)))


# Memory report -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Per-device bytes of weights and KV pages for one model, mesh and page layout.

  Every device holds the same amount (shardings are even), so "per device" is
  exact, not an average. `kv_pages` is how many pages fit next to the weights in
  `memory_fraction` of `device_bytes` (None without a device size) — or the pool
  actually allocated when `num_pages` was given.
  """

  model: str
  mesh: MeshShape
  weight_dtype: str
  kv_dtype: str
  page_size: int
  weight_bytes: int  # the whole model
  weight_bytes_per_device: int
  kv_page_bytes_per_device: int  # one page (K and V, all layers) on one device
  kv_token_bytes_per_device: int
  device_bytes: int | None
  memory_fraction: float
  kv_pages: int | None
  fits: bool | None
  notes: tuple[str, ...] = ()

  @property
  def kv_bytes_per_device(self) -> int | None:
    return None if self.kv_pages is None else self.kv_pages * self.kv_page_bytes_per_device

  @property
  def kv_tokens(self) -> int | None:
    return None if self.kv_pages is None else self.kv_pages * self.page_size

  def summary(self) -> str:
    line = (f"{self.model or 'model'} on mesh {self.mesh}: weights "
            f"{_size(self.weight_bytes_per_device)}/device ({_size(self.weight_bytes)} total, "
            f"{self.weight_dtype}); KV {_size(self.kv_page_bytes_per_device)}/page/device "
            f"({self.page_size} tokens, {self.kv_dtype})")
    if self.kv_pages is not None:
      line += (f"; {self.kv_pages} pages = {self.kv_tokens} tokens = "
               f"{_size(self.kv_bytes_per_device)}/device")
    if self.device_bytes is not None:
      used = self.weight_bytes_per_device + (self.kv_bytes_per_device or 0)
      line += (f"; {_size(used)} of {_size(self.device_bytes)}/device "
               f"(budget {self.memory_fraction:.0%})")
      line += "; fits" if self.fits else "; DOES NOT FIT"
    if self.notes:
      line += "; " + "; ".join(self.notes)
    return line


def _size(n: int) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n} B"


def memory_report(config: ModelConfig, mesh: Mesh | MeshShape | str, *, page_size: int = 16,
                  kv_dtype: Any = None, device_bytes: int | None = None,
                  memory_fraction: float = 0.9, num_pages: int | None = None,
                  max_model_len: int | None = None,
                  rules: ShardingRules = ShardingRules()) -> MemoryReport:
  """Per-device memory of `config` on `mesh` under `rules`, computed from shapes.

  Args:
    config: the model (its param_dtype is the weights' dtype).
    mesh: a Mesh, a MeshShape or a "data=..,model=.." string.
    page_size, kv_dtype: the KV page layout (kv_dtype default: compute dtype).
    device_bytes: memory of one device (an H100: 80 * 2**30); with it,
      `kv_pages` is the pages that fit in `memory_fraction` of it after weights.
    num_pages: report this pool instead of the pages that would fit.
    max_model_len: with device_bytes, `fits` also needs one sequence of this length.
  """
  if isinstance(mesh, str):
    mesh = MeshShape.parse(mesh)
  shape = mesh_shape(mesh)
  if -1 in (shape.data, shape.model):
    raise ValueError(f"memory_report needs concrete mesh sizes, got {shape}")
  p = plan(config, shape, rules)
  specs = params_lib.flatten(p.param_specs(config))
  # Bytes from the stored dtypes: a quantized projection (model/quant.py) is its
  # int8/int4/fp8 values plus its scales and block minimums (sharded like it).
  layout = quant.stored_layout(config)
  total = sum(quant.nbytes(s, d) for s, d in layout.values())
  per_device = 0
  for n, (s, d) in layout.items():
    base = n if n in specs else n.rpartition(".")[0]
    shards = p.shards(specs[base]) if n == base or n.endswith(".qvalue") else 1
    per_device += quant.nbytes(s, d) // shards

  kv_name = str(kv_dtype) if kv_quant.qtype(kv_dtype) is not None else jnp.dtype(
      config.dtype if kv_dtype is None else kv_dtype).name
  kv_heads_local = config.num_kv_heads // p.shards(P(p.axes.get("kv_heads")))
  # An 8-bit cache stores one bf16 scale per (token, head) beside the values.
  token_bytes = 2 * config.num_layers * kv_heads_local * kv_quant.bytes_per_head_token(
      config.head_dim, kv_dtype, config.dtype)
  page_bytes = token_bytes * page_size

  pages, fits = num_pages, None
  if device_bytes is not None:
    room = int(device_bytes * memory_fraction) - per_device
    if pages is None:
      pages = max(room // page_bytes, 0)
    need = ceil_div(max_model_len, page_size) if max_model_len else 1
    fits = room >= pages * page_bytes and pages >= need and room > 0
  return MemoryReport(
      model=config.name, mesh=shape,
      weight_dtype=config.weight_dtype.name + (f"+{config.quantization}"
                                               if config.quantization else ""),
      kv_dtype=kv_name, page_size=page_size, weight_bytes=total,
      weight_bytes_per_device=per_device, kv_page_bytes_per_device=page_bytes,
      kv_token_bytes_per_device=token_bytes, device_bytes=device_bytes,
      memory_fraction=memory_fraction, kv_pages=pages, fits=fits, notes=p.notes)
