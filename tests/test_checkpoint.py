"""Orbax checkpoints: bit-exact round trips, sharded restores, and every failure named.

conftest.py gives 8 fake CPU devices, so the sharded restores here exercise the same
code path as a multi-GPU mesh.
"""

import glob
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ridgeline.configs import models
from ridgeline.model import checkpoint
from ridgeline.model import checkpoint_digest
from ridgeline.model import params as params_lib
from ridgeline.model.checkpoint import CheckpointError

TINY = models.get("tiny")


def random_params(config, seed=0, zeros_except=None):
  """Random numpy params for `config` in its param_dtype.

  With `zeros_except`, every other tensor is zero: zeros compress to almost nothing,
  so that tensor's bytes fill the checkpoint's largest data file.
  """
  rng = np.random.default_rng(seed)
  dtype = config.weight_dtype
  flat = {}
  for name, shape in params_lib.flatten(params_lib.param_shapes(config)).items():
    if zeros_except is not None and name != zeros_except:
      flat[name] = np.zeros(shape, dtype)
    else:
      flat[name] = rng.standard_normal(shape).astype(np.float32).astype(dtype)
  return params_lib.unflatten(flat, config)


def assert_bits_equal(restored, expected):
  got, want = params_lib.flatten(restored), params_lib.flatten(expected)
  assert list(got) == list(want)
  for name, value in want.items():
    out = got[name]
    assert isinstance(out, jax.Array), name
    assert out.dtype == value.dtype, name
    uint = np.uint16 if value.dtype.itemsize == 2 else np.uint32
    np.testing.assert_array_equal(np.asarray(out).view(uint), value.view(uint), err_msg=name)


def data_files(path):
  """The tensor data files orbax (OCDBT) wrote, largest first."""
  files = glob.glob(os.path.join(path, "params", "**", "d", "*"), recursive=True)
  return sorted(files, key=os.path.getsize, reverse=True)


@pytest.mark.parametrize("config", [
    TINY,
    TINY.replace(param_dtype="bfloat16", compute_dtype="bfloat16"),
    TINY.replace(qkv_bias=True, tie_word_embeddings=True),
], ids=["f32", "bf16", "qkv_bias_tied"])
def test_round_trip_is_bit_exact(tmp_path, config):
  params = random_params(config)
  # Values a lossy path would alter: NaN payloads, signed zero, infinities, subnormals.
  special = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-40, -1e-45], np.float32)
  special = special.astype(config.weight_dtype)
  params["final_norm"][:special.size] = special
  nan_bits = params["final_norm"][:1].view(np.uint16 if special.itemsize == 2 else np.uint32)
  nan_bits |= 1  # a NaN with a payload must survive too
  checkpoint.save(tmp_path / "ckpt", params, config)

  assert checkpoint.is_checkpoint(tmp_path / "ckpt")
  assert checkpoint.load_config(tmp_path / "ckpt") == config
  restored_config, restored = checkpoint.restore(tmp_path / "ckpt")
  assert restored_config == config
  assert_bits_equal(restored, params)
  device = jax.local_devices()[0]
  assert all(a.sharding.device_set == {device} for a in jax.tree.leaves(restored))


