"""Input records and output records of the batch job.

Input: `JsonlSource` (a random-access grain data source over a JSONL file's
non-blank lines) and `parse_line` (one line -> an `Item`: Ridgeline's own format,
OpenAI batch-file lines, or an error). Output: the record of one finished request,
in Ridgeline's format or OpenAI's batch output format (frontends/openai_format.py).
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import json
import os
from typing import Any

import grain

from ridgeline.frontends import openai_format as oaf
from ridgeline.engine.sampling import SamplingParams


_EXPECTED_LINE = ('each line must be a JSON object such as {"prompt": "text"}, '
                  '{"prompt": [token ids]} or {"messages": [{"role": "user", "content": '
                  '"text"}]}')


class JsonlSource:
  """grain RandomAccessDataSource over the non-blank lines of a JSONL file.

  Element i is `(line_number, raw_bytes)`, line numbers 1-based as editors show
  them. The offset index is built once, by one pass over the file.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    starts, lengths, numbers = array.array("q"), array.array("q"), array.array("q")
    offset = 0
    with open(self.path, "rb") as f:
      for number, raw in enumerate(f, 1):
        if raw.strip():
          starts.append(offset)
          lengths.append(len(raw))
          numbers.append(number)
        offset += len(raw)
    self._starts, self._lengths, self._numbers = starts, lengths, numbers
    self._fd = os.open(self.path, os.O_RDONLY)

  def __len__(self) -> int:
    return len(self._starts)

  def __getitem__(self, index: int) -> tuple[int, bytes]:
    # pread: safe from any grain reader thread, no shared file position.
    return (self._numbers[index],
            os.pread(self._fd, self._lengths[index], self._starts[index]))

  def __repr__(self) -> str:
    return f"JsonlSource({self.path!r})"

  def __del__(self):
    fd = getattr(self, "_fd", None)
    if fd is not None:
      os.close(fd)


@dataclasses.dataclass
class Item:
  """One input line, parsed. `error` set means it cannot run."""

  line: int
  id: str | int | None
  prompt: Any = None
  params: SamplingParams | None = None
  error: str | None = None
  # "chat" or "completion" for an OpenAI Batch API line (it gets an OpenAI output
  # line); None for Ridgeline's own lines.
  api: str | None = None
  top_logprobs: int | None = None  # OpenAI lines: how many alternatives to report
  error_code: str | None = None
  echo: bool = False  # OpenAI completions lines: the prompt (and its logprobs) echoed

  @property
  def key(self) -> str | None:
    return None if self.id is None else str(self.id)


def id_digest(rid) -> int:
  """A small stand-in for an id, checked when resuming; 31 bits, so it survives
  a broadcast as int32 (JAX's default integer)."""
  if rid is None:
    return -1
  return int.from_bytes(hashlib.blake2b(str(rid).encode(), digest_size=4).digest(),
                        "little") % 2**31


def derive_seed(job_seed: int, key: str) -> int:
  digest = hashlib.blake2b(f"{job_seed}\0{key}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") % 2**63


def _looks_openai(raw: bytes) -> bool:
  """Whether an unparseable line was meant as an OpenAI Batch API request."""
  return b'"custom_id"' in raw or b'"url"' in raw


