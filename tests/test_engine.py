"""Engine core on a tiny random model: batching, chunking, donation, pages, sampling."""

import dataclasses

import numpy as np
import pytest

from ridgeline.configs import models
from ridgeline.engine.engine import Engine, EngineConfig, SamplingParams
from ridgeline.model import transformer as transformer_lib

CONFIG = EngineConfig(page_size=8, num_pages=96, max_model_len=64, max_batch=8,
                      prefill_chunk=32, max_prefill_batch=4)
GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def engine(tiny_model):
  return Engine(tiny_model, None, CONFIG)


def _prompts(n, seed=0, lo=1, hi=40):
  rng = np.random.default_rng(seed)
  return [[int(t) for t in rng.integers(1, 512, size=int(rng.integers(lo, hi)))]
          for _ in range(n)]


def _run_staggered(engine, prompts, params, seed=0):
  """Adds requests at random steps while others run; returns outputs in order."""
  rng = np.random.default_rng(seed)
  arrive_at = sorted(rng.integers(0, 10, size=len(prompts)))
  ids, step = [], 0
  while len(ids) < len(prompts) or engine.has_unfinished():
    while len(ids) < len(prompts) and arrive_at[len(ids)] <= step:
      p = params[len(ids)] if isinstance(params, list) else params
      ids.append(engine.add_request(prompts[len(ids)], p))
    engine.step()
    step += 1
  outs = [engine.get_output(i) for i in ids]
  for i in ids:
    engine.release(i)
  return outs


def test_batch_invariance_greedy_and_seeded(engine):
  prompts = _prompts(16)
  alone = [engine.generate([p], GREEDY)[0].token_ids for p in prompts]
  batched = _run_staggered(engine, prompts, GREEDY)
  assert [o.token_ids for o in batched] == alone
  assert all(o.finish_reason == "length" and len(o.token_ids) == 12 for o in batched)

  seeded = [SamplingParams(temperature=0.9, top_p=0.95, top_k=40, min_p=0.01, seed=s,
                           max_tokens=8) for s in range(16)]
  alone = [engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, seeded)]
  batched = _run_staggered(engine, prompts, seeded, seed=1)
  assert [o.token_ids for o in batched] == alone
  assert engine.num_free_pages() == CONFIG.num_pages


def test_seeded_samples_differ_across_seeds_and_follow_temperature(engine):
  prompt = _prompts(1, seed=3)[0]
  a = engine.generate([prompt], SamplingParams(temperature=1.0, seed=1, max_tokens=12))[0]
  b = engine.generate([prompt], SamplingParams(temperature=1.0, seed=2, max_tokens=12))[0]
  assert a.token_ids != b.token_ids
  # top_k=1 is greedy whatever the temperature.
  k1 = engine.generate([prompt], SamplingParams(temperature=5.0, top_k=1, seed=1,
                                                max_tokens=12))[0]
  assert k1.token_ids == engine.generate([prompt], GREEDY)[0].token_ids


def test_chunked_prefill_equals_one_shot(tiny_model):
  prompts = _prompts(4, seed=5, lo=40, hi=52)
  one_shot = Engine(tiny_model, None, EngineConfig(
      page_size=8, num_pages=96, max_model_len=64, max_batch=4, prefill_chunk=64,
      max_prefill_batch=1)).generate(prompts, GREEDY)
  chunked_engine = Engine(tiny_model, None, EngineConfig(
      page_size=8, num_pages=96, max_model_len=64, max_batch=4, prefill_chunk=16,
      max_prefill_batch=1))
  chunked = chunked_engine.generate(prompts, GREEDY)
  assert [o.token_ids for o in chunked] == [o.token_ids for o in one_shot]
  steps = sum(chunked_engine.metrics.snapshot()["steps"][k]["steps"]
              for k in ("prefill", "mixed") if k in chunked_engine.metrics.snapshot()["steps"])
  assert steps >= len(prompts) * 3  # really chunked: one-shot prefill takes one step each


