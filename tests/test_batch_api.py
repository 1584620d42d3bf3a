"""OpenAI's Batch API on the server (frontends/batch_api.py) through the official
`openai` client: the round trip, uploads refused line by line with OpenAI's
error objects, cancel, two batches at once beside interactive requests (greedy
outputs equal to each request alone), a restart during finalizing, the API key,
and SIGKILL of a server process mid-batch: every custom_id exactly once."""

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from flax import nnx

from ridgeline.configs import models
from ridgeline.engine.engine import Engine, EngineConfig, SamplingParams
from ridgeline.frontends.server import create_app
from ridgeline.model import transformer as transformer_lib
from ridgeline.model.tokenizer import Tokenizer
from tests.serving import free_port, serve_in_thread, wait_healthy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-test"
CONFIG = EngineConfig(page_size=8, num_pages=96, max_model_len=96, max_batch=8,
                      prefill_chunk=32, max_prefill_batch=4)


@pytest.fixture(scope="module")
def model_and_tokenizer(smollm2_gguf):
  config = dataclasses.replace(models.get("tiny"), vocab_size=49152)
  return transformer_lib.Transformer(config, rngs=nnx.Rngs(2)), Tokenizer.from_gguf(smollm2_gguf)


@pytest.fixture()
def served(model_and_tokenizer, tmp_path):
  engine = Engine(*model_and_tokenizer, CONFIG)
  app = create_app(engine, model_name="tiny", api_key=KEY, warmup=False,
                   batch_dir=str(tmp_path / "batches"))
  with serve_in_thread(app) as url:
    yield type("Served", (), dict(url=url, engine=engine, dir=tmp_path / "batches",
                                  client=openai.OpenAI(base_url=url + "/v1", api_key=KEY,
                                                       max_retries=0)))


def _line(i, url="/v1/chat/completions", max_tokens=12, **body):
  if url == "/v1/chat/completions":
    body.setdefault("messages", [{"role": "user", "content": f"Count to {i}."}])
  else:
    body.setdefault("prompt", f"Line {i}: once upon a time")
  return {"custom_id": f"req-{i}", "method": "POST", "url": url,
          "body": {"model": "tiny", "max_tokens": max_tokens, "temperature": 0, **body}}


def _jsonl(lines) -> bytes:
  return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def _wait(client, batch_id, statuses=("completed", "failed", "cancelled", "expired"),
          timeout=180.0, until=None):
  deadline = time.monotonic() + timeout
  while True:
    batch = client.batches.retrieve(batch_id)
    if batch.status in statuses or (until is not None and until(batch)):
      return batch
    assert time.monotonic() < deadline, f"batch stuck at {batch.status}: {batch}"
    time.sleep(0.1)


def _output(client, file_id) -> list[dict]:
  return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


@pytest.fixture(scope="module")
def alone(model_and_tokenizer):
  """A request's greedy text on an engine of its own, run alone."""
  engine = Engine(*model_and_tokenizer, CONFIG)

  def text(messages_or_prompt, max_tokens=12):
    out = engine.generate([messages_or_prompt], SamplingParams(temperature=0,
                                                               max_tokens=max_tokens))[0]
    return out.outputs[0].text
  return text


