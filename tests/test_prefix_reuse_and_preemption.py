"""The KV cache's economy on a tiny model: prefix reuse, LRU eviction, preemption,
admission control and the metrics that report them."""

import numpy as np
import pytest
from flax import nnx

from ridgeline.configs import models
from ridgeline.engine import kv_cache
from ridgeline.engine.engine import CapacityError, Engine, EngineConfig, SamplingParams
from ridgeline.model import transformer as transformer_lib

PAGE = 8
GREEDY = SamplingParams(temperature=0, max_tokens=6)


@pytest.fixture(scope="module")
def model():
  return transformer_lib.Transformer(models.get("tiny"), rngs=nnx.Rngs(1))


def _engine(model, **overrides):
  cfg = dict(page_size=PAGE, num_pages=64, max_model_len=160, max_batch=8, prefill_chunk=32,
             max_prefill_batch=4)
  cfg.update(overrides)
  return Engine(model, None, EngineConfig(**cfg))


def _prefill_tokens(engine):
  return engine.metrics.registry.get_sample_value(
      "ridgeline_computed_tokens_total", {"kind": "prefill"}) or 0


def test_allocator_evicts_least_recently_released_cached_pages():
  alloc = kv_cache.PageAllocator(4)
  a, b, c = alloc.allocate(3)
  key = lambda p: kv_cache.page_hash(b"", [p])  # noqa: E731
  for p in (a, b):
    alloc.cache(p, key(p))
  alloc.free([b])  # released first: evicted first
  alloc.free([a])
  alloc.free([c])  # not cached: plainly free
  assert alloc.num_free == 4 and alloc.num_used == 0 and alloc.num_cached == 2
  got = alloc.allocate(2)  # the plain free pages come first, nothing evicted
  assert alloc.evictions == 0 and alloc.lookup(key(a)) == a
  alloc.allocate(1)
  assert alloc.evictions == 1 and alloc.lookup(key(b)) is None and alloc.lookup(key(a)) == a
  alloc.acquire(a)  # a cache hit revives it
  assert alloc.refcount(a) == 1 and alloc.num_free == 0
  alloc.free(got)
  with pytest.raises(kv_cache.OutOfPages):
    alloc.allocate(3)


def test_ten_turn_conversation_computes_only_new_tokens(model):
  engine = _engine(model)
  rng = np.random.default_rng(0)
  history: list[int] = []
  for turn in range(10):
    new = [int(t) for t in rng.integers(1, 512, size=int(rng.integers(4, 9)))]
    prompt = history + new
    before = _prefill_tokens(engine)
    hits_before = engine.metrics.registry.get_sample_value(
        "ridgeline_prefix_cache_hits_tokens_total")
    out = engine.generate([prompt], GREEDY)[0]
    computed = _prefill_tokens(engine) - before
    hits = engine.metrics.registry.get_sample_value(
        "ridgeline_prefix_cache_hits_tokens_total") - hits_before
    assert hits + computed == len(prompt)
    if turn > 0:
      # New user tokens, the previous answer's last token (never run through the
      # model), and at most one partial page.
      assert computed <= len(new) + 1 + (PAGE - 1), (turn, computed, len(new))
      assert hits >= len(history) - PAGE
    history = prompt + out.token_ids
  snap = engine.metrics.snapshot()["prefix_cache"]
  assert snap["hit_rate"] > 0.6
  # Reuse does not change results: the last turn alone on a fresh engine agrees.
  fresh = _engine(model).generate([history[:-len(out.token_ids)]], GREEDY)[0]
  assert fresh.token_ids == out.token_ids


def test_small_pool_preempts_and_evicts_without_changing_outputs(model):
  rng = np.random.default_rng(3)
  prompts = [[int(t) for t in rng.integers(1, 512, size=int(rng.integers(20, 40)))]
             for _ in range(12)]
  prompts += [p[:24] + [7, 7] for p in prompts[:4]]  # shared prefixes
  params = SamplingParams(temperature=0, max_tokens=40)
  big = _engine(model, num_pages=200).generate(prompts, params)
  small = _engine(model, num_pages=12, max_model_len=96)
  out = small.generate(prompts, params)
  assert [o.token_ids for o in out] == [o.token_ids for o in big]
  assert all(o.finish_reason == "length" for o in out)
  snap = small.metrics.snapshot()
  assert snap["preemptions"] > 0
  assert snap["prefix_cache"]["evictions"] > 0
  assert small.num_free_pages() == 12


