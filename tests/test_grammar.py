"""Structured outputs (engine/grammar.py): every kind of grammar constrains what a
matcher allows, walked token by token through the allowed set of the default
model's tokenizer (and a sentencepiece one trained here), with EOS allowed
exactly where the output is complete; bad requests fail naming their field."""

import ast
import json
import random
import re
import threading

import jsonschema
import numpy as np
import pytest
import sentencepiece

from ridgeline.engine import grammar
from ridgeline.engine.grammar import GrammarCompiler, GrammarError, GrammarSpec
from ridgeline.model.tokenizer import Tokenizer

FIELD = "response_format.json_schema.schema"

# Bounded everywhere a random walk could wander (string lengths, array sizes),
# so walks end in a few hundred tokens; nested objects, an array of objects,
# enums, integer and number ranges, a pattern, a nullable field, required keys.
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "score": {"type": "number", "minimum": 0, "maximum": 100},
        "active": {"type": "boolean"},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                           "country": {"enum": ["US", "CA", "MX"]}},
            "required": ["city", "country"],
            "additionalProperties": False,
        },
        "orders": {
            "type": "array", "minItems": 1, "maxItems": 2,
            "items": {"type": "object",
                      "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                     "quantity": {"type": "integer", "minimum": 1,
                                                  "maximum": 99}},
                      "required": ["sku", "quantity"], "additionalProperties": False},
        },
        "notes": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
    },
    "required": ["id", "name", "role", "address", "orders"],
    "additionalProperties": False,
}
DOCUMENT = {"id": 42, "name": "Ada", "role": "admin", "score": 99.5, "active": True,
            "address": {"city": "Paris", "zip": "75001", "country": "CA"},
            "orders": [{"sku": "ABC-12", "quantity": 3}], "notes": None}


@pytest.fixture(scope="module")
def tok(smollm2_gguf) -> Tokenizer:
  return Tokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def compiler(tok) -> GrammarCompiler:
  return GrammarCompiler(tok)


