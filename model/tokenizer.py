"""One tokenizer interface over HF `tokenizers` and sentencepiece, plus chat templates.

The engine only ever sees `Tokenizer`: text -> ids, ids -> text, chat messages ->
prompt, and an `IncrementalDetokenizer` for streaming. Two libraries do the real
work behind it:

- HF `tokenizers` for `tokenizer.json` files and for byte-level BPE vocabularies
  embedded in a GGUF (`tokenizer.ggml.model == "gpt2"`),
- sentencepiece for `tokenizer.model` files and for sentencepiece vocabularies
  embedded in a GGUF (`tokenizer.ggml.model == "llama"`), rebuilt as a ModelProto.

Chat templates are Jinja, rendered the way transformers renders them, so prompts
match the reference token for token.

    tok = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    detok = tok.detokenizer()
    for token_id in generated:
      print(detok.push(token_id), end="")
    print(detok.flush())
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import gguf
import jinja2
import jinja2.ext
import jinja2.sandbox
import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

PathLike = str | os.PathLike[str]

# Tokens that end a turn. One counts as end-of-generation when the chat template
# writes it (the model learned to emit it there), besides the declared EOS.
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
    "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>",
)

# Gemma's turn format, for GGUF files that carry no template: user and model
# turns between <start_of_turn> and <end_of_turn>, a system message folded into
# the first user turn (Gemma has no system role), content trimmed.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")
DEFAULT_CHAT_TEMPLATES = {"gemma2": GEMMA_CHAT_TEMPLATE, "gemma3": GEMMA_CHAT_TEMPLATE}

# How many already-emitted tokens the detokenizer decodes in front of new ones.
# A suffix decoded alone can lose text (sentencepiece drops the leading space of
# "▁word"; a byte-level token may start mid-character), so new text is always
# measured against a decode of the same window without the new tokens.
DETOKENIZER_CONTEXT_TOKENS = 5

# Byte-level BPE pre-tokenization, by `tokenizer.ggml.pre` (llama.cpp's names).
# Each entry is a list of regexes applied in turn, every match and every gap
# kept as its own piece, before the pieces are mapped to byte characters. This
# mirrors llama.cpp's `llm_tokenizer_bpe`, which is what wrote these files.
_GPT2_SPLIT = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"
               r"|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
                 r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama 3 and files llama.cpp reads the same way: it looks a whole piece up in
# the vocabulary before merging (tokenizer.json's `ignore_merges`) and adds BOS
# unless the file says otherwise.
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
               "midm-2.0", "lfm2")
_PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    # What llama.cpp uses when a file names no pre-tokenizer.
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"),
    **dict.fromkeys(("gpt2", "mpt", "olmo", "jais"), (_GPT2_SPLIT,)),
    # StarCoder's tokenizer (and SmolLM's, trained the same way): every digit alone.
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"),
                    (r"\p{N}", _GPT2_SPLIT)),
    **dict.fromkeys((*_LLAMA3_PRE, "dbrx", "smaug-bpe"), (_LLAMA3_SPLIT,)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), (_QWEN2_SPLIT,)),
}


class _Backend(Protocol):
  """What `Tokenizer` needs from a library: raw encode/decode and the vocabulary."""

  @property
  def vocab_size(self) -> int: ...

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...

  def token_to_id(self, token: str) -> int | None: ...

  def id_to_token(self, token_id: int) -> str | None: ...


class _HFBackend:
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


class _SentencePieceBackend:
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


class Tokenizer:
  """Text <-> token ids for one model, with its special tokens and chat template."""

  def __init__(self, backend: _Backend, *, bos_id: int | None, eos_ids: Iterable[int],
               pad_id: int | None = None, add_bos: bool = False,
               chat_template: str | None = None):
    self._backend = backend
    self.bos_id = bos_id
    self.eos_ids = tuple(dict.fromkeys(eos_ids))
    self.pad_id = pad_id
    self.add_bos = add_bos and bos_id is not None
    self.chat_template = chat_template

  def __repr__(self) -> str:
    return (f"Tokenizer({type(self._backend).__name__}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_ids={self.eos_ids}, add_bos={self.add_bos})")

  @property
  def vocab_size(self) -> int:
    return self._backend.vocab_size

  # -- Text <-> ids ----------------------------------------------------------

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    """Token ids of `text`; BOS first if asked (default: `self.add_bos`). Never EOS."""
    ids = self._backend.encode(text)
    if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
      ids = [self.bos_id, *ids]
    return ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    return self._backend.decode([int(i) for i in ids], skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._backend.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self._backend.id_to_token(token_id)

  def detokenizer(self, prompt_ids: Sequence[int] = (),
                  skip_special_tokens: bool = True) -> IncrementalDetokenizer:
    """A streaming decoder for tokens generated after `prompt_ids`."""
    return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)

  # -- Chat ------------------------------------------------------------------

  def apply_chat_template(self, messages: list[dict[str, Any]],
                          add_generation_prompt: bool = True, **kwargs: Any) -> str:
    """The prompt text for `messages`, rendered like transformers does.

    Extra keyword arguments (e.g. `tools`) are passed to the template.
    """
    if self.chat_template is None:
      raise ValueError("this tokenizer has no chat template")
    return _compile_chat_template(self.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        bos_token=self._token_text(self.bos_id), eos_token=self._token_text(
            self.eos_ids[0] if self.eos_ids else None),
        pad_token=self._token_text(self.pad_id), **kwargs)

  def encode_chat(self, messages: list[dict[str, Any]],
                  add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
    """Prompt ids for `messages`. No BOS is added: a template that wants one writes it."""
    text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
    return self.encode(text, add_bos=False)

  def save(self, directory: PathLike) -> None:
    """Writes the tokenizer as a Hugging Face directory that `from_hf_dir` reads
    back: tokenizer.json or tokenizer.model, tokenizer_config.json (special
    tokens, add_bos, chat template) and generation_config.json (every EOS id)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(self._backend, _HFBackend):
      self._backend.tokenizer.save(os.fspath(directory / "tokenizer.json"))
    else:
      (directory / "tokenizer.model").write_bytes(
          self._backend.processor.serialized_model_proto())
    config = {"add_bos_token": self.add_bos, "chat_template": self.chat_template}
    for name, token_id in (("bos_token", self.bos_id), ("pad_token", self.pad_id),
                           ("eos_token", self.eos_ids[0] if self.eos_ids else None)):
      if token_id is not None:
        config[name] = self._token_text(token_id)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(
        json.dumps({"eos_token_id": list(self.eos_ids)}, indent=2))

  def _token_text(self, token_id: int | None) -> str:
    token = None if token_id is None else self._backend.id_to_token(token_id)
    return token or ""

  # -- Loading ---------------------------------------------------------------

  @classmethod
  def from_sentencepiece(cls, path_or_bytes: PathLike | bytes, *,
                         add_bos: bool | None = None, eos_ids: Iterable[int] = (),
                         chat_template: str | None = None,
                         special_tokens: Mapping[str, Any] | None = None) -> Tokenizer:
    """A `tokenizer.model` file (or its bytes).

    BOS/EOS/pad come from the model's own ids unless `special_tokens` names
    them (keys "bos_token", "eos_token", "pad_token"); BOS is added by default,
    the Llama convention, when the model has one.
    """
    if isinstance(path_or_bytes, bytes):
      processor = sentencepiece.SentencePieceProcessor(model_proto=path_or_bytes)
    else:
      processor = sentencepiece.SentencePieceProcessor(model_file=os.fspath(path_or_bytes))
    backend = _SentencePieceBackend(processor)
    own = {"bos_token": processor.bos_id(), "eos_token": processor.eos_id(),
           "pad_token": processor.pad_id()}
    ids = {name: None if i < 0 else i for name, i in own.items()}
    ids.update(_special_ids(backend, special_tokens or {}))
    return cls(backend, bos_id=ids["bos_token"],
               eos_ids=_eos_ids(backend, ids["eos_token"], eos_ids, chat_template),
               pad_id=ids["pad_token"],
               add_bos=ids["bos_token"] is not None if add_bos is None else add_bos,
               chat_template=chat_template)

  @classmethod
  def from_hf_json(cls, path: PathLike, *, add_bos: bool | None = None,
                   eos_ids: Iterable[int] = (), chat_template: str | None = None,
                   special_tokens: Mapping[str, Any] | None = None) -> Tokenizer:
    """A `tokenizer.json` file. Without `special_tokens`, EOS is guessed from
    the well-known end tokens in the vocabulary (a bare file does not say)."""
    backend = _HFBackend(tokenizers.Tokenizer.from_file(os.fspath(path)))
    ids = {"bos_token": None, "eos_token": None, "pad_token": None}
    ids.update(_special_ids(backend, special_tokens or {}))
    if ids["eos_token"] is None and not special_tokens:
      ids["eos_token"] = next((backend.token_to_id(t) for t in END_OF_TURN_TOKENS
                               if backend.token_to_id(t) is not None), None)
    return cls(backend, bos_id=ids["bos_token"],
               eos_ids=_eos_ids(backend, ids["eos_token"], eos_ids, chat_template),
               pad_id=ids["pad_token"],
               add_bos=backend.adds_bos(ids["bos_token"]) if add_bos is None else add_bos,
               chat_template=chat_template)

  @classmethod
  def from_hf_dir(cls, directory: PathLike) -> Tokenizer:
    """A Hugging Face model directory: `tokenizer.json` (preferred) or
    `tokenizer.model`, described by `tokenizer_config.json`,
    `special_tokens_map.json`, `chat_template.jinja` and `generation_config.json`
    where present."""
    directory = pathlib.Path(directory)
    config = _read_json(directory / "tokenizer_config.json")
    special_tokens = {**_read_json(directory / "special_tokens_map.json"), **{
        k: v for k, v in config.items() if k in ("bos_token", "eos_token", "pad_token") and v}}
    generation_eos = _read_json(directory / "generation_config.json").get("eos_token_id", ())
    if isinstance(generation_eos, int):
      generation_eos = (generation_eos,)
    kwargs = dict(add_bos=config.get("add_bos_token"), eos_ids=generation_eos,
                  chat_template=_hf_chat_template(directory, config),
                  special_tokens=special_tokens)
    if (directory / "tokenizer.json").exists():
      return cls.from_hf_json(directory / "tokenizer.json", **kwargs)
    if (directory / "tokenizer.model").exists():
      return cls.from_sentencepiece(directory / "tokenizer.model", **kwargs)
    raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {directory}")

  @classmethod
  def from_gguf(cls, path: PathLike, reader=None) -> Tokenizer:
    """The vocabulary embedded in a GGUF file (llama.cpp's `tokenizer.*` keys);
    `reader`: the file already open (gguf.GGUFReader)."""
    from ridgeline.model.convert.gguf import open_gguf  # the error that names the file
    reader = reader or open_gguf(path)
    meta = {name: field.contents() for name, field in reader.fields.items()
            if name.startswith("tokenizer.")}
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
      backend = _HFBackend(_byte_level_bpe_from_gguf(meta))
      default_add_bos = meta.get("tokenizer.ggml.pre") in _LLAMA3_PRE
    elif kind == "llama":
      types = meta.get("tokenizer.ggml.token_type") or []
      unk = meta.get("tokenizer.ggml.unknown_token_id")
      user_defined = [t for i, (t, kind) in enumerate(zip(meta["tokenizer.ggml.tokens"], types))
                      if kind == gguf.TokenType.USER_DEFINED
                      or (i == unk and kind == gguf.TokenType.CONTROL)]  # see the proto
      backend = _SentencePieceBackend(sentencepiece.SentencePieceProcessor(
          model_proto=_sentencepiece_proto_from_gguf(meta)), user_defined)
      default_add_bos = True  # llama.cpp's default for sentencepiece files.
    else:
      raise ValueError(f"unsupported GGUF tokenizer model {kind!r} in {path} "
                       "(supported: 'gpt2' byte-level BPE, 'llama' sentencepiece)")
    template = meta.get("tokenizer.chat_template")
    arch = reader.get_field("general.architecture")
    if template is None and arch is not None:
      # Files converted from a base model carry no template (Gemma 3 270M's does not).
      template = DEFAULT_CHAT_TEMPLATES.get(arch.contents())
    return cls(backend, bos_id=meta.get("tokenizer.ggml.bos_token_id"),
               eos_ids=_eos_ids(backend, meta.get("tokenizer.ggml.eos_token_id"),
                                [meta.get("tokenizer.ggml.eot_token_id"),
                                 meta.get("tokenizer.ggml.eom_token_id")], template),
               pad_id=meta.get("tokenizer.ggml.padding_token_id"),
               add_bos=meta.get("tokenizer.ggml.add_bos_token", default_add_bos),
               chat_template=template)


