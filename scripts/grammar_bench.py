"""What structured outputs cost per backend: grammar compile time and per-step mask time.

  python scripts/grammar_bench.py --output results/grammar_cpu.json

On the default model's tokenizer (or --tokenizer), side by side in one run, for
xgrammar and llguidance (--backends), and for engine/grammar.py's wrapper
around llguidance, the one chosen ("ridgeline"):
  - importing the backend (in a fresh interpreter) and building its tokenizer
    info (once per tokenizer);
  - for a moderately complex JSON schema (nested objects, an array of objects,
    enums, bounded numbers, patterns, required fields), new to every cache:
    checking it as a request (ridgeline only), compiling it, compiling it
    again (cached), a matcher for one request, and that matcher's first mask;
  - the next-token bitmask for --batch rows, each row its own matcher, part-way
    through its own JSON document (advanced with that document's tokens
    first), over --steps steps, --passes times: one row at a time, and through
    the backend's batched call at each of --threads;
  - accepting one token;
  - how often the two backends' masks agree on the same state.

Compile times are medians over --repeats (and the first, the coldest); fill
and accept times medians over steps. Host-side work only: no model, no device.
xgrammar is not a dependency (it requires torch, transformers and triton):
`pip install --no-deps xgrammar apache-tvm-ffi` to measure it. The backends'
adapters, one interface for the three, are tools/grammar_backends.py.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time

import numpy as np
from absl import app, flags

from ridgeline.tools.grammar_backends import BACKENDS
from ridgeline.util import ceil_div

flags.DEFINE_string("tokenizer", None, "A .gguf, tokenizer.json, tokenizer.model or HF "
                    "directory. Default: the default model's GGUF (SmolLM2-135M-Instruct).")
flags.DEFINE_list("backends", ["xgrammar", "llguidance", "ridgeline"],
                  "Backends to measure; 'ridgeline' is engine/grammar.py's wrapper.")
flags.DEFINE_integer("batch", 64, "Rows (sequences) whose masks one step fills.")
flags.DEFINE_integer("steps", 32, "Decode steps timed (fill every row, then accept a token).")
flags.DEFINE_integer("repeats", 5, "Repeats of each compile measurement.")
flags.DEFINE_integer("passes", 3, "Passes over the timed steps (medians over all).")
flags.DEFINE_list("threads", ["1", "2"], "Thread counts for the batched fill.")
flags.DEFINE_integer("seed", 0, "Seed of the generated documents.")
flags.DEFINE_string("output", None, "Write the results here as JSON.")
FLAGS = flags.FLAGS

# A user record: nested object with its own required fields and enum, an array of
# objects, bounded integers and numbers, string patterns and lengths, a nullable
# field. additionalProperties false everywhere, as OpenAI's strict mode asks.
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "name": {"type": "string", "minLength": 1, "maxLength": 48},
        "email": {"type": "string", "pattern": "^[a-z0-9._]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "active": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 8},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "country": {"enum": ["US", "CA", "MX"]},
            },
            "required": ["street", "city", "country"],
            "additionalProperties": False,
        },
        "orders": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 1000},
                    "price": {"type": "number", "minimum": 0},
                    "status": {"enum": ["pending", "shipped", "delivered"]},
                },
                "required": ["sku", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "notes": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["id", "name", "role", "address", "orders"],
    "additionalProperties": False,
}

_WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
          "november oscar papa quebec romeo sierra tango uniform victor whiskey").split()


def make_document(rng: random.Random) -> str:
  """A random instance of SCHEMA, keys in declared order, json.dumps' separators."""
  word = lambda: rng.choice(_WORDS)  # noqa: E731
  doc = {
      "id": rng.randint(1, 99999),
      "name": f"{word().title()} {word().title()}",
      "email": f"{word()}.{word()}@{word()}.com",
      "role": rng.choice(["admin", "editor", "viewer"]),
      "score": round(rng.uniform(0, 100), 2),
      "active": rng.random() < 0.5,
      "tags": [word() for _ in range(rng.randint(0, 4))],
      "address": {"street": f"{rng.randint(1, 999)} {word().title()} Street",
                  "city": word().title(), "zip": f"{rng.randint(0, 99999):05d}",
                  "country": rng.choice(["US", "CA", "MX"])},
      "orders": [{"sku": f"{word()[:3].upper()}-{rng.randint(0, 9999):04d}",
                  "quantity": rng.randint(1, 1000), "price": round(rng.uniform(1, 500), 2),
                  "status": rng.choice(["pending", "shipped", "delivered"])}
                 for _ in range(rng.randint(1, 3))],
      "notes": rng.choice([None, f"{word()} {word()} {word()}"]),
  }
  return json.dumps(doc)


# -- Measurements ----------------------------------------------------------------


def _ms(seconds: float) -> float:
  return round(seconds * 1e3, 4)


def _us(seconds: float) -> float:
  return round(seconds * 1e6, 3)


