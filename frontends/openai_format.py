"""OpenAI's API formats: request bodies -> prompts and SamplingParams, engine outputs
-> `chat.completion` / `text_completion` objects (and their streaming chunks).

One module for the server (frontends/server.py) and the batch job (frontends/batch/),
so a request means the same and a response looks the same in both.

Requests are checked by pydantic models that forbid unknown fields (a typo is a 400
naming it, not a silently ignored setting), then by `SamplingParams` for ranges.
Every failure is an `OpenAIError` naming the field (`param`), the way OpenAI's API
reports it: `{"error": {"message", "type", "param", "code"}}`.

Fields: OpenAI's `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`,
`n`, `stop`, `seed`, `presence_penalty`, `frequency_penalty`, `logprobs` /
`top_logprobs`, `stream`, `stream_options.include_usage`; `user`, `metadata`,
`store`, `service_tier` accepted and ignored; vLLM's extras `top_k`, `min_p`,
`repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`,
`skip_special_tokens`, `include_stop_str_in_output`. Structured outputs (one of):
OpenAI's `response_format` (`json_object`, `json_schema`; `strict` or not, the
schema is always enforced), vLLM's `structured_outputs` (`json`, `regex`,
`choice`, `grammar`, `json_object`) and its older `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar` (`guided_decoding_backend` and
`guided_whitespace_pattern` accepted and ignored). Chat message `content` is a
string or an array of text parts (joined with newlines, as vLLM does).
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from typing import Any, Literal, Sequence, Union

import pydantic
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from ridgeline.engine.grammar import STRUCTURED_KEYS, GrammarError, GrammarSpec
from ridgeline.engine.sampling import MAX_LOGPROBS, SamplingParams

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
URLS = {CHAT_URL: "chat", COMPLETIONS_URL: "completion"}

# OpenAI's documented default for /v1/completions; chat has none (the model length).
COMPLETION_DEFAULTS = {"max_tokens": 16}
CHAT_DEFAULTS: dict = {"max_tokens": None}

_Number = Union[StrictInt, StrictFloat]


class OpenAIError(Exception):
  """A request that cannot run, as OpenAI's API reports it."""

  def __init__(self, message: str, param: str | None = None, status: int = 400,
               type: str = "invalid_request_error", code: str | None = None):
    super().__init__(message)
    self.message, self.param, self.status, self.type, self.code = (
        message, param, status, type, code)

  def body(self) -> dict:
    return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
  return {"error": {"message": message, "type": type, "param": param, "code": code}}


# Requests ----------------------------------------------------------------------


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
  include_usage: StrictBool = False
  continuous_usage_stats: StrictBool = False  # vLLM's; accepted, not implemented: ignored


class TextPart(_Strict):
  type: Literal["text"]
  text: StrictStr


class Message(_Strict):
  role: Literal["system", "developer", "user", "assistant", "tool"]
  content: StrictStr | list[TextPart] | None = None
  name: StrictStr | None = None


class _Common(_Strict):
  model: StrictStr | None = None
  max_tokens: StrictInt | None = None
  temperature: _Number | None = None
  top_p: _Number | None = None
  n: StrictInt | None = None
  stop: StrictStr | list[StrictStr] | None = None
  seed: StrictInt | None = None
  presence_penalty: _Number | None = None
  frequency_penalty: _Number | None = None
  stream: StrictBool = False
  stream_options: StreamOptions | None = None
  # Accepted and ignored (they say nothing about generation).
  user: StrictStr | None = None
  metadata: dict[str, Any] | None = None
  store: StrictBool | None = None
  service_tier: StrictStr | None = None
  # vLLM's extras.
  top_k: StrictInt | None = None
  min_p: _Number | None = None
  repetition_penalty: _Number | None = None
  min_tokens: StrictInt | None = None
  ignore_eos: StrictBool | None = None
  stop_token_ids: list[StrictInt] | None = None
  skip_special_tokens: StrictBool | None = None
  include_stop_str_in_output: StrictBool | None = None
  # Structured outputs (engine/grammar.py): OpenAI's response_format, vLLM's
  # structured_outputs, and vLLM's older guided_* names for the same.
  response_format: dict[str, Any] | None = None
  structured_outputs: dict[str, Any] | None = None
  guided_json: dict[str, Any] | StrictStr | None = None
  guided_regex: StrictStr | None = None
  guided_choice: list[StrictStr] | None = None
  guided_grammar: StrictStr | None = None
  guided_json_object: StrictBool | None = None
  guided_decoding_backend: StrictStr | None = None  # accepted and ignored (one backend)
  guided_whitespace_pattern: StrictStr | None = None  # accepted and ignored
  priority: StrictInt = 0  # vLLM's: lower is served first (admitted, kept under preemption)


