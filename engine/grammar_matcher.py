"""Matchers: one sequence's position in its grammar, and the allowed-token masks it fills.

The last of structured outputs' three layers (engine/grammar.py tells the whole
story). A `Matcher` (one per sequence, made from a `CompiledGrammar`) fills its
row of the sampler's allowed-token bitmask (`fill`: bit t % 32 of word t // 32
set when token t may be sampled), accepts the sampled token (`accept`), rolls
back (`rollback`, for speculative decoding) and says when the sequence may end
(`can_end`), must end (`must_end`) or has ended (`is_terminated`). `fill_rows`
fills many rows in one call, on llguidance's own threads, without the GIL: the
scheduler runs it while the device computes the step's model pass.

Details the engine relies on:

- EOS is allowed exactly where the grammar accepts what was generated (and is
  the only token allowed once nothing else can follow, or if the matcher
  failed); every id in `Tokenizer.eos_ids` counts. EOS never reaches llguidance
  (see `accept`): the matcher keeps it itself.
- A rejected token leaves the matcher as it was (llguidance's own
  `consume_token` would put it in a permanent error state); rolling back more
  tokens than were accepted is refused for the same reason.
- The backend writes masks through a raw pointer: every bitmask is checked
  (dtype, shape, contiguity) before it is handed over.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import llguidance
import numpy as np

from ridgeline.engine.grammar_spec import GrammarSpec, clean_error

if TYPE_CHECKING:
  from ridgeline.engine.grammar import CompiledGrammar


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
    return clean_error(self._m.get_error(), self.spec.kind) if self._m.is_error() else None

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
