"""The OpenAI-compatible server, driven by the official `openai` client (and httpx
where the client would hide what is tested) against a live uvicorn server on a
free 127.0.0.1 port.

The model is the tiny random preset with the default model's vocabulary, so text
goes through the real tokenizer and chat template while every step stays cheap;
expected outputs come from `Engine.generate` on a second engine over the same
weights.
"""

import asyncio
import dataclasses
import json
import subprocess
import time

import httpx
import openai
import pytest
from flax import nnx

from ridgeline.configs import models
from ridgeline.engine.engine import Engine, EngineConfig, SamplingParams
from ridgeline.frontends.server import create_app
from ridgeline.model import transformer as transformer_lib
from tests.serving import serve_in_thread

CONFIG = EngineConfig(page_size=16, num_pages=128, max_model_len=128, max_batch=16,
                      prefill_chunk=64, max_prefill_batch=4)
MODEL = "tiny-test"


@pytest.fixture(scope="module")
def reference(text_model, default_tokenizer):
  """A second engine over the same weights, for expected outputs."""
  return Engine(text_model, default_tokenizer, CONFIG)


@pytest.fixture(scope="module")
def served(text_model, default_tokenizer):
  engine = Engine(text_model, default_tokenizer, CONFIG)
  app = create_app(engine, model_name=MODEL)
  with serve_in_thread(app) as url:
    yield type("Served", (), dict(url=url, engine=engine, server=app.state.server))


def _client(served, **kw):
  return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0,
                       timeout=120, **kw)


def _wait_idle(served, timeout_s=30.0):
  """Until the server holds no request, the engine none (an aborted request that
  was still waiting holds no pages but leaves the engine at the loop's next turn)
  and every KV page is free again."""
  alloc = served.engine.scheduler.allocator
  deadline = time.monotonic() + timeout_s
  while (served.server.live_requests or served.engine.has_unfinished()
         or alloc.num_free != alloc.num_pages):
    assert time.monotonic() < deadline, (served.server.live_requests,
                                         served.engine.has_unfinished(),
                                         alloc.num_free, alloc.num_pages)
    time.sleep(0.02)


CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"}]