class ChatRequest(_Common):
  messages: list[Message]
  max_completion_tokens: StrictInt | None = None
  logprobs: StrictBool | None = None
  top_logprobs: StrictInt | None = None
  echo: StrictBool | None = None  # refused with a message (it is /v1/completions')


class CompletionRequest(_Common):
  prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
  logprobs: StrictInt | None = None
  echo: StrictBool | None = None
  best_of: StrictInt | None = None
  suffix: StrictStr | None = None


class TokenizeRequest(_Strict):
  """vLLM's /tokenize body: a prompt, or chat messages rendered by the template."""

  model: StrictStr | None = None
  prompt: StrictStr | None = None
  messages: list[Message] | None = None
  add_special_tokens: StrictBool | None = None  # default: True for prompt, False for chat
  add_generation_prompt: StrictBool = True
  return_token_strs: StrictBool = False


class DetokenizeRequest(_Strict):
  model: StrictStr | None = None
  tokens: list[StrictInt]


def tokenize(tokenizer, body: Any, max_model_len: int) -> dict:
  """/tokenize: {count, max_model_len, tokens[, token_strs]} (vLLM's format)."""
  req = _validated(TokenizeRequest, body)
  if (req.prompt is None) == (req.messages is None):
    raise OpenAIError("give prompt or messages (one of them)", "prompt")
  try:
    if req.prompt is not None:
      add = True if req.add_special_tokens is None else req.add_special_tokens
      ids = tokenizer.encode(req.prompt, add_bos=None if add else False)  # None: its own rule
    else:
      messages = [{"role": m.role, "content": _content_text(m, i)}
                  for i, m in enumerate(req.messages)]
      ids = tokenizer.encode_chat(messages, req.add_generation_prompt)
  except (ValueError, TypeError, UnicodeError) as e:
    raise OpenAIError(f"cannot tokenize: {e}", "prompt" if req.prompt is not None
                      else "messages") from None
  out = {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}
  if req.return_token_strs:
    out["token_strs"] = [tokenizer.id_to_token(t) for t in ids]
  return out


def detokenize(tokenizer, body: Any) -> dict:
  """/detokenize: {prompt} (vLLM's format); ids outside the vocabulary are a 400."""
  req = _validated(DetokenizeRequest, body)
  bad = [t for t in req.tokens if not 0 <= t < tokenizer.vocab_size]
  if bad:
    raise OpenAIError(f"tokens must be ids in [0, {tokenizer.vocab_size}), got {bad[:5]}",
                      "tokens")
  return {"prompt": tokenizer.decode(req.tokens, skip_special_tokens=False)}


def tokenizer_info(tokenizer, max_model_len: int) -> dict:
  """/tokenizer_info: the special tokens and the chat template (what lm-eval's
  remote tokenizer reads to use /tokenize and /detokenize)."""
  def text(token_id):
    return None if token_id is None else tokenizer.id_to_token(token_id)

  return {"tokenizer_class": "ridgeline", "model_max_length": max_model_len,
          "bos_token": text(tokenizer.bos_id),
          "eos_token": text(tokenizer.eos_ids[0]) if tokenizer.eos_ids else None,
          "pad_token": text(tokenizer.pad_id), "add_bos_token": tokenizer.add_bos,
          "chat_template": tokenizer.chat_template}


def _validated(model, body: Any):
  if not isinstance(body, dict):
    raise OpenAIError(f"the request body must be a JSON object, got {type(body).__name__}")
  try:
    return model.model_validate(body)
  except pydantic.ValidationError as e:
    raise _validation_error(e) from None


