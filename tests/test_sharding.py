"""Sharded weights and KV pages on a fake mesh of 8 CPU devices (see conftest.py)."""

import functools
import re

import jax
import numpy as np
import pytest
from flax import nnx

from ridgeline.configs import models
from ridgeline.engine.engine import Engine, EngineConfig, SamplingParams
from ridgeline.model import checkpoint
from ridgeline.engine import loading
from ridgeline.model import params as params_lib
from ridgeline.model import sharding
from ridgeline.model import transformer as transformer_lib

# Two prompts that prefill together in one step (5 + 11 tokens <= prefill_chunk)
# and then decode together within two pages each: two compiled steps per engine.
CONFIG = EngineConfig(page_size=8, num_pages=24, max_model_len=64, max_batch=4,
                      prefill_chunk=16, max_prefill_batch=2)
PROMPTS = [[5, 17, 200, 3, 42], [300, 1, 2, 9, 88, 123, 7, 450, 61, 77, 19]]
GREEDY = SamplingParams(temperature=0, max_tokens=5)
MESHES = ["1x1", "1x2", "2x2", "1x8", "2x4", "8x1"]

TINY = models.get("tiny")  # 4 query heads, 2 KV heads: KV heads < model on 1x8, 2x4
WIDE_KV = TINY.replace(name="tiny-8kv", num_heads=8, num_kv_heads=8)  # KV heads >= model


@functools.cache
def _model(config):
  return transformer_lib.Transformer(config, rngs=nnx.Rngs(0))


