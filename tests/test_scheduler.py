"""The scheduler alone, over a fake runner: no model, no compilation.

The fake samples scripted tokens: a row's token is a function of its sequence's
seed and output position (what the real sampler's key is made of), so a
sequence's output does not depend on what shares its steps, on how the steps
fell, or on a preemption and recomputation. That is what lets these tests pin
the host loop's own decisions: the order of admission, the victim of a
preemption, each way a sequence finishes, and `step()`'s report of the requests
that ended.
"""

import dataclasses
import time
import types

import numpy as np
import pytest

from ridgeline.configs import models
from ridgeline.engine import roofline
from ridgeline.engine.config import EngineConfig
from ridgeline.engine.metrics import Metrics
from ridgeline.engine.planner import Planner
from ridgeline.engine.runner import Forwarded, StepTokens
from ridgeline.engine.sampling import SamplingParams
from ridgeline.engine.scheduler import Scheduler
from ridgeline.engine.sequences import Request
from ridgeline.util import ceil_div

EOS = 1
FILL = 5  # the token of a position the script does not name


class FakeRunner:
  """What the Scheduler asks of a Runner, with scripted tokens: sequence seed s
  samples script[s][i] at output position i (FILL past its end)."""

  def __init__(self, config: EngineConfig, num_pages: int, script: dict[int, list[int]]):
    self.config = config
    self.num_pages = num_pages
    self.model_config = dataclasses.replace(models.get("tiny"), vocab_size=64)
    self.mask_words = ceil_div(self.model_config.vocab_size, 32)
    self.compile_seconds = 2.0
    self.script = script
    self.prefills: list[list[int]] = []  # the first token of every chunk, step by step

  def sample_rows(self, shape) -> int:
    return self.config.sample_rows(shape)

  def shape_for(self, shape):
    return shape  # every shape is "compiled"

  def compile_later(self, shape) -> None:
    raise AssertionError("shape_for never pads, so nothing compiles later")

  def forward(self, shape, decode, chunks) -> Forwarded:
    assert len(decode.tokens) <= shape.decode
    assert sum(ceil_div(len(c.tokens), self.config.prefill_tile) for c in chunks) \
        * self.config.prefill_tile <= shape.prefill
    self.prefills.append([int(c.tokens[0]) for c in chunks if c.start == 0])
    return Forwarded(shape, None, None, time.perf_counter())

  def sample(self, forwarded: Forwarded, sampler):
    seeds = sampler.seed[:, 0].astype(np.int64)
    tokens = np.asarray([_scripted(self.script, int(s), int(i))
                         for s, i in zip(seeds, sampler.token_index)], np.int32)
    return types.SimpleNamespace(tokens=tokens, dispatched_at=forwarded.dispatched_at)

  @staticmethod
  def read(sampled) -> StepTokens:
    return StepTokens(sampled.tokens, None, None)


def _scripted(script, seed: int, index: int) -> int:
  tokens = script.get(seed, ())
  return tokens[index] if index < len(tokens) else FILL


def _scheduler(script, *, num_pages=64, max_batch=4, max_model_len=32, page_size=4):
  config = EngineConfig(page_size=page_size, num_pages=num_pages, max_model_len=max_model_len,
                        max_batch=max_batch, prefill_chunk=16, max_prefill_batch=4)
  runner = FakeRunner(config, num_pages, script)
  planner = Planner(runner.model_config, config, roofline.PEAKS["H200"])
  return Scheduler(runner, config, [EOS], planner, Metrics(planner.ridge))


def _request(rid: str, seed: int, max_tokens: int, prompt=None, priority: int = 0, **params):
  prompt = prompt if prompt is not None else [10 + seed] * 3
  params = SamplingParams(temperature=0, max_tokens=max_tokens, **params)
  return Request(rid, list(prompt), params, time.perf_counter(), seed, max_tokens,
                 priority=priority)


def _run(sched: Scheduler, steps: int = 200) -> list[str]:
  """Steps until no work is left; returns the ended requests in order, checking
  that none is reported twice."""
  ended = []
  for _ in range(steps):
    if not sched.has_work():
      break
    ended += sched.step().finished
  assert not sched.has_work(), "the scheduler did not drain"
  assert len(ended) == len(set(ended)), ended
  return ended