_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "n", "stop", "seed",
                    "presence_penalty", "frequency_penalty", "top_k", "min_p",
                    "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                    "skip_special_tokens", "include_stop_str_in_output")


@dataclasses.dataclass
class ParsedRequest:
  """What a request body asks for: one engine request per prompt."""

  kind: str  # "chat" | "completion"
  prompts: list[Any]  # chat: one message list; completion: strings or token-id lists
  params: SamplingParams
  top_logprobs: int | None  # None: no logprobs
  stream: bool = False
  include_usage: bool = False
  model: str | None = None
  echo: bool = False  # completions: the prompt (and its logprobs) before the completion
  priority: int = 0


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "literal"})


def _param_from_loc(loc: Sequence) -> str | None:
  """pydantic's error location -> OpenAI's `param` (`messages[0].content`), without
  the union-member tags pydantic adds (`str`, `list[int]`, ...)."""
  out = ""
  for part in loc:
    if isinstance(part, int):
      out += f"[{part}]"
    elif (re.fullmatch(r"[a-z_]+", str(part)) and part not in _TYPE_TAGS
          and not (part == "body" and not out)):
      out += ("." if out else "") + part
  return out or None


def _validation_error(e: pydantic.ValidationError) -> OpenAIError:
  # Of a union's alternatives, the one that got furthest names the field best.
  err = max(e.errors(include_url=False), key=lambda x: len(x["loc"]))
  param = _param_from_loc(err["loc"])
  if err["type"] == "extra_forbidden":
    return OpenAIError(f"Unrecognized request argument supplied: {param}", param)
  if err["type"] == "missing":
    return OpenAIError(f"Missing required parameter: '{param}'", param)
  given = err.get("input")
  shown = repr(given) if not isinstance(given, (dict, list)) else type(given).__name__
  return OpenAIError(f"Invalid value for '{param}': {err['msg']} (got {shown[:80]})", param)


def _sampling_error(e: Exception, renames: dict[str, str]) -> OpenAIError:
  """SamplingParams' messages start with the field they name."""
  msg = str(e)
  m = re.match(r"(\w+) ", msg)
  field = m.group(1) if m else None
  param = renames.get(field, field) if field in _SAMPLING_FIELDS + ("logprobs",) else None
  if param and field != param:
    msg = param + msg[len(field):]
  return OpenAIError(f"Invalid value for '{param}': {msg}" if param else msg, param)


_GUIDED = {f"guided_{k}": k for k in STRUCTURED_KEYS}


def _structured_outputs(req: _Common) -> GrammarSpec | None:
  """The one constraint a request gives (response_format, structured_outputs or
  a guided_* field), checked; errors name the field."""
  given = [f for f in ("response_format", "structured_outputs", *_GUIDED)
           if getattr(req, f) not in (None, False)]
  if isinstance(req.response_format, dict) and req.response_format.get("type") == "text":
    given.remove("response_format")  # unconstrained, as if absent
  if len(given) > 1:
    raise OpenAIError(f"give one output constraint, not {' and '.join(given)}", given[1])
  if not given:
    return None
  field = given[0]
  try:
    if field == "response_format":
      return GrammarSpec.from_response_format(req.response_format)
    if field == "structured_outputs":
      return GrammarSpec.from_structured_outputs(req.structured_outputs)
    return GrammarSpec.from_structured_outputs({_GUIDED[field]: getattr(req, field)}, field)
  except GrammarError as e:
    message = str(e)
    if field.startswith("guided_"):  # "guided_json.json: ..." -> "guided_json: ..."
      message = message.replace(f"{field}.{_GUIDED[field]}", field, 1)
    raise OpenAIError(message, field) from None


def _content_text(message: Message, i: int) -> str:
  content = message.content
  if content is None:
    if message.role != "assistant":
      raise OpenAIError(f"messages[{i}].content is required for role '{message.role}'",
                        f"messages[{i}].content")
    return ""
  if isinstance(content, str):
    return content
  return "\n".join(part.text for part in content)