def test_donation_deletes_old_pool_and_aliases(engine):
  rid = engine.add_request([1, 2, 3], GREEDY)
  engine.step()  # prefill
  old = engine.runner.kv
  engine.step()  # decode
  assert all(x.is_deleted() for x in (old[0][0], old[0][1], old[-1][1]))
  assert not engine.runner.kv[0][0].is_deleted()
  engine.abort(rid)
  engine.release(rid)
  # The compiled step aliases the page pools to its outputs.
  hlo = engine.runner.hlo_text((1, 0))
  assert "input_output_alias" in hlo
  assert hlo.count("may-alias") + hlo.count("must-alias") >= 2 * models.get("tiny").num_layers


def test_no_page_leaks_with_aborts_and_errors(engine):
  prompts = _prompts(10, seed=7)
  # Prompts of up to 39 tokens + 24 fit max_model_len 64.
  ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=24)) for p in prompts]
  bad = [engine.add_request([], GREEDY), engine.add_request([7] * 100, GREEDY),
         engine.add_request([1, 99999], GREEDY)]
  multi = engine.add_request(prompts[0], SamplingParams(n=3, temperature=1.0, seed=4,
                                                        max_tokens=20))
  for _ in range(3):
    engine.step()
  engine.abort(ids[1])
  engine.abort(multi)
  while engine.has_unfinished():
    engine.step()
    engine.abort(ids[5])
  assert engine.get_output(ids[1]).finish_reason == "abort"
  assert engine.get_output(ids[5]).finish_reason == "abort"
  assert engine.get_output(ids[0]).finish_reason == "length"
  assert [engine.get_output(b).finish_reason for b in bad[:2]] == ["error", "error"]
  assert "empty prompt" in engine.get_output(bad[0]).error
  assert "max_model_len" in engine.get_output(bad[1]).error
  for i in ids + bad + [multi]:
    engine.release(i)
  assert engine.num_free_pages() == CONFIG.num_pages


def test_bad_requests_fail_alone(engine):
  prompts = [[1, 2, 3], [], [5] * 80, [1, 99999], "text without tokenizer", [4, 5, 6]]
  outs = engine.generate(prompts, GREEDY)
  assert [o.finish_reason for o in outs] == ["length", "error", "error", "error", "error",
                                             "length"]
  assert "out of range" in outs[3].error and "tokenizer" in outs[4].error
  assert outs[0].token_ids == engine.generate([[1, 2, 3]], GREEDY)[0].token_ids


@pytest.mark.parametrize("name,value", [
    ("n", 0), ("max_tokens", 0), ("min_tokens", -1), ("temperature", -0.5),
    ("temperature", float("nan")), ("top_k", -2), ("top_p", 0.0), ("top_p", 1.5),
    ("min_p", -0.1), ("min_p", 1.1), ("repetition_penalty", 0.0),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("seed", -1),
    ("stop", [""]), ("stop_token_ids", [-1]), ("logprobs", 21), ("logprobs", -1),
    ("ignore_eos", "yes"),
])
def test_invalid_sampling_parameters_are_named(name, value):
  with pytest.raises(ValueError, match=name):
    SamplingParams(**{name: value})


def test_min_tokens_above_max_tokens_rejected():
  with pytest.raises(ValueError, match="min_tokens"):
    SamplingParams(min_tokens=5, max_tokens=3)


def test_invalid_params_fail_that_request_only(engine):
  sp = SamplingParams(temperature=0, max_tokens=4)
  bad = SamplingParams(temperature=0, max_tokens=4)
  with pytest.raises(dataclasses.FrozenInstanceError):
    bad.top_p = 7.0
  object.__setattr__(bad, "top_p", 7.0)  # forced past the freeze: caught at submission
  outs = engine.generate([[1, 2], [3, 4]], [bad, sp])
  assert outs[0].finish_reason == "error" and "top_p" in outs[0].error
  assert outs[1].finish_reason == "length"


