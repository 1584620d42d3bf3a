"""The host tier of the KV cache (engine/kv_host.py): multi-turn conversations on
a pool too small to keep them, with the tier off, copying back, recomputing and
priced; greedy outputs identical through eviction, reload, preemption and mixed
steps; no page leaks; a full tier blocks nothing; hash chains keep other
conversations' pages out; a gathered copy is the page before it was
overwritten; the price rule follows the host link."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from ridgeline.configs import models
from ridgeline.engine import kv_cache, roofline
from ridgeline.engine.engine import Engine, EngineConfig, SamplingParams
from ridgeline.engine.kv_host import HostTier
from ridgeline.engine.planner import Planner
from ridgeline.model import transformer as transformer_lib

PAGE = 8
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
  return transformer_lib.Transformer(models.get("tiny"), rngs=nnx.Rngs(6))


def _engine(model, host_bytes=None, policy="price", **kw):
  cfg = dict(page_size=PAGE, num_pages=20, max_model_len=128, max_batch=4, prefill_chunk=32,
             max_prefill_batch=4, host_kv_cache_bytes=host_bytes, host_kv_policy=policy)
  cfg.update(kw)
  return Engine(model, None, EngineConfig(**cfg))


def _conversations(engine, users=6, turns=3, seed=0):
  """Each turn of every user's conversation: the history (prompt + answer so far)
  plus a new message; users take turns in rounds, so their pages are evicted
  between their turns (20 pages hold about two conversations)."""
  rng = np.random.default_rng(seed)
  history = [[int(t) for t in rng.integers(1, 400, size=int(rng.integers(18, 30)))]
             for _ in range(users)]
  outs = []
  for _ in range(turns):
    results = engine.generate(history, GREEDY)
    outs.append([r.token_ids for r in results])
    history = [h + r.token_ids + [int(t) for t in rng.integers(1, 400, size=5)]
               for h, r in zip(history, results)]
  return outs


def _prefill_tokens(engine):
  return engine.metrics.registry.get_sample_value(
      "ridgeline_computed_tokens_total", {"kind": "prefill"}) or 0


@pytest.mark.parametrize("policy", ["price", "copy"])
def test_conversations_reload_from_host_with_the_same_outputs(model, policy):
  off = _engine(model)
  expected = _conversations(off)
  page_bytes = off.runner.page_bytes
  on = _engine(model, host_bytes=64 * page_bytes, policy=policy)
  assert _conversations(on) == expected
  tier = on.metrics.snapshot()["prefix_cache"]["host_tier"]
  assert tier["loaded_tokens"] > 0 and tier["bytes_to_device"] > 0, tier
  assert tier["bytes_to_host"] >= tier["bytes_to_device"]
  assert _prefill_tokens(on) < _prefill_tokens(off) - tier["loaded_tokens"] // 2
  for e in (off, on):
    assert e.num_free_pages() == e.config.num_pages  # no leaks on the device
  assert len(on.scheduler.kv.host) <= 64


def test_recompute_policy_and_a_full_tier_change_nothing(model):
  off = _engine(model)
  expected = _conversations(off, seed=1)
  page_bytes = off.runner.page_bytes
  never = _engine(model, host_bytes=64 * page_bytes, policy="recompute")
  assert _conversations(never, seed=1) == expected
  assert never.metrics.snapshot()["prefix_cache"]["host_tier"]["loaded_tokens"] == 0
  tiny = _engine(model, host_bytes=2 * page_bytes)  # full at once: LRU within 2 pages
  assert _conversations(tiny, seed=1) == expected
  tier = tiny.metrics.snapshot()["prefix_cache"]["host_tier"]
  assert tier["evictions"] > 0 and tier["pages"] <= 2
  assert tiny.num_free_pages() == tiny.config.num_pages


def test_reload_under_preemption_and_mixed_steps(model):
  """Many conversations at once on 12 pages: preemption, and host hits landing
  in steps that also decode."""
  rng = np.random.default_rng(3)
  prompts = [[int(t) for t in rng.integers(1, 400, size=int(rng.integers(20, 34)))]
             for _ in range(8)]
  params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
  base = _engine(model, num_pages=200).generate(prompts, params)
  second = [p + o.token_ids + [7, 8, 9] for p, o in zip(prompts, base)]
  expected = [o.token_ids for o in _engine(model, num_pages=200).generate(second, params)]
  e = _engine(model, host_bytes=10**7, num_pages=12, max_model_len=96)
  e.generate(prompts, params)
  got = [o.token_ids for o in e.generate(second, params)]
  assert got == expected
  snap = e.metrics.snapshot()
  assert snap["preemptions"] > 0 and snap["prefix_cache"]["host_tier"]["loaded_tokens"] > 0
  assert e.num_free_pages() == 12


def test_hash_chain_keeps_other_prefixes_out():
  """Two sequences whose second pages hold the same tokens after different first
  pages: the second's lookup finds nothing of the first's in the host tier."""
  kv = kv_cache.KVCacheManager(4, 4, 4, capacity=2)
  saved = {}

  def save(pages):
    return [jax.numpy.asarray(np.asarray(pages, np.float32)[:, None])]

  host = HostTier(16, 4)
  kv.attach_host(host, save, lambda pages, rows: saved.update(zip(pages, rows[0])),
                 lambda *a: True)
  a = np.array([1, 2, 3, 4, 9, 9, 9, 9, 5], np.int32)
  kv.reuse_prefix(0, a)
  kv.allocate(0, 9)
  kv.publish(0, a, 8)
  kv.release(0)
  kv.allocate(1, 16)  # evicts both published pages into the host tier
  assert len(host) == 2
  kv.release(1)
  b = np.array([7, 7, 7, 7, 9, 9, 9, 9, 5], np.int32)  # same second page, other first
  assert kv.reuse_prefix(0, b) == 0 and kv.last_host == (0, 0, 0)
  kv.release(0)
  assert kv.reuse_prefix(0, a) == 8 and kv.last_host == (8, 8, 0)  # its own: both


def test_a_saved_page_is_the_one_before_it_is_overwritten(model):
  e = _engine(model)
  runner = e.runner
  before = [np.asarray(x[3]) for x in jax.tree.leaves(runner.kv)]
  saved = runner.save_pages([3])  # dispatched first
  new = [np.full((1,) + b.shape, 5, b.dtype) for b in before]
  runner.load_pages([3], new)  # then the page is overwritten
  assert all(np.array_equal(np.asarray(s)[0], b) for s, b in zip(saved, before))
  assert all(np.array_equal(np.asarray(x[3]), n[0])
             for x, n in zip(jax.tree.leaves(runner.kv), new))


def test_the_price_rule_follows_the_host_link():
  """Copy back over NVLink-C2C; over a 10 MB/s link a short hit recomputes."""
  config = models.get("llama-3.1-8b")
  cfg = EngineConfig(page_size=16, max_batch=64, max_model_len=8192)
  fast = Planner(config, cfg, roofline.PEAKS["GH200"])
  slow_peaks = dataclasses.replace(roofline.PEAKS["H100"], host_bandwidth=1e7)
  slow = Planner(config, cfg, slow_peaks)
  assert fast.prefer_copy(0, 1024, 16)
  assert not slow.prefer_copy(0, 16, 512)
  forced = Planner(config, dataclasses.replace(cfg, host_kv_policy="copy"), slow_peaks)
  assert forced.prefer_copy(0, 16, 512)
