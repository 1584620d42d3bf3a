"""Structured outputs: how often JSON comes out valid with and without a schema
constraint, and what the constraint costs in throughput.

validity  20 JSON schemas of our own (nested objects, arrays, enums, numbers,
          required fields) x 10 subjects, sampled at the bench's temperature
          (0.7 by default here): each prompt shows the schema and asks for JSON
          only. Run once constrained (structured_outputs: the schema) and once
          not; an output counts as valid if the whole text parses (json.loads)
          and validates against its schema (jsonschema). Unconstrained outputs
          are also given a lenient second chance (the first {...} block of the
          text, as a user's regex would find it).
cost      `structured_batch` requests decoding together, `structured_tokens`
          output tokens each (ignore_eos): all unconstrained, against a quarter
          of them constrained by a schema that cannot close before max_tokens
          (an array of at least 64 records), alternating repetitions; output
          tok/s of each and their ratio, and the host's grammar time per
          constrained row per step (filling its mask and advancing it).
"""

from __future__ import annotations

import json
import time

from ridgeline.tools.bench.common import Bench, Needs, summarize, table
from ridgeline.util import ceil_div


def _obj(props: dict, required=None) -> dict:
  return {"type": "object", "properties": props,
          "required": list(props) if required is None else required,
          "additionalProperties": False}


_S = {"type": "string", "maxLength": 40}
_I = {"type": "integer", "minimum": 0, "maximum": 100000}
_N = {"type": "number", "minimum": 0, "maximum": 10000}
_B = {"type": "boolean"}


def _arr(items: dict, lo: int = 1, hi: int = 4) -> dict:
  return {"type": "array", "items": items, "minItems": lo, "maxItems": hi}


SCHEMAS = [
    _obj({"name": _S, "age": {"type": "integer", "minimum": 0, "maximum": 120},
          "email": _S}),
    _obj({"title": _S, "author": _S, "year": {"type": "integer", "minimum": 1400,
                                              "maximum": 2030},
          "genres": _arr({"enum": ["fiction", "history", "science", "poetry", "fantasy"]})}),
    _obj({"city": _S, "country": _S, "population": _I,
          "coordinates": _obj({"lat": {"type": "number", "minimum": -90, "maximum": 90},
                               "lon": {"type": "number", "minimum": -180, "maximum": 180}})}),
    _obj({"product": _S, "price": _N, "currency": {"enum": ["USD", "EUR", "GBP", "JPY"]},
          "in_stock": _B}),
    _obj({"order_id": _I, "items": _arr(_obj({"sku": _S, "quantity": {"type": "integer",
                                                                       "minimum": 1,
                                                                       "maximum": 50}})),
          "total": _N}),
    _obj({"sentiment": {"enum": ["positive", "negative", "neutral"]},
          "confidence": {"type": "number", "minimum": 0, "maximum": 1}}),
    _obj({"event": _S, "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
          "attendees": _arr(_S, 1, 5)}),
    _obj({"recipe": _S, "servings": {"type": "integer", "minimum": 1, "maximum": 12},
          "ingredients": _arr(_obj({"name": _S, "grams": _N}), 1, 5),
          "vegetarian": _B}),
    _obj({"company": _S, "founded": {"type": "integer", "minimum": 1800, "maximum": 2030},
          "employees": _I, "ceo": _obj({"name": _S, "since": {"type": "integer"}})}),
    _obj({"language": _S, "paradigm": {"enum": ["functional", "object-oriented",
                                                "procedural", "logic"]},
          "typed": {"enum": ["static", "dynamic"]}, "year": _I}),
    _obj({"patient": _obj({"name": _S, "age": {"type": "integer", "minimum": 0,
                                               "maximum": 120}}),
          "symptoms": _arr(_S, 1, 4), "urgent": _B}),
    _obj({"song": _S, "artist": _S, "duration_seconds": {"type": "integer", "minimum": 30,
                                                         "maximum": 900},
          "rating": {"type": "integer", "minimum": 1, "maximum": 5}}),
    _obj({"planet": _S, "moons": {"type": "integer", "minimum": 0, "maximum": 200},
          "has_rings": _B, "type": {"enum": ["rocky", "gas giant", "ice giant", "dwarf"]}}),
    _obj({"team": _S, "players": _arr(_obj({"name": _S, "number": {"type": "integer",
                                                                   "minimum": 0,
                                                                   "maximum": 99}}), 1, 4),
          "league": _S}),
    _obj({"flight": _S, "from": _S, "to": _S, "status": {"enum": ["on time", "delayed",
                                                                  "cancelled"]},
          "gate": {"type": "string", "pattern": "^[A-Z][0-9]{1,2}$"}}),
    _obj({"question": _S, "answer": _S, "difficulty": {"enum": ["easy", "medium", "hard"]}}),
    _obj({"user": _obj({"id": _I, "username": _S}), "roles": _arr(
        {"enum": ["admin", "editor", "viewer"]}, 1, 3), "active": _B}),
    _obj({"name": _S, "nutrition": _obj({"calories": _N, "protein": _N, "fat": _N}),
          "category": {"enum": ["fruit", "vegetable", "grain", "dairy", "meat"]}}),
    _obj({"invoice": _I, "customer": _S, "lines": _arr(_obj({"description": _S,
                                                             "amount": _N}), 1, 3),
          "paid": _B, "notes": {"anyOf": [_S, {"type": "null"}]}},
         required=["invoice", "customer", "lines", "paid"]),
    _obj({"animal": _S, "habitat": _S, "endangered": _B, "lifespan_years": _N,
          "diet": {"enum": ["herbivore", "carnivore", "omnivore"]}}),
]
SUBJECTS = ["a small bakery in Lyon", "the planet Mars", "a jazz musician from New Orleans",
            "a school library", "a mountain village", "a software startup",
            "a football club", "a hospital in Boston", "a vegetarian restaurant",
            "an airline"]
