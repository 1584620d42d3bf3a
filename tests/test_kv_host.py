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


def test_a_preempted_sequence_gets_its_generated_pages_back_from_the_host(model):
  """A batch sequence (priority 1) preempted mid-answer by an interactive one on
  a one-row, 12-page engine: the interactive request (12 pages) evicts the pages
  the batch sequence had filled (its answer's too) into the host tier; when it
  resumes they are copied back, not recomputed, and both outputs equal each
  alone."""
  rng = np.random.default_rng(4)
  low, high = ([int(t) for t in rng.integers(1, 400, size=n)] for n in (10, 76))
  p_low = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
  p_high = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
  alone = _engine(model, num_pages=40)
  expected = [alone.generate([low], p_low)[0].token_ids,
              alone.generate([high], p_high)[0].token_ids]

  def run(host_bytes):
    e = _engine(model, host_bytes=host_bytes, policy="copy", num_pages=12, max_batch=1,
                max_model_len=96)
    first = e.add_request(low, p_low, priority=1)
    for _ in range(20):  # its prompt, then most of 20 answer tokens: 3 full pages
      e.step()
    second = e.add_request(high, p_high)
    while e.has_unfinished():
      e.step()
    got = [e.get_output(r).outputs[0].token_ids for r in (first, second)]
    assert e.num_free_pages() == 12  # no leaks
    return got, e

  for host_bytes in (None, 10**7):
    got, e = run(host_bytes)
    assert got == expected
    assert e.metrics.snapshot()["preemptions"] > 0
  off_prefill = _prefill_tokens(run(None)[1])
  tier = e.metrics.snapshot()["prefix_cache"]["host_tier"]
  assert tier["loaded_tokens"] == 3 * PAGE, tier  # two of them hold answer tokens
  assert _prefill_tokens(e) <= off_prefill - tier["loaded_tokens"]


def test_the_price_rule_prices_recompute_at_the_speed_prefill_achieves():
  """A hit the roofline alone would recompute is copied back once the steps that
  computed prompts are seen to run at a tenth of the roofline."""
  p = Planner(models.get("llama-3.1-8b"),
              EngineConfig(page_size=16, max_batch=8, max_model_len=8192),
              roofline.PEAKS["H100"])
  p.prefer_copy(0, 1024, 1024)  # compute-bound: recomputing costs the bound's time
  bound = p.prices[-1]
  p.copy_latency = 2 * bound.recompute_s - bound.copy_s  # a copy twice the bound's
  assert not p.prefer_copy(0, 1024, 1024)
  cost = p.cost([(0, 2048)])
  p.observe_step(cost, 10 * cost.time_lower_bound(p.peaks, p.dtype))
  assert p.prefill_efficiency == pytest.approx(0.1)
  assert p.prefer_copy(0, 1024, 1024)
  assert p.prices[-1].recompute_s == pytest.approx(10 * bound.recompute_s)
  p.observe_step(cost, cost.time_lower_bound(p.peaks, p.dtype))  # an average, not the last
  assert p.prefill_efficiency == pytest.approx(0.19)


def test_hash_chain_keeps_other_prefixes_out():
  """Two sequences whose second pages hold the same tokens after different first
  pages: the second's lookup finds nothing of the first's in the host tier."""
  kv = kv_cache.KVCacheManager(4, 4, 4, capacity=2)
  loaded = {}

  def save(pages):  # a host page per page: here, the page's own number
    return [(np.float32(p),) for p in pages]

  host = HostTier(16, 4)
  kv.attach_host(host, save, lambda pages, rows: loaded.update(zip(pages, rows)),
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
  assert len(loaded) == 2


def _page(runner, page):
  return [np.asarray(x[page]) for x in jax.tree.leaves(runner.kv)]


def _host_page(runner, saved):
  """A host page as numpy, one array per pool leaf in the pools' order."""
  out = {}
  for group, stacked in zip(runner._copy_groups, saved):
    assert stacked.sharding.memory_kind == "pinned_host"
    for k, i in enumerate(group):
      out[i] = np.asarray(stacked[k])
  return [out[i] for i in range(len(out))]


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_a_saved_page_is_the_one_before_it_is_overwritten(model, kv_dtype):
  """Page 3 saved to host memory, then overwritten on the device by a copy of
  page 5 dispatched after it: the host copy is page 3 as it was (8-bit values and
  scales as they are)."""
  e = _engine(model, kv_dtype=kv_dtype)
  e.generate([list(range(1, 60))], GREEDY)  # pages 0..7 hold K/V
  runner = e.runner
  before, other = _page(runner, 3), _page(runner, 5)
  assert not all(np.array_equal(a, b) for a, b in zip(before, other))
  saved = runner.save_pages([3, 5])  # dispatched first
  runner.load_pages([3], saved[1:])  # then page 3 becomes page 5
  assert all(np.array_equal(h, b) for h, b in zip(_host_page(runner, saved[0]), before))
  assert all(np.array_equal(a, b) for a, b in zip(_page(runner, 3), other))


def test_a_copy_wider_than_one_program_goes_in_several(model):
  """70 pages (one gather and scatter moves at most 64) copied out and back in
  reverse order."""
  from ridgeline.engine.kv_copies import MAX_WIDTH
  e = _engine(model, num_pages=80)
  runner = e.runner
  runner.kv = jax.tree.map(  # every page's K/V different
      lambda x: jax.device_put(np.random.default_rng(0).normal(size=x.shape).astype(x.dtype),
                               x.sharding), runner.kv)
  pages = list(range(70))
  assert len(pages) > MAX_WIDTH
  before = [_page(runner, p) for p in pages]
  runner.load_pages(pages[::-1], runner.save_pages(pages))
  for p in pages:
    assert all(np.array_equal(a, b) for a, b in zip(_page(runner, 69 - p), before[p]))


def test_the_tier_copies_each_devices_shard_of_a_sharded_pool(model):
  """KV heads split over a 1x2 mesh: pages saved and copied back per device,
  outputs equal to the tier off on one device."""
  from ridgeline.model import sharding
  expected = _conversations(_engine(model))
  e = Engine(model, None, EngineConfig(
      page_size=PAGE, num_pages=20, max_model_len=128, max_batch=4, prefill_chunk=32,
      max_prefill_batch=4, host_kv_cache_bytes=64 * _engine(model).runner.page_bytes,
      host_kv_policy="copy"), mesh=sharding.make_mesh("data=1,model=2"))
  assert _conversations(e) == expected
  assert e.metrics.snapshot()["prefix_cache"]["host_tier"]["loaded_tokens"] > 0
  assert all(len(s.sharding.device_set) == 2 and s.sharding.memory_kind == "pinned_host"
             for s in e.runner.save_pages([0])[0])


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