def test_stop_token_ids_min_tokens_and_logprobs(engine):
  prompt = [3, 1, 4, 1, 5]
  base = engine.generate([prompt], GREEDY)[0].token_ids
  stop_tok = base[4]
  out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12,
                                                 stop_token_ids=[stop_tok]))[0]
  first = base.index(stop_tok)
  assert out.token_ids == base[:first + 1]
  assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_tok
  # min_tokens bans the stop token until enough tokens exist.
  out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12, min_tokens=12,
                                                 stop_token_ids=[stop_tok]))[0]
  assert len(out.token_ids) == 12 and stop_tok not in out.token_ids
  out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=5, logprobs=3))[0]
  lps = out.outputs[0].logprobs
  assert len(lps) == 5
  for tok, lp in zip(out.token_ids, lps):
    assert tok in lp and len(lp) == 3  # greedy: the sampled token is the top one
    assert max(lp.values()) == pytest.approx(lp[tok])
    assert all(v <= 0 for v in lp.values())


def test_penalties_change_output_and_stay_batch_invariant(engine):
  prompt = [7, 7, 7, 7, 9, 9]
  greedy = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0]
  pen = SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.8,
                       frequency_penalty=1.5, presence_penalty=1.0)
  alone = engine.generate([prompt], pen)[0]
  assert alone.token_ids != greedy.token_ids
  mixed = engine.generate([prompt, [1, 2, 3]], [pen, GREEDY])
  assert mixed[0].token_ids == alone.token_ids


def test_penalties_match_a_step_by_step_reference(engine, tiny_model):
  """The history holds every token, the one still on the device included (the
  host runs a step ahead): greedy decoding with penalties equals the reference
  that rescored the whole sequence after each token."""
  prompt = [7, 7, 7, 7, 9, 9, 3]
  rep, freq, pres = 1.8, 0.7, 0.4
  pen = SamplingParams(temperature=0, max_tokens=10, repetition_penalty=rep,
                       frequency_penalty=freq, presence_penalty=pres)
  got = engine.generate([prompt, [1, 2, 3, 4]], [pen, GREEDY])[0].token_ids
  out = []
  for _ in range(10):
    x = np.asarray(transformer_lib.score(tiny_model, [prompt + out])[0, -1], np.float64)
    seen = np.zeros(x.shape, bool)
    seen[prompt + out] = True
    x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
    counts = np.bincount(out, minlength=x.size)[:x.size] if out else np.zeros(x.size)
    x = x - freq * counts - pres * (counts > 0)
    out.append(int(np.argmax(x)))
  assert got == out


def test_n_samples_share_prompt_pages(engine):
  prompt = _prompts(1, seed=11, lo=20, hi=21)[0]
  sp = SamplingParams(n=4, temperature=1.0, seed=9, max_tokens=10)
  out = engine.generate([prompt], sp)[0]
  assert len(out.outputs) == 4 and [c.index for c in out.outputs] == [0, 1, 2, 3]
  assert len({tuple(c.token_ids) for c in out.outputs}) > 1
  again = engine.generate([prompt, [5, 6]], [sp, GREEDY])[0]
  assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
  assert engine.num_free_pages() == CONFIG.num_pages


def test_stream_yields_tokens_and_ends(engine):
  prompts = _prompts(3, seed=2)
  final = engine.generate(prompts, GREEDY)
  got = {0: [], 1: [], 2: []}
  reasons = {}
  for d in engine.stream(prompts, GREEDY):
    got[d.prompt_index] += d.token_ids
    if d.finished:
      reasons[d.prompt_index] = d.finish_reason
  assert [got[i] for i in range(3)] == [o.token_ids for o in final]
  assert reasons == {0: "length", 1: "length", 2: "length"}


def test_compiled_variants_bounded_over_200_requests(tiny_model):
  cfg = EngineConfig(page_size=8, num_pages=160, max_model_len=64, max_batch=16,
                     prefill_chunk=32, max_prefill_batch=4)
  engine = Engine(tiny_model, None, cfg)
  engine.warmup()
  warm = engine.runner.compilations
  assert warm == cfg.max_step_variants()
  rng = np.random.default_rng(0)
  prompts = _prompts(200, seed=1, lo=1, hi=45)
  params = [SamplingParams(temperature=0, max_tokens=int(rng.integers(1, 64 - len(p))))
            for p in prompts]
  outs = engine.generate(prompts, params)
  assert all(len(o.token_ids) == sp.max_tokens for o, sp in zip(outs, params))
  compiled = engine.runner.compilations
  assert compiled == warm, f"{compiled - warm} compilations after warm-up"
  assert compiled == len(engine.runner.variants) <= cfg.max_step_variants()
  print(f"compiled step variants: {compiled} (bound {cfg.max_step_variants()})")
  assert engine.num_free_pages() == cfg.num_pages


