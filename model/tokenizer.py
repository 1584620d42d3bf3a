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

The libraries' wrappers are model/tokenizer_backends.py, a GGUF's vocabulary is
rebuilt by model/gguf_vocab.py, and the templates are model/chat_templates.py;
this module is the interface, the loaders and the streaming detokenizer.

    tok = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    detok = tok.detokenizer()
    for token_id in generated:
      print(detok.push(token_id), end="")
    print(detok.flush())
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import gguf
import sentencepiece
import tokenizers

from ridgeline.model import chat_templates, gguf_vocab
from ridgeline.model.tokenizer_backends import Backend, HFBackend, SentencePieceBackend

PathLike = str | os.PathLike[str]

# Tokens that end a turn. One counts as end-of-generation when the chat template
# writes it (the model learned to emit it there), besides the declared EOS.
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
    "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>",
)

# How many already-emitted tokens the detokenizer decodes in front of new ones.
# A suffix decoded alone can lose text (sentencepiece drops the leading space of
# "▁word"; a byte-level token may start mid-character), so new text is always
# measured against a decode of the same window without the new tokens.
DETOKENIZER_CONTEXT_TOKENS = 5


class Tokenizer:
  """Text <-> token ids for one model, with its special tokens and chat template."""

  def __init__(self, backend: Backend, *, bos_id: int | None, eos_ids: Iterable[int],
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
    return chat_templates.compile_template(self.chat_template).render(
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
    if isinstance(self._backend, HFBackend):
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
    backend = SentencePieceBackend(processor)
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
    backend = HFBackend(tokenizers.Tokenizer.from_file(os.fspath(path)))
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
      backend = HFBackend(gguf_vocab.byte_level_bpe(meta))
      default_add_bos = meta.get("tokenizer.ggml.pre") in gguf_vocab.LLAMA3_PRE
    elif kind == "llama":
      types = meta.get("tokenizer.ggml.token_type") or []
      unk = meta.get("tokenizer.ggml.unknown_token_id")
      user_defined = [t for i, (t, kind) in enumerate(zip(meta["tokenizer.ggml.tokens"], types))
                      if kind == gguf.TokenType.USER_DEFINED
                      or (i == unk and kind == gguf.TokenType.CONTROL)]  # see the proto
      backend = SentencePieceBackend(sentencepiece.SentencePieceProcessor(
          model_proto=gguf_vocab.sentencepiece_proto(meta)), user_defined)
      default_add_bos = True  # llama.cpp's default for sentencepiece files.
    else:
      raise ValueError(f"unsupported GGUF tokenizer model {kind!r} in {path} "
                       "(supported: 'gpt2' byte-level BPE, 'llama' sentencepiece)")
    template = meta.get("tokenizer.chat_template")
    arch = reader.get_field("general.architecture")
    if template is None and arch is not None:
      # Files converted from a base model carry no template (Gemma 3 270M's does not).
      template = chat_templates.DEFAULT_CHAT_TEMPLATES.get(arch.contents())
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


def _special_ids(backend: Backend, special_tokens: Mapping[str, Any]) -> dict[str, int | None]:
  """Ids of the named special tokens ("bos_token": "<s>" or {"content": "<s>"})."""
  ids = {}
  for name in ("bos_token", "eos_token", "pad_token"):
    token = special_tokens.get(name)
    if isinstance(token, Mapping):
      token = token.get("content")
    if token:
      ids[name] = backend.token_to_id(token)
  return ids


def _eos_ids(backend: Backend, eos_id: int | None, extra: Iterable[int | None],
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