def parse_request(kind: str, body: Any, defaults: dict | None = None) -> ParsedRequest:
  """Checks an OpenAI request body (`kind`: "chat" or "completion"); fields it does
  not set take `defaults` (SamplingParams fields), then SamplingParams' defaults.
  Raises OpenAIError naming the field."""
  if not isinstance(body, dict):
    raise OpenAIError(f"the request body must be a JSON object, got {type(body).__name__}")
  model = ChatRequest if kind == "chat" else CompletionRequest
  try:
    req = model.model_validate(body)
  except pydantic.ValidationError as e:
    raise _validation_error(e) from None
  given = req.model_fields_set
  sampling = dict(defaults or {})
  renames = {}
  for f in _SAMPLING_FIELDS:
    if f in given and getattr(req, f) is not None:
      sampling[f] = getattr(req, f)
  top_logprobs = None
  if kind == "chat":
    if req.max_completion_tokens is not None:
      if req.max_tokens is not None and req.max_tokens != req.max_completion_tokens:
        raise OpenAIError("give max_completion_tokens or max_tokens, not both",
                          "max_completion_tokens")
      sampling["max_tokens"] = req.max_completion_tokens
      renames["max_tokens"] = "max_completion_tokens"
    if req.logprobs:
      top_logprobs = req.top_logprobs or 0
      renames["logprobs"] = "top_logprobs"
    elif req.top_logprobs is not None:
      raise OpenAIError("top_logprobs needs logprobs: true", "top_logprobs")
    if req.echo:
      raise OpenAIError("echo is not supported for chat completions (it returns a "
                        "prompt's text and log-probabilities from /v1/completions)", "echo")
    if not req.messages:
      raise OpenAIError("messages must be a non-empty list", "messages")
    prompts = [[{"role": m.role, "content": _content_text(m, i)}
                for i, m in enumerate(req.messages)]]
  else:
    if req.suffix:
      raise OpenAIError("suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
      raise OpenAIError("best_of other than n is not supported", "best_of")
    top_logprobs = req.logprobs
    p = req.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)):
      prompts = [p]
    else:
      prompts = list(p)
    if not prompts or any(len(x) == 0 for x in prompts):
      raise OpenAIError("prompt must not be empty", "prompt")
  if top_logprobs is not None:
    if not 0 <= top_logprobs <= MAX_LOGPROBS:
      raise OpenAIError(f"{'top_logprobs' if kind == 'chat' else 'logprobs'} must be in "
                        f"[0, {MAX_LOGPROBS}], got {top_logprobs}",
                        "top_logprobs" if kind == "chat" else "logprobs")
    sampling["logprobs"] = top_logprobs
  echo = kind == "completion" and bool(req.echo)
  if echo and top_logprobs is not None:  # the prompt's own log-probabilities too
    sampling["prompt_logprobs"] = top_logprobs
  spec = _structured_outputs(req)
  if spec is not None:
    sampling["structured_outputs"] = spec
  try:
    params = SamplingParams.from_dict(sampling)
  except (ValueError, TypeError) as e:
    raise _sampling_error(e, renames) from None
  opts = req.stream_options
  if opts is not None and not req.stream:
    raise OpenAIError("stream_options is only allowed with stream: true", "stream_options")
  if not -2**62 <= req.priority < 2**62:
    raise OpenAIError(f"priority must be an integer in [-2**62, 2**62), got {req.priority}",
                      "priority")
  return ParsedRequest(kind, prompts, params, top_logprobs, req.stream,
                       bool(opts and opts.include_usage), req.model, echo=echo,
                       priority=req.priority)


def engine_error(message: str, kind: str) -> OpenAIError:
  """An error the engine recorded for a request it refused (add_request's checks)."""
  prompt_param = "messages" if kind == "chat" else "prompt"
  if "max_model_len" in message:
    return OpenAIError(message, prompt_param, code="context_length_exceeded")
  if "stop strings" in message:
    return OpenAIError(message, "stop")
  if "prompt" in message or "chat" in message or "message" in message:
    return OpenAIError(message, prompt_param)
  return _sampling_error(ValueError(message), {})


