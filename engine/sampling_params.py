"""SamplingParams: how to generate one completion, with vLLM's meanings and ranges.

Built and checked once, when a request is parsed (the server answers a bad value
with a 400 naming the field), then frozen: the engine never changes it, and every
value it holds fits the int32 and float32 device arrays it becomes
(engine/sampler_inputs.py). The structured-outputs field is turned into a
`GrammarSpec` here (engine/grammar_spec.py), so a bad schema fails just as early.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np

from ridgeline.engine.grammar_spec import GrammarSpec

MAX_LOGPROBS = 20
_INT32_MAX = 2**31 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to generate one completion; fields and ranges follow vLLM.

  Frozen: built (and normalised, and validated) once; the engine never changes
  it. `dataclasses.replace(params, seed=...)` makes a changed copy.

  A `seed` of None means the engine picks one at admission; the request is then
  still reproducible within that run (it depends on no other request).
  `max_tokens` None: until a stop or the model length. A request whose prompt plus
  `max_tokens` exceeds the engine's max_model_len fails (vLLM's rule), naming both.
  `top_k` 0 or -1, or any value >= the vocabulary size: all tokens.
  `stop` a string or a list of strings; `stop_token_ids` token ids below the
  vocabulary size (checked by the engine, which knows it).
  `skip_special_tokens`: leave special tokens (EOS, chat markers) out of the text.
  """

  n: int = 1
  max_tokens: int | None = None
  min_tokens: int = 0
  temperature: float = 1.0
  top_k: int = 0  # 0 or -1: all tokens
  top_p: float = 1.0
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  seed: int | None = None
  stop: Sequence[str] | str | None = None
  stop_token_ids: Sequence[int] | None = None
  ignore_eos: bool = False
  logprobs: int | None = None
  # Log-probabilities of the prompt's tokens (vLLM's meaning): None, or k >= 0
  # alternatives per token besides the prompt's own; the first token has none.
  prompt_logprobs: int | None = None
  skip_special_tokens: bool = True
  include_stop_str_in_output: bool = False
  allowed_token_ids: Sequence[int] | None = None  # sample only among these
  # Output that must match a grammar (engine/grammar.py): a GrammarSpec, or
  # vLLM's form {"json": schema} / {"regex": ...} / {"choice": [...]} /
  # {"grammar": ...} / {"json_object": true}, turned into one here.
  structured_outputs: GrammarSpec | Mapping[str, Any] | None = None

  def __post_init__(self):
    # Normalise once (frozen: through object.__setattr__), then validate.
    stop = self.stop
    if stop is None:
      stop = ()
    elif isinstance(stop, str):
      stop = (stop,)
    elif isinstance(stop, (list, tuple)):
      stop = tuple(stop)
    else:
      raise ValueError(f"stop must be a string or a list of strings, got {stop!r}")
    object.__setattr__(self, "stop", stop)
    ids = self.stop_token_ids
    if ids is None:
      ids = ()
    elif isinstance(ids, (list, tuple, np.ndarray)):
      ids = tuple(int(t) if isinstance(t, np.integer) else t for t in ids)
    else:
      raise ValueError(f"stop_token_ids must be a list of token ids, got {ids!r}")
    object.__setattr__(self, "stop_token_ids", ids)
    allowed = self.allowed_token_ids
    if allowed is not None:
      if not isinstance(allowed, (list, tuple, np.ndarray)):
        raise ValueError(f"allowed_token_ids must be a list of token ids, got {allowed!r}")
      allowed = tuple(int(t) if isinstance(t, np.integer) else t for t in allowed)
    object.__setattr__(self, "allowed_token_ids", allowed)
    if self.top_k == -1:
      object.__setattr__(self, "top_k", 0)
    object.__setattr__(self, "structured_outputs",
                       GrammarSpec.from_structured_outputs(self.structured_outputs))
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first parameter outside its allowed range."""
    def bad(name, allowed):
      raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

    def is_int(v):
      return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    # Every integer below reaches an int32 device array (or a count of them).
    if not is_int(self.n) or not 1 <= self.n <= _INT32_MAX:
      bad("n", "an integer >= 1")
    if self.max_tokens is not None and (not is_int(self.max_tokens)
                                        or not 0 <= self.max_tokens <= _INT32_MAX):
      bad("max_tokens", "an integer >= 1 (or None: up to the model length)")
    if self.max_tokens == 0 and self.prompt_logprobs is None:
      bad("max_tokens", "an integer >= 1 (0 only to score a prompt: with prompt_logprobs)")
    if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= _INT32_MAX:
      bad("min_tokens", "an integer >= 0")
    if self.max_tokens is not None and self.min_tokens > self.max_tokens:
      bad("min_tokens", f"<= max_tokens ({self.max_tokens})")
    if not _finite32(self.temperature) or self.temperature < 0:
      bad("temperature", "a finite number >= 0 (0 = greedy)")
    if not is_int(self.top_k) or self.top_k < 0:
      bad("top_k", "an integer >= 1, or 0 / -1 for all tokens")
    if not _finite32(self.top_p) or not 0 < self.top_p <= 1:
      bad("top_p", "in (0, 1]")
    if not _finite32(self.min_p) or not 0 <= self.min_p <= 1:
      bad("min_p", "in [0, 1]")
    if (not _finite32(self.repetition_penalty) or self.repetition_penalty <= 0
        or np.float32(self.repetition_penalty) == 0):
      bad("repetition_penalty", "a number > 0 (1 = off)")
    if not _finite32(self.presence_penalty) or not -2 <= self.presence_penalty <= 2:
      bad("presence_penalty", "in [-2, 2]")
    if not _finite32(self.frequency_penalty) or not -2 <= self.frequency_penalty <= 2:
      bad("frequency_penalty", "in [-2, 2]")
    if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
      bad("seed", "an integer in [0, 2**63) or None")
    if not all(isinstance(s, str) and s for s in self.stop):
      bad("stop", "a string or a list of non-empty strings")
    if not all(is_int(t) and 0 <= t <= _INT32_MAX for t in self.stop_token_ids):
      bad("stop_token_ids", "a list of token ids in [0, 2**31)")
    if self.logprobs is not None and (not is_int(self.logprobs)
                                      or not 0 <= self.logprobs <= MAX_LOGPROBS):
      bad("logprobs", f"an integer in [0, {MAX_LOGPROBS}] or None")
    if self.prompt_logprobs is not None and (
        not is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
      bad("prompt_logprobs", f"an integer in [0, {MAX_LOGPROBS}] or None")
    if self.allowed_token_ids is not None and (
        not self.allowed_token_ids or not all(is_int(t) and t >= 0 for t in self.allowed_token_ids)):
      bad("allowed_token_ids", "a non-empty list of token ids >= 0, or None")
    for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
      if not isinstance(getattr(self, name), bool):
        bad(name, "true or false")

  @property
  def uses_penalties(self) -> bool:
    return (self.repetition_penalty != 1 or self.presence_penalty != 0
            or self.frequency_penalty != 0)

  @classmethod
  def from_dict(cls, d: dict) -> "SamplingParams":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown sampling parameters {sorted(unknown)}; known: {sorted(known)}")
    return cls(**d)


def _finite32(x) -> bool:
  """A real number that stays finite as the float32 the sampler computes in."""
  if not isinstance(x, (int, float, np.number)) or isinstance(x, bool):
    return False
  return bool(abs(x) <= _FLOAT32_MAX)