def test_openai_client_chat_and_completions_equal_engine_generate(served, reference,
                                                                  default_tokenizer):
  client = _client(served)
  assert [m.id for m in client.models.list()] == [MODEL]
  greedy = SamplingParams(temperature=0, max_tokens=10)

  # Chat, non-streaming; content as an array of text parts means the same.
  exp = reference.generate([CHAT], greedy)[0]
  r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0)
  assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
  assert r.choices[0].message.content == exp.text
  assert r.choices[0].finish_reason == exp.finish_reason
  assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
      len(exp.prompt_token_ids), len(exp.token_ids),
      len(exp.prompt_token_ids) + len(exp.token_ids))
  parts = [CHAT[0], {"role": "user", "content": [{"type": "text", "text": CHAT[1]["content"]}]}]
  r2 = client.chat.completions.create(model=MODEL, messages=parts, max_completion_tokens=10,
                                      temperature=0)
  assert r2.choices[0].message.content == exp.text

  # Chat, streaming, with usage at the end.
  chunks = list(client.chat.completions.create(
      model=MODEL, messages=CHAT, max_tokens=10, temperature=0, stream=True,
      stream_options={"include_usage": True}))
  assert chunks[0].choices[0].delta.role == "assistant"
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == exp.text
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == exp.finish_reason
  assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(exp.token_ids)
  assert all(c.usage is None for c in chunks[:-1])

  # Completions, non-streaming and streaming.
  prompt = "The capital of France is"
  exp = reference.generate([prompt], SamplingParams(temperature=0, max_tokens=12))[0]
  r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
  assert r.object == "text_completion" and r.choices[0].text == exp.text
  assert r.usage.prompt_tokens == len(exp.prompt_token_ids)
  stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                     stream=True)
  assert "".join(c.choices[0].text for c in stream) == exp.text

  # Stop: the text ends before the first occurrence of the stop string.
  cut = len(exp.text) // 2
  stop = exp.text[cut:cut + 3]
  r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                stop=[stop])
  assert r.choices[0].text == exp.text[:exp.text.find(stop)]
  assert r.choices[0].finish_reason == "stop"

  # n > 1, seeded sampling: the same completions as the engine's, index by index.
  exp = reference.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7,
                                                    max_tokens=6))[0]
  r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=1.0,
                                n=3, seed=7)
  assert sorted(c.index for c in r.choices) == [0, 1, 2]
  assert {c.index: c.text for c in r.choices} == {c.index: c.text for c in exp.outputs}
  assert r.usage.completion_tokens == sum(len(c.token_ids) for c in exp.outputs)
  chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6,
                                               temperature=1.0, n=2, seed=3, stream=True))
  texts = {0: "", 1: ""}
  for c in chunks:
    for ch in c.choices:
      texts[ch.index] += ch.delta.content or ""
  exp = reference.generate([CHAT], SamplingParams(n=2, temperature=1.0, seed=3,
                                                  max_tokens=6))[0]
  assert texts == {c.index: c.text for c in exp.outputs}

  # Logprobs, chat: token strings and bytes as OpenAI gives them.
  exp = reference.generate([CHAT], SamplingParams(temperature=0, max_tokens=8, logprobs=3))[0]
  r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                     logprobs=True, top_logprobs=3)
  content = r.choices[0].logprobs.content
  assert len(content) == len(exp.token_ids)
  assert b"".join(bytes(e.bytes) for e in content) == default_tokenizer.decode(
      exp.token_ids, skip_special_tokens=False).encode()
  for e, tid, lp in zip(content, exp.token_ids, exp.outputs[0].logprobs):
    assert e.logprob == pytest.approx(lp[tid], abs=1e-6)
    assert len(e.top_logprobs) == 3
    assert e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob
    assert e.top_logprobs[0].logprob == pytest.approx(max(lp.values()), abs=1e-6)
  # Logprobs, completions (and streamed): tokens, token_logprobs, top_logprobs, offsets.
  r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                logprobs=2)
  lp = r.choices[0].logprobs
  assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
  assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
  assert all(1 <= len(t) <= 2 and v <= 0 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
  streamed = []
  for c in client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                     logprobs=2, stream=True):
    if c.choices[0].logprobs:
      streamed += c.choices[0].logprobs.token_logprobs
  assert streamed == pytest.approx(lp.token_logprobs, abs=1e-6)
  _wait_idle(served)


def test_64_concurrent_streaming_clients(served, reference):
  prompts = [f"Request {i}: a few words about the number {i * 7}" for i in range(64)]
  expected = [o.text for o in reference.generate(
      prompts, SamplingParams(temperature=0, max_tokens=8))]
  steps_before = served.server.driver.steps

  async def one(client, prompt):
    text = ""
    async for c in await client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                                   temperature=0, stream=True):
      text += c.choices[0].text
    return text

  async def main():
    limits = httpx.Limits(max_connections=100)
    async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0,
                                  timeout=120,
                                  http_client=httpx.AsyncClient(limits=limits)) as client:
      return await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in prompts)), 240)

  got = asyncio.run(main())
  assert got == expected
  # They shared steps: far fewer steps than 64 requests run one after another.
  steps = served.server.driver.steps - steps_before
  assert steps < 64 * 9 // 4, steps
  assert served.engine.metrics.snapshot()["decode_batch_size"]["max"] > 1
  _wait_idle(served)


def test_clients_that_disconnect_mid_stream_free_their_pages(served):
  alloc = served.engine.scheduler.allocator
  steps_before = served.server.driver.steps
  body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 100, "temperature": 0,
          "ignore_eos": True, "stream": True}

  async def leave_early(client):
    async with client.stream("POST", "/v1/completions", json=body) as r:
      assert r.status_code == 200
      seen = 0
      async for line in r.aiter_lines():
        seen += line.startswith("data: ")
        if seen == 3:
          return True  # leaving the block closes the connection mid-stream

  async def main():
    async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
      return await asyncio.gather(*(leave_early(client) for _ in range(8)))

  assert asyncio.run(main()) == [True] * 8
  _wait_idle(served)
  assert alloc.num_free == alloc.num_pages and not served.engine.has_unfinished()
  # Aborted, not run out: 8 requests of 100 tokens each would take 100 decode steps.
  assert served.server.driver.steps - steps_before < 60