def parse_line(line: int, raw: bytes, default_sampling: dict | None = None,
               seed: int = 0) -> Item:
  """One JSONL line -> Item. Never raises for bad input; sets `error` instead.

  Three kinds of line: Ridgeline's own (`id`, `prompt` or `messages`, `sampling`);
  OpenAI Batch API requests (`custom_id`, `method`, `url`, `body`), which get
  OpenAI batch output lines; and bare `custom_id` + `body` lines (no `url`), read
  as OpenAI bodies but answered in Ridgeline's format, as before."""
  try:
    obj = json.loads(raw)
  except ValueError as e:  # includes invalid UTF-8
    return Item(line, None, error=f"line {line}: not JSON ({e}); {_EXPECTED_LINE}",
                api="completion" if _looks_openai(raw) else None,
                error_code="invalid_json_line")
  if not isinstance(obj, dict):
    return Item(line, None,
                error=f"line {line}: expected a JSON object, got {type(obj).__name__}; "
                      f"{_EXPECTED_LINE}")
  batch_api = "url" in obj or "method" in obj
  openai = batch_api or "custom_id" in obj or "body" in obj
  rid = obj.get("custom_id") if openai else obj.get("id")
  if rid is None:
    rid = f"line-{line}"
  elif not isinstance(rid, (str, int)) or isinstance(rid, bool):
    return Item(line, None, error=f"line {line}: {'custom_id' if openai else 'id'} must be "
                                  f"a string or an integer, got {rid!r}",
                api="completion" if batch_api else None, error_code="invalid_custom_id")
  item = Item(line, rid)

  def fail(msg: str, code: str = "invalid_request") -> Item:
    item.error = f"line {line}: {msg}"
    item.error_code = code
    return item

  sampling = dict(default_sampling or {})
  body = obj
  kind = None
  if batch_api:
    url = obj.get("url")
    item.api = oaf.URLS.get(url, "completion")
    unknown = sorted(set(obj) - {"custom_id", "method", "url", "body"})
    if url not in oaf.URLS:
      return fail(f"url {url!r} is not supported; use one of {sorted(oaf.URLS)}",
                  "invalid_url")
    if obj.get("method", "POST") != "POST":
      return fail(f"method {obj.get('method')!r} is not supported; use 'POST'",
                  "invalid_method")
    if unknown:
      return fail(f"unknown fields {unknown}; an OpenAI batch line has custom_id, method, "
                  "url and body")
    kind = item.api
  if openai:
    body = obj.get("body")
    if not isinstance(body, dict):
      return fail("an OpenAI batch line needs a 'body' object")
    if kind is None:
      kind = "chat" if "messages" in body else "completion"
    try:
      parsed = oaf.parse_request(kind, body, sampling)
    except oaf.OpenAIError as e:
      return fail(f"body: {e.message}", e.code or "invalid_request")
    if len(parsed.prompts) != 1:
      return fail("body.prompt: a batch line takes one prompt, got "
                  f"{len(parsed.prompts)}")
    item.prompt, params = parsed.prompts[0], parsed.params
    item.top_logprobs, item.echo = parsed.top_logprobs, parsed.echo
    overrides = None if batch_api else obj.get("sampling")
    if overrides is not None:
      if not isinstance(overrides, dict):
        return fail(f"'sampling' must be an object, got {type(overrides).__name__}")
      try:
        fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
        params = SamplingParams.from_dict({**fields, **overrides})
      except (ValueError, TypeError) as e:
        return fail(f"invalid sampling parameters: {e}")
  else:
    overrides = obj.get("sampling")
    if overrides is not None:
      if not isinstance(overrides, dict):
        return fail(f"'sampling' must be an object, got {type(overrides).__name__}")
      sampling.update(overrides)
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    if has_prompt and has_messages:
      return fail("give 'prompt' or 'messages', not both")
    if not (has_prompt or has_messages):
      return fail("no prompt: a line needs 'prompt' (text or token ids) or 'messages' (chat)")
    prompt = body["prompt"] if has_prompt else body["messages"]
    if has_messages and not (isinstance(prompt, list) and prompt
                             and all(isinstance(m, dict) for m in prompt)):
      return fail("'messages' must be a non-empty list of {'role', 'content'} objects")
    if has_prompt and not isinstance(prompt, (str, list)):
      return fail("'prompt' must be a string or a list of token ids, "
                  f"got {type(prompt).__name__}")
    if has_prompt and len(prompt) == 0:
      return fail("empty prompt")
    item.prompt = prompt
    try:
      params = SamplingParams.from_dict(sampling)
    except (ValueError, TypeError) as e:
      return fail(f"invalid sampling parameters: {e}")
  if params.seed is None:  # SamplingParams is frozen: a copy with the derived seed
    params = dataclasses.replace(params, seed=derive_seed(seed, item.key))
  item.params = params
  return item


def make_dataset(path: str | os.PathLike, default_sampling: dict | None = None,
                 seed: int = 0, shard: grain.sharding.ShardOptions | None = None,
                 ) -> grain.MapDataset:
  """The input pipeline: JSONL lines -> this process's shard -> parsed Items."""
  ds = grain.MapDataset.source(JsonlSource(path))
  if shard is not None and shard.shard_count > 1:
    # Strided, so each process gets a fair mix of the file (similar lines cluster).
    ds = ds.slice(slice(shard.shard_index, None, shard.shard_count))
  return ds.map(lambda x: parse_line(x[0], x[1], default_sampling, seed))


def parse_record(raw: bytes) -> dict | None:
  """A complete output record (a dict with its input line), or None for a torn or
  foreign line."""
  if not raw.endswith(b"\n"):
    return None
  try:
    record = json.loads(raw)
  except ValueError:
    return None
  if not isinstance(record, dict) or not isinstance(record.get("line"), int):
    return None
  return record


def encode_record(record: dict) -> bytes:
  """One output line: the record as JSON and its newline."""
  return json.dumps(record, ensure_ascii=False).encode("utf-8", "replace") + b"\n"


def error_record(item: Item, error: str, code: str | None = None) -> dict:
  if item.api is not None:
    return openai_error_record(item.line, item.id, error, code or item.error_code
                               or "invalid_request")
  return {"id": item.id, "line": item.line, "finish_reason": "error", "error": error}


# OpenAI Batch API output lines: {"id", "custom_id", "response": {"status_code",
# "request_id", "body"}, "error": {"code", "message"} | null}, plus two fields of
# Ridgeline's that OpenAI's readers ignore: "line" (what resuming and merging key
# on) and "metrics" (the request's latencies, for the summary).


def _openai_ids(line: int, custom_id) -> tuple[str, str]:
  """Stable ids for a line, so a rerun writes the same ones."""
  h = hashlib.blake2b(f"{line}\0{custom_id}".encode(), digest_size=12).hexdigest()
  return f"batch_req_{h}", f"req_{h}"


