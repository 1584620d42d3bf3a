"""Orbax checkpoints of the canonical parameter tree, restored straight into shardings.

A checkpoint is a directory:

```
<path>/
  params/         orbax StandardCheckpointer output (OCDBT + zarr, one entry per tensor)
  manifest.json   name, shape, dtype and a content digest of every tensor
  config.json     ModelConfig.to_json(); written last, so it marks a finished save
```

Why a manifest when orbax already writes metadata: OCDBT checksums (CRC-32C) its
b-tree nodes but not the chunk data, so bytes overwritten inside a data file under
`params/ocdbt.process_0/d/` restore without any error as silently wrong weights
(measured with orbax-checkpoint 0.12.8 / tensorstore 0.1.86; truncation, by
contrast, is reported). The manifest's per-tensor digest turns that into a
`CheckpointError` naming the tensor. The digests are computed shard by shard where the shards live, never gathered
(model/checkpoint_digest.py); `restore(..., verify=False)` skips them.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ridgeline.util import write_json_atomic
from ridgeline.model import checkpoint_digest
from ridgeline.model import params as params_lib
from ridgeline.model import quant
from ridgeline.model.config import ModelConfig
from ridgeline.model.params import Params

CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
PARAMS_DIR = "params"
_FORMAT = "ridgeline-checkpoint"
_FORMAT_VERSION = 1

Shardings = jax.sharding.Sharding | Params | None


class CheckpointError(ValueError):
  """A checkpoint is missing, incomplete, corrupted or does not match its config."""


# Paths and small files ---------------------------------------------------------


def _abspath(path: str | os.PathLike) -> str:
  # Orbax insists on absolute paths; error messages are clearer with them too.
  return os.path.abspath(os.fspath(path))


def _read_json(path: str, what: str, checkpoint: str) -> Any:
  if not os.path.isfile(path):
    raise CheckpointError(f"checkpoint {checkpoint}: missing {what} file {path}")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"checkpoint {checkpoint}: cannot read {what} file {path}: {e}") from e


def _check_dir(path: str) -> None:
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint directory {path} does not exist")


def is_checkpoint(path: str | os.PathLike) -> bool:
  """Whether `path` holds a finished checkpoint (cheap: looks at file names only).

  Useful for caches: convert once, then restore while this stays true.
  """
  path = _abspath(path)
  return all(os.path.exists(os.path.join(path, n))
             for n in (CONFIG_FILE, MANIFEST_FILE, PARAMS_DIR))


def load_config(path: str | os.PathLike) -> ModelConfig:
  """The ModelConfig stored beside a checkpoint's weights (reads no weights)."""
  path = _abspath(path)
  _check_dir(path)
  config_path = os.path.join(path, CONFIG_FILE)
  data = _read_json(config_path, "config", path)
  try:
    return ModelConfig.from_dict(data)
  except (TypeError, ValueError) as e:
    hint = ""
    if isinstance(data, dict) and ("architectures" in data or "model_type" in data):
      hint = (" (this looks like a Hugging Face model directory; convert it with "
              "model.convert.hf.load_hf first)")
    raise CheckpointError(
        f"checkpoint {path}: {config_path} is not a valid ModelConfig: {e}{hint}") from e


# Save ----------------------------------------------------------------------------


