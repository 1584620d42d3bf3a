"""OpenAI's response objects, from engine outputs: `chat.completion` and
`text_completion` bodies, their streaming chunks, usage, and log-probabilities in
both of OpenAI's shapes (chat's `content` list, completions' legacy lists with text
offsets), with `echo`'s prompt text and log-probabilities first.

What a token looks like in log-probabilities (`TokenText`) is the one subtle part:
a token in the middle of a multi-byte character decodes to U+FFFD, so its bytes
come from its vocabulary piece instead (byte-level BPE's alphabet, or
SentencePiece's `<0xNN>` byte pieces), cached per token id. JSON has no -Infinity,
so a token of probability 0 is reported as -9999, as vLLM does.

The server (frontends/completions.py) and the batch job (frontends/batch/) both
build their responses here, through frontends/openai_format.py, which re-exports
this module.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Sequence


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