def test_pool_too_small_for_one_sequence_is_refused(model):
  with pytest.raises(ValueError, match=r"max_model_len=160.*needs.*num_pages"):
    _engine(model, num_pages=10)
  with pytest.raises(ValueError, match=r"cpu_kv_cache_bytes"):
    _engine(model, num_pages=None, cpu_kv_cache_bytes=1000)


def test_admission_control(model):
  engine = _engine(model, max_waiting=4)
  accepted, rejected = [], 0
  for i in range(10):
    try:
      accepted.append(engine.add_request([1 + i, 2, 3], GREEDY))
    except CapacityError as e:
      rejected += 1
      msg = str(e)
  assert len(accepted) == 4 and rejected == 6
  assert "at capacity" in msg and "4 requests waiting" in msg and "running" in msg
  assert "KV cache" in msg
  assert len(engine.scheduler.requests) == 4  # rejected load is not kept
  while engine.has_unfinished():
    engine.step()
  assert all(engine.get_output(r).finish_reason == "length" for r in accepted)
  # generate() feeds a long list through the bounded queue.
  outs = engine.generate([[5, i + 1] for i in range(11)], GREEDY)
  assert len(outs) == 11 and all(len(o.token_ids) == 6 for o in outs)


def test_metrics_match_a_known_workload(model):
  engine = _engine(model)
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8], list(range(10, 30))]
  engine.generate(prompts, SamplingParams(temperature=0, max_tokens=5))
  snap = engine.metrics.snapshot()
  assert snap["prompt_tokens"] == 28
  assert snap["generation_tokens"] == 15
  computed = lambda kind: engine.metrics.registry.get_sample_value(  # noqa: E731
      "ridgeline_computed_tokens_total", {"kind": kind})
  assert computed("prefill") == 28  # nothing cached yet
  assert computed("decode") == 12  # 4 decode rows per request
  # Two prompts fill the first step's 32-token prefill budget (16-token tiles);
  # the third prefills in the next step beside their decode rows, then all
  # three decode together.
  assert snap["steps"]["prefill"]["tokens"] == 8 and snap["steps"]["mixed"]["tokens"] == 22
  assert snap["decode_batch_size"]["max"] == 3 and snap["decode_batch_size"]["count"] == 5
  assert snap["ttft_s"]["count"] == 3 and snap["tpot_s"]["count"] == 3
  assert snap["requests_running"] == 0 and snap["kv_cache_utilization"] == 0
  assert snap["ridge_point"] == pytest.approx(engine.planner.ridge)
  for kind in ("prefill", "decode"):
    assert snap["steps"][kind]["achieved_intensity"] > 0
    assert 0 < snap["steps"][kind]["mbu"] and 0 < snap["steps"][kind]["mfu"]
  text = engine.metrics.prometheus_text()
  for name in ("ridgeline_decode_batch_size_bucket", "ridgeline_kv_cache_utilization",
               "ridgeline_prefix_cache_hits_tokens_total", "ridgeline_preemptions_total",
               "ridgeline_target_arithmetic_intensity", "ridgeline_mfu", "ridgeline_mbu",
               "ridgeline_time_to_first_token_seconds_bucket",
               'ridgeline_generation_tokens_total 15.0'):
    assert name in text, name
  # A second identical batch hits the prefix cache for every full page.
  engine.generate(prompts, SamplingParams(temperature=0, max_tokens=5))
  assert engine.metrics.snapshot()["prefix_cache"]["hit_tokens"] == 16


def test_metric_samples_stay_bounded():
  """A long-running server keeps at most MAX_SAMPLES raw samples of each kind;
  numbering stays absolute, so a job's `since` still reads what it took."""
  from ridgeline.engine import metrics as metrics_lib
  m = metrics_lib.Metrics(ridge_point=100.0)
  m._samples["ttft"] = metrics_lib._Samples(cap=8)
  for i in range(20):
    m.on_request_finished(float(i), None, None)
  assert m.sample_count("ttft") == 20
  kept = m.samples("ttft")
  assert len(kept) <= 8 and kept[-1] == 19.0 and kept == sorted(kept)
  assert m.samples("ttft", since=17) == [17.0, 18.0, 19.0]
  assert m.snapshot()["ttft_s"]["count"] == len(kept)