def test_restore_into_two_device_mesh(tmp_path):
  params = random_params(TINY)
  checkpoint.save(tmp_path / "ckpt", params, TINY)
  mesh = jax.make_mesh((2,), ("model",), devices=jax.devices()[:2])

  def spec(name, shape):  # column-parallel projections, vocab-sharded embedding
    if len(shape) == 1:
      return NamedSharding(mesh, P())
    if name == "embed":
      return NamedSharding(mesh, P("model", None))
    return NamedSharding(mesh, P(None, "model"))

  flat_shapes = params_lib.flatten(params_lib.param_shapes(TINY))
  shardings = params_lib.unflatten({n: spec(n, s) for n, s in flat_shapes.items()}, TINY)
  _, restored = checkpoint.restore(tmp_path / "ckpt", shardings)

  assert_bits_equal(restored, params)
  flat = params_lib.flatten(restored)
  for name, shape in flat_shapes.items():
    array = flat[name]
    assert array.sharding == spec(name, shape), name
    shards = array.addressable_shards
    assert len(shards) == 2
    if len(shape) == 1:
      want = shape
    elif name == "embed":
      want = (shape[0] // 2, shape[1])
    else:
      want = (shape[0], shape[1] // 2)
    assert all(s.data.shape == want for s in shards), name
  assert flat["layers.0.q"].addressable_shards[0].data.shape == (64, 32)


def test_save_from_sharded_arrays(tmp_path):
  """Saving what a sharded restore returned: digests computed on the shards agree."""
  params = random_params(TINY)
  checkpoint.save(tmp_path / "a", params, TINY)
  mesh = jax.make_mesh((2,), ("model",), devices=jax.devices()[:2])
  row = NamedSharding(mesh, P("model"))  # every tensor's leading axis is even
  _, sharded = checkpoint.restore(tmp_path / "a", row)
  checkpoint.save(tmp_path / "b", sharded, TINY)
  manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ab"]
  assert manifests[0] == manifests[1]
  assert_bits_equal(checkpoint.restore(tmp_path / "b")[1], params)


@pytest.mark.parametrize("verify", [True, False])
def test_restore_one_sharding_for_all_with_dtype_cast(tmp_path, verify):
  params = random_params(TINY)
  checkpoint.save(tmp_path / "ckpt", params, TINY)
  mesh = jax.make_mesh((2,), ("model",), devices=jax.devices()[:2])
  replicated = NamedSharding(mesh, P())
  config, restored = checkpoint.restore(
      tmp_path / "ckpt", replicated, dtype="bfloat16", verify=verify)
  assert config.param_dtype == config.compute_dtype == "bfloat16"
  params_lib.check(restored, config)
  for name, value in params_lib.flatten(params).items():
    array = params_lib.flatten(restored)[name]
    assert array.sharding == replicated, name
    assert array.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        np.asarray(array).view(np.uint16), value.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_save_refuses_to_overwrite_unless_forced(tmp_path):
  path = tmp_path / "ckpt"
  path.mkdir()
  (path / "tokenizer.json").write_text("{}")  # unrelated files are allowed and kept
  checkpoint.save(path, random_params(TINY, seed=0), TINY)
  with pytest.raises(FileExistsError, match="force=True"):
    checkpoint.save(path, random_params(TINY, seed=1), TINY)
  newer = random_params(TINY, seed=1)
  checkpoint.save(path, newer, TINY, force=True)
  assert_bits_equal(checkpoint.restore(path)[1], newer)
  assert (path / "tokenizer.json").read_text() == "{}"


def test_save_validates_params_against_config(tmp_path):
  params = random_params(TINY)
  del params["layers"][1]["up"]
  with pytest.raises(ValueError, match=r"layers\.1\.up"):
    checkpoint.save(tmp_path / "a", params, TINY)
  with pytest.raises(ValueError, match="param_dtype"):
    checkpoint.save(tmp_path / "b", random_params(TINY), TINY.replace(param_dtype="bfloat16"))
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_missing_directory_and_files_are_named(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(CheckpointError, match=f"{missing}.*does not exist"):
    checkpoint.restore(missing)
  with pytest.raises(CheckpointError, match="does not exist"):
    checkpoint.load_config(missing)

  path = tmp_path / "ckpt"
  checkpoint.save(path, random_params(TINY), TINY)
  os.remove(path / "manifest.json")
  with pytest.raises(CheckpointError, match=f"{path}.*manifest.json"):
    checkpoint.restore(path)
  checkpoint.restore(path, verify=False)  # the manifest only serves verification
  os.remove(path / "config.json")
  assert not checkpoint.is_checkpoint(path)
  with pytest.raises(CheckpointError, match=f"{path}.*config.json"):
    checkpoint.restore(path)


def test_hugging_face_directory_gets_a_hint(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
  with pytest.raises(CheckpointError, match="load_hf"):
    checkpoint.load_config(tmp_path)


def test_missing_tensor_is_named(tmp_path, monkeypatch):
  params = random_params(TINY)
  del params["layers"][1]["up"]
  with monkeypatch.context() as m:  # bypass save's validation to write a bad checkpoint
    m.setattr(params_lib, "check", lambda *args, **kwargs: None)
    checkpoint.save(tmp_path / "ckpt", params, TINY)
  with pytest.raises(CheckpointError, match=rf"{tmp_path / 'ckpt'}.*missing.*layers\.1\.up"):
    checkpoint.restore(tmp_path / "ckpt")


def test_config_that_does_not_match_the_weights_is_named(tmp_path):
  path = tmp_path / "ckpt"
  checkpoint.save(path, random_params(TINY), TINY)
  config = json.loads((path / "config.json").read_text())
  config["num_layers"] = 3
  config["intermediate_size"] = 96
  config["param_dtype"] = "bfloat16"
  (path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError) as info:
    checkpoint.restore(path)
  message = str(info.value)
  assert str(path) in message
  assert "layers.2.q" in message  # missing
  assert "layers.0.gate: stored shape (64, 128), config expects (64, 96)" in message
  assert "embed: stored dtype float32, config.param_dtype is bfloat16" in message


# When one read fails, orbax abandons its other read coroutines unawaited.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["overwrite", "flip_one_bit", "truncate"])
def test_corrupted_tensor_data_is_detected(tmp_path, damage):
  path = tmp_path / "ckpt"
  victim = "layers.1.gate"
  checkpoint.save(path, random_params(TINY, zeros_except=victim), TINY)
  target = data_files(path)[0]  # almost all of it is the victim's bytes
  data = bytearray(open(target, "rb").read())
  middle = len(data) // 2
  if damage == "overwrite":
    data[middle:middle + 16] = b"\x55" * 16
  elif damage == "flip_one_bit":
    data[middle] ^= 0x10
  else:
    data = data[:middle]
  with open(target, "wb") as f:
    f.write(bytes(data))

  with pytest.raises(CheckpointError) as info:
    checkpoint.restore(path)
  message = str(info.value)
  assert str(path) in message
  assert victim in message
  others = set(params_lib.flatten(params_lib.param_shapes(TINY))) - {victim}
  assert not any(f"'{name}'" in message for name in others)


def test_digest_ignores_sharding_and_sees_one_changed_element():
  rng = np.random.default_rng(0)
  value = rng.standard_normal((16, 8)).astype(ml_dtypes.bfloat16)
  mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
  sharded = jax.device_put(value, NamedSharding(mesh, P("x", None)))
  digests = checkpoint_digest.digests({"host": value, "sharded": sharded})
  assert digests["host"] == digests["sharded"]
  changed = value.copy()
  changed[3, 5] = -changed[3, 5]
  swapped = value.copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  others = checkpoint_digest.digests({"changed": changed, "swapped": swapped})
  assert digests["host"] not in others.values()


def test_digest_runs_only_single_device_programs(monkeypatch):
  """Shard by shard on the shards' own devices, each piece once (hundreds of
  multi-device all-reduce programs in flight deadlocked XLA:CPU on 8 devices)."""
  rng = np.random.default_rng(1)
  value = rng.standard_normal((24, 16)).astype(np.float32)
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  arrays = {"host": value,
            "sharded": jax.device_put(value, NamedSharding(mesh, P("data", "model"))),
            "replicated_over_data": jax.device_put(value, NamedSharding(mesh, P(None, "model"))),
            "replicated": jax.device_put(value, NamedSharding(mesh, P()))}
  launched = []
  real = checkpoint_digest._digest_jit

  def spy(piece, offsets, strides):
    launched.append(piece.sharding.device_set)
    return real(piece, offsets, strides)

  monkeypatch.setattr(checkpoint_digest, "_digest_jit", spy)
  digests = checkpoint_digest.digests(arrays)
  assert len(set(digests.values())) == 1  # replicas are not counted twice
  assert all(len(devices) == 1 for devices in launched)
  assert len(launched) == 1 + 8 + 4 + 1