def openai_error_record(line: int, custom_id, message: str, code: str) -> dict:
  batch_id, _ = _openai_ids(line, custom_id)
  return {"id": batch_id, "custom_id": custom_id, "response": None,
          "error": {"code": code, "message": message}, "line": line}


def _openai_result_record(item: Item, out, token_text, model_name: str) -> dict:
  batch_id, request_id = _openai_ids(item.line, item.id)
  prefix = "chatcmpl-" if item.api == "chat" else "cmpl-"
  body = oaf.response_body(item.api, [out], model_name, token_text, item.top_logprobs,
                           request_id=prefix + batch_id[len("batch_req_"):],
                           echo_prompts=[item.prompt] if item.echo else None)
  m = out.metrics
  return {"id": batch_id, "custom_id": item.id,
          "response": {"status_code": 200, "request_id": request_id, "body": body},
          "error": None, "line": item.line,
          "metrics": {"queue_s": _round(m.queue_time), "ttft_s": _round(m.ttft),
                      "tpot_s": _round(m.tpot), "e2e_s": _round(m.e2e)}}


def record_view(record: dict) -> dict:
  """What resuming, merging and the summary read from a record, whichever format:
  id (the input's id / custom_id), line, finish_reason, token counts, metrics."""
  if "custom_id" not in record:
    return record
  view = {"id": record.get("custom_id"), "line": record.get("line"),
          "metrics": record.get("metrics"), "openai": True}
  body = (record.get("response") or {}).get("body") or {}
  if record.get("error") or not body.get("choices"):
    view["finish_reason"] = "error"
    return view
  usage = body.get("usage") or {}
  view.update(finish_reason=body["choices"][0].get("finish_reason"),
              prompt_tokens=usage.get("prompt_tokens", 0),
              completion_tokens=usage.get("completion_tokens", 0))
  lp = body["choices"][0].get("logprobs") or {}
  scored = (lp.get("token_logprobs") or [])[:usage.get("prompt_tokens", 0)]
  if scored and scored[0] is None:  # echo with logprobs: the prompt's own come first
    view["prompt_logprob"] = sum(scored[1:])
    view["prompt_scored_tokens"] = len(scored) - 1
  return view


def _round(x: float | None) -> float | None:
  return None if x is None else round(x, 6)


def _completion(c, with_token_ids: bool) -> dict:
  out = {"text": c.text, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
         "completion_tokens": len(c.token_ids)}
  if with_token_ids:
    out["token_ids"] = list(c.token_ids)
  if c.logprobs is not None:
    # The sampled token first, then the top-k (which may include it again).
    out["logprobs"] = [
        {"token_id": t, "logprob": lp.get(t), "top": {str(k): v for k, v in lp.items()}}
        for t, lp in zip(c.token_ids, c.logprobs)]
  return out


def refused_record(item: Item, error: str | None) -> dict:
  """The record of a line the engine refused or failed (`error`: its message)."""
  code = None
  if item.api is not None:
    code = oaf.engine_error(error or "", item.api).code or "invalid_request"
  return error_record(item, f"line {item.line}: {error}", code)


def result_record(item: Item, out, with_token_ids: bool, token_text=None,
                  model_name: str = "ridgeline") -> dict:
  if out.error is not None or out.finish_reason == "error":
    return refused_record(item, out.error)
  if item.api is not None:
    return _openai_result_record(item, out, token_text or oaf.TokenText(None), model_name)
  first = _completion(out.outputs[0], with_token_ids)
  record = {"id": item.id, "line": item.line, "text": first.pop("text"),
            "finish_reason": first.pop("finish_reason"),
            "stop_reason": first.pop("stop_reason"),
            "prompt_tokens": len(out.prompt_token_ids),
            "completion_tokens": sum(len(c.token_ids) for c in out.outputs)}
  first.pop("completion_tokens")
  record.update(first)
  if len(out.outputs) > 1:
    record["choices"] = [dict(index=c.index, **_completion(c, with_token_ids))
                         for c in out.outputs]
  if out.prompt_logprobs is not None:
    # Each prompt token's log-probability (the first has none) and the top
    # alternatives asked for; their sum and count give the line's perplexity.
    ids = out.prompt_token_ids
    record["prompt_logprobs"] = [None] + [
        {"token_id": t, "logprob": lp[t], "top": {str(k): v for k, v in lp.items()}}
        for t, lp in zip(ids[1:], out.prompt_logprobs[1:])]
    record["prompt_logprob"] = sum(lp[t] for t, lp in zip(ids[1:], out.prompt_logprobs[1:]))
    record["prompt_scored_tokens"] = len(ids) - 1
  m = out.metrics
  record["metrics"] = {"queue_s": _round(m.queue_time), "ttft_s": _round(m.ttft),
                       "tpot_s": _round(m.tpot), "e2e_s": _round(m.e2e)}
  return record