def test_decode_compiles_once_per_shape(tiny_model):
  """Generating 64 tokens after one warm-up generation triggers no compilation."""
  from jax import monitoring
  compiles = []
  monitoring.register_event_duration_secs_listener(
      lambda event, _, **kw: compiles.append(event) if "backend_compile" in event else None)
  cfg = EngineConfig(page_size=16, num_pages=16, max_model_len=128, max_batch=4,
                     prefill_chunk=16, max_prefill_batch=1)
  engine = Engine(tiny_model, None, cfg)
  params = SamplingParams(temperature=0, max_tokens=64)
  engine.generate([[1, 2, 3]], params)  # compiles every bucket this workload uses
  warm = len(compiles)
  assert warm > 0
  out = engine.generate([[4, 5, 6]], params)[0]
  assert len(out.token_ids) == 64
  assert len(compiles) == warm, f"{len(compiles) - warm} recompilations"


def test_mixed_workload_equals_each_request_alone(tiny_model):
  """Staggered arrivals, short and long (chunked) prompts, shared prefixes (prefix
  cache hits), n > 1 and a pool small enough to preempt: every greedy output, and
  every seeded sample, equals the same request run alone on a roomy engine."""
  rng = np.random.default_rng(21)
  shared = [int(t) for t in rng.integers(1, 512, size=24)]
  prompts = _prompts(10, seed=22, lo=1, hi=60)
  prompts += [shared + p[:int(rng.integers(1, 12))] for p in _prompts(4, seed=23)]
  params = [SamplingParams(temperature=0, max_tokens=int(rng.integers(4, 20)))
            for _ in prompts]
  params[3] = SamplingParams(n=2, temperature=0.8, seed=5, max_tokens=10)
  params[7] = SamplingParams(temperature=1.0, top_k=20, seed=6, max_tokens=12)
  roomy = Engine(tiny_model, None, EngineConfig(page_size=8, num_pages=160, max_model_len=96,
                                           max_batch=8, prefill_chunk=32, max_prefill_batch=4))
  alone = [[c.token_ids for c in roomy.generate([p], sp)[0].outputs]
           for p, sp in zip(prompts, params)]
  tight = Engine(tiny_model, None, EngineConfig(page_size=8, num_pages=14, max_model_len=96,
                                           max_batch=8, prefill_chunk=32, max_prefill_batch=4))
  outs = _run_staggered(tight, prompts, params, seed=3)
  assert [[c.token_ids for c in o.outputs] for o in outs] == alone
  snap = tight.metrics.snapshot()
  assert snap["preemptions"] > 0 and snap["prefix_cache"]["hit_tokens"] > 0
  assert tight.num_free_pages() == 14


def test_stops_seen_a_step_late_never_leak_a_token(engine):
  """The host reads step N after dispatching N+1: a sequence that stops at N has a
  row in N+1, whose token must be dropped. Each output ends exactly at its stop."""
  prompts = _prompts(8, seed=31)
  free = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=16))
  stops = [o.token_ids[int(i)] for o, i in zip(free, np.arange(8) % 5 + 2)]
  outs = engine.generate(prompts, [SamplingParams(temperature=0, max_tokens=16,
                                                  stop_token_ids=[t]) for t in stops])
  for o, f, t in zip(outs, free, stops):
    first = f.token_ids.index(t)
    assert o.token_ids == f.token_ids[:first + 1] and o.finish_reason == "stop"
  assert engine.num_free_pages() == CONFIG.num_pages