class Walker:
  """Random walks through a matcher's allowed tokens, checking every mask."""

  # Characters that close what a walk opened: preferring tokens with one ends
  # strings and numbers in a few tokens instead of hundreds.
  CLOSERS = set('"]},')

  def __init__(self, tok: Tokenizer, compiler: GrammarCompiler):
    self.tok, self.compiler = tok, compiler
    texts = [tok.decode([i], skip_special_tokens=False) for i in range(tok.vocab_size)]
    self.closes = np.array([any(c in self.CLOSERS for c in t) for t in texts])
    self.eos = np.asarray(tok.eos_ids)

  def allowed(self, matcher) -> np.ndarray:
    row = self.compiler.new_bitmask(1)[0]
    matcher.fill(row)
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")
    ids = np.flatnonzero(bits)
    assert not (ids >= self.tok.vocab_size).any(), "a padding id is allowed"
    return ids

  def walk(self, matcher, seed: int, budget: int = 300, check=None,
           min_len: int = 0) -> list[int]:
    """Random allowed tokens until EOS (not by choice before `min_len` tokens,
    nor closing preferred); `check(ids, eos_allowed)` at each step. Returns
    the ids before EOS."""
    rng = random.Random(seed)
    ids: list[int] = []
    while True:
      allowed = self.allowed(matcher)
      eos_allowed = bool(np.isin(self.eos, allowed).any())
      assert eos_allowed == matcher.can_end()
      if check is not None:
        check(ids, eos_allowed)
      others = allowed[~np.isin(allowed, self.eos)]
      assert matcher.must_end() == (others.size == 0)
      if eos_allowed and (others.size == 0 or (len(ids) >= min_len and (
          rng.random() < 0.3 or len(ids) >= budget))):
        assert matcher.accept(int(self.eos[0])) and matcher.is_terminated()
        return ids
      assert others.size, f"nothing allowed after {self.tok.decode(ids)!r}"
      assert len(ids) < 2 * budget, f"no end in sight: {self.tok.decode(ids)!r}"
      closing = others[self.closes[others]]
      pool = closing if closing.size and len(ids) >= min_len and (
          len(ids) > budget // 2 or rng.random() < 0.3) else others
      token = int(rng.choice(list(pool)))
      assert matcher.accept(token)
      ids.append(token)


@pytest.fixture(scope="module")
def walker(tok, compiler) -> Walker:
  return Walker(tok, compiler)


# -- Every kind constrains ---------------------------------------------------------


def test_json_schema_walks_validate(tok, compiler, walker):
  spec = GrammarSpec.json_schema(SCHEMA, FIELD)
  for seed in range(6):
    ids = walker.walk(compiler.matcher(spec), seed)
    jsonschema.validate(json.loads(tok.decode(ids)), SCHEMA)


def test_json_object_walks_parse(tok, compiler, walker):
  sizes = []
  for seed in range(4):
    ids = walker.walk(compiler.matcher(GrammarSpec.json_object()), seed, min_len=40)
    value = json.loads(tok.decode(ids))
    assert isinstance(value, dict)
    sizes.append(len(json.dumps(value)))
  assert max(sizes) > 20  # not all "{}"


def test_regex_eos_exactly_at_full_matches(tok, compiler, walker):
  pattern = r"(ab|c){1,4}-[0-9]{2,3}"
  spec = GrammarSpec.regex(pattern)

  def check(ids, eos_allowed):
    assert eos_allowed == bool(re.fullmatch(pattern, tok.decode(ids)))

  for seed in range(8):
    assert re.fullmatch(pattern, tok.decode(walker.walk(compiler.matcher(spec), seed,
                                                        budget=12, check=check)))


def test_choice_eos_exactly_at_a_choice(tok, compiler, walker):
  choices = ["yes", "no", "not sure", 'say "hi"\n', "back\\slash", "ünïcode"]
  spec = GrammarSpec.choice(choices)

  def check(ids, eos_allowed):
    assert eos_allowed == (tok.decode(ids) in choices)

  seen = {tok.decode(walker.walk(compiler.matcher(spec), seed, check=check))
          for seed in range(30)}
  assert seen <= set(choices) and len(seen) >= 3


@pytest.mark.parametrize("text", [
    # Lark: the start rule; no whitespace unless %ignore'd.
    'start: expr\nexpr: term (("+" | "-") term)*\nterm: NUMBER | "(" expr ")"\n'
    "NUMBER: /[1-9][0-9]{0,2}/\n",
    # The same grammar in GBNF: the root rule.
    'root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= number | "(" expr ")"\n'
    "number ::= [1-9] [0-9]? [0-9]?\n",
])
def test_grammar_eos_exactly_at_complete_expressions(tok, compiler, walker, text):
  def parses(s):
    try:
      ast.parse(s, mode="eval")
      return True
    except SyntaxError:
      return False

  def check(ids, eos_allowed):
    assert eos_allowed == parses(tok.decode(ids))

  spec = GrammarSpec.grammar(text)
  for seed in range(6):
    out = tok.decode(walker.walk(compiler.matcher(spec), seed, budget=40, check=check))
    assert re.fullmatch(r"[0-9+\-()]+", out) and parses(out)


def test_valid_document_eos_only_at_its_end(tok, compiler, walker):
  ids = tok.encode(json.dumps(DOCUMENT))
  m = compiler.matcher(GrammarSpec.json_schema(SCHEMA))
  for i, token in enumerate(ids):
    assert token in walker.allowed(m), tok.decode(ids[:i + 1])
    assert not m.can_end() and not m.must_end()
    assert m.accept(token)
  # A closed object: EOS allowed, and nothing else.
  assert m.can_end() and m.must_end()
  assert set(walker.allowed(m)) == set(tok.eos_ids)
  assert m.accept(tok.eos_ids[0]) and m.is_terminated() and not m.can_end()
  assert not m.accept(ids[0]) and m.num_tokens == len(ids) + 1
  # An ended sequence's row allows EOS only, filled alone or in a batch.
  assert set(walker.allowed(m)) == set(tok.eos_ids)
  rows = compiler.new_bitmask(2)
  grammar.fill_rows([m], rows, rows=[1])
  assert np.array_equal(rows[1], compiler.eos_mask) and not rows[0].any()


def test_json_is_laid_out_as_json_dumps_writes_it(tok, compiler):
  # A small model can loop on whitespace: none is allowed beyond ", " and ": ".
  for spec in (GrammarSpec.json_object(), GrammarSpec.json_schema(SCHEMA)):
    m = compiler.matcher(spec)
    assert m.accept(tok.encode("{")[0])
    assert not m.accept(tok.encode(" ")[0]) and not m.accept(tok.encode("\n")[0])
    assert m.accept(tok.encode('"')[0])
  m = compiler.matcher(GrammarSpec.json_schema(SCHEMA))
  text = json.dumps(DOCUMENT)
  assert all(m.accept(t) for t in tok.encode(text)) and m.can_end()
  flexible = dict(SCHEMA, **{"x-guidance": {"whitespace_flexible": True}})
  m = compiler.matcher(GrammarSpec.json_schema(flexible))  # a schema may ask otherwise
  assert m.accept(tok.encode("{")[0]) and m.accept(tok.encode("\n")[0])


def test_control_tokens_never_allowed(tok, compiler, walker):
  m = compiler.matcher(GrammarSpec.json_schema({"type": "string"}))
  assert m.accept(tok.encode('"')[0])
  allowed = set(walker.allowed(m))
  assert len(allowed) > 40000  # inside a free string almost anything goes...
  for name in ("<|im_start|>", "<|endoftext|>", "<repo_name>", "<|im_end|>"):
    assert tok.token_to_id(name) not in allowed, name  # ...but not these (nor EOS)


def test_rejected_token_changes_nothing_and_rollback(tok, compiler, walker):
  m = compiler.matcher(GrammarSpec.json_schema(SCHEMA))
  ids = tok.encode(json.dumps(DOCUMENT))
  assert not m.accept(tok.encode("x")[0])  # a JSON object starts with "{"
  assert not m.accept(tok.eos_ids[0])  # nothing generated is not a complete match
  assert not m.accept(tok.vocab_size + 5) and not m.accept(-1)
  assert m.error is None and not m.is_terminated()
  for token in ids[:10]:
    assert m.accept(token)
  before = walker.allowed(m)
  for token in ids[10:20]:
    assert m.accept(token)
  m.rollback(10)
  assert np.array_equal(walker.allowed(m), before) and m.num_tokens == 10
  with pytest.raises(ValueError, match="cannot roll back 11 tokens: 10 accepted"):
    m.rollback(11)
  for token in ids[10:]:
    assert m.accept(token)
  assert m.accept(tok.eos_ids[0]) and m.is_terminated()
  m.rollback(1)  # undoing EOS reopens the matcher
  assert not m.is_terminated() and m.can_end()
  m.reset()
  assert m.num_tokens == 0 and np.array_equal(walker.allowed(m),
                                               walker.allowed(compiler.matcher(m.spec)))


def test_model_vocabulary_wider_than_the_tokenizer(tok, walker):
  wide = GrammarCompiler(tok, vocab_size=tok.vocab_size + 72)
  assert wide.words == -(-(tok.vocab_size + 72) // 32)
  assert wide.new_bitmask(2).shape == (2, wide.words)
  walk = Walker(tok, wide)
  for seed in range(2):  # Walker.allowed asserts no padding id is ever allowed
    ids = walk.walk(wide.matcher(GrammarSpec.json_schema(SCHEMA)), seed)
    jsonschema.validate(json.loads(tok.decode(ids)), SCHEMA)
  m = wide.matcher(GrammarSpec.choice(["a"]))
  assert not m.accept(tok.vocab_size + 1) and m.error is None
  with pytest.raises(GrammarError, match="vocab_size .* is smaller than the tokenizer's"):
    GrammarCompiler(tok, vocab_size=tok.vocab_size - 1)


def test_fill_rows_matches_fill(tok, compiler):
  specs = [GrammarSpec.json_schema(SCHEMA), GrammarSpec.json_object(),
           GrammarSpec.regex("[a-z]+@[a-z]+"), GrammarSpec.choice(["alpha", "beta"])]
  texts = [json.dumps(DOCUMENT)[:30], '{"k": [1, tr', "abc@d", "al"]
  matchers = []
  for spec, text in zip(specs, texts):
    m = compiler.matcher(spec)
    assert all(m.accept(t) for t in tok.encode(text))
    matchers.append(m)
  one = compiler.new_bitmask(len(matchers))
  for i, m in enumerate(matchers):
    m.fill(one[i])
  for threads in (1, 2, None):
    batch = compiler.new_bitmask(6)
    grammar.fill_rows(matchers, batch, rows=[5, 0, 3, 1], threads=threads)
    assert np.array_equal(batch[[5, 0, 3, 1]], one) and not batch[[2, 4]].any()
  with pytest.raises(ValueError, match="outside a bitmask of 6 rows"):
    grammar.fill_rows(matchers, batch, rows=[0, 1, 2, 6])
  with pytest.raises(ValueError, match=r"shape \[rows, 1536\]"):
    grammar.fill_rows(matchers, np.zeros((4, 100), np.uint32))
  with pytest.raises(ValueError, match="uint32"):
    matchers[0].fill(np.zeros(compiler.words, np.float32))
  with pytest.raises(ValueError, match="C-contiguous"):
    matchers[0].fill(np.zeros(2 * compiler.words, np.uint32)[::2])


# -- Specs and their errors --------------------------------------------------------


@pytest.mark.parametrize("schema,message", [
    ({"type": "object", "properties": {"age": {"type": "integr"}}},
     f"{FIELD}.properties.age: Invalid type: integr"),
    ({"properties": {"zip": {"type": "string", "pattern": "[0-9"}}},
     f"{FIELD}.properties.zip: invalid regex '[0-9': unclosed character class"),
    ({"properties": {"a": {"$ref": "#/$defs/missing"}}},
     f"{FIELD}.properties.a: Pointer '/$defs/missing' does not exist"),
    ({"properties": {"tags": {"type": "array", "items": {"type": "string", "minLength": -1}}}},
     f"{FIELD}.properties.tags.items: Expected positive integer for 'minLength', got -1"),
    ({"required": "a"}, f"{FIELD}: Expected array for 'required', got \"a\""),
    ({"type": "integer", "minimum": 5, "maximum": 1},
     f"{FIELD}: Unsatisfiable schema: minimum (5) is greater than maximum (1)"),
    ('{"type": "object",}', f"{FIELD}: not valid JSON: "),
    ([{"type": "object"}], f"{FIELD}: a JSON Schema must be an object, got list"),
    (False, f"{FIELD}: the schema `false` matches nothing"),
    # Valid JSON Schema the backend cannot enforce: said so, not silently ignored.
    ({"anyOf": [{"type": "string"}, {"not": {"type": "integer"}}]},
     f"{FIELD}.anyOf[1]: not supported by the grammar backend (llguidance "),
    ({"properties": {"d": {"type": "string", "format": "bogus"}}},
     f"{FIELD}.properties.d: not supported by the grammar backend"),
])
def test_invalid_schema_errors_name_the_field(schema, message):
  with pytest.raises(GrammarError) as e:
    GrammarSpec.json_schema(schema, FIELD)
  assert str(e.value).startswith(message), str(e.value)
  assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("make,message", [
    (lambda: GrammarSpec.regex("[a-", "guided_regex"),
     "guided_regex: invalid regex '[a-': unclosed character class"),
    (lambda: GrammarSpec.regex("(?<=a)b", "guided_regex"),
     "guided_regex: invalid regex '(?<=a)b': look-around"),
    (lambda: GrammarSpec.regex(5, "guided_regex"), "guided_regex: a regex must be a string"),
    (lambda: GrammarSpec.grammar("start: foo", "guided_grammar"),
     'guided_grammar: at 1(8): unknown name: "foo"'),
    (lambda: GrammarSpec.grammar('root ::= "a" | b', "guided_grammar"),
     "guided_grammar: Rule 'b' not found"),
    (lambda: GrammarSpec.grammar("  ", "guided_grammar"), "guided_grammar: must be a non-empty"),
    (lambda: GrammarSpec.choice([], "guided_choice"), "guided_choice: must be a non-empty list"),
    (lambda: GrammarSpec.choice(["a", 1], "guided_choice"), "guided_choice[1]: must be a string"),
    (lambda: GrammarSpec.from_response_format({"type": "xml"}),
     "response_format.type: must be 'text', 'json_object' or 'json_schema', got 'xml'"),
    (lambda: GrammarSpec.from_response_format({"type": "json_schema", "json_schema": {}}),
     "response_format.json_schema.schema: is required"),
    (lambda: GrammarSpec("yaml", ""), "grammar kind must be one of"),
])
def test_invalid_requests_name_the_field(make, message):
  with pytest.raises(GrammarError) as e:
    make()
  assert str(e.value).startswith(message), str(e.value)


def test_tokenizer_dependent_errors_at_compile(compiler):
  spec = GrammarSpec.grammar('start: "a" <[99999]>')  # token ids: only a tokenizer knows
  with pytest.raises(GrammarError, match="guided_grammar: .*Token range end too large: 99999"):
    compiler.compile(spec, "guided_grammar")


def test_specs_are_canonical_and_hashable():
  a = GrammarSpec.json_schema({"type": "object", "properties": {"x": {"type": "string"}}})
  b = GrammarSpec.json_schema('{ "type" : "object",\n "properties": {"x": {"type": "string"}} }')
  assert a == b and hash(a) == hash(b) and a.source == (
      '{"type":"object","properties":{"x":{"type":"string"}}}')
  # Key order is kept: properties are generated in schema order.
  swapped = GrammarSpec.json_schema({"properties": {"x": {"type": "string"}}, "type": "object"})
  assert swapped != a
  assert GrammarSpec.json_schema(True).source == "{}"
  assert GrammarSpec.choice(["b", "a", "b"]).source == ("b", "a")
  assert GrammarSpec.from_response_format({"type": "text"}) is None
  assert GrammarSpec.from_response_format({"type": "json_object"}) == GrammarSpec.json_object()
  assert GrammarSpec.from_response_format(
      {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"},
                                              "strict": True}}) == GrammarSpec.json_schema(
                                                  {"type": "object"})
  assert len({a, b, GrammarSpec.regex("a+"), GrammarSpec.regex("a+")}) == 2


def test_compile_cache(tok):
  compiler = GrammarCompiler(tok, cache_size=2)
  spec = GrammarSpec.json_schema(SCHEMA)
  first = compiler.compile(spec)
  assert compiler.compile(GrammarSpec.json_schema(json.dumps(SCHEMA))) is first
  assert compiler.cache_info() == {"hits": 1, "misses": 1, "size": 1, "max_size": 2}
  compiler.compile(GrammarSpec.regex("a+"))
  compiler.compile(spec)  # most recently used: the regex goes first
  compiler.compile(GrammarSpec.choice(["x"]))
  assert compiler.compile(spec) is first
  assert compiler.cache_info()["size"] == 2
  # Matchers from one compiled grammar are independent.
  m1, m2 = first.matcher(), first.matcher()
  assert m1.accept(tok.encode("{")[0]) and m2.num_tokens == 0
  # Threads compiling one new spec at once all get the same object.
  new = GrammarSpec.json_schema({"type": "array", "items": {"type": "integer"}})
  results, barrier = [], threading.Barrier(6)

  def compile_it():
    barrier.wait()
    results.append(compiler.compile(new))

  threads = [threading.Thread(target=compile_it) for _ in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(results) == 6 and all(r is results[0] for r in results)


# -- Sentencepiece -----------------------------------------------------------------


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory) -> Tokenizer:
  """A Llama-style sentencepiece model (BPE, byte fallback, dummy-prefix space)."""
  path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
  corpus = [json.dumps(DOCUMENT), "The quick brown fox jumps over the lazy dog.",
            "admin editor viewer orders quantity Paris", "café naïve 12345"] * 50
  with path.open("wb") as f:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=f, model_type="bpe", vocab_size=400,
        byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2)
  return Tokenizer.from_sentencepiece(path)