# Can't close before max_tokens: the constrained rows of the cost run go the distance.
LONG = {"type": "array", "minItems": 64, "items": _obj(
    {"id": _I, "name": _S, "kind": {"enum": ["alpha", "beta", "gamma"]}, "score": _N})}


def _needs(o, config, peer: bool) -> Needs:
  length = 1024 + max(o.structured_tokens, o.structured_max_tokens)
  return Needs(max_batch=o.structured_batch, max_len=length,
               pages=o.structured_batch * ceil_div(length, config.page_size),
               prefill_batch=8, prefill_tokens=config.prefill_chunk)


def _prompt(schema: dict, subject: str) -> list[dict]:
  return [{"role": "user", "content": f"Describe {subject} as a JSON object that matches "
                                      f"this JSON schema:\n{json.dumps(schema)}\n"
                                      "Reply with the JSON object only."}]


def _valid(text: str, schema: dict, lenient: bool = False) -> bool:
  import jsonschema
  if lenient:  # the first {...} block, as a regex after the fact would find it
    start, end = text.find("{"), text.rfind("}")
    text = text[start:end + 1] if 0 <= start < end else text
  try:
    jsonschema.validate(json.loads(text), schema)
    return True
  except (json.JSONDecodeError, jsonschema.ValidationError):
    return False