def test_allowed_token_ids_restrict_sampling_per_row(engine):
  prompts = _prompts(3, seed=41)
  allowed = [5, 77, 300]
  sp = [SamplingParams(temperature=1.0, seed=1, max_tokens=8, allowed_token_ids=allowed),
        SamplingParams(temperature=0, max_tokens=8),
        SamplingParams(temperature=0, max_tokens=8, allowed_token_ids=[9])]
  outs = engine.generate(prompts, sp)
  assert set(outs[0].token_ids) <= set(allowed)
  assert outs[2].token_ids == [9] * 8
  # A row without a mask is not affected by its neighbours' masks.
  assert outs[1].token_ids == engine.generate([prompts[1]], sp[1])[0].token_ids


def test_step_variants_grow_logarithmically_as_the_readme_says():
  counts = {b: EngineConfig(max_batch=b).max_step_variants() for b in (64, 256, 1024)}
  assert counts == {64: 31, 256: 42, 1024: 53}
  assert EngineConfig(max_batch=64).decode_buckets == (1, 2, 4, 8, 16, 24, 32, 48, 64)


def test_default_batch_is_sized_to_the_ridge_and_the_pool(tiny_model):
  from ridgeline.engine import planner, roofline
  llama8b, small = models.get("llama-3.1-8b"), models.get("smollm2-135m")

  def pool(c, peaks):  # tokens 90% of the device's memory holds after the weights
    return int((0.9 * peaks.memory_bytes - roofline.weight_bytes(c)) // c.kv_bytes_per_token())

  h100, h200, a100 = (roofline.PEAKS[k] for k in ("H100", "H200", "A100"))
  # An 8B model cannot reach the ridge at 512 tokens on an H100 (its KV reads grow
  # with the batch): the pool decides. Hundreds of rows on every GPU.
  assert planner.default_max_batch(llama8b, h100, pool(llama8b, h100)) == 768
  assert planner.default_max_batch(llama8b, h200, pool(llama8b, h200)) == 1024
  assert planner.default_max_batch(llama8b, a100, pool(llama8b, a100)) == 512
  # A pool that holds fewer rows bounds it; a measured device (a CPU) stays modest.
  assert planner.default_max_batch(llama8b, h100, 64 * 512) == 64
  cpu = dataclasses.replace(h100, name="measured cpu", measured=True)
  assert planner.default_max_batch(small, cpu, 10**9) == planner.MEASURED_DEVICE_BATCH == 64
  # The engine resolves None from its device; an explicit value wins.
  engine = Engine(tiny_model, None, EngineConfig(num_pages=64, max_model_len=64))
  assert engine.config.max_batch == planner.default_max_batch(
      tiny_model.config, engine.peaks, 64 * engine.config.page_size)
  assert Engine(tiny_model, None, EngineConfig(num_pages=64, max_model_len=64,
                                          max_batch=8)).config.max_batch == 8


def test_background_compilation_runs_padded_steps_with_the_same_outputs(tiny_model):
  cfg = EngineConfig(page_size=8, num_pages=96, max_model_len=64, max_batch=8,
                     prefill_chunk=32, max_prefill_batch=4)
  prompts = _prompts(6, seed=21)
  params = [SamplingParams(temperature=0, max_tokens=10),
            SamplingParams(temperature=0.8, seed=3, max_tokens=10)] * 3
  eager = Engine(tiny_model, None, cfg)
  eager.warmup()
  expected = [o.token_ids for o in eager.generate(prompts, params)]
  lazy = Engine(tiny_model, None, cfg)
  lazy.warmup(background=True)
  runner = lazy.runner
  # The cover shapes (every step fits in one): their model passes and samplers.
  assert runner.compilations == 4
  assert [o.token_ids for o in lazy.generate(prompts, params)] == expected
  lazy.generate(prompts, params)
  if runner._background is not None:
    runner._background.shutdown(wait=True)
  # Every other shape was compiled in the background, none by a waiting step.
  keys = {k for s in runner.cover_shapes() + list(runner._queued)
              for k in runner.standard_keys(s)}
  assert runner.variants <= keys
