"""The host benchmark: what one engine step costs the host, per batch size.

On a GPU the host and the device run side by side, so a step takes the longer of
the two; a host that needs more time than the device's step caps the engine
however fast the device is. This mode measures the host's own ceiling: for each
batch size B it runs B requests of a fixed workload (128 prompt and 128 greedy
output tokens by default, ignore_eos) through `Engine.add_request` / `step` three
ways:

  host only        the runner's compiled step replaced by one that returns a
                   token for every row at once (the host still plans, builds and
                   dispatches every input array, reads the tokens, finds stops
                   and makes text): the host's work alone, as on a GPU where the
                   device runs beside it. Without a tokenizer, and with one (the
                   bench model's, or --host_tokenizer), whose text the stub's
                   tokens come from (a real text's token ids).
  whole engine     the real step on the bench's model; on a CPU the step's math
                   shares the cores with the host, so its figure mixes both.

For each it reports the median host milliseconds of a decode step at B rows
(the step's wall time minus the time it waited for the device's tokens), the
median wait, and output tokens/s over the whole run (prefill included).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import numpy as np

from ridgeline.tools.bench.common import Bench, table
from ridgeline.util import ceil_div

ALICE = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "alice.txt"


class _StubSteps(dict):
  """Stands in for the runner's compiled variants: every model pass is `model`,
  every sampler `sample`."""

  def __init__(self, model, sample):
    super().__init__()
    self.model, self.sample = model, sample

  def get(self, key, default=None):
    return self.model if key[0] == "model" else self.sample


def _stub_steps(runner, stream: np.ndarray) -> _StubSteps:
  """A step whose sampler returns the next `max_rows` ids of `stream` as its tokens."""
  from ridgeline.engine.sampling import MAX_LOGPROBS
  at = [0]
  rows = runner.max_rows
  no_scores = (np.zeros(0, np.float32), np.zeros((0, MAX_LOGPROBS), np.int32),
               np.zeros((0, MAX_LOGPROBS), np.float32))

  def model(state, kv, prev, inputs):
    del state, prev
    return kv, np.zeros((inputs.sample_index.shape[0], 1), np.float32), no_scores

  def sample(logits, prev, sampler):
    del prev, sampler
    r = logits.shape[0]
    idx = (at[0] + np.arange(rows)) % len(stream)
    at[0] += r
    return (stream[idx], np.zeros(r, np.float32), np.zeros((r, MAX_LOGPROBS), np.int32),
            np.zeros((r, MAX_LOGPROBS), np.float32))
  return _StubSteps(model, sample)


def _engine(model, tokenizer, batch: int, prompt: int, output: int, stub_tokens=None):
  from ridgeline.engine.engine import Engine, EngineConfig
  length = prompt + output
  page = 16
  # Prefill fast enough that all `batch` requests decode together before the
  # first ones finish (2,048 prompt tokens, up to 64 prompts a step).
  config = EngineConfig(page_size=page, max_batch=batch,
                        max_model_len=ceil_div(length, page) * page,
                        num_pages=batch * (ceil_div(length, page) + 1) + 8,
                        prefill_chunk=2048, max_prefill_batch=64)
  eng = Engine(model, tokenizer, config)
  if stub_tokens is not None:
    eng.runner._compiled = _stub_steps(eng.runner, stub_tokens)
  return eng


def _run(eng, prompts, output: int) -> dict:
  """Runs the requests to the end, timing every step; returns the figures."""
  from ridgeline.engine.sampling import SamplingParams
  params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=output)
  ids = [eng.add_request(p, params) for p in prompts]
  host, wait, decode_host, decode_wait = [], [], [], []
  m = eng.metrics
  t0 = time.perf_counter()
  while eng.has_unfinished():
    w0 = m.device_wait_seconds._value.get()
    s0 = time.perf_counter()
    eng.step()
    seconds = time.perf_counter() - s0
    waited = m.device_wait_seconds._value.get() - w0
    host.append(seconds - waited)
    wait.append(waited)
    if eng.scheduler.last_kind == "decode" and eng.scheduler.last_decode_batch == len(prompts):
      decode_host.append(seconds - waited)
      decode_wait.append(waited)
  wall = time.perf_counter() - t0
  outs = [eng.get_output(r) for r in ids]
  assert all(len(o.token_ids) == output for o in outs), "short output"
  chars = sum(len(o.text) for o in outs)
  for r in ids:
    eng.release(r)
  med = lambda v: float(np.median(v)) if v else float("nan")  # noqa: E731
  return {"steps": len(host), "decode_steps": len(decode_host), "seconds": wall,
          "host_ms_per_decode_step": 1e3 * med(decode_host),
          "wait_ms_per_decode_step": 1e3 * med(decode_wait),
          "host_ms_per_step_mean": 1e3 * float(np.mean(host)),
          "output_tokens_per_second": len(prompts) * output / wall, "text_chars": chars}


def run_host(b: Bench) -> None:
  from flax import nnx
  from ridgeline.configs import models
  from ridgeline.model import transformer as transformer_lib
  o = b.options
  prompt_len, output = o.host_workload
  tokenizer = b.tokenizer
  if o.host_tokenizer:
    from ridgeline.model import default_model
    from ridgeline.model.tokenizer import load_tokenizer
    path = default_model.gguf_path() if o.host_tokenizer == "default" else o.host_tokenizer
    tokenizer = load_tokenizer(path)
  text_ids = None
  if tokenizer is not None:
    text_ids = np.asarray(tokenizer.encode(ALICE.read_text()), np.int32)

  def stub_model(vocab):
    # Host only: the model is never run, only its shapes sized (tiny's, this vocabulary).
    cfg = dataclasses.replace(models.get("tiny"), vocab_size=vocab,
                              max_position_embeddings=max(512, prompt_len + output))
    return transformer_lib.Transformer(cfg, rngs=nnx.Rngs(0))

  plain_model = stub_model(b.model_config.vocab_size)
  text_model = stub_model(tokenizer.vocab_size) if tokenizer is not None else None
  rng = np.random.default_rng(o.seed)
  vocab = b.model_config.vocab_size
  random_ids = rng.integers(min(100, vocab // 4), max(vocab - 100, vocab // 2),
                            size=1 << 16).astype(np.int32)
  points, rows = [], []
  for batch in o.host_batches:
    rec = {"batch": batch, "prompt": prompt_len, "output": output}
    variants = [("host_only", lambda: _engine(plain_model, None, batch, prompt_len, output,
                                              random_ids), None)]
    if tokenizer is not None:
      variants.append(("host_only_tokenizer", lambda: _engine(
          text_model, tokenizer, batch, prompt_len, output, text_ids), text_ids))
    if o.host_engine:
      variants.append(("engine", lambda: _engine(b.model, None, batch, prompt_len, output),
                       None))
    for name, make, ids in variants:
      eng = make()
      warm = cover = 0.0
      if name == "engine":  # the two cover shapes, then the rest (cold: no cache)
        cover = eng.warmup(background=True)
        eng.runner._background.shutdown(wait=True)
        eng.runner._background = None
        warm = cover + eng.warmup()
      pool = ids if ids is not None else random_ids

      def draw():  # prompts from the pool (a real text's ids, when there is a tokenizer)
        starts = rng.integers(0, len(pool) - prompt_len, size=batch)
        return [pool[s:s + prompt_len].tolist() for s in starts]

      _run(eng, draw(), output)  # warm: first-touch of arrays, caches
      r = _run(eng, draw(), output)
      r["warmup_seconds"], r["cover_warmup_seconds"] = warm, cover
      rec[name] = r
      print(f"host B={batch} {name}: {r['host_ms_per_decode_step']:.2f} ms host / decode step, "
            f"{r['wait_ms_per_decode_step']:.2f} ms waiting, "
            f"{r['output_tokens_per_second']:.0f} output tok/s"
            + (f", warm-up {cover:.1f} s (cover) / {warm:.1f} s (all)" if warm else ""),
            flush=True)
      del eng
    points.append(rec)
    cell = lambda k, f: (f"{rec[k][f]:.2f}" if k in rec else "-")  # noqa: E731
    tps = lambda k: (f"{rec[k]['output_tokens_per_second']:.0f}" if k in rec else "-")  # noqa
    rows.append([batch, cell("host_only", "host_ms_per_decode_step"), tps("host_only"),
                 cell("host_only_tokenizer", "host_ms_per_decode_step"),
                 tps("host_only_tokenizer"), cell("engine", "host_ms_per_decode_step"),
                 cell("engine", "wait_ms_per_decode_step"), tps("engine"),
                 (f"{rec['engine']['cover_warmup_seconds']:.1f} / "
                  f"{rec['engine']['warmup_seconds']:.1f}") if "engine" in rec else "-"])
  b.results["host"] = {"workload": [prompt_len, output], "points": points,
                       "tokenizer": str(o.host_tokenizer or
                                        ("the model's" if b.tokenizer is not None else None))}
  print(f"\nHost cost of a step ({prompt_len} prompt / {output} output tokens, greedy, "
        "ignore_eos; medians over the decode steps at B rows; host = step wall time minus "
        "the wait for the device's tokens)")
  print(table(rows, ["B", "host-only ms", "tok/s", "host+text ms", "tok/s", "engine host ms",
                     "engine wait ms", "engine tok/s", "warm-up s (cover / all)"]))