def run_structured(b: Bench) -> None:
  from ridgeline.engine.sampling import SamplingParams
  o, eng = b.options, b.engine
  if eng.tokenizer is None:
    raise SystemExit("structured mode needs a tokenizer (a real model, e.g. --model smollm2)")
  temperature = o.temperature or 0.7
  rec = {"temperature": temperature}

  # Cost.
  batch, tokens = o.structured_batch, o.structured_tokens
  free = SamplingParams(temperature=temperature, max_tokens=tokens, ignore_eos=True)
  constrained = SamplingParams(temperature=temperature, max_tokens=tokens, ignore_eos=True,
                               structured_outputs={"json": LONG})
  ask = [[{"role": "user", "content": f"List 64 records about {SUBJECTS[i % 10]} as JSON."}]
         for i in range(batch)]
  runs = {"unconstrained": [free] * batch,
          "quarter_constrained": [constrained if i % 4 == 0 else free for i in range(batch)]}
  times = {k: [] for k in runs}
  sched = eng.scheduler
  mask = {"seconds": 0.0, "rows": 0}
  for rep in range(o.repeats + 1):  # the first of each: warm-up
    for name, params in runs.items():
      s0, r0 = sched.grammar_seconds, sched.masked_rows
      t0 = time.perf_counter()
      outs = eng.generate(ask, params)
      seconds = time.perf_counter() - t0
      assert all(len(x.outputs[0].token_ids) == tokens for x in outs), "a row ended early"
      if rep:
        times[name].append(seconds)
        mask["seconds"] += sched.grammar_seconds - s0
        mask["rows"] += sched.masked_rows - r0
  cost = {}
  for name in runs:
    s = summarize(times[name])
    cost[name] = {**s, "output_tokens_per_second": batch * tokens / s["median"]}
  ratio = (cost["quarter_constrained"]["output_tokens_per_second"]
           / cost["unconstrained"]["output_tokens_per_second"])
  per_row = mask["seconds"] / max(mask["rows"], 1)
  rec["cost"] = {"batch": batch, "output_tokens": tokens, **cost, "ratio": ratio,
                 "mask_seconds_per_row_step": per_row}
  print(f"\nCost at batch {batch}, {tokens} output tokens each, a quarter constrained "
        f"(median of {o.repeats}, alternating): constrained / unconstrained = {ratio:.3f} "
        f"(target >= 0.90); grammar mask per constrained row per step "
        f"{per_row * 1e6:.1f} us")
  print(table([[name, f"{c['median']:.2f}", f"{c['output_tokens_per_second']:.1f}"]
               for name, c in cost.items()], ["run", "seconds", "output tok/s"]))

  # Validity.
  max_tokens = o.structured_max_tokens
  cases = [(s, subject) for s in SCHEMAS[:o.structured_schemas]
           for subject in SUBJECTS[:o.structured_prompts]]
  prompts = [_prompt(s, subject) for s, subject in cases]
  counts = {}
  for name in ("unconstrained", "constrained"):
    params = [SamplingParams(temperature=temperature, seed=o.seed + i, max_tokens=max_tokens,
                             structured_outputs={"json": s} if name == "constrained" else None)
              for i, (s, _) in enumerate(cases)]
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params)
    seconds = time.perf_counter() - t0
    texts = [x.outputs[0].text for x in outs]
    reasons = [x.outputs[0].finish_reason for x in outs]
    counts[name] = {
        "valid": sum(_valid(t, s) for t, (s, _) in zip(texts, cases)),
        "valid_lenient": sum(_valid(t, s, True) for t, (s, _) in zip(texts, cases)),
        "length": reasons.count("length"), "seconds": seconds,
        "output_tokens": sum(len(x.outputs[0].token_ids) for x in outs)}
    if name == "constrained":
      bad = [(t, r) for t, r, (s, _) in zip(texts, reasons, cases) if not _valid(t, s)]
      counts[name]["invalid_examples"] = bad[:3]
  n = len(cases)
  rec["validity"] = {"requests": n, "max_tokens": max_tokens, **counts}
  rows = [[name, f"{c['valid']}/{n} ({c['valid'] / n:.1%})",
           f"{c['valid_lenient'] / n:.1%}", str(c["length"]), f"{c['seconds']:.0f}"]
          for name, c in counts.items()]
  print(f"\nJSON validity: {o.structured_schemas} schemas x {o.structured_prompts} subjects, "
        f"temperature {temperature}, max_tokens {max_tokens} (target: constrained 100%)")
  print(table(rows, ["run", "parse + validate", "lenient (first {...})", "hit max_tokens",
                     "seconds"]))
  b.results["structured"] = rec