def _output(sched: Scheduler, rid: str):
  seqs = sorted(sched.requests[rid].seqs, key=lambda s: s.index)
  return [(s.token_ids, s.out.finish_reason, s.out.stop_reason) for s in seqs]


def test_finishes_by_eos_stop_id_and_length_each_reported_once():
  script = {1: [7, 8, EOS, 9], 2: [7, 9, 8], 3: [6, 6, 6, 6, 6], 4: [8, EOS]}
  sched = _scheduler(script)
  sched.add(_request("eos", 1, 10))
  sched.add(_request("stop-id", 2, 10, stop_token_ids=[9]))
  sched.add(_request("length", 3, 3))
  sched.add(_request("ignore-eos", 4, 3, ignore_eos=True))
  sched.add(_request("n2", 6, 2, n=2))  # two sequences, one request
  ended = _run(sched)
  assert sorted(ended) == ["eos", "ignore-eos", "length", "n2", "stop-id"]
  assert _output(sched, "eos") == [([7, 8, EOS], "stop", None)]
  assert _output(sched, "stop-id") == [([7, 9], "stop", 9)]
  assert _output(sched, "length") == [([6, 6, 6], "length", None)]
  assert _output(sched, "ignore-eos") == [([8, EOS, FILL], "length", None)]
  assert [o[1] for o in _output(sched, "n2")] == ["length", "length"]
  assert sched.num_running == 0 and not sched.waiting
  assert sched.kv.num_free == sched.runner.num_pages  # every page back (cached or free)


def test_abort_running_and_waiting_requests():
  sched = _scheduler({}, max_batch=1)
  sched.add(_request("running", 1, 20))
  sched.add(_request("waiting", 2, 20))
  sched.add(_request("done", 3, 2))
  finished = sched.step().finished + sched.step().finished
  assert finished == []
  assert sched.abort("running") and sched.abort("waiting")
  assert not sched.abort("running")  # once
  assert not sched.abort("unknown")
  ended = finished + _run(sched)
  assert ended == ["done"]  # an abort is the caller's: not reported as ended
  assert _output(sched, "running")[0][1] == _output(sched, "waiting")[0][1] == "abort"
  assert _output(sched, "waiting")[0][0] == []
  assert not sched.abort("done")  # finished already


def test_admission_by_priority_then_arrival():
  sched = _scheduler({}, max_batch=2)
  for rid, seed, priority in [("a", 1, 1), ("b", 2, 0), ("c", 3, 0), ("d", 4, -1)]:
    sched.add(_request(rid, seed, 4, priority=priority))
  _run(sched)
  firsts = [t for step in sched.runner.prefills for t in step]
  assert firsts == [14, 12, 13, 11]  # d, b, then c, a as rows free up
  first_scheduled = {rid: r.first_scheduled_time for rid, r in sched.requests.items()}
  assert sorted(first_scheduled, key=first_scheduled.get) == ["d", "b", "c", "a"]


@pytest.mark.parametrize("priorities, victim", [((0, 0, 0), "z"), ((0, 1, 0), "y")])
def test_preemption_takes_the_lowest_priority_then_the_newest(priorities, victim):
  # 8 pages of 4 tokens; three sequences that grow to 16 tokens (4 pages) each
  # cannot all fit: when the third page runs out the victim is the last of
  # (priority, arrival), and it is recomputed later with the same output.
  script = {1: list(range(20, 32)), 2: list(range(32, 44)), 3: list(range(44, 56))}
  sched = _scheduler(script, num_pages=8, max_batch=3)
  preempted = []
  preempt = sched._preempt
  sched._preempt = lambda slot: (preempted.append(sched.batch.seqs[slot].request.request_id),
                                 preempt(slot))
  for (rid, seed), priority in zip([("x", 1), ("y", 2), ("z", 3)], priorities):
    sched.add(_request(rid, seed, 12, prompt=[10 + seed] * 4, priority=priority))
  ended = _run(sched)
  assert preempted and preempted[0] == victim
  assert sorted(ended) == ["x", "y", "z"]
  assert sched.metrics.preemptions._value.get() == len(preempted)
  for rid, seed in [("x", 1), ("y", 2), ("z", 3)]:
    assert _output(sched, rid) == [(script[seed], "length", None)]
