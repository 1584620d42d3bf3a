"""The checks every request passes before it is queued, and the KV pool's size.

A request that cannot run must fail alone, with a message that names the field
and what is allowed, before it takes a slot, a page or a step: the prompt's form
(text, token ids or chat messages; no bytes, no lone surrogates, nothing empty),
its token ids against the vocabulary, every sampling value bound for a device
array, its length against max_model_len, and its structured_outputs compiled for
the tokenizer (once per spec). `RequestChecker` holds what those checks read (the
model's config, the engine's config, the tokenizer) and nothing that changes as
the engine runs, so any thread may use it (the Batch API checks uploads with it
while the engine steps).

`pool_pages` sizes the KV pool from the engine's settings and the device's
memory, and refuses a pool that cannot hold one sequence of max_model_len.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from ridgeline.engine.config import EngineConfig
from ridgeline.engine.sampling import SamplingParams
from ridgeline.model.config import ModelConfig

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]
CHAT_ROLES = ("system", "user", "assistant", "tool")


def _check_text(text: str, field: str) -> None:
  """Text must be encodable Unicode: a lone surrogate (from a bad JSON escape or a
  broken decode) cannot be tokenized."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise ValueError(f"{field} contains a lone surrogate {text[e.start]!r} at character "
                     f"{e.start}; text must be valid Unicode") from None


def _describe(x) -> str:
  if isinstance(x, (list, tuple)) and x:
    kinds = sorted({type(v).__name__ for v in x})
    return f"a {type(x).__name__} of {', '.join(kinds)}"
  if isinstance(x, (list, tuple)):
    return f"an empty {type(x).__name__}"
  return type(x).__name__