def test_past_the_bound_429_and_the_others_keep_being_served(served):
  server = served.server
  bound = server.max_pending
  server.max_pending = 3
  body = {"model": MODEL, "prompt": "Hold on", "max_tokens": 120, "temperature": 0,
          "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
  try:
    async def hold(client, started):
      usage = None
      async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        started.release()
        async for line in r.aiter_lines():
          if line.startswith("data: {"):
            usage = json.loads(line[6:]).get("usage") or usage
      return usage["completion_tokens"]

    async def main():
      async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
        started = asyncio.Semaphore(0)
        holders = [asyncio.create_task(hold(client, started)) for _ in range(3)]
        for _ in range(3):
          await started.acquire()
        refused = []
        for k in range(200):  # while the three are running (they end within seconds)
          t0 = time.perf_counter()
          kind = ("/v1/completions", {"prompt": "x", "max_tokens": 2}) if k % 2 else (
              "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
          r = await client.post(kind[0], json=kind[1])
          if server.live_requests < 3:
            break
          refused.append((r.status_code, r.headers.get("retry-after"), r.json()["error"]["code"],
                          time.perf_counter() - t0))
          assert len(served.engine.scheduler.waiting) == 0  # nothing kept for a refusal
        return refused, await asyncio.gather(*holders)

    refused, held = asyncio.run(main())
    assert len(refused) >= 10, len(refused)
    assert {r[:3] for r in refused} == {(429, "1", "rate_limit_exceeded")}
    assert max(r[3] for r in refused) < 2.0  # at once, not after a queue
    assert held == [120] * 3  # the accepted ones ran to the end meanwhile
    with pytest.raises(openai.RateLimitError):  # what the official client sees
      server.max_pending = 0
      _client(served).completions.create(model=MODEL, prompt="x", max_tokens=2)
  finally:
    server.max_pending = bound
  r = _client(served).completions.create(model=MODEL, prompt="x", max_tokens=2)
  assert r.choices[0].finish_reason in ("stop", "length")
  _wait_idle(served)


LONG = "word " * 200  # well over max_model_len = 128 tokens
INVALID = [
    ("chat", {"messages": "hi"}, "messages"),
    ("chat", {}, "messages"),
    ("chat", {"messages": []}, "messages"),
    ("chat", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0].type"),
    ("chat", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
              "top_logprobs": 50}, "top_logprobs"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "top_logprobs"),
    ("chat", {"messages": [{"role": "user", "content": LONG}]}, "messages"),
    ("completion", {"prompt": "x", "temperature": -1}, "temperature"),
    ("completion", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("completion", {"prompt": "x", "top_p": 0}, "top_p"),
    ("completion", {"prompt": "x", "n": 0}, "n"),
    ("completion", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("completion", {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    ("completion", {"prompt": "x", "stop": [""]}, "stop"),
    ("completion", {"prompt": "x", "stop": 5}, "stop"),
    ("completion", {"prompt": "x", "seed": -1}, "seed"),
    ("completion", {"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ("completion", {"prompt": "x", "frequency_penalty": -3}, "frequency_penalty"),
    ("completion", {"prompt": "x", "top_k": -5}, "top_k"),
    ("completion", {"prompt": "x", "min_p": 2}, "min_p"),
    ("completion", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ("completion", {"prompt": "x", "min_tokens": -1}, "min_tokens"),
    ("completion", {"prompt": "x", "max_tokens": 2, "min_tokens": 5}, "min_tokens"),
    ("completion", {"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
    ("completion", {"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    ("completion", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("completion", {"prompt": "x", "tempreature": 1}, "tempreature"),
    ("completion", {"prompt": "x", "stream": "yes"}, "stream"),
    ("completion", {"prompt": "x", "stream_options": {"include_usage": True}},
     "stream_options"),
    ("completion", {"prompt": "x", "echo": "yes"}, "echo"),
    ("completion", {"prompt": "x", "echo": True, "max_tokens": 0}, "max_tokens"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
    ("completion", {"prompt": []}, "prompt"),
    ("completion", {"prompt": ""}, "prompt"),
    ("completion", {"prompt": {"text": "x"}}, "prompt"),
    ("completion", {"prompt": [10**9]}, "prompt"),
    ("completion", {"prompt": LONG}, "prompt"),
    ("completion", {"prompt": LONG, "stream": True}, "prompt"),
]


def test_every_invalid_field_is_a_400_naming_it(served):
  with httpx.Client(base_url=served.url, timeout=60) as client:
    for kind, body, param in INVALID:
      path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
      r = client.post(path, json=body)
      assert r.status_code == 400, (body, r.text)
      err = r.json()["error"]
      assert err["param"] == param and err["type"] == "invalid_request_error", (body, err)
      assert err["message"]
      if LONG in json.dumps(body):
        assert "max_model_len is 128" in err["message"]
        assert err["code"] == "context_length_exceeded"
    for raw in (b"{not json", b"", b"\xff\xfe", b"[1, 2]", b"null"):
      r = client.post("/v1/completions", content=raw,
                      headers={"content-type": "application/json"})
      assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", raw
    r = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/health").json() == {"status": "ok"}
  with pytest.raises(openai.BadRequestError) as e:
    _client(served).chat.completions.create(model=MODEL, messages=CHAT, temperature=-0.5)
  assert e.value.body["param"] == "temperature"
  r = _client(served).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)
  assert r.choices[0].finish_reason in ("stop", "length")
  _wait_idle(served)


def test_metrics_endpoint(served):
  text = httpx.get(served.url + "/metrics").text
  for name in ("ridgeline_kv_cache_utilization", "ridgeline_requests_running",
               "ridgeline_requests_waiting", "ridgeline_decode_batch_size",
               "ridgeline_time_to_first_token_seconds", "ridgeline_preemptions",
               "ridgeline_prefix_cache_hits_tokens", "ridgeline_mfu",
               "ridgeline_server_pending_requests", "ridgeline_server_requests_total"):
    assert name in text, name


def test_api_key():
  tiny = transformer_lib.Transformer(models.get("tiny"), rngs=nnx.Rngs(0))
  engine = Engine(tiny, None, EngineConfig(page_size=16, num_pages=16, max_model_len=64,
                                           max_batch=2, prefill_chunk=32))
  with serve_in_thread(create_app(engine, api_key="sekret")) as url:
    for key in ("wrong", "sekret2", "sekre"):
      with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0).models.list()
    for headers in ({}, {"Authorization": "Bearer x"}, {"Authorization": "sekret"}):
      r = httpx.post(url + "/v1/completions", json={"prompt": [1]}, headers=headers)
      assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
    r = client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4 and r.usage.prompt_tokens == 3
    with pytest.raises(openai.BadRequestError) as e:  # no tokenizer: token ids only
      client.completions.create(model="tiny", prompt="text", max_tokens=4)
    assert e.value.body["param"] == "prompt"
    assert httpx.get(url + "/health").status_code == 200  # open, like /metrics


def test_serve_bench_against_the_live_server(served):
  from ridgeline.tools import serve_bench
  cfg = serve_bench.ServeBenchConfig(url=served.url, rates=(8.0, float("inf")), num_requests=6,
                                     input_len=8, output_len=5, warmup_requests=2)
  results = serve_bench.run(cfg)
  assert [r["rate"] for r in results] == [8.0, float("inf")]
  for r in results:
    assert r["completed"] == 6 and r["rejected_429"] == 0 and r["failed"] == 0
    assert r["output_tokens"] == 6 * 5 and r["output_tok_s"] > 0
    assert 0 < r["ttft_s"]["p50"] <= r["ttft_s"]["p99"]
    assert r["tpot_s"]["p50"] > 0 and r["itl_s"] is not None
  table = serve_bench.format_table(results)
  assert "TTFT p50" in table and "capacity:" in table
  # A request over the time limit fails alone: the rate still reports its results.
  slow = serve_bench.run(dataclasses.replace(cfg, rates=(float("inf"),), timeout_s=1e-3,
                                             warmup_requests=0))
  assert slow[0]["requests"] == 6 and slow[0]["failed"] == 6 and slow[0]["completed"] == 0
  assert any("timed out" in e for e in slow[0]["errors"])
  _wait_idle(served)


def test_serve_bench_starts_the_installed_server_anywhere(tmp_path):
  """`ridgeline-bench --mode serve` starts `python -m ridgeline.cli.serve` with this
  installation first on the path (no scripts/ directory needed), from any directory."""
  from ridgeline.tools import serve_bench
  command, env = serve_bench.server_command()
  done = subprocess.run([*command, "--helpshort"], env=env, cwd=tmp_path, capture_output=True,
                        text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "OpenAI-compatible server" in done.stdout and "--port" in done.stdout