def test_seeded_sampling_with_min_tokens_penalties_and_stop_ids_survives_preemption(model):
  """Found by fuzzing: min_tokens banned the stop ids one token too long while a
  token was in flight (it counted only the tokens read), but not in a preempted
  sequence's recomputation (nothing in flight), so a seeded output changed exactly
  where min_tokens ended. The ban now ends at the same output position either way."""
  rng = np.random.default_rng(5)
  prompts = [[int(t) for t in rng.integers(1, 512, size=int(rng.integers(20, 40)))]
             for _ in range(10)]
  stop_ids = [3, 10, 17, 24, 31, 38, 45]  # (8 or fewer: the standard banned width)
  params = [SamplingParams(seed=i, n=1, max_tokens=30, min_tokens=1 + i % 12, temperature=1.0,
                           top_k=2**31 - 1, stop_token_ids=stop_ids,
                           repetition_penalty=1.3 if i % 2 else 1.0,
                           frequency_penalty=0.5 if i % 2 else 0.0)
            for i in range(10)]
  big = _engine(model, num_pages=200).generate(prompts, params)
  small = _engine(model, num_pages=12, max_model_len=96)
  out = small.generate(prompts, params)
  assert small.metrics.snapshot()["preemptions"] > 0
  assert [o.token_ids for o in out] == [o.token_ids for o in big]
  for o, p in zip(out, params):  # no stop before min_tokens; a stop ends the output
    assert not set(o.token_ids[:p.min_tokens]) & set(stop_ids)
    if o.finish_reason == "stop":
      assert o.token_ids[-1] in stop_ids
  # A stop id ends a sequence right after min_tokens: the greedy third token, as a
  # stop id with min_tokens 2, ends the output there (it was banned one token too long).
  engine = _engine(model, num_pages=200)
  third = engine.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=3))[0]
  assert not set(third.token_ids[:2]) & {third.token_ids[2]}
  ended = engine.generate(prompts[:1], SamplingParams(
      temperature=0, max_tokens=8, min_tokens=2, stop_token_ids=[third.token_ids[2]]))[0]
  assert ended.token_ids == third.token_ids and ended.finish_reason == "stop"


@pytest.mark.parametrize("at", [8, 9, 10])
def test_a_preemption_at_the_end_of_min_tokens_changes_no_seeded_token(model, at):
  """The defect's exact case: preempted when `at` tokens are out (min_tokens 9),
  the recomputation samples the next token with nothing in flight."""
  prompt = [int(t) for t in np.random.default_rng(9).integers(1, 512, size=30)]
  params = SamplingParams(seed=0, max_tokens=22, min_tokens=9, temperature=1.0,
                          top_k=2**31 - 1, stop_token_ids=[152, 360, 39],
                          repetition_penalty=1.2)
  engine = _engine(model, num_pages=200)
  expected = engine.generate([prompt], params)[0].token_ids
  rid = engine.add_request(prompt, params)
  sched = engine.scheduler
  seq = sched.requests[rid].seqs[0]
  while seq.num_output < at:
    engine.step()
  sched._preempt(seq.slot)  # forced, as a full pool would
  while engine.has_unfinished():
    engine.step()
  assert engine.get_output(rid).token_ids == expected
  assert engine.metrics.snapshot()["preemptions"] == 1