class RequestChecker:
  """Validates requests for one engine (its model, config and tokenizer)."""

  def __init__(self, model_config: ModelConfig, config: EngineConfig, tokenizer=None):
    self.model_config = model_config
    self.config = config
    self.tokenizer = tokenizer
    self._grammars = None  # a GrammarCompiler, made by the first constrained request

  def check(self, prompt: Prompt, params: SamplingParams
            ) -> tuple[list[int], SamplingParams, int, object]:
    """Every check a request passes before it is queued: returns its prompt ids,
    the params it runs with, its most output tokens and its compiled grammar (or
    None); raises ValueError naming the problem."""
    if not isinstance(params, SamplingParams):
      raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    params.validate()
    prompt_ids = self._tokenize(prompt)
    params = self._check_params(params)
    max_tokens = self._check_length(prompt_ids, params)
    return prompt_ids, params, max_tokens, self._compile_grammar(params)

  def _compile_grammar(self, params: SamplingParams):
    """The request's structured_outputs compiled for this tokenizer (cached by
    the spec: the thousandth request with one schema reuses the first's work)."""
    spec = params.structured_outputs
    if spec is None:
      return None
    if self.tokenizer is None:
      raise ValueError("structured_outputs needs a tokenizer (the grammar is over text)")
    if self._grammars is None:
      from ridgeline.engine.grammar import GrammarCompiler
      self._grammars = GrammarCompiler(self.tokenizer, vocab_size=self.model_config.vocab_size)
    return self._grammars.compile(spec, "structured_outputs")

  def _check_params(self, params: SamplingParams) -> SamplingParams:
    """The checks that need the model: every value bound for a device array must
    fit it. Returns the params to run with (a copy when one is normalised)."""
    vocab = self.model_config.vocab_size
    for name in ("stop_token_ids", "allowed_token_ids"):
      bad = [t for t in getattr(params, name) or () if t >= vocab]
      if bad:
        raise ValueError(f"{name} must be token ids below the vocabulary size {vocab}, "
                         f"got {bad[:5]}")
    for name in ("logprobs", "prompt_logprobs"):
      if getattr(params, name) is not None and getattr(params, name) > vocab:
        raise ValueError(f"{name} must be at most the vocabulary size {vocab}, "
                         f"got {getattr(params, name)}")
    if params.n > self.config.max_batch:
      raise ValueError(f"n must be at most max_batch ({self.config.max_batch}): all samples "
                       f"of a prompt decode together; got {params.n}")
    if params.stop and self.tokenizer is None:
      raise ValueError("stop strings need a tokenizer; use stop_token_ids")
    if params.top_k >= vocab:  # vLLM's meaning: at least the whole vocabulary = all tokens
      params = dataclasses.replace(params, top_k=0)
    return params

  def _tokenize(self, prompt: Prompt) -> list[int]:
    if isinstance(prompt, (bytes, bytearray, memoryview)):
      raise ValueError("prompt is bytes; pass text (decode it, e.g. data.decode('utf-8')), "
                       "a list of token ids or a list of chat messages")
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise ValueError("a text prompt needs a tokenizer; pass token ids instead")
      _check_text(prompt, "prompt")
      if not prompt.strip():
        raise ValueError("prompt is empty or only whitespace; give some text")
      ids = self._encode(self.tokenizer.encode, prompt)
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
      if self.tokenizer is None:
        raise ValueError("a chat prompt needs a tokenizer")
      for i, m in enumerate(prompt):
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
          raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}; "
                           f"got {role!r}")
        if not isinstance(content, str):
          raise ValueError(f"messages[{i}].content must be a string, got "
                           f"{type(content).__name__}")
        _check_text(content, f"messages[{i}].content")
      if not any(m["content"].strip() for m in prompt):
        raise ValueError("every message's content is empty or only whitespace")
      ids = self._encode(self.tokenizer.encode_chat, list(prompt))
    elif isinstance(prompt, (Sequence, np.ndarray)) and not isinstance(prompt, str) and all(
        isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
      ids = [int(t) for t in prompt]
      vocab = self.model_config.vocab_size
      bad = [t for t in ids if not 0 <= t < vocab]
      if bad:
        raise ValueError(f"prompt token ids out of range: they must be in [0, {vocab}) "
                         f"(the vocabulary), got {bad[:5]}")
    else:
      raise ValueError("a prompt must be a string, a list of token ids or a list of "
                       f"chat messages ({{'role', 'content'}}), got {_describe(prompt)}")
    if not ids:
      raise ValueError("empty prompt: it has no tokens")
    top = max(ids)
    if top >= self.model_config.vocab_size:  # text / chat: the tokenizer's ids
      raise ValueError(f"the tokenizer produced token id {top}, beyond the model's "
                       f"vocabulary of {self.model_config.vocab_size}: the tokenizer "
                       "does not belong to this model")
    return ids

  @staticmethod
  def _encode(fn, value) -> list[int]:
    try:
      return fn(value)
    except (ValueError, TypeError, UnicodeError):
      raise
    except Exception as e:  # tokenizers / jinja raise their own types; all mean bad input
      raise ValueError(f"cannot tokenize the prompt: {type(e).__name__}: {e}") from e

  def _check_length(self, prompt_ids: list[int], params: SamplingParams) -> int:
    """The most tokens to generate. Like vLLM, a prompt plus max_tokens beyond
    max_model_len is an error, not a silent clamp; max_tokens None means up to it."""
    limit = self.config.max_model_len
    n = len(prompt_ids)
    if n >= limit:
      raise ValueError(f"prompt is {n} tokens; max_model_len is {limit}, "
                       "which must leave room for at least one generated token")
    room = limit - n
    if params.max_tokens is not None and params.max_tokens > room:
      raise ValueError(
          f"max_tokens is {params.max_tokens} but the prompt has {n} tokens and "
          f"max_model_len is {limit}: at most {room} new tokens fit (or pass None for "
          "up to the model length)")
    if params.min_tokens > room:
      raise ValueError(f"min_tokens is {params.min_tokens} but at most {room} new tokens "
                       f"fit (prompt {n} tokens, max_model_len {limit})")
    return room if params.max_tokens is None else params.max_tokens


def pool_pages(config: EngineConfig, model_config: ModelConfig, mesh=None) -> int:
  """Pages in the pool; refuses a pool that cannot hold one full-length sequence
  (the scheduler relies on it: the oldest sequence can always run).

  Budgets are per device: on a mesh a page's bytes are split over the devices
  that shard the KV heads, so the same memory holds more pages.
  """
  if mesh is None:
    page_bytes = config.page_size * model_config.kv_bytes_per_token(config.kv_dtype)
  else:
    from ridgeline.model import sharding  # only needed on a mesh
    page_bytes = sharding.memory_report(model_config, mesh, page_size=config.page_size,
                                        kv_dtype=config.kv_dtype).kv_page_bytes_per_device
  if config.num_pages is not None:
    num_pages, budget, setting = config.num_pages, config.num_pages * page_bytes, "num_pages"
  else:
    stats = jax.local_devices()[0].memory_stats() or {}
    if config.kv_cache_bytes is not None:
      budget, setting = config.kv_cache_bytes, "kv_cache_bytes"
    elif "bytes_limit" in stats:
      budget = (config.memory_fraction * stats["bytes_limit"]
                - stats.get("bytes_in_use", 0))
      setting = (f"memory_fraction (now {config.memory_fraction} of "
                 f"{stats['bytes_limit'] / 2**30:.1f} GiB, "
                 f"{stats.get('bytes_in_use', 0) / 2**30:.1f} GiB already in use)")
    else:
      budget, setting = config.cpu_kv_cache_bytes, "cpu_kv_cache_bytes"
    num_pages = int(max(budget, 0) // page_bytes)
  # max_model_len None: it becomes what the pool holds, which must be a page.
  need_pages = 1 if config.max_model_len is None else config.max_pages_per_seq
  if num_pages < need_pages:
    need = need_pages * page_bytes
    raise ValueError(
        f"the KV cache cannot hold one sequence of max_model_len={config.max_model_len} "
        f"tokens: that needs {need / 2**20:.1f} MiB ({need_pages} pages of "
        f"{page_bytes} bytes) and the pool gets {max(budget, 0) / 2**20:.1f} MiB; raise "
        f"{setting} or lower max_model_len")
  return num_pages
