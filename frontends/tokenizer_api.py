"""vLLM's tokenizer endpoints: POST /tokenize and /detokenize, GET /tokenizer_info.

They let a client use the served model's tokenizer without its files: lm-eval's
remote tokenizer reads /tokenizer_info (the special tokens and the chat template)
and then tokenizes through /tokenize and /detokenize. Bodies are checked like the
completion endpoints' (unknown fields are a 400 naming them, frontends/
openai_format.py); the formats are vLLM's.
"""

from __future__ import annotations

from typing import Any

from pydantic import StrictBool, StrictInt, StrictStr

from ridgeline.frontends.openai_format import (Message, OpenAIError, _content_text, _Strict,
                                               _validated)


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
