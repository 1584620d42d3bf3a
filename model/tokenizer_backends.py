"""The two tokenizer libraries behind model/tokenizer.py's `Tokenizer`.

`Backend` is what `Tokenizer` needs from a library: raw encode and decode (no
BOS, no EOS) and the vocabulary. `HFBackend` wraps HF `tokenizers` (a
tokenizer.json, or a GGUF's byte-level BPE rebuilt by model/gguf_vocab.py);
`SentencePieceBackend` wraps sentencepiece (a tokenizer.model, or a GGUF's
sentencepiece vocabulary rebuilt as a ModelProto) and teaches it what HF and
llama.cpp do with control tokens written in the text: match them whole.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

import sentencepiece
import tokenizers

class Backend(Protocol):
  """What `Tokenizer` needs from a library: raw encode/decode and the vocabulary."""

  @property
  def vocab_size(self) -> int: ...

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...

  def token_to_id(self, token: str) -> int | None: ...

  def id_to_token(self, token_id: int) -> str | None: ...


class HFBackend:
  """HF `tokenizers`: special tokens in the text are matched whole, none added."""

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    self.tokenizer = tokenizer

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self.tokenizer.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self.tokenizer.id_to_token(token_id)

  def adds_bos(self, bos_id: int | None) -> bool:
    """Whether the file's post-processor prepends BOS (Llama 3 style)."""
    ids = self.tokenizer.encode("a", add_special_tokens=True).ids
    return bos_id is not None and bool(ids) and ids[0] == bos_id


class SentencePieceBackend:
  """sentencepiece, with control tokens written in the text (e.g. a chat
  template's "<s>") matched whole, as HF and llama.cpp do.

  sentencepiece itself never parses control pieces out of text, so the text is
  cut at them and each piece of text is encoded on its own; like llama.cpp and
  HF's legacy Llama tokenizer, each piece then gets the dummy-prefix space.
  """

  def __init__(self, processor: sentencepiece.SentencePieceProcessor,
               whole_pieces: Sequence[str] = ()):
    """`whole_pieces`: more pieces matched whole in the raw text: a GGUF's
    user-defined ones. Gemma's runs of spaces ("  ", 138) are user-defined pieces
    sentencepiece never sees once it has escaped spaces to "▁"; transformers
    matches them in the text, as added tokens."""
    self.processor = processor
    controls = [processor.id_to_piece(i) for i in range(processor.get_piece_size())
                if processor.is_control(i) and processor.id_to_piece(i)]
    controls += [p for p in whole_pieces if p]
    controls.sort(key=len, reverse=True)  # Longest first: "<s>" must not win over "<s>x".
    self._control_re = re.compile("|".join(map(re.escape, controls))) if controls else None

  @property
  def vocab_size(self) -> int:
    return self.processor.get_piece_size()

  def encode(self, text: str) -> list[int]:
    if self._control_re is None:
      return self.processor.encode(text)
    ids, start = [], 0
    for match in self._control_re.finditer(text):
      if match.start() > start:
        ids += self.processor.encode(text[start:match.start()])
      ids.append(self.processor.piece_to_id(match.group()))
      start = match.end()
    if start < len(text):
      ids += self.processor.encode(text[start:])
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
    ids = list(ids)
    if skip_special_tokens:
      return self.processor.decode(ids)
    # sentencepiece drops control tokens; put their text back where they were,
    # keeping its own decoding (leading space, byte pieces) for the rest.
    decoded = self.processor.decode(ids, out_type="offset_mapping")
    text, parts, position = decoded["text"], [], 0
    for token_id, (start, _) in zip(decoded["ids"], decoded["offsets"]):
      if self.processor.is_control(token_id):
        parts += [text[position:start], self.processor.id_to_piece(token_id)]
        position = start
    return "".join(parts) + text[position:]

  def token_to_id(self, token: str) -> int | None:
    token_id = self.processor.piece_to_id(token)
    if token_id < 0 or (token_id == self.processor.unk_id()
                        and token != self.processor.id_to_piece(token_id)):
      return None
    return token_id

  def id_to_token(self, token_id: int) -> str | None:
    if 0 <= token_id < self.processor.get_piece_size():
      return self.processor.id_to_piece(token_id)
    return None