def import_ms(name: str) -> float:
  """Importing the backend in a fresh interpreter (xgrammar imports torch)."""
  import subprocess
  module = {"ridgeline": "ridgeline.engine.grammar"}.get(name, name)
  code = (f"import time; t = time.perf_counter(); import {module}; "
          "print(time.perf_counter() - t)")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, cwd=root, env={**os.environ, "PYTHONPATH": root})
  return _ms(float(out.stdout.strip().splitlines()[-1]))


def measure_compile(backend, schema: dict, repeats: int) -> dict:
  """A new schema each repeat (its title differs, so no cache has it): checking
  it (ridgeline only, at request parsing), compiling it, compiling it again,
  a new matcher, and that matcher's first mask."""
  prepare, cold, cached, matcher, first_mask = [], [], [], [], []

  def timed(times: list, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    times.append(time.perf_counter() - t0)
    return out

  for i in range(repeats):
    backend.forget()
    text = json.dumps({"title": f"record {i} {time.time_ns()}", **schema},
                      separators=(",", ":"))
    spec = timed(prepare, backend.prepare, text)
    compiled = timed(cold, backend.compile, spec)
    compiled = timed(cached, backend.compile, spec)
    m = timed(matcher, backend.matcher, compiled)
    timed(first_mask, backend.fill, m, np.zeros((1, backend.vocab_words), np.int32), 0)
  return {"check_spec_ms": _ms(statistics.median(prepare)),
          "compile_cold_ms": _ms(statistics.median(cold)),
          "compile_cold_first_ms": _ms(cold[0]),
          "compile_cached_ms": _ms(statistics.median(cached)),
          "matcher_ms": _ms(statistics.median(matcher)),
          "first_mask_ms": _ms(statistics.median(first_mask))}


def advanced_matchers(backend, compiled, docs, starts):
  matchers = []
  for doc, start in zip(docs, starts):
    m = backend.matcher(compiled)
    for t in doc[:start]:
      if not backend.accept(m, t):
        raise RuntimeError(f"{backend.name} rejected token {t} of a valid document")
    matchers.append(m)
  return matchers


def measure_steps(backend, compiled, docs, starts, steps, passes, mode, threads=1):
  """Per step: fill every row's mask (one at a time, or batched), then each row
  accepts its document's next token; `passes` times over the same steps (the
  matchers rolled back in between). Returns the per-step fill times, the
  per-token accept times, and the first pass's masks (for the agreement check)."""
  matchers = advanced_matchers(backend, compiled, docs, starts)
  bitmask = np.zeros((len(matchers), backend.vocab_words), np.int32)
  fills, accepts, masks = [], [], []
  for p in range(passes):
    for step in range(steps):
      t0 = time.perf_counter()
      if mode == "rows":
        for i, m in enumerate(matchers):
          backend.fill(m, bitmask, i)
      else:
        backend.batch_fill(matchers, bitmask, threads)
      fills.append(time.perf_counter() - t0)
      tokens = [doc[start + step] for doc, start in zip(docs, starts)]
      if p == 0:
        masks.append(bitmask.copy())
        for i, t in enumerate(tokens):  # the document's token must be allowed
          if not (int(bitmask[i, t // 32]) >> (t % 32)) & 1:
            raise RuntimeError(f"{backend.name}: a valid token was masked out at step {step}")
      t0 = time.perf_counter()
      for m, t in zip(matchers, tokens):
        backend.accept(m, t)
      accepts.append((time.perf_counter() - t0) / len(matchers))
    for m in matchers:
      backend.rollback(m, steps)
  return fills, accepts, masks


def main(argv):
  del argv
  from ridgeline.model import default_model
  from ridgeline.model.tokenizer import load_tokenizer
  path = FLAGS.tokenizer or str(default_model.gguf_path())
  tok = load_tokenizer(path)
  vocab_size = tok.vocab_size
  words = ceil_div(vocab_size, 32)
  # Not sort_keys: both backends emit properties in declared order.
  schema = json.dumps(SCHEMA, separators=(",", ":"))
  rng = random.Random(FLAGS.seed)
  texts = [make_document(rng) for _ in range(FLAGS.batch)]
  docs = [tok.encode(text, add_bos=False) for text in texts]
  # Part-way: each row starts somewhere in the middle third of its document, so
  # rows sit in different states (keys, strings, numbers, enums, nesting).
  starts = [rng.randint(len(d) // 3, 2 * len(d) // 3) for d in docs]
  steps = min(FLAGS.steps, min(len(d) - s for d, s in zip(docs, starts)))
  print(f"tokenizer {os.path.basename(path)}: {vocab_size} tokens; schema {len(schema)} chars; "
        f"{FLAGS.batch} rows, documents {min(map(len, docs))}-{max(map(len, docs))} tokens, "
        f"{steps} steps from token {min(starts)}-{max(starts)}; {os.cpu_count()} CPUs", flush=True)

  results = {"tokenizer": os.path.basename(path), "vocab_size": vocab_size,
             "batch": FLAGS.batch, "steps": steps, "cpus": os.cpu_count(),
             "schema": SCHEMA, "backends": {}}
  all_masks = {}
  for name in FLAGS.backends:
    try:
      __import__({"ridgeline": "ridgeline.engine.grammar"}.get(name, name))  # not timed here
    except ImportError as e:
      print(f"skipping {name}: {e} (xgrammar is not a dependency: `pip install --no-deps "
            "xgrammar apache-tvm-ffi`; it imports torch)", flush=True)
      continue
    t0 = time.perf_counter()
    try:
      backend = BACKENDS[name](tok, vocab_size)
    except AttributeError:  # the raw adapters read an HF tokenizer.json
      print(f"skipping {name}: this bench feeds it HF tokenizers only", flush=True)
      continue
    backend.vocab_words = words
    row = {"tokenizer_info_ms": _ms(time.perf_counter() - t0),
           "import_ms": import_ms(name), "version": _version(name)}
    row.update(measure_compile(backend, SCHEMA, FLAGS.repeats))
    compiled = backend.compile(backend.prepare(schema))
    fills, accepts, masks = measure_steps(backend, compiled, docs, starts, steps,
                                          FLAGS.passes, "rows")
    all_masks[name] = masks
    row["fill_step_rows_ms"] = _ms(statistics.median(fills))
    row["fill_row_us"] = _us(statistics.median(fills) / FLAGS.batch)
    row["fill_step_rows_max_ms"] = _ms(max(fills))
    row["accept_token_us"] = _us(statistics.median(accepts))
    for threads in map(int, FLAGS.threads):
      fills, _, _ = measure_steps(backend, compiled, docs, starts, steps, FLAGS.passes,
                                  "batch", threads)
      row[f"fill_step_batch_t{threads}_ms"] = _ms(statistics.median(fills))
      row[f"fill_step_batch_t{threads}_max_ms"] = _ms(max(fills))
    results["backends"][name] = row
    print(name, json.dumps(row), flush=True)

  if "xgrammar" in all_masks and "llguidance" in all_masks:
    a, b = np.stack(all_masks["xgrammar"]), np.stack(all_masks["llguidance"])
    same_rows = np.all(a == b, axis=-1)
    bits_a = np.unpackbits(a.view(np.uint8), axis=-1, bitorder="little").sum(-1)
    bits_b = np.unpackbits(b.view(np.uint8), axis=-1, bitorder="little").sum(-1)
    results["mask_agreement"] = {
        "identical_rows": float(same_rows.mean()),
        "median_allowed_xgrammar": float(np.median(bits_a)),
        "median_allowed_llguidance": float(np.median(bits_b)),
    }

  _print_table(results)
  if FLAGS.output:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    with open(FLAGS.output, "w") as f:
      json.dump(results, f, indent=2)
    print(f"wrote {FLAGS.output}")


def _version(name: str) -> str:
  from importlib import metadata
  try:
    return metadata.version("llguidance" if name == "ridgeline" else name)
  except metadata.PackageNotFoundError:
    return "?"


def _print_table(results: dict) -> None:
  names = list(results["backends"])
  rows = [("import (fresh process) ms", "import_ms"),
          ("tokenizer info (once) ms", "tokenizer_info_ms"),
          ("check a request's schema ms", "check_spec_ms"),
          ("compile, cold ms (median)", "compile_cold_ms"),
          ("compile, cold ms (first)", "compile_cold_first_ms"),
          ("compile, cached ms", "compile_cached_ms"),
          ("new matcher ms", "matcher_ms"),
          ("first mask of a new matcher ms", "first_mask_ms"),
          (f"fill {results['batch']} rows, row by row ms/step", "fill_step_rows_ms"),
          ("  same, worst step ms", "fill_step_rows_max_ms"),
          ("  per row us", "fill_row_us")]
  for threads in FLAGS.threads:
    rows += [(f"fill {results['batch']} rows, batched t={threads} ms/step",
              f"fill_step_batch_t{threads}_ms"),
             ("  same, worst step ms", f"fill_step_batch_t{threads}_max_ms")]
  rows += [("accept one token us", "accept_token_us")]
  width = max(len(label) for label, _ in rows) + 2
  print()
  print("".ljust(width) + "".join(n.rjust(14) for n in names))
  for label, key in rows:
    print(label.ljust(width) + "".join(
        f"{results['backends'][n].get(key, float('nan')):14.3f}" for n in names))
  if "mask_agreement" in results:
    agree = results["mask_agreement"]
    print(f"\nmasks identical on {agree['identical_rows']:.1%} of row-steps; median allowed "
          f"tokens: xgrammar {agree['median_allowed_xgrammar']:.0f}, "
          f"llguidance {agree['median_allowed_llguidance']:.0f}")


if __name__ == "__main__":
  app.run(main)
