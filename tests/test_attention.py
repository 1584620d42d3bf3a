"""Paged attention: the decode route of the XLA implementation and the Pallas GPU
kernel (in interpret mode, on the CPU) against the reference einsums."""

import numpy as np
import pytest

import jax.numpy as jnp
from flax import nnx

from ridgeline.configs import models
from ridgeline.engine.engine import Engine, EngineConfig, SamplingParams
from ridgeline.model import attention
from ridgeline.model import paged_attention
from ridgeline.model import pallas_attention
from ridgeline.model import transformer as transformer_lib


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
    (3, 2, 2, 16, 8, 4), (2, 3, 3, 64, 16, 3), (1, 1, 4, 32, 4, 5), (2, 8, 1, 8, 4, 6)])
def test_decode_routes_match_reference(batch, kv_heads, groups, head_dim, page_size, pages):
  args = _inputs(batch, kv_heads, groups, head_dim, page_size, pages)
  ref = attention._attend_xla(*args)
  # One block, and several blocks walked by the loop (8-token blocks).
  # One block, several blocks walked by the loop (8-token blocks), and the
  # platform's own choice.
  for block in (paged_attention.BLOCK_TOKENS, 8, None):
    got = paged_attention.paged_attention(*args, block_tokens=block)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  pallas = pallas_attention.attend_decode(args[0], args[1], args[2], args[3], args[5],
                                          interpret=True)
  np.testing.assert_allclose(pallas, ref, rtol=1e-5, atol=1e-5)


def test_cpu_blocks_fit_the_cache_and_other_platforms_keep_the_default():
  block = paged_attention.block_tokens_for
  # The default model's decode rows (3 KV heads of 64, fp32): a batch of 64
  # gathers 32-token blocks (1.5 MiB of keys), one row the whole 256.
  assert block(64, 3, 64, 4, 16, "cpu") == 32
  assert block(1, 3, 64, 4, 16, "cpu") == paged_attention.BLOCK_TOKENS
  for rows in (1, 3, 17, 64, 512, 4096):
    tokens = block(rows, 8, 128, 2, 16, "cpu")
    pages = tokens // 16
    assert tokens % 16 == 0 and pages & (pages - 1) == 0 and 16 <= tokens <= 256
    assert tokens == 16 or rows * tokens * 8 * 128 * 2 <= paged_attention.CPU_BLOCK_BYTES
  assert block(512, 8, 128, 2, 16, "gpu") == paged_attention.BLOCK_TOKENS


def _step_inputs(seed=0, page_size=4, tile=4):
  """A step of two decode rows and two prefill chunks (one over a cached prefix)."""
  rng = np.random.default_rng(seed)
  kv_heads, groups, head_dim, pages = 2, 2, 8, 25
  shape = (pages, page_size, kv_heads, head_dim)
  k_pages = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  v_pages = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  width = 6
  tables = rng.permutation(pages - 1)[:4 * width].reshape(4, width).astype(np.int32)
  # decode rows at positions 9 and 17; chunk A: 6 tokens at 0..5; chunk B: 3 at 12..14
  dec_pos = np.array([9, 17], np.int32)
  chunks = [(0, 6, 2), (12, 3, 3)]  # (start, length, table row)
  positions = list(dec_pos)
  tile_tables, tile_lens = [], []
  for start, n, row in chunks:
    for t0 in range(0, n, tile):
      m = min(tile, n - t0)
      positions += list(range(start + t0, start + t0 + m)) + [-1] * (tile - m)
      tile_tables.append(tables[row])
      tile_lens.append(start + t0 + m)
  positions = np.asarray(positions, np.int32)
  q = jnp.asarray(rng.standard_normal((len(positions), kv_heads * groups, head_dim)),
                  jnp.float32)
  layout = attention.StepLayout(jnp.asarray(tables[:2]), jnp.asarray(dec_pos + 1),
                                jnp.asarray(np.stack(tile_tables)),
                                jnp.asarray(tile_lens, np.int32))
  return q, k_pages, v_pages, jnp.asarray(positions), layout, tables, chunks, dec_pos


@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 2.0)])
def test_step_regions_match_reference(window, softcap):
  q, kp, vp, positions, layout, tables, chunks, dec_pos = _step_inputs()
  out = np.asarray(attention.attend(q, kp, vp, positions, layout, window=window,
                                    softcap=softcap))
  kw = dict(window=window, softcap=softcap)
  for i, p in enumerate(dec_pos):  # decode rows: one query over their own pages
    ref = attention._attend_xla(q[i][None, None], kp, vp, jnp.asarray(tables[i:i + 1]),
                                jnp.asarray([[p]]), jnp.asarray([p + 1]), **kw)
    np.testing.assert_allclose(out[i], ref[0, 0], rtol=1e-5, atol=1e-5)
  at = 2
  for start, n, row in chunks:  # each chunk's real tokens, whatever its tiles
    tiles = -(-n // 4)
    idx = [at + t * 4 + j for t in range(tiles) for j in range(4)][:n]
    ref = attention._attend_xla(q[np.asarray(idx)][None], kp, vp,
                                jnp.asarray(tables[row:row + 1]),
                                jnp.arange(start, start + n, dtype=jnp.int32)[None],
                                jnp.asarray([start + n]), **kw)
    np.testing.assert_allclose(out[np.asarray(idx)], ref[0], rtol=1e-5, atol=1e-5)
    at += tiles * 4
  assert np.all(np.isfinite(out))  # padding queries see nothing and stay finite


def test_pallas_decode_rows_match_xla():
  q, kp, vp, positions, layout, *_ = _step_inputs(seed=1)
  ref = attention.attend(q, kp, vp, positions, layout, impl="xla")
  got = attention.attend(q, kp, vp, positions, layout, impl="pallas_gpu_interpret")
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_auto_is_xla_on_cpu_and_unknown_impl_fails():
  assert attention.resolve_impl("auto") == "xla"
  q, kp, vp, positions, layout, *_ = _step_inputs()
  with pytest.raises(ValueError, match="unknown attention impl"):
    attention.attend(q, kp, vp, positions, layout, impl="cuda")


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
