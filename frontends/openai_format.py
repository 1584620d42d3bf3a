"""OpenAI's API formats: request bodies -> prompts and SamplingParams, engine outputs
-> `chat.completion` / `text_completion` objects (and their streaming chunks).

One module for the server (frontends/server.py) and the batch job (frontends/batch/),
so a request means the same and a response looks the same in both. The request
side is here; the response side is frontends/openai_responses.py, re-exported
here; vLLM's tokenizer endpoints are frontends/tokenizer_api.py.

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
from typing import Any, Literal, Sequence, Union

import pydantic
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from ridgeline.engine.grammar import STRUCTURED_KEYS, GrammarError, GrammarSpec
from ridgeline.engine.sampling import MAX_LOGPROBS, SamplingParams
# The response side, read through this module by the server, the batch job
# (frontends/batch/) and the fleet: one module, so a response looks the same in all.
from ridgeline.frontends.openai_responses import (
    TokenText, chat_logprobs, chunk, chunk_choice, completion_logprobs, echo_parts,
    finish_reason, join_logprobs, new_id, response_body, usage)

__all__ = ["OpenAIError", "error_body", "ParsedRequest", "parse_request", "engine_error",
           "driver_error", "CHAT_URL", "COMPLETIONS_URL", "URLS", "CHAT_DEFAULTS",
           "COMPLETION_DEFAULTS", "Message",
           # re-exported from openai_responses
           "TokenText", "chat_logprobs", "chunk", "chunk_choice", "completion_logprobs",
           "echo_parts", "finish_reason", "join_logprobs", "new_id", "response_body", "usage"]

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