def save(path: str | os.PathLike, params: Params, config: ModelConfig, *,
         force: bool = False) -> None:
  """Write `params` (numpy or jax arrays, any sharding) and `config` under `path`.

  Args:
    path: checkpoint directory. It may already exist and hold unrelated files (a
      tokenizer, say); only `params/`, `manifest.json` and `config.json` are ours.
    params: the canonical tree (see model/params.py), validated against `config`.
    config: stored as config.json. Its `param_dtype` must be the arrays' dtype, so
      a restored config always describes the restored arrays.
    force: replace an existing checkpoint at `path`. Without it, saving over one
      raises FileExistsError, because silently replacing converted weights is a
      costly mistake. The old config.json is deleted first, so a crash mid-save
      leaves a directory that `restore` rejects rather than a mixed checkpoint.

  Raises:
    ValueError: `params` do not match `config` (names every tensor at fault).
    FileExistsError: a checkpoint already exists at `path` and `force` is False.
  """
  path = _abspath(path)
  params_lib.check(params, config, source=f"parameters to save to {path}")
  # Quantized projections (qwix QArrays, model/quant.py) are stored as two
  # tensors, "<name>.qvalue" and "<name>.scale".
  quantized = sorted(n for n, v in params_lib.flatten(params).items()
                     if isinstance(v, quant.QArray))
  if quantized and not config.quantization:
    raise ValueError(f"saving to {path}: tensors {quantized[:3]}... are quantized but "
                     "config.quantization is None")
  params = quant.to_storage(params)
  flat = params_lib.flatten(params)
  layout = quant.stored_layout(config)
  unknown = sorted(set(flat) - set(layout))
  if unknown:
    raise ValueError(f"saving to {path}: tensors {unknown[:4]} do not fit config.quantization="
                     f"{config.quantization}")
  wrong = sorted(n for n, v in flat.items() if jnp.dtype(v.dtype) != layout[n][1]
                 or tuple(np.shape(v)) != tuple(layout[n][0]))
  if wrong:
    n = wrong[0]
    raise ValueError(
        f"saving to {path}: tensors {wrong} do not have the dtype/shape the config implies "
        f"({n}: {jnp.dtype(flat[n].dtype)}{list(np.shape(flat[n]))}, expected "
        f"{layout[n][1]}{list(layout[n][0])}; config.param_dtype is {config.param_dtype}, "
        f"quantization {config.quantization}); cast the params or use config.replace(...)")

  ours = [os.path.join(path, n) for n in (CONFIG_FILE, MANIFEST_FILE, PARAMS_DIR)]
  existing = [p for p in ours if os.path.lexists(p)]
  if existing and not force:
    raise FileExistsError(
        f"checkpoint {path} already exists (found {existing}); pass force=True to replace it")

  digests = checkpoint_digest.digests(flat)
  manifest = {
      "format": _FORMAT,
      "version": _FORMAT_VERSION,
      "digest": checkpoint_digest.NAME,
      "tensors": {
          name: {"shape": list(np.shape(v)), "dtype": jnp.dtype(v.dtype).name,
                 "digest": digests[name]}
          for name, v in flat.items()
      },
  }

  primary = jax.process_index() == 0
  if primary:
    os.makedirs(path, exist_ok=True)
    for p in ours[:2]:  # config first: from here on the old checkpoint is invalid
      if os.path.lexists(p):
        os.remove(p)
  _sync("ridgeline_checkpoint_save_prepare")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, PARAMS_DIR), params, force=force)
    ckptr.wait_until_finished()
  if primary:
    write_json_atomic(os.path.join(path, MANIFEST_FILE), text=_manifest_json(manifest))
    write_json_atomic(os.path.join(path, CONFIG_FILE), text=config.to_json())
  _sync("ridgeline_checkpoint_save_done")


def _manifest_json(manifest: dict[str, Any]) -> str:
  """JSON with one line per tensor: diffable and greppable by tensor name."""
  head = {k: v for k, v in manifest.items() if k != "tensors"}
  lines = [f"  {json.dumps(n)}: {json.dumps(e)}" for n, e in manifest["tensors"].items()]
  return (json.dumps(head)[:-1] + ', "tensors": {\n' + ",\n".join(lines) + "\n}}\n")


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(name)


# Restore -------------------------------------------------------------------------


def _stored_arrays(path: str, params_dir: str) -> dict[str, Any]:
  """{name: orbax ArrayMetadata} read from orbax's own metadata (no weights read)."""
  if not os.path.isdir(params_dir):
    raise CheckpointError(f"checkpoint {path}: missing parameter directory {params_dir}")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(params_dir)
  except Exception as e:  # orbax/tensorstore raise many types; all mean unreadable
    raise CheckpointError(f"checkpoint {path}: cannot read orbax metadata: {e}") from e
  # orbax >= 0.11 returns StepMetadata(item_metadata=TreeMetadata(tree=...)); older
  # versions returned the tree itself.
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  if not isinstance(tree, (dict, list)):
    raise CheckpointError(f"checkpoint {path}: cannot read orbax metadata in {params_dir}")
  return params_lib.flatten(tree)