def test_sentencepiece_tokenizer(sp_tok):
  compiler = GrammarCompiler(sp_tok, vocab_size=sp_tok.vocab_size + 16)
  walker = Walker(sp_tok, compiler)
  for seed in range(3):
    ids = walker.walk(compiler.matcher(GrammarSpec.json_schema(SCHEMA)), seed)
    jsonschema.validate(json.loads(sp_tok.decode(ids)), SCHEMA)
  # Sentencepiece encodes text with a dummy-prefix space ("▁{"), which JSON
  # cannot start with: the grammar rejects it...
  m = compiler.matcher(GrammarSpec.json_schema(SCHEMA))
  first = sp_tok.encode(json.dumps(DOCUMENT), add_bos=False)[0]
  assert sp_tok.id_to_token(first).startswith("\u2581") and not m.accept(first)
  # ...and the document is spelled with the pieces it allows (longest first),
  # EOS (sentencepiece's </s>) allowed only at its end.
  text = json.dumps(DOCUMENT).encode()
  pieces = {i: _piece_bytes(sp_tok, i) for i in range(sp_tok.vocab_size)}
  while text:
    assert not m.can_end()
    token = max((int(i) for i in walker.allowed(m) if text.startswith(pieces[int(i)])),
                key=lambda i: len(pieces[i]))
    assert m.accept(token)
    text = text[len(pieces[token]):]
  assert m.can_end() and m.accept(sp_tok.eos_ids[0])
  # <s>, </s> and <unk> are never text.
  m = compiler.matcher(GrammarSpec.regex(".*"))
  assert set(walker.allowed(m)) & {0, 1} == set() and sp_tok.eos_ids[0] in walker.allowed(m)


def _piece_bytes(tok: Tokenizer, token_id: int) -> bytes:
  piece = tok.id_to_token(token_id)
  if re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
    return bytes([int(piece[3:5], 16)])
  return piece.replace("\u2581", " ").encode()
