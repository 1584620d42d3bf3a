"""Paged attention: the decode route of the XLA implementation and the Pallas GPU
kernel (in interpret mode, on the CPU) against the reference einsums."""

import numpy as np
import pytest

import jax.numpy as jnp
from flax import nnx

from configs import models
from engine.engine import Engine, EngineConfig, SamplingParams
from model import attention
from model import transformer as transformer_lib


def _inputs(batch, kv_heads, groups, head_dim, page_size, pages_per_seq, seed=0,
            dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  pool = batch * pages_per_seq + 1
  shape = (pool, page_size, kv_heads, head_dim)
  k_pages = jnp.asarray(rng.standard_normal(shape), dtype)
  v_pages = jnp.asarray(rng.standard_normal(shape), dtype)
  q = jnp.asarray(rng.standard_normal((batch, 1, kv_heads * groups, head_dim)), dtype)
  tables = jnp.asarray(rng.permutation(pool - 1)[:batch * pages_per_seq]
                       .reshape(batch, pages_per_seq), jnp.int32)
  lens = rng.integers(1, pages_per_seq * page_size + 1, batch)
  lens[-1] = pages_per_seq * page_size  # one row with every page full
  lens = jnp.asarray(lens, jnp.int32)
  return q, k_pages, v_pages, tables, (lens - 1)[:, None], lens


@pytest.mark.parametrize("batch,kv_heads,groups,head_dim,page_size,pages", [
    (3, 2, 2, 16, 8, 4), (2, 3, 3, 64, 16, 3), (1, 1, 4, 32, 4, 5)])
def test_decode_routes_match_reference(batch, kv_heads, groups, head_dim, page_size, pages):
  args = _inputs(batch, kv_heads, groups, head_dim, page_size, pages)
  ref = attention._attend_xla(*args)
  dec = attention._attend_xla_decode(*args)
  np.testing.assert_allclose(dec, ref, rtol=1e-5, atol=1e-5)
  pallas = attention.attend(*args, impl="pallas_gpu_interpret")
  np.testing.assert_allclose(pallas, ref, rtol=1e-5, atol=1e-5)
  # The public entry point takes the decode route for one query per sequence.
  np.testing.assert_allclose(attention.attend(*args, impl="xla"), dec, rtol=0, atol=0)


def test_padding_rows_and_prefill_fall_back():
  q, kp, vp, tables, pos, lens = _inputs(2, 2, 2, 16, 8, 2)
  lens = lens.at[1].set(0)  # a padding row: nothing visible, output finite
  out = attention.attend(q, kp, vp, tables, pos.at[1].set(0), lens, impl="pallas_gpu_interpret")
  assert bool(jnp.all(jnp.isfinite(out)))
  # Several queries per sequence (prefill): every impl runs the reference.
  q2 = jnp.concatenate([q, q], axis=1)
  pos2 = jnp.concatenate([pos - 1, pos], axis=1)
  ref = attention._attend_xla(q2, kp, vp, tables, pos2, lens)
  for impl in ("xla", "pallas_gpu_interpret"):
    np.testing.assert_array_equal(attention.attend(q2, kp, vp, tables, pos2, lens, impl=impl),
                                  ref)


def test_auto_is_xla_on_cpu_and_unknown_impl_fails():
  assert attention.resolve_impl("auto") == "xla"
  with pytest.raises(ValueError, match="unknown attention impl"):
    attention.attend(*_inputs(1, 1, 1, 8, 4, 1), impl="cuda")


def test_engine_greedy_tokens_same_with_pallas_kernel():
  model = transformer_lib.Transformer(models.get("tiny"), rngs=nnx.Rngs(0))
  config = EngineConfig(page_size=8, num_pages=16, max_model_len=32, max_batch=2,
                        prefill_chunk=16, max_prefill_batch=2)
  prompts = [[5, 17, 99, 3, 250], [7, 7, 1]]
  params = SamplingParams(temperature=0, max_tokens=4)
  ref = [o.token_ids for o in Engine(model, None, config).generate(prompts, params)]
  model.attention_impl = "pallas_gpu_interpret"
  got = [o.token_ids for o in Engine(model, None, config).generate(prompts, params)]
  assert got == ref