def _check_layout(path: str, config: ModelConfig, stored: Mapping[str, Any],
                  manifest: Mapping[str, Any] | None) -> None:
  """Compare stored tensors with `config` (and the manifest) before reading any bytes."""
  layout = quant.stored_layout(config)
  expected = {n: shape for n, (shape, _) in layout.items()}
  problems = []
  missing = sorted(set(expected) - set(stored))
  extra = sorted(set(stored) - set(expected))
  if missing:
    problems.append(f"missing tensors {missing}")
  if extra:
    problems.append(f"unexpected tensors {extra}")
  for name in sorted(set(expected) & set(stored)):
    shape = tuple(stored[name].shape)
    if shape != tuple(expected[name]):
      problems.append(f"tensor {name}: stored shape {shape}, config expects {expected[name]}")
    if jnp.dtype(stored[name].dtype) != layout[name][1]:
      implied = (f"config.param_dtype is {config.param_dtype}" if not config.quantization
                 else f"config (param_dtype {config.param_dtype}, quantization "
                      f"{config.quantization}) implies {layout[name][1].name}")
      problems.append(f"tensor {name}: stored dtype {jnp.dtype(stored[name].dtype).name}, "
                      + implied)
  if manifest is not None:
    listed = manifest.get("tensors") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or not all(
        isinstance(e, dict) and {"shape", "dtype", "digest"} <= set(e) for e in listed.values()):
      raise CheckpointError(f"checkpoint {path}: {MANIFEST_FILE} is malformed")
    for name in sorted(set(stored) - set(listed)):
      problems.append(f"tensor {name} is not in {MANIFEST_FILE}")
    for name in sorted(set(listed) - set(stored)):
      problems.append(f"tensor {name} is listed in {MANIFEST_FILE} but not stored")
    for name in sorted(set(listed) & set(stored)):
      entry, meta = listed[name], stored[name]
      if (tuple(entry["shape"]) != tuple(meta.shape)
          or jnp.dtype(entry["dtype"]) != jnp.dtype(meta.dtype)):
        problems.append(
            f"tensor {name}: {MANIFEST_FILE} says {entry['dtype']}{entry['shape']}, "
            f"stored {jnp.dtype(meta.dtype).name}{list(meta.shape)}")
  if problems:
    if config.quantization and any(n.endswith((".minimum", ".zero_point"))
                                   for n in missing + extra):
      problems.append(f"the projections were stored in an earlier {config.quantization} "
                      "layout (before affine blocks of 32 with a float minimum); convert "
                      "the float weights again with --quantize")
    raise CheckpointError(
        f"checkpoint {path} does not match its config: " + "; ".join(problems))


def _sharding_for_each(shardings: Shardings, names: list[str]) -> dict[str, jax.sharding.Sharding]:
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(shardings, jax.sharding.Sharding):
    return {n: shardings for n in names}
  flat = params_lib.flatten(shardings)
  missing = sorted(set(names) - set(flat))
  extra = sorted(set(flat) - set(names))
  if missing or extra:
    raise ValueError(f"shardings tree does not match the parameters: missing {missing}, "
                     f"unexpected {extra}")
  bad = sorted(n for n in names if not isinstance(flat[n], jax.sharding.Sharding))
  if bad:
    raise ValueError(f"shardings for {bad} are not jax.sharding.Sharding objects")
  return {n: flat[n] for n in names}


def _tensors_named_in(message: str, names: list[str]) -> list[str]:
  """Tensor names a tensorstore error mentions (it says e.g. "layers.0.q/0.0")."""
  found = []
  for name in names:
    if re.search(r"(?<![\w.])" + re.escape(name) + r"(?![\w])", message):
      found.append(name)
  return found


