"""The structured-output backends that scripts/grammar_bench.py measures, behind one
interface: xgrammar, llguidance, and engine/grammar.py's wrapper around llguidance
(the one chosen, "ridgeline").

Each adapter: its tokenizer info once (__init__); forget() its compile caches;
prepare(schema text) -> what compile takes (only ridgeline checks the request
there); compile -> compiled; matcher(compiled); fill(matcher, bitmask, row);
batch_fill(matchers, bitmask, threads); accept(matcher, token); rollback(matcher,
n). The raw adapters read an HF tokenizer.json (byte-level BPE); xgrammar is not
a dependency (it requires torch, transformers and triton), so it is imported only
when measured.
"""

from __future__ import annotations


class XGrammar:
  name = "xgrammar"

  def __init__(self, tok, vocab_size: int):
    import xgrammar as xgr
    self.xgr = xgr
    self.info = xgr.TokenizerInfo(_byte_level_vocab(tok), xgr.VocabType.BYTE_LEVEL,
                                  vocab_size=vocab_size, stop_token_ids=list(tok.eos_ids))
    self.compiler = xgr.GrammarCompiler(self.info)
    self._batchers = {}

  def forget(self):
    # A new compiler: xgrammar also caches per rule, which a new title alone
    # would not defeat (a second "new" schema compiled in 9 ms instead of 19).
    self.compiler = self.xgr.GrammarCompiler(self.info)

  def prepare(self, schema: str):
    return schema

  def compile(self, schema: str):
    return self.compiler.compile_json_schema(schema)  # cached by the compiler

  def matcher(self, compiled):
    return self.xgr.GrammarMatcher(compiled)

  def fill(self, matcher, bitmask, row):
    matcher.fill_next_token_bitmask(bitmask, row)

  def batch_fill(self, matchers, bitmask, threads):
    if threads not in self._batchers:
      self._batchers[threads] = self.xgr.BatchGrammarMatcher(threads)
    self._batchers[threads].batch_fill_next_token_bitmask(matchers, bitmask)

  def accept(self, matcher, token):
    return matcher.accept_token(token)

  def rollback(self, matcher, n):
    matcher.rollback(n)


class LLGuidance:
  name = "llguidance"

  def __init__(self, tok, vocab_size: int):
    import llguidance
    self.llg = llguidance
    self.tokenizer = llguidance.LLTokenizer(tok._backend.tokenizer.to_str(), n_vocab=vocab_size,
                                            eos_token=list(tok.eos_ids))
    self._cache = {}
    self._executors = {}

  def forget(self):
    pass  # its cache is keyed by the schema text, which the new title changes

  def prepare(self, schema: str):
    return schema

  def compile(self, schema: str):
    # llguidance keeps no cache: the compiled form is a pristine matcher that
    # requests deep-copy, kept here in a dict as engine/grammar.py does.
    if schema not in self._cache:
      matcher = self.llg.LLMatcher(self.tokenizer, self.llg.grammar_from("json_schema", schema),
                                   log_level=0)
      assert not matcher.is_error(), matcher.get_error()
      self._cache[schema] = matcher
    return self._cache[schema]

  def matcher(self, compiled):
    return compiled.deep_copy()

  def fill(self, matcher, bitmask, row):
    matcher.unsafe_compute_mask_ptr(bitmask[row].ctypes.data, bitmask.shape[1] * 4)

  def batch_fill(self, matchers, bitmask, threads):
    if threads not in self._executors:
      self._executors[threads] = self.llg.LLExecutor(threads)
    self._executors[threads].unsafe_compute_mask_ptr(
        [(m, i) for i, m in enumerate(matchers)], bitmask.ctypes.data, bitmask.shape[1] * 4,
        bitmask.shape[0])

  def accept(self, matcher, token):
    return matcher.consume_token(token)

  def rollback(self, matcher, n):
    assert matcher.rollback(n)


class Ridgeline:
  """engine/grammar.py: what the engine will call (llguidance underneath)."""
  name = "ridgeline"

  def __init__(self, tok, vocab_size: int):
    from ridgeline.engine import grammar
    self.grammar = grammar
    self.compiler = grammar.GrammarCompiler(tok, vocab_size=vocab_size)

  def forget(self):
    pass  # its cache is keyed by the spec, which the new title changes

  def prepare(self, schema: str):
    return self.grammar.GrammarSpec.json_schema(schema, "response_format.json_schema.schema")

  def compile(self, spec):
    return self.compiler.compile(spec)

  def matcher(self, compiled):
    return compiled.matcher()

  def fill(self, matcher, bitmask, row):
    matcher.fill(bitmask[row])

  def batch_fill(self, matchers, bitmask, threads):
    self.grammar.fill_rows(matchers, bitmask, threads=threads)

  def accept(self, matcher, token):
    return matcher.accept(token)

  def rollback(self, matcher, n):
    matcher.rollback(n)


BACKENDS = {"xgrammar": XGrammar, "llguidance": LLGuidance, "ridgeline": Ridgeline}


def _byte_level_vocab(tok) -> list[str]:
  """The byte-level BPE vocabulary as xgrammar reads it, control tokens emptied:
  given as text, "<|im_start|>" would be allowed inside a JSON string."""
  hf = tok._backend.tokenizer
  special = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
  return ["" if i in special else hf.id_to_token(i) for i in range(tok.vocab_size)]
