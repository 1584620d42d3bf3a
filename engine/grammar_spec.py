"""What a request asked its output to match: `GrammarSpec`, checked when the request is parsed.

`GrammarSpec` is the first of structured outputs' three layers (engine/grammar.py
tells the whole story): a kind and its source text, frozen and hashable so it can
sit in a frozen `SamplingParams` and key a cache. Its constructors
(`GrammarSpec.json_schema(schema, field)`, `.regex`, `.choice`, `.grammar`,
`.json_object`, `from_response_format`, `from_structured_outputs`) check the
input without a tokenizer, and raise a `GrammarError` (a ValueError) that starts
with the request field ("response_format.json_schema.schema.properties.age:
Invalid type: integr"), so a bad schema is a 400 before anything is queued. The
same error wording (`clean_error`, `describe_error`) serves the compiler and the
matchers, which meet the backend's messages later.

Details the spec decides:

- JSON is laid out one way (JSON_FORMAT: `json.dumps`'s ", " and ": ", no
  other whitespace): under a grammar that allows free whitespace a small model
  loops on it (the default model at temperature 0.7 filled 2 of 200 documents
  with runs of 32 newlines between every pair of tokens until max_tokens, when
  32 characters in one place were allowed; llguidance's own default is
  unbounded). A schema's own "x-guidance" overrides it.
- Property order: both backends emit object properties in the schema's order,
  so the canonical schema text keeps its key order (it is not sorted).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import llguidance

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# vLLM's `structured_outputs` fields (and `guided_<key>` in its older API).
STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")
# Fields of vLLM's StructuredOutputsParams that choose its own machinery, not
# the constraint: accepted and ignored.
IGNORED_KEYS = ("backend", "disable_fallback", "disable_any_whitespace",
                "disable_additional_properties", "whitespace_pattern")

# How JSON output is laid out (llguidance's JSON options): as json.dumps writes
# it, '{"a": 1, "b": [2, 3]}', and no other whitespace. A schema's own
# "x-guidance": {...} overrides it (e.g. {"whitespace_flexible": true}).
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
  """A structured-output request the backend cannot serve; the message starts
  with the request field it came from."""


@dataclasses.dataclass(frozen=True)
class GrammarSpec:
  """What a request asked its output to match.

  kind: one of KINDS. source: for "json_schema" the schema as canonical JSON
  text (compact separators, key order kept: properties are generated in
  schema order); "regex" the pattern (Rust regex syntax: no look-around or
  backreferences; anchored at both ends whether or not it says ^ $); "choice"
  a tuple of the allowed strings; "grammar" Lark (llguidance's dialect, which
  can embed `%json {...}` schemas) or GBNF text; "json_object" nothing.

  Build one with the constructors below, which check the source and name the
  request field in their errors; the bare constructor only checks types.
  """

  kind: str
  source: str | tuple[str, ...] = ""

  def __post_init__(self):
    if self.kind not in KINDS:
      raise GrammarError(f"grammar kind must be one of {KINDS}, got {self.kind!r}")
    if self.kind == "choice":
      if (not isinstance(self.source, tuple) or not self.source
          or not all(isinstance(c, str) for c in self.source)):
        raise GrammarError(f"a choice grammar's source must be a non-empty tuple of "
                           f"strings, got {self.source!r}")
    elif not isinstance(self.source, str):
      raise GrammarError(f"a {self.kind} grammar's source must be a string, "
                         f"got {type(self.source).__name__}")

  def __repr__(self) -> str:
    source = repr(self.source)
    return f"GrammarSpec({self.kind!r}, {source[:60] + '...' if len(source) > 60 else source})"

  # -- Constructors: each checks the input and names `field` in its errors ----

  @classmethod
  def json_schema(cls, schema: Mapping[str, Any] | bool | str,
                  field: str = "json_schema") -> GrammarSpec:
    """A JSON Schema given as a dict, JSON text, or a boolean (`true`: any JSON)."""
    if isinstance(schema, str):
      try:
        schema = json.loads(schema)
      except json.JSONDecodeError as e:
        raise GrammarError(f"{field}: not valid JSON: {e}") from None
    if schema is True:
      schema = {}
    elif schema is False:
      raise GrammarError(f"{field}: the schema `false` matches nothing")
    if not isinstance(schema, Mapping):
      raise GrammarError(f"{field}: a JSON Schema must be an object, "
                         f"got {type(schema).__name__}")
    try:
      text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
      raise GrammarError(f"{field}: not JSON-serializable: {e}") from None
    return cls("json_schema", text)._validated(field, schema)

  @classmethod
  def json_object(cls) -> GrammarSpec:
    """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
    return cls("json_object")

  @classmethod
  def regex(cls, pattern: str, field: str = "regex") -> GrammarSpec:
    if not isinstance(pattern, str):
      raise GrammarError(f"{field}: a regex must be a string, got {type(pattern).__name__}")
    return cls("regex", pattern)._validated(field)

  @classmethod
  def choice(cls, choices: Sequence[str], field: str = "choice") -> GrammarSpec:
    """Exactly one of `choices` (duplicates dropped, order kept)."""
    if isinstance(choices, str) or not isinstance(choices, Sequence) or not choices:
      raise GrammarError(f"{field}: must be a non-empty list of strings, got {choices!r}")
    for i, choice in enumerate(choices):
      if not isinstance(choice, str):
        raise GrammarError(f"{field}[{i}]: must be a string, got {type(choice).__name__}")
    return cls("choice", tuple(dict.fromkeys(choices)))._validated(field)

  @classmethod
  def grammar(cls, text: str, field: str = "grammar") -> GrammarSpec:
    """A Lark grammar (its `start` rule) or a GBNF one (its `root` rule)."""
    if not isinstance(text, str) or not text.strip():
      raise GrammarError(f"{field}: must be a non-empty grammar text, got {text!r}")
    return cls("grammar", text)._validated(field)

  @classmethod
  def from_response_format(cls, response_format: Mapping[str, Any] | None,
                           field: str = "response_format") -> GrammarSpec | None:
    """OpenAI's `response_format`: {"type": "text"} (None: unconstrained),
    {"type": "json_object"}, or {"type": "json_schema", "json_schema":
    {"name": ..., "schema": {...}, "strict": ...}} (always enforced)."""
    if response_format is None:
      return None
    if not isinstance(response_format, Mapping):
      raise GrammarError(f"{field}: must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
      return None
    if kind == "json_object":
      return cls.json_object()
    if kind == "json_schema":
      body = response_format.get("json_schema")
      if not isinstance(body, Mapping):
        raise GrammarError(f"{field}.json_schema: must be an object with a `schema`, "
                           f"got {body!r}")
      if "schema" not in body:
        raise GrammarError(f"{field}.json_schema.schema: is required")
      return cls.json_schema(body["schema"], f"{field}.json_schema.schema")
    raise GrammarError(f"{field}.type: must be 'text', 'json_object' or 'json_schema', "
                       f"got {kind!r}")

  @classmethod
  def from_structured_outputs(cls, value: Mapping[str, Any] | GrammarSpec | None,
                              field: str = "structured_outputs") -> GrammarSpec | None:
    """vLLM's `structured_outputs`: an object with exactly one of "json" (a schema,
    as an object or JSON text), "regex", "choice", "grammar" or "json_object":
    true. A GrammarSpec passes through; None is unconstrained."""
    if value is None or isinstance(value, GrammarSpec):
      return value
    if not isinstance(value, Mapping):
      raise GrammarError(f"{field}: must be an object with one of {STRUCTURED_KEYS}, "
                         f"got {type(value).__name__}")
    unknown = sorted(set(value) - set(STRUCTURED_KEYS) - set(IGNORED_KEYS))
    if unknown:
      raise GrammarError(f"{field}: unknown keys {unknown}; known: {list(STRUCTURED_KEYS)}")
    given = [k for k in STRUCTURED_KEYS if value.get(k) not in (None, False)]
    if len(given) != 1:
      raise GrammarError(f"{field}: give exactly one of {list(STRUCTURED_KEYS)}, got "
                         f"{given or 'none'}")
    key = given[0]
    body, at = value[key], f"{field}.{key}"
    if key == "json":
      return cls.json_schema(body, at)
    if key == "json_object":
      if body is not True:
        raise GrammarError(f"{at}: must be true, got {body!r}")
      return cls.json_object()
    return {"regex": cls.regex, "choice": cls.choice, "grammar": cls.grammar}[key](body, at)

  # -- The backend's form ----------------------------------------------------

  def backend_grammar(self) -> str:
    """The llguidance grammar (JSON text) for this spec."""
    if self.kind in ("json_schema", "json_object"):
      schema = self.source if self.kind == "json_schema" else '{"type":"object"}'
      return llguidance.LLMatcher.grammar_from_json_schema(
          schema, defaults=JSON_FORMAT)
    if self.kind == "regex":
      return llguidance.LLMatcher.grammar_from_regex(self.source)
    if self.kind == "choice":
      # JSON string escapes are Lark's too ("\"", "\\", "\n", "\u00fc").
      return llguidance.LLMatcher.grammar_from_lark(
          "start: " + " | ".join(json.dumps(c) for c in self.source))
    return llguidance.LLMatcher.grammar_from_lark(self._lark())

  def _lark(self) -> str:
    from llguidance.gbnf_to_lark import any_to_lark
    return any_to_lark(self.source)  # Lark passes through; GBNF is converted.

  def _validated(self, field: str, schema: Any = None) -> GrammarSpec:
    """Checks the spec with the backend, without a tokenizer (0.6 ms for the
    1.1 kB schema above: parsing, canonical text and grammar)."""
    try:
      grammar = self.backend_grammar()
    except Exception as e:  # the GBNF converter and the schema parser raise their own
      raise GrammarError(f"{field}: {clean_error(str(e), self.kind)}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
      raise GrammarError(describe_error(messages[0], self, field, schema))
    return self



def clean_error(message: str, kind: str) -> str:
  """One line from llguidance's message: no state dump, no echo of the
  generated Lark source, no positions in it (they are not the user's text)."""
  text = message.split("<state>")[0]
  if "regex parse error" in text:
    lines = [line.strip() for line in text.splitlines()]
    at = next(i for i, line in enumerate(lines) if "regex parse error" in line)
    pattern = lines[at + 1] if at + 1 < len(lines) else ""
    error = next((line[len("error:"):].strip() for line in lines if line.startswith("error:")),
                 "")
    return f"invalid regex {pattern!r}: {error}" if error else f"invalid regex {pattern!r}"
  lines = [line.strip() for line in text.splitlines()
           if line.strip() and not re.fullmatch(r"\s*\^\s*", line)
           and not re.match(r"\s*\d+ \| ", line)]
  text = " ".join(lines)
  if kind != "grammar":
    text = re.sub(r"^at \d+\(\d+\): ", "", text)
  return text


_UNSUPPORTED = ("Unimplemented keys", "Unknown format")


def describe_error(message: str, spec: GrammarSpec, field: str, schema: Any = None) -> str:
  """The error for `field`: where in the schema, when the message lets us find
  it, and whether it is the schema's fault or a limit of the backend."""
  text = clean_error(message, spec.kind)
  if spec.kind == "json_schema":
    if schema is None:
      schema = json.loads(spec.source)
    field += _locate(schema, text)
    if text.startswith(_UNSUPPORTED):
      text = (f"not supported by the grammar backend (llguidance "
              f"{llguidance.__version__}): {text}")
  return f"{field}: {text}"


_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains",
              "propertyNames", "unevaluatedProperties", "unevaluatedItems",
              "additionalItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions",
                   "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_VALUE_KEYS = ("type", "format", "pattern", "$ref")


def _walk(node: Any, path: str = ""):
  """(path, subschema) for every subschema, depth first, parents first."""
  if not isinstance(node, Mapping):
    return
  yield path, node
  for key in _SUBSCHEMA_MAPS:
    if isinstance(node.get(key), Mapping):
      for name, sub in node[key].items():
        part = f".{name}" if re.fullmatch(r"[A-Za-z_$][\w$-]*", name) else f"[{name!r}]"
        yield from _walk(sub, f"{path}.{key}{part}")
  for key in _SUBSCHEMA:
    yield from _walk(node.get(key), f"{path}.{key}")
  for key in _SUBSCHEMA_LISTS:
    if isinstance(node.get(key), list):
      for i, sub in enumerate(node[key]):
        yield from _walk(sub, f"{path}.{key}[{i}]")


def _locate(schema: Any, message: str) -> str:
  """The path of the first subschema the message points at ("" if none): one
  that has a keyword the message quotes ('minLength', ["not"]), or a `type`,
  `format`, `pattern` or `$ref` whose value the message repeats."""
  quoted = set(re.findall(r"""['"]([^'"]+)['"]""", message))
  for path, node in _walk(schema):
    for key, value in node.items():
      if key in quoted:
        return path
      if (key in _VALUE_KEYS and isinstance(value, str) and len(value) > 1
          and value.lstrip("#") in message):
        return path
  return ""