def restore(path: str | os.PathLike, shardings: Shardings = None, dtype: Any = None, *,
            verify: bool = True) -> tuple[ModelConfig, Params]:
  """Read a checkpoint straight into device memory with the requested shardings.

  Every tensor is read by the devices that own its shards (orbax targets are
  ShapeDtypeStructs carrying the sharding), so no host ever holds the whole model.

  Args:
    path: the directory `save` wrote.
    shardings: a tree like the params tree with `jax.sharding.Sharding` leaves, one
      Sharding for every tensor, or None for the first local device.
    dtype: cast the weights to this dtype (None keeps the stored dtype). The returned
      config's param_dtype and compute_dtype become `dtype`.
    verify: check every tensor's digest against the manifest (see module docstring
      for the cost). With a dtype change, verification reads the stored dtype first
      and casts tensor by tensor, so the stored-dtype model must fit in device
      memory; verify=False instead casts while reading.

  Returns:
    (config, params) with params as jax Arrays in the canonical tree layout.

  Raises:
    CheckpointError: the directory, config.json, manifest.json or params/ is missing,
      the stored tensors do not match the config, or a tensor file is truncated or
      corrupted. The message names the checkpoint path and the tensors at fault.
  """
  path = _abspath(path)
  config = load_config(path)
  manifest = _read_json(os.path.join(path, MANIFEST_FILE), "manifest", path) if verify else None
  params_dir = os.path.join(path, PARAMS_DIR)
  stored = _stored_arrays(path, params_dir)
  _check_layout(path, config, stored, manifest)

  layout = quant.stored_layout(config)
  names = list(layout)  # canonical order (quantized weights: .qvalue, .scale)
  castable = [n for n in names if n in layout and n.rpartition(".")[2] not in quant.STORED_FIELDS]
  target_dtype = None if dtype is None else jnp.dtype(dtype)
  read_dtype = {n: jnp.dtype(stored[n].dtype) for n in names}
  if target_dtype is not None and not verify:
    read_dtype.update({n: target_dtype for n in castable})  # tensorstore casts while reading
  canonical = list(params_lib.flatten(params_lib.param_shapes(config)))
  shard = quant.storage_shardings(_sharding_for_each(shardings, canonical), layout)
  abstract = {}
  for n in names:
    try:
      abstract[n] = jax.ShapeDtypeStruct(
          tuple(stored[n].shape), read_dtype[n], sharding=shard[n])
    except ValueError as e:
      raise ValueError(f"restoring {path}: sharding for tensor {n} "
                       f"{tuple(stored[n].shape)} is not usable: {e}") from e
  target = _unflatten_stored(abstract, config)

  try:
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(params_dir, target)
  except Exception as e:  # tensorstore reports data loss as ValueError, others vary
    culprits = _tensors_named_in(str(e), names)
    which = f" (tensor {', '.join(culprits)})" if culprits else ""
    raise CheckpointError(
        f"checkpoint {path}: failed to read parameters{which}; the tensor files under "
        f"{params_dir} may be truncated or corrupted: {e}") from e
  flat = params_lib.flatten(restored)
  del restored

  if verify:
    got = checkpoint_digest.digests(flat)
    bad = sorted(n for n in names if got[n] != manifest["tensors"][n]["digest"])
    if bad:
      raise CheckpointError(
          f"checkpoint {path}: tensors {bad} are corrupted (content digest differs "
          f"from {MANIFEST_FILE}); re-create the checkpoint")
  if target_dtype is not None:
    for n in castable:  # one tensor at a time, so each original is freed as we go
      if flat[n].dtype != target_dtype:
        flat[n] = _cast(flat[n], target_dtype)
    config = config.replace(param_dtype=target_dtype.name, compute_dtype=target_dtype.name)
  return config, params_lib.unflatten(quant.from_storage({n: flat[n] for n in names}, config),
                                      config)


def _unflatten_stored(flat: Mapping[str, Any], config: ModelConfig) -> Params:
  """Stored names -> the nested tree orbax reads and writes: a quantized weight
  is a {"qvalue", "scale"} dict in its tensor's place."""
  tree: Params = {"layers": [{} for _ in range(config.num_layers)]}
  for name, value in flat.items():
    parts = name.split(".")
    node = tree["layers"][int(parts[1])] if parts[0] == "layers" else tree
    keys = parts[2:] if parts[0] == "layers" else parts
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = value
  return tree


def _cast(x: jax.Array, dtype: np.dtype) -> jax.Array:
  """x.astype(dtype) on x's devices, keeping x's sharding object exactly.

  A plain jitted astype may hand back an equivalent but unequal sharding (P() comes
  back as P(None,)), which surprises callers that compare shardings.
  """
  return _cast_fn(x.sharding, dtype)(x)


@functools.lru_cache(maxsize=None)
def _cast_fn(sharding: jax.sharding.Sharding, dtype: np.dtype):
  return jax.jit(lambda x: x.astype(dtype), out_shardings=sharding)
