"""Structured outputs: grammars that decide, token by token, what a sequence may sample.

A request can ask for output in a shape: JSON that matches a schema
(`response_format: json_schema`), any JSON object (`json_object`), text that
matches a regex, one of a few strings (`choice`), or anything a context-free
grammar (Lark or GBNF) derives. The engine cannot make the model want that
shape; it can only forbid, before each sample, every token that would leave it.
So each step the host fills, for each constrained sequence, one row of the
sampler's allowed-token bitmask (`SamplerInputs.allowed` in engine/sampler_inputs.py:
bit t % 32 of word t // 32 set when token t may be sampled), and after the step
tells the sequence's matcher which token was sampled.

Three layers, from the request to the step:

- `GrammarSpec` (engine/grammar_spec.py) is what the user asked for, checked
  when the request is parsed, without a tokenizer, so a bad schema is a 400
  before anything is queued.
- `GrammarCompiler` (here, one per tokenizer) turns a spec into a
  `CompiledGrammar`, kept in a thread-safe LRU cache keyed by the spec: the
  hundredth request with the same schema reuses the first one's work.
- `Matcher` (engine/grammar_matcher.py, one per sequence) fills its row, accepts
  the sampled token and says when the sequence may or must end; `fill_rows`
  fills many rows in one call, without the GIL.

This module re-exports the other two layers' public names: `ridgeline.engine.grammar`
is where the rest of the code imports structured outputs from.

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

Details the engine relies on (the spec's and the matcher's own are in their modules):

- Control tokens ("<|im_start|>") are never allowed by a grammar; they are not
  text.
- The model's vocabulary may be wider than the tokenizer's (lm_head padded to a
  multiple of 64 or 128): `GrammarCompiler(tokenizer, vocab_size=model's)`
  sizes the rows to the model, and the padding ids are never allowed.
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
import threading

import llguidance
import numpy as np

from ridgeline.engine.grammar_matcher import Matcher, fill_rows
from ridgeline.engine.grammar_spec import (JSON_FORMAT, KINDS, STRUCTURED_KEYS, GrammarError,
                                           GrammarSpec, clean_error, describe_error)
from ridgeline.util import ceil_div

# Compiled grammars kept per tokenizer. One costs ~1 ms to build (the 1.1 kB
# schema above); a server sees few distinct schemas.
CACHE_SIZE = 256

_SPECIAL_PIECE_TYPES = (2, 3, 5)  # sentencepiece UNKNOWN, CONTROL, UNUSED
_BYTE_PIECE_TYPE = 6


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
    self.words = ceil_div(self.vocab_size, 32)  # int32 words a bitmask row has
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
      raise GrammarError(f"{field}: {clean_error(str(e), spec.kind)}") from None
    template = llguidance.LLMatcher(self._lltokenizer, grammar, log_level=0)
    if template.is_error():
      raise GrammarError(describe_error(template.get_error(), spec, field))
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


def _lltokenizer(tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
  """llguidance's view of `tokenizer` (a model.tokenizer.Tokenizer), its
  vocabulary padded to `vocab_size` with tokens that never match."""
  from ridgeline.model import tokenizer as tokenizer_lib
  backend = tokenizer._backend  # pylint: disable=protected-access
  eos = list(tokenizer.eos_ids)
  if isinstance(backend, tokenizer_lib.HFBackend):
    # The whole tokenizer.json: llguidance's Rust `tokenizers` reads the
    # byte-level (or byte-fallback) decoding and the special tokens itself.
    return llguidance.LLTokenizer(backend.tokenizer.to_str(), n_vocab=vocab_size,
                                  eos_token=eos)
  if isinstance(backend, tokenizer_lib.SentencePieceBackend):
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


__all__ = ["KINDS", "STRUCTURED_KEYS", "JSON_FORMAT", "CACHE_SIZE", "GrammarError", "GrammarSpec",
           "CompiledGrammar", "GrammarCompiler", "Matcher", "fill_rows"]
