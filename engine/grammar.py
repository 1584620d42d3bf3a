"""Structured outputs: grammars that decide, token by token, what a sequence may sample.

A request can ask for output in a shape: JSON that matches a schema
(`response_format: json_schema`), any JSON object (`json_object`), text that
matches a regex, one of a few strings (`choice`), or anything a context-free
grammar (Lark or GBNF) derives. The engine cannot make the model want that
shape; it can only forbid, before each sample, every token that would leave it.
So each step the host fills, for each constrained sequence, one row of the
sampler's allowed-token bitmask (`SamplerInputs.allowed` in engine/sampling.py:
bit t % 32 of word t // 32 set when token t may be sampled), and after the step
tells the sequence's matcher which token was sampled.

Three layers, from the request to the step:

- `GrammarSpec` is what the user asked for: a kind and its source text, frozen
  and hashable so it can sit in a frozen `SamplingParams` and key a cache. Its
  constructors (`GrammarSpec.json_schema(schema, field)`, `.regex`, `.choice`,
  `.grammar`, `.json_object`, `from_response_format`) check the input when the
  request is parsed, without a tokenizer, and raise a ValueError that starts with
  the request field ("response_format.json_schema.schema.properties.age: Invalid
  type: integr"), so a bad schema is a 400 before anything is queued.
- `GrammarCompiler` (one per tokenizer) turns a spec into a `CompiledGrammar`,
  kept in a thread-safe LRU cache keyed by the spec: the hundredth request with
  the same schema reuses the first one's work.
- `Matcher` (one per sequence) fills its row (`fill`), accepts the sampled token
  (`accept`), rolls back (`rollback`, for speculative decoding) and says when
  the sequence may end (`can_end`), must end (`must_end`) or has ended
  (`is_terminated`). `fill_rows` fills many rows in one call, on llguidance's
  own threads, without the GIL.

The backend is llguidance (Rust: an Earley parser over lexer DFAs built as
they are needed). It and xgrammar were measured side by side by
scripts/grammar_bench.py on this project's 2-core CPU host (busy: load ~2.3),
with the default model's tokenizer (49152 tokens) and a 1.1 kB schema (nested
objects, an array of objects, enums, bounded numbers, patterns):

                                         xgrammar 0.2.9   llguidance 1.9.1
  import                                     2.0 s            33 ms
  tokenizer info (once per tokenizer)        50 ms            225 ms
  compile a new schema                       20 ms            1.1 ms
  compile it again (cached)                  0.04 ms          0.003 ms (here)
  64 rows' masks mid-document, per step      0.10 ms          0.48 ms
    the same in one batched call             0.07 ms          0.43 ms
  accept one token                           0.65 us          0.8 us

xgrammar precomputes masks when it compiles, so its steps cost ~5x less; but
64 rows cost under half a millisecond either way, far below a decode step, and
`fill_rows` can run beside the device step; compiling is on the request's
critical path, and every new schema pays it. Robustness decided it: xgrammar
silently ignores JSON Schema keywords it does not implement (with `not` or
`if`/`then`, output the schema forbids was accepted), and under `maxLength`
its strings take raw control characters and no escapes (`{"a": "x<TAB>y"}`
was accepted: invalid JSON); llguidance refuses unimplemented keywords by
name, reads Lark and GBNF, and has no Python dependencies, where xgrammar
requires torch, transformers and triton (importing torch is its 2 s). On the
same states the two masks were identical 81% of the time; the rest are those
strings and the keys, where llguidance allows only the canonical tokens of
forced text ("name", not "n" + "ame").

Details the engine relies on:

- EOS is allowed exactly where the grammar accepts what was generated (and is
  the only token allowed once nothing else can follow, or if the matcher
  failed); every id in `Tokenizer.eos_ids` counts. Control tokens
  ("<|im_start|>") are never allowed by a grammar; they are not text.
- The model's vocabulary may be wider than the tokenizer's (lm_head padded to a
  multiple of 64 or 128): `GrammarCompiler(tokenizer, vocab_size=model's)`
  sizes the rows to the model, and the padding ids are never allowed.
- A rejected token leaves the matcher as it was (llguidance's own
  `consume_token` would put it in a permanent error state); rolling back more
  tokens than were accepted is refused for the same reason.
- JSON is laid out one way (JSON_FORMAT: `json.dumps`'s ", " and ": ", no
  other whitespace): under a grammar that allows free whitespace a small model
  loops on it (the default model at temperature 0.7 filled 2 of 200 documents
  with runs of 32 newlines between every pair of tokens until max_tokens, when
  32 characters in one place were allowed; llguidance's own default is
  unbounded). A schema's own "x-guidance" overrides it.
- Property order: both backends emit object properties in the schema's order,
  so the canonical schema text keeps its key order (it is not sorted).
- Tokenizers: HF `tokenizers` vocabularies (byte-level BPE, as the default
  model's) go to llguidance whole, as tokenizer.json text; sentencepiece ones
  (Llama 2, Gemma) as the bytes of each piece, byte pieces as their byte and
  control/unknown/unused pieces as special tokens. Where a vocabulary adds a
  dummy-prefix space, a reply's natural first piece ("▁{") starts with a space
  that JSON (or a regex) may not allow: the grammar then has the model spell
  it without one ("{").
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import llguidance
import numpy as np

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# vLLM's `structured_outputs` fields (and `guided_<key>` in its older API).
STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")
# Fields of vLLM's StructuredOutputsParams that choose its own machinery, not
# the constraint: accepted and ignored.
IGNORED_KEYS = ("backend", "disable_fallback", "disable_any_whitespace",
                "disable_additional_properties", "whitespace_pattern")

# How JSON output is laid out (llguidance's JSON options): as json.dumps writes
# it, '{"a": 1, "b": [2, 3]}', and no other whitespace. A schema's own
# "x-guidance": {...} overrides it (e.g. {"whitespace_flexible": true}).
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# Compiled grammars kept per tokenizer. One costs ~1 ms to build (the 1.1 kB
# schema above); a server sees few distinct schemas.
CACHE_SIZE = 256

_SPECIAL_PIECE_TYPES = (2, 3, 5)  # sentencepiece UNKNOWN, CONTROL, UNUSED
_BYTE_PIECE_TYPE = 6


class GrammarError(ValueError):
  """A structured-output request the backend cannot serve; the message starts
  with the request field it came from."""


@dataclasses.dataclass(frozen=True)
class GrammarSpec:
  """What a request asked its output to match.

  kind: one of KINDS. source: for "json_schema" the schema as canonical JSON
  text (compact separators, key order kept: properties are generated in
  schema order); "regex" the pattern (Rust regex syntax: no look-around or
  backreferences; anchored at both ends whether or not it says ^ $); "choice"
  a tuple of the allowed strings; "grammar" Lark (llguidance's dialect, which
  can embed `%json {...}` schemas) or GBNF text; "json_object" nothing.

  Build one with the constructors below, which check the source and name the
  request field in their errors; the bare constructor only checks types.
  """

  kind: str
  source: str | tuple[str, ...] = ""

  def __post_init__(self):
    if self.kind not in KINDS:
      raise GrammarError(f"grammar kind must be one of {KINDS}, got {self.kind!r}")
    if self.kind == "choice":
      if (not isinstance(self.source, tuple) or not self.source
          or not all(isinstance(c, str) for c in self.source)):
        raise GrammarError(f"a choice grammar's source must be a non-empty tuple of "
                           f"strings, got {self.source!r}")
    elif not isinstance(self.source, str):
      raise GrammarError(f"a {self.kind} grammar's source must be a string, "
                         f"got {type(self.source).__name__}")

  def __repr__(self) -> str:
    source = repr(self.source)
    return f"GrammarSpec({self.kind!r}, {source[:60] + '...' if len(source) > 60 else source})"

  # -- Constructors: each checks the input and names `field` in its errors ----

  @classmethod
  def json_schema(cls, schema: Mapping[str, Any] | bool | str,
                  field: str = "json_schema") -> GrammarSpec:
    """A JSON Schema given as a dict, JSON text, or a boolean (`true`: any JSON)."""
    if isinstance(schema, str):
      try:
        schema = json.loads(schema)
      except json.JSONDecodeError as e:
        raise GrammarError(f"{field}: not valid JSON: {e}") from None
    if schema is True:
      schema = {}
    elif schema is False:
      raise GrammarError(f"{field}: the schema `false` matches nothing")
    if not isinstance(schema, Mapping):
      raise GrammarError(f"{field}: a JSON Schema must be an object, "
                         f"got {type(schema).__name__}")
    try:
      text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
      raise GrammarError(f"{field}: not JSON-serializable: {e}") from None
    return cls("json_schema", text)._validated(field, schema)

  @classmethod
  def json_object(cls) -> GrammarSpec:
    """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
    return cls("json_object")

  @classmethod
  def regex(cls, pattern: str, field: str = "regex") -> GrammarSpec:
    if not isinstance(pattern, str):
      raise GrammarError(f"{field}: a regex must be a string, got {type(pattern).__name__}")
    return cls("regex", pattern)._validated(field)

  @classmethod
  def choice(cls, choices: Sequence[str], field: str = "choice") -> GrammarSpec:
    """Exactly one of `choices` (duplicates dropped, order kept)."""
    if isinstance(choices, str) or not isinstance(choices, Sequence) or not choices:
      raise GrammarError(f"{field}: must be a non-empty list of strings, got {choices!r}")
    for i, choice in enumerate(choices):
      if not isinstance(choice, str):
        raise GrammarError(f"{field}[{i}]: must be a string, got {type(choice).__name__}")
    return cls("choice", tuple(dict.fromkeys(choices)))._validated(field)

  @classmethod
  def grammar(cls, text: str, field: str = "grammar") -> GrammarSpec:
    """A Lark grammar (its `start` rule) or a GBNF one (its `root` rule)."""
    if not isinstance(text, str) or not text.strip():
      raise GrammarError(f"{field}: must be a non-empty grammar text, got {text!r}")
    return cls("grammar", text)._validated(field)

  @classmethod
  def from_response_format(cls, response_format: Mapping[str, Any] | None,
                           field: str = "response_format") -> GrammarSpec | None:
    """OpenAI's `response_format`: {"type": "text"} (None: unconstrained),
    {"type": "json_object"}, or {"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}, "strict": ...}} (always enforced)."""
    if response_format is None:
      return None
    if not isinstance(response_format, Mapping):
      raise GrammarError(f"{field}: must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
      return None
    if kind == "json_object":
      return cls.json_object()
    if kind == "json_schema":
      body = response_format.get("json_schema")
      if not isinstance(body, Mapping):
        raise GrammarError(f"{field}.json_schema: must be an object with a `schema`, "
                           f"got {body!r}")
      if "schema" not in body:
        raise GrammarError(f"{field}.json_schema.schema: is required")
      return cls.json_schema(body["schema"], f"{field}.json_schema.schema")
    raise GrammarError(f"{field}.type: must be 'text', 'json_object' or 'json_schema', "
                       f"got {kind!r}")

  @classmethod
  def from_structured_outputs(cls, value: Mapping[str, Any] | GrammarSpec | None,
                              field: str = "structured_outputs") -> GrammarSpec | None:
    """vLLM's `structured_outputs`: an object with exactly one of "json" (a schema,
    as an object or JSON text), "regex", "choice", "grammar" or "json_object":
    true. A GrammarSpec passes through; None is unconstrained."""
    if value is None or isinstance(value, GrammarSpec):
      return value
    if not isinstance(value, Mapping):
      raise GrammarError(f"{field}: must be an object with one of {STRUCTURED_KEYS}, "
                         f"got {type(value).__name__}")
    unknown = sorted(set(value) - set(STRUCTURED_KEYS) - set(IGNORED_KEYS))
    if unknown:
      raise GrammarError(f"{field}: unknown keys {unknown}; known: {list(STRUCTURED_KEYS)}")
    given = [k for k in STRUCTURED_KEYS if value.get(k) not in (None, False)]
    if len(given) != 1:
      raise GrammarError(f"{field}: give exactly one of {list(STRUCTURED_KEYS)}, got "
                         f"{given or 'none'}")
    key = given[0]
    body, at = value[key], f"{field}.{key}"
    if key == "json":
      return cls.json_schema(body, at)
    if key == "json_object":
      if body is not True:
        raise GrammarError(f"{at}: must be true, got {body!r}")
      return cls.json_object()
    return {"regex": cls.regex, "choice": cls.choice, "grammar": cls.grammar}[key](body, at)

  # -- The backend's form ----------------------------------------------------

  def backend_grammar(self) -> str:
    """The llguidance grammar (JSON text) for this spec."""
    if self.kind in ("json_schema", "json_object"):
      schema = self.source if self.kind == "json_schema" else '{"type":"object"}'
      return llguidance.LLMatcher.grammar_from_json_schema(
          schema, defaults=JSON_FORMAT)
    if self.kind == "regex":
      return llguidance.LLMatcher.grammar_from_regex(self.source)
    if self.kind == "choice":
      # JSON string escapes are Lark's too ("\"", "\\", "\n", "\u00fc").
      return llguidance.LLMatcher.grammar_from_lark(
          "start: " + " | ".join(json.dumps(c) for c in self.source))
    return llguidance.LLMatcher.grammar_from_lark(self._lark())

  def _lark(self) -> str:
    from llguidance.gbnf_to_lark import any_to_lark
    return any_to_lark(self.source)  # Lark passes through; GBNF is converted.

  def _validated(self, field: str, schema: Any = None) -> GrammarSpec:
    """Checks the spec with the backend, without a tokenizer (0.6 ms for the
    1.1 kB schema above: parsing, canonical text and grammar)."""
    try:
      grammar = self.backend_grammar()
    except Exception as e:  # the GBNF converter and the schema parser raise their own
      raise GrammarError(f"{field}: {_clean(str(e), self.kind)}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
      raise GrammarError(_describe(messages[0], self, field, schema))
    return self


class CompiledGrammar:
  """A spec compiled for one tokenizer. llguidance has no separate compiled form:
  this is a pristine matcher (its grammar built, its lexer empty) that each
  sequence's matcher is copied from (a few microseconds)."""

  __slots__ = ("spec", "compiler", "_template")

  def __init__(self, spec: GrammarSpec, compiler: GrammarCompiler,
               template: llguidance.LLMatcher):
    self.spec = spec
    self.compiler = compiler
    self._template = template

  def __repr__(self) -> str:
    return f"CompiledGrammar({self.spec!r})"

  def matcher(self) -> Matcher:
    """A new matcher for one sequence, at the start of the grammar."""
    return Matcher(self, self._template.deep_copy())


class GrammarCompiler:
  """Compiles specs for one tokenizer, caching the results (thread-safe).

  Building llguidance's token trie is the expensive part (0.23 s for the
  default model's 49152 tokens, 0.97 s for Gemma 3's 262144): make one
  compiler per tokenizer and keep it. `vocab_size` is the model's (the width
  of its logits), at least the tokenizer's; the ids past the tokenizer's are
  padding and are never allowed. Compiled grammars and their matchers may be
  used from any thread (one matcher by one thread at a time).
  """

  def __init__(self, tokenizer, *, vocab_size: int | None = None,
               cache_size: int = CACHE_SIZE):
    self.tokenizer_vocab_size = tokenizer.vocab_size
    self.vocab_size = tokenizer.vocab_size if vocab_size is None else int(vocab_size)
    if self.vocab_size < self.tokenizer_vocab_size:
      raise GrammarError(f"vocab_size ({self.vocab_size}) is smaller than the tokenizer's "
                         f"({self.tokenizer_vocab_size}): the model could not sample some "
                         "of the tokenizer's tokens")
    if not tokenizer.eos_ids:
      raise GrammarError("the tokenizer has no EOS token: a constrained sequence could "
                         "never end where its grammar does")
    self.eos_ids = tuple(tokenizer.eos_ids)
    self.words = -(-self.vocab_size // 32)  # int32 words a bitmask row has
    self.eos_mask = np.zeros(self.words, np.uint32)  # an ended sequence's row
    for i in self.eos_ids:
      self.eos_mask[i // 32] |= np.uint32(1 << (i % 32))
    self.cache_size = cache_size
    self._lltokenizer = _lltokenizer(tokenizer, self.vocab_size)
    if sorted(self._lltokenizer.eos_tokens) != sorted(self.eos_ids):
      raise GrammarError(f"llguidance took EOS ids {self._lltokenizer.eos_tokens}, "
                         f"the tokenizer has {list(self.eos_ids)}")
    self._cache: collections.OrderedDict[GrammarSpec, CompiledGrammar] = (
        collections.OrderedDict())
    self._lock = threading.Lock()
    self.hits = self.misses = 0

  def compile(self, spec: GrammarSpec, field: str | None = None) -> CompiledGrammar:
    """The compiled grammar of `spec`: the cached one if this spec was compiled
    before (the same object), else a new one. Errors name `field` (default: the
    kind), e.g. a Lark token range past this vocabulary."""
    with self._lock:
      compiled = self._cache.get(spec)
      if compiled is not None:
        self._cache.move_to_end(spec)
        self.hits += 1
        return compiled
      self.misses += 1
    # Outside the lock: llguidance builds the grammar without the GIL, so two
    # threads compile two specs at once; if both compiled this one, the first
    # to finish is kept and both get it.
    field = field or spec.kind
    try:
      grammar = spec.backend_grammar()
    except Exception as e:
      raise GrammarError(f"{field}: {_clean(str(e), spec.kind)}") from None
    template = llguidance.LLMatcher(self._lltokenizer, grammar, log_level=0)
    if template.is_error():
      raise GrammarError(_describe(template.get_error(), spec, field))
    compiled = CompiledGrammar(spec, self, template)
    with self._lock:
      compiled = self._cache.setdefault(spec, compiled)
      self._cache.move_to_end(spec)
      while len(self._cache) > self.cache_size:
        self._cache.popitem(last=False)
    return compiled

  def matcher(self, spec: GrammarSpec) -> Matcher:
    return self.compile(spec).matcher()

  def new_bitmask(self, rows: int) -> np.ndarray:
    """[rows, ceil(vocab_size / 32)] uint32 zeros: nothing allowed yet."""
    return np.zeros((rows, self.words), np.uint32)

  def cache_info(self) -> dict[str, int]:
    with self._lock:
      return {"hits": self.hits, "misses": self.misses, "size": len(self._cache),
              "max_size": self.cache_size}


class Matcher:
  """One sequence's position in its grammar. Not thread-safe: one sequence is
  stepped by one thread at a time."""

  __slots__ = ("compiled", "_m", "_eos", "_tokenizer_vocab", "_words", "_tokens", "_ended")

  def __init__(self, compiled: CompiledGrammar, matcher: llguidance.LLMatcher):
    compiler = compiled.compiler
    self.compiled = compiled
    self._m = matcher
    self._eos = frozenset(compiler.eos_ids)
    self._tokenizer_vocab = compiler.tokenizer_vocab_size
    self._words = compiler.words
    self._tokens = 0  # accepted so far, EOS included (what rollback may undo)
    self._ended = False  # EOS accepted

  def __repr__(self) -> str:
    return (f"Matcher({self.compiled.spec!r}, tokens={self._tokens}, "
            f"can_end={self.can_end()}, terminated={self.is_terminated()})")

  @property
  def spec(self) -> GrammarSpec:
    return self.compiled.spec

  @property
  def num_tokens(self) -> int:
    """Tokens accepted so far, EOS included."""
    return self._tokens

  @property
  def error(self) -> str | None:
    """Why the matcher failed (it then allows only EOS), or None."""
    return _clean(self._m.get_error(), self.spec.kind) if self._m.is_error() else None

  def fill(self, bitmask_row: np.ndarray) -> None:
    """Writes the tokens allowed next into `bitmask_row`, a writable, contiguous
    uint32 (or int32) array of ceil(vocab_size / 32) words: bit t % 32 of word
    t // 32 is set iff token t is allowed. Every word is written."""
    _check_bitmask(bitmask_row, 1, self._words)
    if self._ended:
      bitmask_row.view(np.uint32)[:] = self.compiled.compiler.eos_mask
    else:
      self._m.unsafe_compute_mask_ptr(bitmask_row.ctypes.data, bitmask_row.nbytes)

  def accept(self, token_id: int) -> bool:
    """Advances past `token_id` if the grammar allows it there; returns whether
    it did. A rejected token changes nothing. An accepted EOS ends the matcher."""
    token_id = int(token_id)
    if self._ended or not 0 <= token_id < self._tokenizer_vocab:
      return False  # (llguidance would fail for good on an out-of-range id)
    if token_id in self._eos:
      # EOS never reaches llguidance: once nothing else can follow (a closed
      # object) its try_consume_tokens refuses EOS though the mask allows it,
      # and its consume_token takes EOS without counting it for rollback.
      if not self.can_end():
        return False
      self._ended = True
    elif self._m.try_consume_tokens([token_id]) != 1:
      return False
    self._tokens += 1
    return True

  def rollback(self, num_tokens: int = 1) -> None:
    """Undoes the last `num_tokens` accepted tokens (an accepted EOS included)."""
    if not 0 <= num_tokens <= self._tokens:
      raise ValueError(f"cannot roll back {num_tokens} tokens: {self._tokens} accepted")
    if num_tokens and self._ended:  # the EOS, llguidance never saw
      self._ended = False
      self._tokens -= 1
      num_tokens -= 1
    if num_tokens and not self._m.rollback(num_tokens):
      raise RuntimeError(f"rollback failed: {self.error}")
    self._tokens -= num_tokens

  def reset(self) -> None:
    """Back to the start of the grammar."""
    self.rollback(self._tokens)

  def can_end(self) -> bool:
    """Whether EOS is allowed now: the output so far is a complete match (or the
    matcher failed, and EOS is all it allows)."""
    return not self._ended and (self._m.is_accepting() or self._m.is_error())

  def must_end(self) -> bool:
    """Whether EOS is the only token allowed now: nothing can extend the match
    (a closed JSON object, a finished choice). The engine can end the sequence
    without sampling it."""
    return not self._ended and self._m.is_stopped()

  def is_terminated(self) -> bool:
    """Whether the matcher accepts nothing more: EOS was accepted, or it failed."""
    return self._ended or self._m.is_error()


def fill_rows(matchers: Sequence[Matcher], bitmask: np.ndarray,
              rows: Sequence[int] | None = None, *, threads: int | None = None) -> None:
  """Fills bitmask[rows[i]] for matchers[i] (rows default: 0, 1, ...) in one
  call, on llguidance's thread pool and without the GIL: the engine can run it
  beside the device step. `threads`: the pool's size (default: llguidance's,
  80% of the CPUs, at least 1).

  On the 2-core host, 64 rows mid-way through JSON documents: 0.44 ms a step
  with 1 thread, 0.45 ms with 2 (a row is ~7 us of work: a second thread's
  hand-off costs what it saves), 0.55 ms filling row by row from Python. The
  gain that matters is the GIL; on a many-core host the threads help too.
  """
  if not matchers:
    return
  words = matchers[0]._words
  _check_bitmask(bitmask, 2, words)
  rows = range(len(matchers)) if rows is None else [int(r) for r in rows]
  if len(rows) != len(matchers):
    raise ValueError(f"{len(matchers)} matchers but {len(rows)} rows")
  if any(not 0 <= r < bitmask.shape[0] for r in rows):
    raise ValueError(f"rows {list(rows)} outside a bitmask of {bitmask.shape[0]} rows")
  if any(m._words != words for m in matchers):
    raise ValueError("matchers of different vocabulary sizes in one bitmask")
  _executor(threads).unsafe_compute_mask_ptr(
      [(m._m, r) for m, r in zip(matchers, rows)], bitmask.ctypes.data, words * 4,
      bitmask.shape[0])
  for m, r in zip(matchers, rows):
    if m._ended:  # llguidance never saw the EOS: its mask is the one before it
      bitmask[r].view(np.uint32)[:] = m.compiled.compiler.eos_mask


# -- Helpers -------------------------------------------------------------------

_executors: dict[int | None, llguidance.LLExecutor] = {}
_executors_lock = threading.Lock()


def _executor(threads: int | None) -> llguidance.LLExecutor:
  with _executors_lock:
    if threads not in _executors:
      _executors[threads] = llguidance.LLExecutor(
          None if threads is None else max(1, int(threads)))
    return _executors[threads]


def _check_bitmask(bitmask: np.ndarray, ndim: int, words: int) -> None:
  """The backend writes through a raw pointer: refuse anything it would overrun."""
  if not isinstance(bitmask, np.ndarray) or bitmask.dtype not in (np.uint32, np.int32):
    raise ValueError(f"bitmask must be a uint32 numpy array, got "
                     f"{getattr(bitmask, 'dtype', type(bitmask).__name__)}")
  if bitmask.ndim != ndim or bitmask.shape[-1] != words:
    want = f"[{words}]" if ndim == 1 else f"[rows, {words}]"
    raise ValueError(f"bitmask must have shape {want} (ceil(vocab_size / 32) words), "
                     f"got {list(bitmask.shape)}")
  if not bitmask.flags.c_contiguous or not bitmask.flags.writeable:
    raise ValueError("bitmask must be C-contiguous and writable")


def _lltokenizer(tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
  """llguidance's view of `tokenizer` (a model.tokenizer.Tokenizer), its
  vocabulary padded to `vocab_size` with tokens that never match."""
  from ridgeline.model import tokenizer as tokenizer_lib
  backend = tokenizer._backend  # pylint: disable=protected-access
  eos = list(tokenizer.eos_ids)
  if isinstance(backend, tokenizer_lib._HFBackend):  # pylint: disable=protected-access
    # The whole tokenizer.json: llguidance's Rust `tokenizers` reads the
    # byte-level (or byte-fallback) decoding and the special tokens itself.
    return llguidance.LLTokenizer(backend.tokenizer.to_str(), n_vocab=vocab_size,
                                  eos_token=eos)
  if isinstance(backend, tokenizer_lib._SentencePieceBackend):  # pylint: disable=protected-access
    return llguidance.LLTokenizer(
        llguidance.TokenizerWrapper(_SentencePieceVocab(backend.processor, tokenizer,
                                                        vocab_size)),
        eos_token=eos)
  raise GrammarError(f"structured outputs do not support {type(backend).__name__} "
                     "tokenizers (supported: HF tokenizers, sentencepiece)")


class _SentencePieceVocab:
  """A sentencepiece vocabulary as llguidance's TokenizerWrapper reads it: each
  piece's bytes ("▁" is a space, "<0x0A>" the byte 0x0A), control, unknown and
  unused pieces as special tokens (llguidance never matches them as text), and
  an encoder for the text llguidance needs tokenized, which must not add
  sentencepiece's dummy-prefix space: it tokenizes text from mid-output."""

  def __init__(self, processor, tokenizer, vocab_size: int):
    from sentencepiece import sentencepiece_model_pb2  # protobuf, as model/tokenizer.py
    import sentencepiece
    proto = sentencepiece_model_pb2.ModelProto.FromString(processor.serialized_model_proto())
    self.tokens, self.special_token_ids = [], []
    for i, piece in enumerate(proto.pieces):
      if piece.type == _BYTE_PIECE_TYPE:
        self.tokens.append(bytes([int(piece.piece[3:5], 16)]))  # "<0xNN>"
      elif piece.type in _SPECIAL_PIECE_TYPES:
        self.tokens.append(piece.piece.encode())
        self.special_token_ids.append(i)
      else:
        self.tokens.append(piece.piece.replace("\u2581", " ").encode())
    self.tokens += [b""] * (vocab_size - len(self.tokens))  # padding: never matches
    self.eos_token_id = tokenizer.eos_ids[0]
    self.bos_token_id = tokenizer.bos_id
    if proto.normalizer_spec.add_dummy_prefix:
      proto.normalizer_spec.add_dummy_prefix = False
      processor = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    self._processor = processor

  def __call__(self, text: bytes | str) -> list[int]:
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    return self._processor.encode(text)


def _clean(message: str, kind: str) -> str:
  """One line from llguidance's message: no state dump, no echo of the
  generated Lark source, no positions in it (they are not the user's text)."""
  text = message.split("<state>")[0]
  if "regex parse error" in text:
    lines = [line.strip() for line in text.splitlines()]
    at = next(i for i, line in enumerate(lines) if "regex parse error" in line)
    pattern = lines[at + 1] if at + 1 < len(lines) else ""
    error = next((line[len("error:"):].strip() for line in lines if line.startswith("error:")),
                 "")
    return f"invalid regex {pattern!r}: {error}" if error else f"invalid regex {pattern!r}"
  lines = [line.strip() for line in text.splitlines()
           if line.strip() and not re.fullmatch(r"\s*\^\s*", line)
           and not re.match(r"\s*\d+ \| ", line)]
  text = " ".join(lines)
  if kind != "grammar":
    text = re.sub(r"^at \d+\(\d+\): ", "", text)
  return text


_UNSUPPORTED = ("Unimplemented keys", "Unknown format")


def _describe(message: str, spec: GrammarSpec, field: str, schema: Any = None) -> str:
  """The error for `field`: where in the schema, when the message lets us find
  it, and whether it is the schema's fault or a limit of the backend."""
  text = _clean(message, spec.kind)
  if spec.kind == "json_schema":
    if schema is None:
      schema = json.loads(spec.source)
    field += _locate(schema, text)
    if text.startswith(_UNSUPPORTED):
      text = (f"not supported by the grammar backend (llguidance "
              f"{llguidance.__version__}): {text}")
  return f"{field}: {text}"


_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains",
              "propertyNames", "unevaluatedProperties", "unevaluatedItems",
              "additionalItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions",
                   "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_VALUE_KEYS = ("type", "format", "pattern", "$ref")


def _walk(node: Any, path: str = ""):
  """(path, subschema) for every subschema, depth first, parents first."""
  if not isinstance(node, Mapping):
    return
  yield path, node
  for key in _SUBSCHEMA_MAPS:
    if isinstance(node.get(key), Mapping):
      for name, sub in node[key].items():
        part = f".{name}" if re.fullmatch(r"[A-Za-z_$][\w$-]*", name) else f"[{name!r}]"
        yield from _walk(sub, f"{path}.{key}{part}")
  for key in _SUBSCHEMA:
    yield from _walk(node.get(key), f"{path}.{key}")
  for key in _SUBSCHEMA_LISTS:
    if isinstance(node.get(key), list):
      for i, sub in enumerate(node[key]):
        yield from _walk(sub, f"{path}.{key}[{i}]")


def _locate(schema: Any, message: str) -> str:
  """The path of the first subschema the message points at ("" if none): one
  that has a keyword the message quotes ('minLength', ["not"]), or a `type`,
  `format`, `pattern` or `$ref` whose value the message repeats."""
  quoted = set(re.findall(r"""['"]([^'"]+)['"]""", message))
  for path, node in _walk(schema):
    for key, value in node.items():
      if key in quoted:
        return path
      if (key in _VALUE_KEYS and isinstance(value, str) and len(value) > 1
          and value.lstrip("#") in message):
        return path
  return ""


def supported_backend() -> str:
  """The backend and its version, for logs and /version."""
  return f"llguidance {llguidance.__version__}"


__all__ = ["KINDS", "JSON_FORMAT", "CACHE_SIZE", "GrammarError", "GrammarSpec",
           "CompiledGrammar", "GrammarCompiler", "Matcher", "fill_rows",
           "supported_backend"]