def test_round_trip_with_the_openai_client(served, alone):
  client = served.client
  lines = [_line(i) for i in range(6)]
  f = client.files.create(file=("in.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
  assert f.purpose == "batch" and f.bytes > 0 and f.filename == "in.jsonl"
  assert client.files.retrieve(f.id).id == f.id
  assert f.id in [x.id for x in client.files.list()]
  batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                completion_window="24h", metadata={"job": "test"})
  assert batch.status in ("validating", "in_progress") and batch.metadata == {"job": "test"}
  done = _wait(client, batch.id)
  assert done.status == "completed", done
  assert done.request_counts.total == 6 and done.request_counts.completed == 6
  assert done.request_counts.failed == 0 and done.error_file_id is None
  out = _output(client, done.output_file_id)
  assert [r["custom_id"] for r in out] == [f"req-{i}" for i in range(6)]
  for r, line in zip(out, lines):
    body = r["response"]["body"]
    assert r["response"]["status_code"] == 200 and r["error"] is None
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == alone(line["body"]["messages"])
  listed = client.batches.list(limit=5)
  assert listed.data[0].id == batch.id
  metrics = httpx.get(served.url + "/metrics").text
  assert f'ridgeline_batch_lines{{batch="{batch.id}",state="done"}} 6.0' in metrics
  deleted = client.files.delete(f.id)
  assert deleted.deleted
  with pytest.raises(openai.NotFoundError):
    client.files.retrieve(f.id)


def test_files_list_pages_as_openai(served):
  """limit, order and the after cursor; the client's auto-pagination walks every page."""
  client = served.client
  ids = [client.files.create(file=(f"in{i}.jsonl", io.BytesIO(_jsonl([_line(i)]))),
                             purpose="batch").id for i in range(3)]
  newest_first = [f.id for f in client.files.list().data]
  assert sorted(newest_first) == sorted(ids)
  first = client.files.list(limit=2)
  assert [f.id for f in first.data] == newest_first[:2] and first.has_more
  rest = client.files.list(limit=2, after=first.data[-1].id)
  assert [f.id for f in rest.data] == newest_first[2:] and not rest.has_more
  assert [f.id for f in client.files.list(order="asc").data] == newest_first[::-1]
  assert [f.id for f in client.files.list(limit=1)] == newest_first  # every page
  for bad, param in (({"limit": 0}, "limit"), ({"order": "up"}, "order"),
                     ({"after": "file-nope"}, "after")):
    r = httpx.get(served.url + "/v1/files", params=bad,
                  headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("lines,code,where", [
    (["{not json"], "invalid_json_line", "line 1"),
    ([_line(0), _line(0)], "duplicate_custom_id", "line 2"),
    ([_line(0), dict(_line(1), url="/v1/embeddings")], "invalid_url", "line 2"),
    ([_line(0, messages=[{"role": "user", "content": "word " * 200}])], None, "line 1"),
    ([_line(0, max_tokens=500)], None, "line 1"),
])
def test_invalid_uploads_are_refused_naming_the_line(served, lines, code, where):
  with pytest.raises(openai.BadRequestError) as e:
    served.client.files.create(file=("bad.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
  err = e.value.body
  assert err["message"].startswith(where) and err["param"] == "file", err
  if code is not None:
    assert err["code"] == code, err
  else:
    assert "max_model_len" in err["message"], err
  assert served.client.files.list().data == []


def test_cancel_keeps_what_finished_and_two_batches_share_steps_with_interactive(
    served, alone):
  client = served.client
  slow = [_line(i, max_tokens=48) for i in range(200)]
  quick = [_line(100 + i) for i in range(8)]
  asks = [[{"role": "user", "content": f"Name {k} colors."}] for k in range(3)]
  expected = [alone(messages) for messages in asks]
  expected_slow = [alone(line["body"]["messages"], 48) for line in slow[:3]]
  f1 = client.files.create(file=("a.jsonl", io.BytesIO(_jsonl(slow))), purpose="batch")
  f2 = client.files.create(file=("b.jsonl", io.BytesIO(_jsonl(quick))), purpose="batch")
  b1 = client.batches.create(input_file_id=f1.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
  b2 = client.batches.create(input_file_id=f2.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
  # Interactive requests while both run: the same greedy text as alone.
  for messages, text in zip(asks, expected):
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                       max_tokens=12)
    assert r.choices[0].message.content == text
  _wait(client, b1.id, until=lambda b: b.request_counts.completed >= 3)
  cancelling = client.batches.cancel(b1.id)
  assert cancelling.status in ("cancelling", "cancelled")
  done2 = _wait(client, b2.id)
  assert done2.status == "completed" and done2.request_counts.completed == 8
  done1 = _wait(client, b1.id)
  assert done1.status == "cancelled" and done1.cancelled_at is not None
  out = _output(client, done1.output_file_id)
  assert 3 <= len(out) < 200 and len({r["custom_id"] for r in out}) == len(out)
  assert done1.request_counts.completed == len(out) and done1.request_counts.failed == 0
  assert all(r["response"]["status_code"] == 200 for r in out)
  never_ran = _output(client, done1.error_file_id)  # OpenAI's batch_cancelled lines
  assert all(r["response"] is None and r["error"]["code"] == "batch_cancelled"
             for r in never_ran)
  assert sorted(r["custom_id"] for r in out + never_ran) == sorted(x["custom_id"] for x in slow)
  texts = {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"]
           for r in out}
  for i, text in enumerate(expected_slow):  # batch lines' greedy text is their own too
    if f"req-{i}" in texts:
      assert texts[f"req-{i}"] == text
  assert served.engine.num_free_pages() == CONFIG.num_pages


def test_an_expired_batch_keeps_what_finished_and_lists_the_rest(served, monkeypatch):
  """The completion window passes mid-batch: status expired, the finished lines in
  the output file, the others in the error file as OpenAI's batch_expired."""
  from ridgeline.frontends import batch_runner
  client = served.client
  lines = [_line(i, max_tokens=32) for i in range(40)]
  f = client.files.create(file=("in.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
  batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                completion_window="24h")
  _wait(client, batch.id, until=lambda b: b.request_counts.completed >= 2)
  later = time.time() + 2 * 86400
  monkeypatch.setattr(batch_runner, "now", lambda: int(later))
  done = _wait(client, batch.id)
  assert done.status == "expired" and done.expired_at == int(later), done
  out, rest = _output(client, done.output_file_id), _output(client, done.error_file_id)
  assert 2 <= len(out) < 40 and done.request_counts.completed == len(out)
  assert all(r["error"]["code"] == "batch_expired" and r["response"] is None for r in rest)
  assert sorted(r["custom_id"] for r in out + rest) == sorted(x["custom_id"] for x in lines)
  metrics = httpx.get(served.url + "/metrics").text
  assert f'ridgeline_batch_lines{{batch="{batch.id}",state="pending"}} 0.0' in metrics
  deadline = time.monotonic() + 30  # the aborts reach the engine on its own thread
  while served.engine.num_free_pages() != CONFIG.num_pages:
    assert time.monotonic() < deadline, "pages leaked"
    time.sleep(0.05)


def test_restart_during_finalizing_writes_the_same_files(model_and_tokenizer, tmp_path):
  root = str(tmp_path / "batches")
  lines = [_line(i, url="/v1/completions") for i in range(4)]

  def serve():
    engine = Engine(*model_and_tokenizer, CONFIG)
    return serve_in_thread(create_app(engine, api_key=KEY, warmup=False, batch_dir=root))

  with serve() as url:
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError):  # n = 0 is refused at upload
      bad = _line(9, url="/v1/completions", n=0)
      client.files.create(file=("x.jsonl", io.BytesIO(_jsonl(lines + [bad]))), purpose="batch")
    f = client.files.create(file=("x.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    done = _wait(client, client.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                                               completion_window="24h").id)
    first = client.files.content(done.output_file_id).text
  # As if killed after "finalizing" was saved and before the files were written.
  path = os.path.join(root, "batches", done.id + ".json")
  with open(path) as f:
    state = json.load(f)
  state.update(status="finalizing", output_file_id=None, completed_at=None,
               _final_status="completed")
  with open(path, "w") as f:
    json.dump(state, f)
  os.remove(os.path.join(root, "files", done.output_file_id + ".jsonl"))
  with serve() as url:
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    again = _wait(client, done.id, statuses=("completed",))
    assert again.output_file_id == done.output_file_id
    assert client.files.content(again.output_file_id).text == first
    assert again.request_counts.completed == 4


def test_the_api_key_guards_the_batch_endpoints(served):
  for method, path in (("GET", "/v1/files"), ("POST", "/v1/batches"), ("GET", "/v1/batches"),
                       ("GET", "/v1/files/file-x/content")):
    r = httpx.request(method, served.url + path)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
  with pytest.raises(openai.NotFoundError) as e:
    served.client.batches.retrieve("batch_missing")
  assert "No such batch" in e.value.body["message"]


def test_sigkill_mid_batch_then_restart_runs_every_line_exactly_once(tmp_path):
  """A server process (tiny random model, token-id prompts) killed with SIGKILL
  while a batch runs; the same command again resumes it from the journal."""
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  command = [sys.executable, os.path.join(ROOT, "scripts", "serve.py"), "--model", "tiny",
             "--page_size", "8", "--num_pages", "64", "--max_model_len", "64",
             "--max_batch", "4", "--prefill_chunk", "16", "--max_prefill_batch", "2",
             "--precompile", "none", "--port", str(port),
             "--batch_dir", str(tmp_path / "batches"),
             "--compilation_cache_dir", str(tmp_path / "jax_cache")]
  url = f"http://127.0.0.1:{port}"
  client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

  def start():
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def alive() -> None:
      assert proc.poll() is None, "server did not start"

    wait_healthy(url, 180, alive, poll_s=0.2)
    return proc

  n = 64
  lines = [{"custom_id": f"k{i}", "method": "POST", "url": "/v1/completions",
            "body": {"prompt": [1 + i, 2, 3, 4 + i], "max_tokens": 24, "temperature": 0,
                     "ignore_eos": True}} for i in range(n)]
  proc = start()
  try:
    f = client.files.create(file=("k.jsonl", io.BytesIO(_jsonl(lines))), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                                  completion_window="24h")
    running = _wait(client, batch.id, until=lambda b: b.request_counts.completed >= 4)
    proc.send_signal(signal.SIGKILL)
    assert running.status == "in_progress" and running.request_counts.completed < n
    proc.wait(30)
    proc = start()
    done = _wait(client, batch.id, timeout=300)
    assert done.status == "completed" and done.request_counts.completed == n, done
    out = _output(client, done.output_file_id)
    assert sorted(r["custom_id"] for r in out) == sorted(f"k{i}" for i in range(n))
    assert all(r["response"]["body"]["usage"]["completion_tokens"] == 24 for r in out)
  finally:
    proc.kill()
    proc.wait(30)


def test_a_batch_whose_lines_are_for_another_endpoint_fails(served):
  client = served.client
  f = client.files.create(file=("c.jsonl", io.BytesIO(_jsonl([_line(0), _line(1)]))),
                          purpose="batch")
  batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                                completion_window="24h")
  done = _wait(client, batch.id)
  assert done.status == "failed" and done.failed_at is not None
  assert done.errors.data[0].code == "mismatched_endpoint" and done.errors.data[0].line == 1
  with pytest.raises(openai.BadRequestError) as e:
    client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings",
                          completion_window="24h")
  assert e.value.body["param"] == "endpoint"
  for metadata in ({f"k{i}": "v" for i in range(17)}, {"k": "v" * 513}, {"k": 1}):
    with pytest.raises(openai.BadRequestError) as e:
      client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                            completion_window="24h", metadata=metadata)
    assert e.value.body["param"] == "metadata"
  page = client.batches.list(limit=1)
  assert page.data[0].id == batch.id and not page.has_more