def driver_error(failed, kind: str) -> OpenAIError:
  """An engine request that failed in the driver (engine/driver.py's `Failed`), as
  OpenAI's API reports it: a full queue is a 429, a refusal a 400 naming its field,
  a shutdown a 503, anything else a 500."""
  from ridgeline.engine import driver  # here: it imports the engine (and JAX)
  if failed.cause == driver.CAPACITY:
    return OpenAIError(failed.message, status=429, type="rate_limit_error",
                       code="rate_limit_exceeded")
  if failed.cause == driver.INVALID:
    return engine_error(failed.message, kind)
  if failed.cause == driver.STOPPED:
    return OpenAIError("server shutting down", status=503, type="server_error")
  return OpenAIError(failed.message, status=500, type="server_error")


# Responses ----------------------------------------------------------------------


def new_id(kind: str) -> str:
  return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def finish_reason(reason: str | None) -> str | None:
  """OpenAI's values: `stop` (EOS, a stop string or stop token) and `length`."""
  return reason


def _byte_decoder() -> dict[str, int]:
  """GPT-2's byte-level alphabet, inverted: the character that stands for each byte."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_DECODER = _byte_decoder()


class TokenText:
  """Token id -> (text, UTF-8 bytes) as OpenAI reports them in logprobs; cached.

  A token that is part of a multi-byte character decodes to U+FFFD; its real
  bytes come from the vocabulary piece (byte-level BPE's alphabet, or
  SentencePiece's `<0xNN>` byte pieces)."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self._cache: dict[int, tuple[str, list[int]]] = {}

  def __call__(self, token_id: int) -> tuple[str, list[int]]:
    hit = self._cache.get(token_id)
    if hit is not None:
      return hit
    tok = self.tokenizer
    if tok is None:
      text, raw = f"token_id:{token_id}", None
    else:
      text = tok.decode([token_id], skip_special_tokens=False)
      raw = text.encode("utf-8")
      if "\ufffd" in text:
        piece = tok.id_to_token(token_id) or ""
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
          raw = bytes([int(piece[3:5], 16)])
        elif piece and all(c in _BYTE_DECODER for c in piece):
          raw = bytes(_BYTE_DECODER[c] for c in piece)
        text = raw.decode("utf-8", errors="backslashreplace")
    out = (text, list(raw if raw is not None else text.encode()))
    if len(self._cache) < 1 << 20:
      self._cache[token_id] = out
    return out


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
  # The engine's entry holds the sampled token and the top k (which may include it).
  return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def chat_logprobs(token_text: TokenText, token_ids: Sequence[int],
                  logprobs: Sequence[dict[int, float]], k: int) -> dict:
  content = []
  for t, entry in zip(token_ids, logprobs):
    text, raw = token_text(t)
    tops = []
    for tid, lp in _top(entry, k):
      ttext, traw = token_text(tid)
      tops.append({"token": ttext, "logprob": lp, "bytes": traw})
    content.append({"token": text, "logprob": entry.get(t), "bytes": raw,
                    "top_logprobs": tops})
  return {"content": content, "refusal": None}


def completion_logprobs(token_text: TokenText, token_ids: Sequence[int],
                        logprobs: Sequence[dict[int, float] | None], k: int,
                        offset: int = 0) -> dict:
  """The legacy completions `logprobs` object. An entry None (a prompt's first
  token, with echo) has null log-probabilities; a prompt token's entry holds its
  own log-probability and its top k alternatives (up to k + 1, as OpenAI's)."""
  tokens, token_lps, tops, offsets = [], [], [], []
  for t, entry in zip(token_ids, logprobs):
    text, _ = token_text(t)
    tokens.append(text)
    token_lps.append(None if entry is None else _finite(entry.get(t)))
    tops.append(None if entry is None else
                {token_text(tid)[0]: _finite(lp) for tid, lp in _top(entry, k + 1)})
    offsets.append(offset)
    offset += len(text)
  return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
          "text_offset": offsets}