def load_tokenizer(path: PathLike) -> Tokenizer:
  """The tokenizer at `path`: a .gguf file, a sentencepiece .model file, a
  tokenizer.json file, or a Hugging Face model directory.

  Raises FileNotFoundError or ValueError naming the path and what is wrong (the
  parsers' own exceptions say neither)."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"tokenizer {path} does not exist")
  if path.is_dir():
    load = Tokenizer.from_hf_dir
  elif path.suffix == ".gguf":
    load = Tokenizer.from_gguf
  elif path.suffix == ".model":
    load = Tokenizer.from_sentencepiece
  elif path.suffix == ".json":
    load = Tokenizer.from_hf_json
  else:
    raise ValueError(f"don't know how to load a tokenizer from {path} (expected a .gguf, "
                     "tokenizer.json or .model file, or a Hugging Face directory)")
  try:
    return load(path)
  except FileNotFoundError:
    raise
  except Exception as e:  # tokenizers, sentencepiece, gguf, json raise their own types
    if str(path) in str(e):
      raise ValueError(f"{e}") from e
    what = "directory" if path.is_dir() else "file"
    raise ValueError(f"cannot read tokenizer {what} {path}: {type(e).__name__}: "
                     f"{' '.join(str(e).split()) or 'unreadable'}") from e


class IncrementalDetokenizer:
  """Streams text for a growing list of token ids, one delta per `push`.

  vLLM's scheme: decode a small window (the tokens emitted last, then the new
  ones) with and without the new ones, and emit the difference.
  Holding back while the decode ends in U+FFFD keeps a character split across
  byte tokens from coming out broken. Each push costs O(window), not O(length).
  Without prompt ids, all deltas plus `flush()` equal `decode(pushed ids)`;
  with them, the first delta keeps the space that joins it to the prompt.
  """

  def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (),
               skip_special_tokens: bool = True):
    self._decode = functools.partial(tokenizer.decode, skip_special_tokens=skip_special_tokens)
    # The window: context tokens (already emitted), then the ones not emitted yet.
    self._ids = [int(i) for i in list(prompt_ids)[-DETOKENIZER_CONTEXT_TOKENS:]]
    self._read_offset = len(self._ids)  # Tokens before this are emitted.
    self.text = ""

  def push(self, token_id: int) -> str:
    """Adds one token; returns the text it completes (often "", never a broken character)."""
    self._ids.append(int(token_id))
    context, full = self._window_texts()
    if len(full) <= len(context) or full.endswith("\ufffd"):
      return ""
    return self._emit(full[len(context):])

  def extend(self, token_ids: Sequence[int]) -> str:
    """Adds many tokens at once and returns all their text, in one decode (the
    text of a finished sequence: equal to pushing them one by one and flushing)."""
    self._ids.extend(int(t) for t in token_ids)
    context, full = self._window_texts()
    return self._emit(full[len(context):]) if len(full) > len(context) else ""

  def flush(self) -> str:
    """Emits whatever is held back (at the end of generation), even if incomplete."""
    context, full = self._window_texts()
    return self._emit(full[len(context):]) if len(full) > len(context) else ""

  def _window_texts(self) -> tuple[str, str]:
    return self._decode(self._ids[:self._read_offset]), self._decode(self._ids)

  def _emit(self, delta: str) -> str:
    # The tokens just emitted become the next window's context; older ones go.
    del self._ids[:self._read_offset]
    self._read_offset = len(self._ids)
    self.text += delta
    return delta


# -- Helpers -------------------------------------------------------------------


def _byte_level_bpe_from_gguf(meta: Mapping[str, Any]) -> tokenizers.Tokenizer:
  """A GGUF "gpt2" vocabulary as the HF byte-level BPE it was converted from."""
  pre = meta.get("tokenizer.ggml.pre", "default")
  if pre not in _PRE_TOKENIZER_SPLITS:
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} "
                     f"(supported: {sorted(_PRE_TOKENIZER_SPLITS)})")
  tokens = meta["tokenizer.ggml.tokens"]
  merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", ())]
  tokenizer = tokenizers.Tokenizer(models.BPE(
      vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
      ignore_merges=pre in _LLAMA3_PRE))
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      *(pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated")
        for split in _PRE_TOKENIZER_SPLITS[pre]),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tokenizer.decoder = decoders.ByteLevel()
  # Control tokens (<|im_end|>) and user-defined ones (<think>) are matched whole
  # in text; only control tokens are dropped by skip_special_tokens.
  types = meta.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
  tokenizer.add_special_tokens([
      tokenizers.AddedToken(t, special=True, normalized=False)
      for t, kind in zip(tokens, types) if kind == gguf.TokenType.CONTROL])
  tokenizer.add_tokens([
      tokenizers.AddedToken(t, special=False, normalized=False)
      for t, kind in zip(tokens, types) if kind == gguf.TokenType.USER_DEFINED])
  return tokenizer


def _sentencepiece_proto_from_gguf(meta: Mapping[str, Any]) -> bytes:
  """A GGUF "llama" vocabulary as a serialized sentencepiece ModelProto.

  The file keeps pieces, scores and types (gguf.TokenType numbers them like
  sentencepiece does). The rest is llama.cpp's reading of such a vocabulary:
  BPE merging by score, no normalization, optional dummy-prefix space.
  """
  from sentencepiece import sentencepiece_model_pb2  # Needs protobuf; only this path does.

  tokens = meta["tokenizer.ggml.tokens"]
  scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
  types = meta.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
  proto = sentencepiece_model_pb2.ModelProto()
  unk = meta.get("tokenizer.ggml.unknown_token_id")
  for i, (token, score, kind) in enumerate(zip(tokens, scores, types)):
    # Gemma's files mark <unk> CONTROL; sentencepiece needs it UNKNOWN to have an
    # unk id at all (its original model does).
    if i == unk and kind == gguf.TokenType.CONTROL:
      kind = gguf.TokenType.UNKNOWN
    proto.pieces.add(piece=token, score=score, type=int(kind))
  spec = proto.trainer_spec
  spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
  spec.vocab_size = len(tokens)
  spec.byte_fallback = gguf.TokenType.BYTE in types
  for name, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
    token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
    setattr(spec, f"{name}_id", -1 if token_id is None else token_id)
    if token_id is not None:
      setattr(spec, f"{name}_piece", tokens[token_id])
  normalizer = proto.normalizer_spec
  normalizer.name = "identity"
  normalizer.add_dummy_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
  normalizer.remove_extra_whitespaces = False
  normalizer.escape_whitespaces = True
  return proto.SerializeToString()


def _special_ids(backend: _Backend, special_tokens: Mapping[str, Any]) -> dict[str, int | None]:
  """Ids of the named special tokens ("bos_token": "<s>" or {"content": "<s>"})."""
  ids = {}
  for name in ("bos_token", "eos_token", "pad_token"):
    token = special_tokens.get(name)
    if isinstance(token, Mapping):
      token = token.get("content")
    if token:
      ids[name] = backend.token_to_id(token)
  return ids


def _eos_ids(backend: _Backend, eos_id: int | None, extra: Iterable[int | None],
             chat_template: str | None) -> list[int]:
  """Every id that ends generation: the declared EOS, extra declared ones, and
  the end-of-turn tokens the chat template writes."""
  ids = [i for i in (eos_id, *extra) if i is not None]
  for token in END_OF_TURN_TOKENS:
    token_id = backend.token_to_id(token)
    if token_id is not None and chat_template and token in chat_template:
      ids.append(token_id)
  return ids


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _hf_chat_template(directory: pathlib.Path, config: Mapping[str, Any]) -> str | None:
  """The default chat template: a separate file (newer transformers) or the config."""
  if (directory / "chat_template.jinja").exists():
    return (directory / "chat_template.jinja").read_text(encoding="utf-8")
  template = (config.get("chat_template")
              or _read_json(directory / "chat_template.json").get("chat_template"))
  if isinstance(template, list):  # Named templates: [{"name": ..., "template": ...}].
    named = {t["name"]: t["template"] for t in template}
    template = named.get("default", next(iter(named.values()), None))
  return template


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
  # Jinja's own tojson escapes HTML characters, which templates don't expect.
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                    separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile_chat_template(template: str) -> jinja2.Template:
  """The template in the environment transformers gives it (templates are
  untrusted code, hence the sandbox; the options change whitespace)."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)
