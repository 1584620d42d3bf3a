"""Structured outputs through the engine: every constraint kind on the default
model (Engine.generate, the server with the official `openai` client, the batch
job), outputs that parse and validate, ends that respect the grammar, greedy
outputs unchanged by batching and preemption beside unconstrained rows, no
compilation after warm-up, and the errors naming their field. (The grammar
backend itself is tests/test_grammar.py.)"""

import dataclasses
import json
import re

import jsonschema
import numpy as np
import openai
import pydantic
import pytest
from flax import nnx

from ridgeline.configs import models
from ridgeline.frontends import batch
from ridgeline.engine.engine import Engine, EngineConfig, SamplingParams
from ridgeline.engine.grammar import GrammarSpec
from ridgeline.frontends.server import create_app
from ridgeline.engine import loading
from ridgeline.model import transformer as transformer_lib
from ridgeline.model.tokenizer import Tokenizer
from tests.serving import serve_in_thread

NAME = "smollm2"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["engineer", "doctor", "teacher", "artist"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 16},
                   "maxItems": 3},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 20},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe Ada Lovelace, a 36 year old engineer from "
                                   "London, as JSON."}]
SHORT = [{"role": "user", "content": 'Repeat exactly: {"capital": "Paris", "country": "France"}'}]
GREETING = 'start: greeting " " NAME "!"\ngreeting: "Hello" | "Hi"\nNAME: /[A-Z][a-z]{1,9}/\n'
# (constraint, request parameters, check of the text)
KINDS = {
    "json_schema": ({"json": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
    "json_object": ({"json_object": True}, lambda t: isinstance(json.loads(t), dict)),
    "regex": ({"regex": r"\(\d{3}\) \d{3}-\d{4}"},
              lambda t: re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", t)),
    "choice": ({"choice": ["positive", "negative", "neutral"]},
               lambda t: t in ("positive", "negative", "neutral")),
    "grammar": ({"grammar": GREETING}, lambda t: re.fullmatch(r"(Hello|Hi) [A-Z][a-z]{1,9}!", t)),
}


def _check(kind: str, text: str) -> None:
  assert KINDS[kind][1](text), f"{kind}: {text!r}"


@pytest.fixture(scope="module")
def loaded(default_checkpoint):
  return loading.load_model(default_checkpoint)


def _config(**kw):
  cfg = dict(page_size=16, num_pages=64, max_model_len=256, max_batch=8, prefill_chunk=64,
             max_prefill_batch=4)
  cfg.update(kw)
  return EngineConfig(**cfg)


@pytest.fixture(scope="module")
def engine(loaded):
  return Engine(*loaded, _config())


def test_every_kind_through_engine_generate(engine):
  kinds = list(KINDS)
  params = [SamplingParams(temperature=0, max_tokens=120, structured_outputs=KINDS[k][0])
            for k in kinds]
  # Sampled too (n = 3, temperature 0.9): the draw stays inside the mask.
  params += [SamplingParams(temperature=0.9, top_p=0.95, seed=7, n=3, max_tokens=120,
                            structured_outputs=KINDS[k][0]) for k in ("json_schema", "choice")]
  kinds += ["json_schema", "choice"]
  outs = engine.generate([SHORT if k == "json_object" else ASK for k in kinds], params)
  for kind, out in zip(kinds, outs):
    assert out.error is None
    for c in out.outputs:
      assert c.finish_reason == "stop", (kind, c.text)
      _check(kind, c.text)
  doc = json.loads(outs[0].outputs[0].text)
  assert doc["name"].startswith("Ada")  # it still reads the prompt
  assert engine.scheduler.masked_rows > 0


def test_max_tokens_inside_a_structure_is_length_and_eos_waits_for_the_grammar(engine):
  """A document cut by max_tokens says "length" (never "stop" on half a
  document); EOS is never sampled before the grammar accepts, even where the
  model wants it (ignore_eos off, min_tokens 0)."""
  cut, whole = engine.generate([ASK, ASK], [
      SamplingParams(temperature=0, max_tokens=6, structured_outputs={"json": PERSON}),
      SamplingParams(temperature=0, max_tokens=120, structured_outputs={"regex": "[a-z]{20}"})])
  assert cut.outputs[0].finish_reason == "length"
  with pytest.raises(json.JSONDecodeError):
    json.loads(cut.outputs[0].text)
  assert cut.outputs[0].text.startswith("{")
  assert whole.outputs[0].finish_reason == "stop"
  assert re.fullmatch("[a-z]{20}", whole.outputs[0].text)


def test_bad_constraints_fail_alone_naming_the_field(engine):
  with pytest.raises(ValueError, match=r"^structured_outputs.json.properties.a: "):
    SamplingParams(structured_outputs={"json": {"type": "object",
                                                "properties": {"a": {"type": "integr"}}}})
  with pytest.raises(ValueError, match=r"^structured_outputs: give exactly one"):
    SamplingParams(structured_outputs={"regex": "a", "choice": ["a"]})
  with pytest.raises(ValueError, match=r"^structured_outputs.regex: invalid regex"):
    SamplingParams(structured_outputs={"regex": "(("})
  no_tokenizer = Engine(_tiny(), None, _config())
  rid = no_tokenizer.add_request([1, 2, 3], SamplingParams(
      max_tokens=4, structured_outputs=GrammarSpec.choice(["a"])))
  assert "structured_outputs needs a tokenizer" in no_tokenizer.get_output(rid).error


# The engine's mechanics on a small random model with the default model's
# tokenizer (its outputs are arbitrary, but they must follow the grammar and
# must not depend on batching, preemption or their neighbours).


def _tiny():
  config = dataclasses.replace(models.get("tiny"), vocab_size=49152)
  return transformer_lib.Transformer(config, rngs=nnx.Rngs(5))


@pytest.fixture(scope="module")
def tiny(smollm2_gguf):
  return _tiny(), Tokenizer.from_gguf(smollm2_gguf)


def test_constrained_rows_beside_free_ones_under_preemption_are_batch_invariant(tiny):
  model, tok = tiny
  small = {"type": "object", "properties": {
      "k": {"enum": ["alpha", "beta", "gamma"]},
      "n": {"type": "integer", "minimum": 0, "maximum": 999},
      "s": {"type": "string", "maxLength": 6}}, "required": ["k", "n", "s"],
      "additionalProperties": False}
  constraints = [{"json": small}, {"regex": "[0-9]{4}-[a-z]{3}"}, {"choice": ["yes", "no"]},
                 {"grammar": GREETING}, None]
  rng = np.random.default_rng(0)
  prompts, params = [], []
  for i in range(15):
    prompts.append([int(t) for t in rng.integers(300, 40000, size=int(rng.integers(5, 40)))])
    params.append(SamplingParams(temperature=0, max_tokens=40, ignore_eos=constraints[i % 5]
                                 is None, structured_outputs=constraints[i % 5]))
  alone = Engine(model, tok, _config(num_pages=40, max_model_len=96))
  expected = [alone.generate([p], [sp])[0].outputs[0] for p, sp in zip(prompts, params)]
  # A pool of 16 pages for 15 sequences of up to 80 tokens: preemption.
  mixed = Engine(model, tok, _config(num_pages=16, max_model_len=96, prefill_chunk=32))
  mixed.warmup()
  compiled = mixed.runner.compilations
  got = mixed.generate(prompts, params)
  assert mixed.metrics.preemptions._value.get() > 0
  assert mixed.runner.compilations == compiled, "compiled after warm-up"
  for i, (out, ref) in enumerate(zip(got, expected)):
    c = out.outputs[0]
    assert c.token_ids == ref.token_ids and c.finish_reason == ref.finish_reason, i
    kind = ["json_schema", "regex", "choice", "grammar", None][i % 5]
    if kind is not None and c.finish_reason == "stop":
      if kind == "json_schema":
        jsonschema.validate(json.loads(c.text), small)
      elif kind == "regex":
        assert re.fullmatch("[0-9]{4}-[a-z]{3}", c.text)
      elif kind == "choice":
        assert c.text in ("yes", "no")
      else:
        _check("grammar", c.text)


# The server and the batch job on the default model.


@pytest.fixture(scope="module")
def client(loaded):
  engine = Engine(*loaded, _config())
  app = create_app(engine, model_name=NAME, warmup=False)
  with serve_in_thread(app, timeout_s=300) as url:
    yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


class Address(pydantic.BaseModel):
  city: str
  zip: str


class Person(pydantic.BaseModel):
  name: str
  age: int
  address: Address


def test_server_response_format_and_parse(client):
  parsed = client.beta.chat.completions.parse(
      model=NAME, messages=ASK, response_format=Person, temperature=0, max_tokens=120)
  person = parsed.choices[0].message.parsed
  assert isinstance(person, Person) and person.name.startswith("Ada")
  r = client.chat.completions.create(
      model=NAME, messages=ASK, temperature=0, max_tokens=120,
      response_format={"type": "json_schema",
                       "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
  assert r.choices[0].finish_reason == "stop"
  _check("json_schema", r.choices[0].message.content)
  r = client.chat.completions.create(model=NAME, messages=SHORT, temperature=0, max_tokens=120,
                                     response_format={"type": "json_object"})
  _check("json_object", r.choices[0].message.content)


@pytest.mark.parametrize("kind", ["regex", "choice", "grammar", "json_schema"])
def test_server_structured_outputs_and_guided_aliases(client, kind):
  constraint = KINDS[kind][0]
  key, value = next(iter(constraint.items()))
  old = {"json": "guided_json"}.get(key, f"guided_{key}")
  # Streaming chat with vLLM's structured_outputs; completions with the old name.
  stream = client.chat.completions.create(
      model=NAME, messages=ASK, temperature=0, max_tokens=120, stream=True,
      extra_body={"structured_outputs": constraint})
  text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
  _check(kind, text)
  r = client.completions.create(model=NAME, prompt="Answer: ", temperature=0, max_tokens=120,
                                extra_body={old: value})
  _check(kind, r.choices[0].text)


def test_server_refuses_bad_constraints_naming_the_field(client):
  cases = [
      ({"response_format": {"type": "json_schema", "json_schema": {
          "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integr"}}}}}},
       "response_format", "response_format.json_schema.schema.properties.a"),
      ({"extra_body": {"guided_regex": "(("}}, "guided_regex", "invalid regex"),
      ({"extra_body": {"structured_outputs": {"choice": []}}}, "structured_outputs",
       "structured_outputs.choice"),
      ({"response_format": {"type": "json_object"}, "extra_body": {"guided_choice": ["a"]}},
       "guided_choice", "give one output constraint"),
      ({"response_format": {"type": "xml"}}, "response_format", "response_format.type"),
  ]
  for kwargs, param, message in cases:
    with pytest.raises(openai.BadRequestError) as e:
      client.chat.completions.create(model=NAME, messages=ASK, max_tokens=8, **kwargs)
    err = e.value.body
    assert err["param"] == param and message in err["message"], err


def test_batch_job_lines_with_constraints(engine, tmp_path):
  lines = [
      {"id": "own", "messages": ASK,
       "sampling": {"max_tokens": 120, "structured_outputs": {"json": PERSON}}},
      {"id": "choice", "prompt": "The movie was great. Sentiment:",
       "sampling": {"max_tokens": 8, "structured_outputs": {"choice": ["positive", "negative"]}}},
      {"custom_id": "openai", "method": "POST", "url": "/v1/chat/completions",
       "body": {"messages": ASK, "max_tokens": 120, "response_format": {
           "type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}},
      {"id": "bad", "prompt": "x", "sampling": {"structured_outputs": {"regex": "(("}}},
      {"custom_id": "bad-openai", "method": "POST", "url": "/v1/chat/completions",
       "body": {"messages": ASK, "response_format": {"type": "json_schema"}}},
  ]
  src = tmp_path / "in.jsonl"
  src.write_text("".join(json.dumps(x) + "\n" for x in lines))
  job = batch.BatchJob(str(src), str(tmp_path / "out.jsonl"), progress=False,
                       default_sampling={"temperature": 0})
  batch.run_batch(engine, job)
  records = {r.get("custom_id") or r["id"]: r
             for r in map(json.loads, open(tmp_path / "out.jsonl"))}
  _check("json_schema", records["own"]["text"])
  assert records["choice"]["text"] in ("positive", "negative")
  body = records["openai"]["response"]["body"]
  _check("json_schema", body["choices"][0]["message"]["content"])
  assert "structured_outputs.regex: invalid regex" in records["bad"]["error"]
  assert "response_format.json_schema" in json.dumps(records["bad-openai"]["error"])