def _finite(lp: float | None) -> float | None:
  """JSON has no -Infinity: a token of probability 0 is reported as -9999 (vLLM's)."""
  return None if lp is None else max(lp, -9999.0)


def echo_parts(token_text: TokenText, prompt: Any, out, k: int | None
               ) -> tuple[str, dict | None]:
  """With echo: the prompt's text (as given, or its token ids decoded) and, when
  log-probabilities are asked, its legacy logprobs object (first token null)."""
  tok = token_text.tokenizer
  if isinstance(prompt, str):
    text = prompt
  elif tok is not None:
    text = tok.decode(out.prompt_token_ids, skip_special_tokens=False)
  else:
    text = ""
  if k is None:
    return text, None
  entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
  return text, completion_logprobs(token_text, out.prompt_token_ids, entries, k)


def join_logprobs(first: dict | None, second: dict | None) -> dict | None:
  """Two legacy logprobs objects, one after the other (the second's text offsets
  already count from the start of the choice's text)."""
  if first is None or second is None:
    return first or second
  return {key: first[key] + second[key] for key in first}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
  return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
          "total_tokens": prompt_tokens + completion_tokens}


def response_body(kind: str, outputs: Sequence, model: str, token_text: TokenText,
                  top_logprobs: int | None, request_id: str | None = None,
                  created: int | None = None, echo_prompts: Sequence | None = None) -> dict:
  """A `chat.completion` or `text_completion` object from finished RequestOutputs
  (one per prompt; choice index = prompt index * n + completion index).
  `echo_prompts`: completions with echo: the prompts as given (their text and, with
  logprobs, their log-probabilities come before each choice's completion)."""
  choices = []
  prompt_tokens = completion_tokens = 0
  for p, out in enumerate(outputs):
    n = len(out.outputs)
    prompt_tokens += len(out.prompt_token_ids)
    echoed = (echo_parts(token_text, echo_prompts[p], out, top_logprobs)
              if echo_prompts is not None else ("", None))
    for c in out.outputs:
      completion_tokens += len(c.token_ids)
      lp = None
      if top_logprobs is not None and c.logprobs is not None:
        offset = len(echoed[0]) if kind != "chat" else 0
        lp = (chat_logprobs(token_text, c.token_ids, c.logprobs, top_logprobs) if kind == "chat"
              else completion_logprobs(token_text, c.token_ids, c.logprobs, top_logprobs,
                                       offset))
      if echo_prompts is not None:
        lp = join_logprobs(echoed[1], lp)
      choice = {"index": p * n + c.index}
      if kind == "chat":
        choice["message"] = {"role": "assistant", "content": c.text, "refusal": None}
      else:
        choice["text"] = echoed[0] + c.text
      choice.update(logprobs=lp, finish_reason=finish_reason(c.finish_reason))
      if c.stop_reason is not None:
        choice["stop_reason"] = c.stop_reason  # vLLM's extra: which stop string / token
      choices.append(choice)
  return {"id": request_id or new_id(kind),
          "object": "chat.completion" if kind == "chat" else "text_completion",
          "created": int(created if created is not None else time.time()), "model": model,
          "choices": choices, "usage": usage(prompt_tokens, completion_tokens),
          "system_fingerprint": None}


def chunk(kind: str, request_id: str, created: int, model: str, choices: list[dict],
          include_usage: bool = False) -> dict:
  """One streaming chunk (`chat.completion.chunk` or `text_completion`)."""
  out = {"id": request_id, "object": "chat.completion.chunk" if kind == "chat"
         else "text_completion", "created": created, "model": model, "choices": choices,
         "system_fingerprint": None}
  if include_usage:
    out["usage"] = None
  return out


def chunk_choice(kind: str, index: int, text: str | None, logprobs: dict | None,
                 finish: str | None, first: bool = False) -> dict:
  if kind == "chat":
    delta = {}
    if first:
      delta["role"] = "assistant"
    if text is not None:
      delta["content"] = text
    return {"index": index, "delta": delta, "logprobs": logprobs,
            "finish_reason": finish_reason(finish)}
  return {"index": index, "text": text or "", "logprobs": logprobs,
          "finish_reason": finish_reason(finish)}