def test_priorities_admit_interactive_first_and_preempt_batch_work_only(model):
  """Priority (vLLM's meaning: lower first): queued interactive requests (0) start
  before batch requests (1) queued earlier, preemption takes only batch work, and
  no greedy output changes."""
  rng = np.random.default_rng(4)
  prompts = [[int(t) for t in rng.integers(1, 500, size=int(rng.integers(20, 40)))]
             for _ in range(8)]
  params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
  alone = _engine(model)
  expected = [alone.generate([p], params)[0].token_ids for p in prompts]
  # 24 pages of 8 tokens for 8 sequences of up to 64: preemption (of batch work:
  # the two interactive sequences fit the pool together).
  engine = _engine(model, num_pages=24, max_model_len=64)
  sched = engine.scheduler
  victims = []
  preempt = sched._preempt

  def record_preempt(slot):
    victims.append(int(sched.batch.priority[slot]))
    preempt(slot)

  sched._preempt = record_preempt
  batch_ids = [engine.add_request(p, params, priority=1) for p in prompts[:6]]
  interactive = [engine.add_request(p, params) for p in prompts[6:]]
  assert [s.request.request_id for s in list(sched.waiting)[:2]] == interactive
  while engine.has_unfinished():
    engine.step()
  outs = {rid: engine.get_output(rid) for rid in batch_ids + interactive}
  assert [outs[r].outputs[0].token_ids for r in batch_ids + interactive] == expected
  assert victims and set(victims) == {1}, victims  # interactive work never preempted
  queued = {r: outs[r].metrics.queue_time for r in outs}
  assert max(queued[r] for r in interactive) <= min(queued[r] for r in batch_ids[2:])
  error = engine.get_output(engine.add_request([1, 2], params, priority=True)).error
  assert error.startswith("priority must be an integer")


@pytest.mark.parametrize("priority,started", [(1, 2), (0, 3)])
def test_batch_work_leaves_a_page_reserve_for_interactive_requests(model, priority, started):
  """A pool of 24 pages keeps 3 (min(8 pages of max_model_len, 24 // 8)) that
  batch work may not start into: one interactive and three batch prompts of 8
  pages each, one step: the interactive one and one batch one start (a second
  would leave 0 free), where three requests of priority 0 would start."""
  engine = _engine(model, num_pages=24, max_model_len=64, prefill_chunk=256)
  assert engine.scheduler.page_reserve == 3
  params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
  engine.add_request(list(range(1, 61)), params)
  for i in range(3):
    engine.add_request(list(range(100 + i, 160 + i)), params, priority=priority)
  engine.step()
  assert engine.scheduler.num_running == started
  while engine.has_unfinished():
    engine.step()


def test_batch_work_starts_only_below_batch_rows(model):
  """batch_rows 3 of max_batch 8: six batch prompts start three at a time (the
  rest wait, and start as rows end), interactive ones start past it, and every
  greedy output is what it is alone."""
  params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
  prompts = [list(range(10 * i + 1, 10 * i + 9)) for i in range(8)]
  expected = [_engine(model).generate([p], params)[0].token_ids for p in prompts]
  engine = _engine(model, batch_rows=3, prefill_chunk=128)
  batch = [engine.add_request(p, params, priority=1) for p in prompts[:6]]
  engine.step()
  assert engine.scheduler.num_running == 3
  interactive = [engine.add_request(p, params) for p in prompts[6:]]
  engine.step()
  assert engine.scheduler.num_running == 5
  most = 5
  while engine.has_unfinished():
    engine.step()
    most = max(most, engine.scheduler.num_running)
  assert most == 5  # batch rows never joined a batch of 3 or more
  assert [engine.get_output(r).outputs[0].token_ids for r in batch + interactive] == expected
  with pytest.raises(ValueError, match="batch_rows"):
    EngineConfig(batch_rows=0)


def test_a_full_batch_of_batch_work_gives_a_row_to_an_interactive_request(model):
  """max_batch 2, both rows decoding batch work (priority 1): an interactive
  request starts at once, preempting the newest batch sequence, and every
  greedy output is unchanged."""
  params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
  prompts = [list(range(1, 20)), list(range(30, 52)), list(range(60, 75))]
  expected = [_engine(model).generate([p], params)[0].token_ids for p in prompts]
  engine = _engine(model, max_batch=2)
  batch = [engine.add_request(p, params, priority=1) for p in prompts[:2]]
  for _ in range(5):
    engine.step()
  assert engine.scheduler.num_running == 2
  rid = engine.add_request(prompts[2], params)
  engine.step()
  running = {s.request.request_id for s in engine.scheduler.batch.seqs
             if s is not None and s.slot >= 0 and engine.scheduler.batch.running[s.slot]}
  assert rid in running and batch[0] in running and batch[1] not in running
  while engine.has_unfinished():
    engine.step()
  assert [engine.get_output(r).outputs[0].token_ids for r in batch + [rid]] == expected