@functools.cache
def _reference(config):
  """Greedy tokens from the plain single-device engine (no mesh)."""
  engine = Engine(_model(config), None, CONFIG)
  return [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("config", [TINY, WIDE_KV], ids=lambda c: c.name)
@pytest.mark.parametrize("mesh", MESHES)
def test_greedy_outputs_identical_on_every_mesh(config, mesh):
  model = _model(config)
  engine = Engine(model, None, CONFIG, mesh=sharding.make_mesh(mesh))
  assert [o.token_ids for o in engine.generate(PROMPTS, GREEDY)] == _reference(config)
  # The pools are sharded by KV head over `model` when the heads divide, else replicated.
  m = engine.runner.mesh.shape["model"]
  pool = engine.runner.kv[0][0]
  heads = model.config.num_kv_heads
  expected = heads // m if heads % m == 0 else heads
  assert {s.data.shape[2] for s in pool.addressable_shards} == {expected}


def test_mesh_flag_parsing():
  assert sharding.MeshShape.parse("data=2,model=4") == sharding.MeshShape(2, 4)
  assert sharding.MeshShape.parse("model=8") == sharding.MeshShape(1, 8)
  assert sharding.MeshShape.parse("2x4") == sharding.MeshShape(2, 4)
  assert sharding.MeshShape.parse(None) == sharding.MeshShape(1, 1)
  assert sharding.MeshShape.parse("data=-1,model=2").resolve(8) == sharding.MeshShape(4, 2)
  for bad in ["data=2,data=2", "tensor=2", "data=x", "model=0"]:
    with pytest.raises(ValueError):
      sharding.MeshShape.parse(bad)
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh("data=2,model=8")
  mesh = sharding.make_mesh("data=2,model=4")
  assert dict(mesh.shape) == {"data": 2, "model": 4}


def test_rules_column_row_parallel_and_fallbacks():
  specs = params_lib.flatten(sharding.plan(WIDE_KV, sharding.MeshShape(2, 4))
                             .param_specs(WIDE_KV))
  P = jax.sharding.PartitionSpec
  assert specs["layers.0.q"] == P(None, "model")  # column-parallel
  assert specs["layers.0.k"] == P(None, "model")
  assert specs["layers.0.up"] == P(None, "model")
  assert specs["layers.0.o"] == P("model", None)  # row-parallel
  assert specs["layers.0.down"] == P("model", None)
  assert specs["embed"] == P("model", None)  # over the vocabulary
  assert specs["lm_head"] == P(None, "model")
  assert specs["layers.0.attn_norm"] == P(None)

  # Fewer KV heads than the model axis: k, v and the pools replicate, q stays split.
  tiny = sharding.plan(TINY, sharding.MeshShape(2, 4))
  assert tiny.axes["kv_heads"] is None and tiny.axes["q_heads"] == "model"
  assert tiny.kv_spec() == P(None, None, None, None)
  assert any("KV pages replicated" in n for n in tiny.notes)
  # Query heads that do not divide the axis: q and o replicate too, and say so.
  assert sharding.plan(TINY, sharding.MeshShape(1, 8)).axes["q_heads"] is None
  # A vocabulary that does not divide: the embedding is split over its width.
  odd = TINY.replace(vocab_size=509)
  p = sharding.plan(odd, sharding.MeshShape(1, 4))
  assert params_lib.flatten(p.param_specs(odd))["embed"] == P(None, "model")
  assert any("over the width" in n for n in p.notes)


def test_each_device_holds_its_share_of_the_weights():
  model = transformer_lib.Transformer(WIDE_KV, rngs=nnx.Rngs(0))
  mesh = sharding.make_mesh("data=2,model=4")
  engine = Engine(model, None, CONFIG, mesh=mesh)
  state = nnx.merge(engine.runner.graphdef, engine.runner.state)
  flat = params_lib.flatten(transformer_lib.to_params(state))
  report = sharding.memory_report(WIDE_KV, mesh, page_size=CONFIG.page_size)
  sharded = [n for n in flat if n.rsplit(".", 1)[-1] not in ("attn_norm", "mlp_norm",
                                                              "final_norm")]
  for device in mesh.devices.flat:
    held = {n: sum(s.data.nbytes for s in a.addressable_shards if s.device == device)
            for n, a in flat.items()}
    for n in sharded:  # every large weight: exactly 1/model of it
      assert held[n] * 4 == flat[n].nbytes, n
    assert sum(held.values()) == report.weight_bytes_per_device
  pool = engine.runner.kv[0][0]
  assert pool.addressable_shards[0].data.nbytes * 4 == pool.nbytes


def _collectives(hlo: str) -> list[tuple[str, str]]:
  """(op, result shape) of every collective in compiled HLO text."""
  ops = "all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute"
  return [(op, shape) for shape, op in re.findall(rf"= (\S+) ({ops})(?:-start)?\(", hlo)]


def _decode_hlo(engine, batch):
  return engine.runner.hlo_text((batch, 0))


def _dims(shape: str) -> tuple[int, ...]:
  inner = re.match(r"\w+\[([\d,]*)\]", shape).group(1)
  return tuple(int(d) for d in inner.split(",") if d)


@pytest.mark.parametrize("mesh", ["1x4", "2x4"])
def test_decode_step_collectives_are_tensor_parallel(mesh):
  config = WIDE_KV
  model = transformer_lib.Transformer(config, rngs=nnx.Rngs(0))
  engine = Engine(model, None, CONFIG, mesh=sharding.make_mesh(mesh))
  batch = 4
  hlo = _decode_hlo(engine, batch)
  found = _collectives(hlo)
  weight_shapes = {tuple(s) for s in params_lib.flatten(params_lib.param_shapes(config)).values()}
  pool_rows = {CONFIG.num_pages + 1, (CONFIG.num_pages + 1) * CONFIG.page_size}
  for op, shape in found:
    assert _dims(shape) not in weight_shapes, f"{op} of a weight: {shape}"
    assert not (_dims(shape) and _dims(shape)[0] in pool_rows), f"{op} of a page pool: {shape}"
  # The pools are updated in place: no copy of a whole pool anywhere in the step.
  copies = re.findall(r"= (\S+) copy\(", hlo)
  assert not [s for s in copies if _dims(s) and _dims(s)[0] in pool_rows]
  assert hlo.count("may-alias") + hlo.count("must-alias") >= 2 * config.num_layers

  hidden = config.hidden_size
  # The step's flat batch is replicated over `data` (each replica computes it).
  reduces = [_dims(s) for op, s in found if op == "all-reduce"]
  activation_reduces = [d for d in reduces if d == (batch, hidden)]
  # One all-reduce after the attention output (o) and one after the MLP (down) per
  # layer, plus one for the embedding gathered from vocabulary shards.
  assert len(activation_reduces) == 2 * config.num_layers + 1
  # Everything else is the sampler's, over the sampled rows of vocabulary-sharded
  # logits (reductions for the argmax and softmax; gathers only inside the
  # branches that sort or draw, which a greedy batch skips).
  others = [(op, _dims(s)) for op, s in found if _dims(s) != (batch, hidden)]
  assert others and all(d[0] == batch for _, d in others), others


def test_checkpoint_saved_on_1x1_restores_on_2x4(tmp_path):
  model = _model(TINY)
  checkpoint.save(tmp_path / "ckpt", transformer_lib.to_params(model), model.config)
  mesh = sharding.make_mesh("data=2,model=4")
  restored, _ = loading.load_model(str(tmp_path / "ckpt"), mesh=mesh)
  want = params_lib.flatten(sharding.param_shardings(TINY, mesh))
  for name, array in params_lib.flatten(transformer_lib.to_params(restored)).items():
    assert array.sharding == want[name], name
  engine = Engine(restored, None, CONFIG, mesh=mesh)
  assert [o.token_ids for o in engine.generate(PROMPTS, GREEDY)] == _reference(TINY)

  # And back: the sharded weights saved from 2x4 restore on one device, equal.
  checkpoint.save(tmp_path / "ckpt2", transformer_lib.to_params(restored), TINY)
  _, params = checkpoint.restore(tmp_path / "ckpt2")
  original = params_lib.flatten(transformer_lib.to_params(model))
  for name, array in params_lib.flatten(params).items():
    np.testing.assert_array_equal(np.asarray(array), np.asarray(original[name]), err_msg=name)


def test_sharded_preset_init_is_the_same_on_every_mesh():
  arrays = []
  for mesh in ["1x1", "2x4"]:
    model, _ = loading.load_model(preset="tiny", mesh=sharding.make_mesh(mesh))
    flat = params_lib.flatten(transformer_lib.to_params(model))
    arrays.append({n: np.asarray(a) for n, a in flat.items()})
    assert flat["layers.0.gate"].sharding.spec == jax.sharding.PartitionSpec(None, "model")
  for name in arrays[0]:
    np.testing.assert_array_equal(arrays[0][name], arrays[1][name], err_msg=name)


def test_memory_report_llama_on_8_h100():
  h100 = 80 * 2**30
  small = sharding.memory_report(models.get("llama-3.1-8b"), "model=8", device_bytes=h100)
  big = sharding.memory_report(models.get("llama-3.1-70b"), "model=8", device_bytes=h100)
  alone = sharding.memory_report(models.get("llama-3.1-70b"), "model=1", device_bytes=h100)
  for report in (small, big):
    assert report.weight_dtype == "bfloat16" and not report.notes
    # Everything but the tiny norms is split 8 ways.
    assert report.weight_bytes / 8 <= report.weight_bytes_per_device < report.weight_bytes / 7.9
    assert report.fits
  # One KV head per device: 2 (K, V) * layers * 128 * 2 bytes per token.
  assert small.kv_token_bytes_per_device == 2 * 32 * 128 * 2
  assert big.kv_token_bytes_per_device == 2 * 80 * 128 * 2
  assert big.kv_page_bytes_per_device == 16 * big.kv_token_bytes_per_device
  assert big.kv_pages == (int(h100 * 0.9) - big.weight_bytes_per_device) // (
      big.kv_page_bytes_per_device)
  assert 140e9 < big.weight_bytes < 142e9  # 70.6 B parameters in bfloat16
  assert not alone.fits and "DOES NOT FIT" in alone.summary()
  assert "fits" in big.summary() and "model=8" in big.summary()
