"""Offline batch generation: a JSONL file of prompts in, a JSONL file of completions out.

```python
job = BatchJob(input="prompts.jsonl", output="out.jsonl",
               default_sampling={"temperature": 0, "max_tokens": 256})
summary = run_batch(engine, job)
```

The story of one job:

1. The input is read through grain: `JsonlSource` is a random-access data source
   over the file's non-blank lines (a line-offset index built once), wrapped in a
   `grain.MapDataset`. A multi-process job gives each process every
   `process_count`-th line (grain's `ShardOptions`, applied as a strided slice),
   and each process writes its own part, `OUTPUT.part-00000-of-00002`. (An engine
   that is one program over several JAX processes runs the job in lockstep instead:
   see `BatchJob.lockstep`.)
2. Each line is parsed into an `Item`: an id (its own, or `line-N` from its 1-based
   line number), a prompt (text, token ids or chat messages) and SamplingParams (the
   job's defaults, overridden by the line's `sampling` object, or by the fields of an
   OpenAI batch-file `body`). A line that cannot run becomes an error record; it
   never stops the job.
3. The engine is fed incrementally: at most `max_in_flight` requests are queued or
   running; as each finishes, its record is appended to the output and the request
   is released, and the next lines are pulled from the dataset.
4. Exactly once: every batch of finished records goes to the file in one `write`
   followed by `fsync`. On start the output is read back; a torn tail (no final
   newline, or a line that does not parse) is truncated away, and the lines already
   there are skipped. Error records count as done (they are deterministic). So the
   job may be killed at any instant, SIGKILL included, and rerun with the same input.
5. When the input is exhausted the output is rewritten (atomically) in input order,
   parts are merged once every part is complete, and a summary is printed and
   written to `OUTPUT.summary.json`.

A line's seed, when neither the line nor the job's defaults give one, is derived
from the job seed and the line's id, so sampled outputs do not depend on how the
job was sharded, resumed or batched.

Output records (one per non-blank input line):

  {"id", "line", "text", "finish_reason", "stop_reason", "prompt_tokens",
   "completion_tokens", "token_ids", "logprobs"?, "choices"? (n > 1),
   "metrics": {"queue_s", "ttft_s", "tpot_s", "e2e_s"}}
  {"id", "line", "finish_reason": "error", "error"}

OpenAI Batch API request lines (`custom_id`, `method`, `url`, `body`) get OpenAI
batch output lines instead (the objects are built by engine/openai_format.py, as
the server's responses are):

  {"id": "batch_req_...", "custom_id", "response": {"status_code": 200,
   "request_id", "body": chat.completion | text_completion}, "error": null,
   "line", "metrics"}
  {"id", "custom_id", "response": null, "error": {"code", "message"}, "line"}

`line` and `metrics` are Ridgeline's additions (resuming and merging key on the
line; OpenAI readers ignore unknown fields).
"""

from __future__ import annotations

import array
import collections
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import sys
import time
from typing import Any, Iterable, Sequence

import grain
import numpy as np

from engine import openai_format as oaf
from engine.sampling import SamplingParams

__all__ = ["BatchJob", "JsonlSource", "Item", "parse_line", "make_dataset", "ResultWriter",
           "run_batch", "merge_parts", "part_path", "summary_path", "format_summary",
           "read_records"]

_PERCENTILES = (50, 90, 99)
try:  # raised by engines with a bounded waiting queue
  from engine.engine import CapacityError as _CapacityError
except ImportError:
  class _CapacityError(Exception):
    pass


# Input ---------------------------------------------------------------------------


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

  @property
  def key(self) -> str | None:
    return None if self.id is None else str(self.id)


def _id_digest(rid) -> int:
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
    return Item(line, None, error=f"line {line}: malformed JSON: {e}",
                api="completion" if _looks_openai(raw) else None,
                error_code="invalid_json_line")
  if not isinstance(obj, dict):
    return Item(line, None,
                error=f"line {line}: expected a JSON object, got {type(obj).__name__}")
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
    item.top_logprobs = parsed.top_logprobs
    overrides = None if batch_api else obj.get("sampling")
    if overrides is not None:
      if not isinstance(overrides, dict):
        return fail(f"'sampling' must be an object, got {type(overrides).__name__}")
      try:
        params = SamplingParams.from_dict({**dataclasses.asdict(params), **overrides})
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
  if params.seed is None:
    params.seed = derive_seed(seed, item.key)
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


# Output --------------------------------------------------------------------------


def part_path(output: str, index: int, count: int) -> str:
  return f"{output}.part-{index:05d}-of-{count:05d}"


def summary_path(output: str) -> str:
  return output + ".summary.json"


class Tally:
  """What the records of an output add up to."""

  def __init__(self):
    self.requests = self.errors = self.prompt_tokens = self.output_tokens = 0
    self.finish_reasons = collections.Counter()
    self.latency = {k: array.array("d") for k in ("queue_s", "ttft_s", "tpot_s", "e2e_s")}

  def add(self, record: dict) -> None:
    record = _record_view(record)
    self.requests += 1
    self.finish_reasons[record.get("finish_reason")] += 1
    if record.get("finish_reason") == "error":
      self.errors += 1
      return
    self.prompt_tokens += record.get("prompt_tokens") or 0
    self.output_tokens += record.get("completion_tokens") or 0
    for k, v in (record.get("metrics") or {}).items():
      if k in self.latency and v is not None:
        self.latency[k].append(v)

  def as_dict(self) -> dict:
    out = {"requests": self.requests, "ok": self.requests - self.errors,
           "errors": self.errors, "prompt_tokens": self.prompt_tokens,
           "output_tokens": self.output_tokens,
           "finish_reasons": dict(sorted((str(k), v) for k, v in self.finish_reasons.items()))}
    for k, values in self.latency.items():
      out[k] = _percentiles(values)
    return out


def _percentiles(values) -> dict | None:
  if not len(values):
    return None
  a = np.asarray(values)
  out = {f"p{p}": float(np.percentile(a, p)) for p in _PERCENTILES}
  out["mean"] = float(a.mean())
  return out


def _iter_lines(path: str) -> Iterable[tuple[int, bytes]]:
  """(offset, line) for each line of a file, the last one possibly unterminated."""
  offset = 0
  with open(path, "rb") as f:
    for raw in f:
      yield offset, raw
      offset += len(raw)


def _parse_record(raw: bytes) -> dict | None:
  if not raw.endswith(b"\n"):
    return None
  try:
    record = json.loads(raw)
  except ValueError:
    return None
  if not isinstance(record, dict) or not isinstance(record.get("line"), int):
    return None
  return record


class ResultWriter:
  """Append-only JSONL output that survives being killed at any instant.

  Holds an exclusive lock on the file (a second job on the same output fails
  fast). On open, keeps the longest prefix of complete, parseable records and
  truncates the rest; `done` maps each kept record's line number to its id's digest.
  """

  def __init__(self, path: str, fsync: bool = True):
    self.path = path
    self.fsync = fsync
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self._fd)
      raise RuntimeError(f"another job is writing {path}") from None
    self.done: dict[int, int] = {}
    self.tally = Tally()
    self.truncated_bytes = 0
    for stale in glob.glob(glob.escape(path) + ".tmp-*"):
      os.remove(stale)  # from a rewrite killed before its rename; we hold the lock
    self._recover()

  def _recover(self) -> None:
    size = os.fstat(self._fd).st_size
    good = 0
    for offset, raw in _iter_lines(self.path):
      record = _parse_record(raw)
      if record is None or record["line"] in self.done:
        break
      self.done[record["line"]] = _id_digest(_record_view(record).get("id"))
      self.tally.add(record)
      good = offset + len(raw)
    if good < size:
      os.ftruncate(self._fd, good)
      os.fsync(self._fd)
      self.truncated_bytes = size - good

  def append(self, records: Sequence[dict]) -> None:
    """Writes records with one write and one fsync; all or (after a crash) a tail
    that the next open truncates."""
    if not records:
      return
    data = b"".join(_dumps(r) for r in records)
    start = os.fstat(self._fd).st_size
    try:
      view = memoryview(data)
      while view:
        view = view[os.write(self._fd, view):]
      if self.fsync:
        os.fsync(self._fd)
    except BaseException:
      os.ftruncate(self._fd, start)  # never leave a torn line in the middle
      raise
    for r in records:
      self.done[r["line"]] = _id_digest(_record_view(r).get("id"))
      self.tally.add(r)

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # releases the lock
      self._fd = None


class _FollowerWriter:
  """What a non-writing process of a lockstep job keeps: the same `done` and tally
  as process 0's ResultWriter, and no file."""

  def __init__(self, path: str):
    self.path = path
    self.done: dict[int, int] = {}
    self.tally = Tally()
    self.truncated_bytes = 0

  def append(self, records: Sequence[dict]) -> None:
    for r in records:
      self.done[r["line"]] = _id_digest(_record_view(r).get("id"))
      self.tally.add(r)

  def close(self) -> None:
    pass


def _agree_on_done(writer) -> None:
  """Lockstep: every process takes process 0's view of what is already written,
  so all of them skip the same lines and submit the same requests."""
  from jax.experimental import multihost_utils
  lines = np.asarray(sorted(writer.done), np.int32)
  n = int(multihost_utils.broadcast_one_to_all(np.asarray([len(lines)], np.int32))[0])
  if len(lines) != n:
    lines = np.zeros(n, np.int32)
  digests = np.asarray([writer.done.get(int(x), -1) for x in lines], np.int32)
  lines, digests = multihost_utils.broadcast_one_to_all((lines, digests))
  writer.done = {int(a): int(b) for a, b in zip(lines, digests)}


def _dumps(record: dict) -> bytes:
  return json.dumps(record, ensure_ascii=False).encode("utf-8", "replace") + b"\n"


def read_records(path: str) -> list[dict]:
  """Every complete record of an output file, in file order."""
  return [r for r in (_parse_record(raw) for _, raw in _iter_lines(path)) if r is not None]


def _error_record(item: Item, error: str, code: str | None = None) -> dict:
  if item.api is not None:
    return _openai_error_record(item.line, item.id, error, code or item.error_code
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


def _openai_error_record(line: int, custom_id, message: str, code: str) -> dict:
  batch_id, _ = _openai_ids(line, custom_id)
  return {"id": batch_id, "custom_id": custom_id, "response": None,
          "error": {"code": code, "message": message}, "line": line}


def _openai_result_record(item: Item, out, token_text, model_name: str) -> dict:
  batch_id, request_id = _openai_ids(item.line, item.id)
  prefix = "chatcmpl-" if item.api == "chat" else "cmpl-"
  body = oaf.response_body(item.api, [out], model_name, token_text, item.top_logprobs,
                           request_id=prefix + batch_id[len("batch_req_"):])
  m = out.metrics
  return {"id": batch_id, "custom_id": item.id,
          "response": {"status_code": 200, "request_id": request_id, "body": body},
          "error": None, "line": item.line,
          "metrics": {"queue_s": _round(m.queue_time), "ttft_s": _round(m.ttft),
                      "tpot_s": _round(m.tpot), "e2e_s": _round(m.e2e)}}


def _record_view(record: dict) -> dict:
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


def _result_record(item: Item, out, with_token_ids: bool, token_text=None,
                   model_name: str = "ridgeline") -> dict:
  if out.error is not None or out.finish_reason == "error":
    code = None
    if item.api is not None:
      code = oaf.engine_error(out.error or "", item.api).code or "invalid_request"
    return _error_record(item, f"line {item.line}: {out.error}", code)
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
  m = out.metrics
  record["metrics"] = {"queue_s": _round(m.queue_time), "ttft_s": _round(m.ttft),
                       "tpot_s": _round(m.tpot), "e2e_s": _round(m.e2e)}
  return record


# The job -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchJob:
  """One batch-generation job (or one process's share of it).

  default_sampling: SamplingParams fields for every line; a line's `sampling`
    object (or OpenAI `body`) overrides them.
  seed: the job seed; lines without a seed get one derived from it and their id.
  process_index / process_count: this process's shard; with process_count > 1 the
    output goes to `part_path(output, index, count)`.
  max_in_flight: most requests queued or running at once (default 4 x max_batch).
  auto_merge: after a process finishes its part, merge all parts into `output`
    if every part is complete.
  lockstep: the engine is one program over several JAX processes (jax.distributed,
    a mesh spanning them), so every process must submit the same requests: the
    input is not sharded, all processes read every line, and only process 0
    writes `output` (the others learn what is already done from it).
  """

  input: str
  output: str
  default_sampling: dict = dataclasses.field(default_factory=dict)
  seed: int = 0
  process_index: int = 0
  process_count: int = 1
  max_in_flight: int | None = None
  token_ids: bool = True
  fsync: bool = True
  progress: bool = True
  auto_merge: bool = True
  lockstep: bool = False

  @property
  def path(self) -> str:
    """Where this process writes."""
    if self.process_count == 1 or self.lockstep:
      return self.output
    return part_path(self.output, self.process_index, self.process_count)


def run_batch(engine, job: BatchJob, load_time_s: float | None = None) -> dict:
  """Runs (or resumes) the job on `engine`; returns its summary.

  The summary's "errors" counts every error record of this process's output
  (earlier runs included); "merged" holds the merged summary when this call
  merged the parts.
  """
  if not 0 <= job.process_index < job.process_count:
    raise ValueError(f"process_index {job.process_index} not in [0, {job.process_count})")
  if job.lockstep and job.process_count > 1:
    raise ValueError("a lockstep job reads the whole input in every process; "
                     "it cannot also be sharded (process_count > 1)")
  path = job.path
  leader = True
  if job.lockstep:
    import jax
    leader = jax.process_index() == 0
  shard = grain.sharding.ShardOptions(job.process_index, job.process_count)
  ds = make_dataset(job.input, job.default_sampling, job.seed, shard)
  previous = None
  if leader:
    previous = _read_json(summary_path(path))
    if os.path.exists(summary_path(path)):
      os.remove(summary_path(path))  # it marks a complete part; this one is not yet
  writer = ResultWriter(path, fsync=job.fsync) if leader else _FollowerWriter(path)
  try:
    if job.lockstep:
      _agree_on_done(writer)
    stats = _feed(engine, dataclasses.replace(job, progress=job.progress and leader), ds,
                  writer)
  finally:
    writer.close()
  if not leader:
    return {"output": path, "complete": True, "writer": False, **writer.tally.as_dict(),
            "run": stats}
  _rewrite_in_input_order([path], path)
  summary = {"input": job.input, "output": path,
             "process_index": job.process_index, "process_count": job.process_count,
             "complete": True, **writer.tally.as_dict(), "run": stats}
  if load_time_s is not None:
    summary["run"]["load_time_s"] = round(load_time_s, 3)
  summary["run"]["truncated_bytes"] = writer.truncated_bytes
  metrics = getattr(engine, "metrics", None)
  if metrics is not None and hasattr(metrics, "snapshot"):
    summary["engine"] = metrics.snapshot()  # since the engine was built
  if stats["requests"] == 0 and previous and previous.get("run", {}).get("requests"):
    # Nothing was left to do: keep the figures of the run that did the work.
    summary["run"] = dict(previous["run"], skipped=stats["skipped"], rerun_noop=True)
    if "engine" in previous:
      summary["engine"] = previous["engine"]
  _write_json(summary_path(path), summary)
  if job.process_count > 1 and job.auto_merge:
    parts = [part_path(job.output, i, job.process_count) for i in range(job.process_count)]
    if all(os.path.exists(summary_path(p)) for p in parts):
      summary["merged"] = merge_parts(job.output, job.process_count)
  return summary


def _feed(engine, job: BatchJob, ds: grain.MapDataset, writer: ResultWriter) -> dict:
  """The loop: keep up to max_in_flight requests in the engine, write each as it ends."""
  from tqdm import tqdm  # progress only; keeps the module importable without it
  cap = job.max_in_flight or 4 * engine.config.max_batch
  total = len(ds)
  items = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
  exhausted = False
  held: Item | None = None  # taken from the input, not yet accepted by the engine
  seen: dict[str, int] = {}  # id -> first line with it, over this shard
  inflight: dict[str, Item] = {}
  skipped = completed = prompt_tokens = output_tokens = steps = live_tokens = 0
  batch_sum = batch_max = decode_steps = 0
  kv_sum = kv_max = 0.0
  sched = engine.scheduler
  token_text = oaf.TokenText(getattr(engine, "tokenizer", None))
  model_name = getattr(getattr(engine, "model_config", None), "name", None) or "ridgeline"
  stats0 = collections.Counter(dict(getattr(sched, "stats", {})))
  pbar = tqdm(total=total, initial=len(writer.done), unit="req", file=sys.stderr,
              disable=not job.progress, dynamic_ncols=True, smoothing=0.1)
  t0 = last_refresh = time.perf_counter()

  def finish(records: list[dict]) -> None:
    nonlocal completed, prompt_tokens, output_tokens
    writer.append(records)
    for r in records:
      completed += 1
      view = _record_view(r)
      prompt_tokens += view.get("prompt_tokens", 0)
      output_tokens += view.get("completion_tokens", 0)
    pbar.update(len(records))

  try:
    while True:
      records = []
      while len(inflight) < cap and not exhausted:
        item, held = held or next(items, None), None
        if item is None:
          exhausted = True
          break
        if item.key is not None and seen.get(item.key, item.line) != item.line:
          item = Item(item.line, None, api=item.api, error_code="duplicate_custom_id", error=(
              f"line {item.line}: duplicate id {item.id!r} (first on line {seen[item.key]})"))
        elif item.key is not None:
          seen[item.key] = item.line
        if item.line in writer.done:
          if writer.done[item.line] != _id_digest(item.id):
            raise RuntimeError(
                f"{writer.path} has a record for line {item.line} with another id than "
                f"the input's {item.id!r}: the output belongs to a different input file")
          skipped += 1
          continue
        if item.error is not None:
          records.append(_error_record(item, item.error))
          continue
        rid = str(item.line)
        try:
          engine.add_request(item.prompt, item.params, request_id=rid)
        except _CapacityError:  # the engine's queue is full: retry after a step
          if not inflight:
            raise
          held = item
          break
        out = engine.get_output(rid)
        if out.finished:  # failed validation
          records.append(_result_record(item, out, job.token_ids, token_text,
                                        model_name))
          engine.release(rid)
        else:
          inflight[rid] = item
      if records:
        finish(records)
        records = []
      if not inflight:
        if exhausted:
          break
        continue
      deltas = engine.step()
      steps += 1
      live_tokens += sum(len(d.token_ids) for d in deltas)
      b = getattr(sched, "last_decode_batch", 0)
      if b:
        decode_steps += 1
        batch_sum += b
        batch_max = max(batch_max, b)
      kv = engine.kv_utilization()
      kv_sum += kv
      kv_max = max(kv_max, kv)
      ended = {d.request_id for d in deltas if d.finished and d.request_id in inflight}
      if not engine.has_unfinished():
        ended = set(inflight)  # a request may end without a delta (nothing left to run)
      for rid in sorted(ended, key=int):
        out = engine.get_output(rid)
        if out.finished:
          records.append(_result_record(inflight.pop(rid), out, job.token_ids, token_text,
                                        model_name))
          engine.release(rid)
      finish(records)
      now = time.perf_counter()
      if job.progress and now - last_refresh > 0.5:
        last_refresh = now
        pbar.set_postfix_str(f"{live_tokens / (now - t0):.1f} tok/s, batch {b}, "
                             f"kv {kv:.0%}", refresh=True)
  finally:
    pbar.close()
    for rid in inflight:  # interrupted (e.g. KeyboardInterrupt): leave the engine clean
      try:
        engine.abort(rid)
        engine.release(rid)
      except Exception:  # noqa: BLE001 -- the original error is the one to see
        pass
  wall = time.perf_counter() - t0
  sched_stats = collections.Counter(dict(getattr(sched, "stats", {})))
  sched_stats.subtract(stats0)
  return {
      "requests": completed, "skipped": skipped, "wall_time_s": round(wall, 3),
      "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
      "output_tokens_per_s": output_tokens / wall if wall > 0 else 0.0,
      "requests_per_s": completed / wall if wall > 0 else 0.0,
      "steps": steps,
      "decode_batch_mean": batch_sum / decode_steps if decode_steps else 0.0,
      "decode_batch_max": batch_max,
      "kv_utilization_mean": kv_sum / steps if steps else 0.0,
      "kv_utilization_max": kv_max,
      "preemptions": sched_stats.get("preemptions", 0),
      "scheduler": {k: int(v) for k, v in sorted(sched_stats.items())},
  }


# Merging ---------------------------------------------------------------------------


def _rewrite_in_input_order(sources: Sequence[str], dest: str) -> Tally:
  """Writes the records of `sources` to `dest` in input-line order, atomically.

  An id seen on an earlier line turns a later record into a duplicate-id error
  (a single process already does this for its own shard; parts need it across
  shards). Does nothing when `dest` is the only source and already in order.
  """
  index = []  # (line, source, offset, length), in file order
  slim = {}  # line -> what the summary and the id check need
  for s, path in enumerate(sources):
    for offset, raw in _iter_lines(path):
      record = _parse_record(raw)
      if record is None:
        raise ValueError(f"{path}: unreadable record at byte {offset}; rerun the job "
                         "for that part to repair it")
      if record["line"] in slim:
        continue
      view = _record_view(record)
      slim[record["line"]] = {k: view.get(k) for k in (
          "id", "finish_reason", "prompt_tokens", "completion_tokens", "metrics", "openai")}
      index.append((record["line"], s, offset, len(raw)))
  in_order = sorted(index)
  seen: dict[str, int] = {}
  fixes = {}
  tally = Tally()
  for line, *_ in in_order:
    record = slim[line]
    if record["id"] is not None:
      key = str(record["id"])
      if key in seen:
        message = f"line {line}: duplicate id {record['id']!r} (first on line {seen[key]})"
        fixes[line] = (_openai_error_record(line, None, message, "duplicate_custom_id")
                       if record.get("openai") else
                       {"id": None, "line": line, "finish_reason": "error", "error": message})
        record = {"id": None, "line": line, "finish_reason": "error"}
      else:
        seen[key] = line
    tally.add(record)
  if list(sources) == [dest] and in_order == index and not fixes:
    return tally
  tmp = f"{dest}.tmp-{os.getpid()}"
  fds = [os.open(p, os.O_RDONLY) for p in sources]
  try:
    with open(tmp, "wb") as out:
      for line, s, offset, length in in_order:
        out.write(_dumps(fixes[line]) if line in fixes else os.pread(fds[s], length, offset))
      out.flush()
      os.fsync(out.fileno())
    os.replace(tmp, dest)
  finally:
    for fd in fds:
      os.close(fd)
    if os.path.exists(tmp):
      os.remove(tmp)
  return tally


def merge_parts(output: str, process_count: int) -> dict:
  """Merges the complete parts of a multi-process job into `output`, in input
  order, with a summary beside it; returns that summary. Safe to repeat, and
  safe if two processes merge at once (the output is replaced atomically)."""
  parts = [part_path(output, i, process_count) for i in range(process_count)]
  missing = [p for p in parts if not os.path.exists(summary_path(p))]
  if missing:
    raise FileNotFoundError(f"parts not complete (no summary beside them): {missing}")
  part_summaries = [_read_json(summary_path(p)) or {} for p in parts]
  tally = _rewrite_in_input_order(parts, output)
  runs = [s.get("run", {}) for s in part_summaries]
  wall = max((r.get("wall_time_s", 0) for r in runs), default=0)
  out_tokens = sum(r.get("output_tokens", 0) for r in runs)
  summary = {"input": part_summaries[0].get("input"), "output": output,
             "process_count": process_count, "complete": True, **tally.as_dict(),
             "run": {"requests": sum(r.get("requests", 0) for r in runs),
                     "skipped": sum(r.get("skipped", 0) for r in runs),
                     "wall_time_s": wall, "output_tokens": out_tokens,
                     "prompt_tokens": sum(r.get("prompt_tokens", 0) for r in runs),
                     "output_tokens_per_s": out_tokens / wall if wall else 0.0,
                     "preemptions": sum(r.get("preemptions", 0) for r in runs),
                     "decode_batch_mean": float(np.mean(
                         [r.get("decode_batch_mean", 0) for r in runs])),
                     "decode_batch_max": max(r.get("decode_batch_max", 0) for r in runs),
                     "kv_utilization_mean": float(np.mean(
                         [r.get("kv_utilization_mean", 0) for r in runs])),
                     "kv_utilization_max": max(r.get("kv_utilization_max", 0) for r in runs)},
             "parts": part_summaries}
  caches = [(s.get("engine") or {}).get("prefix_cache") for s in part_summaries]
  if all(caches):
    queried = sum(c.get("queried_tokens", 0) for c in caches)
    hits = sum(c.get("hit_tokens", 0) for c in caches)
    summary["engine"] = {"prefix_cache": {
        "queried_tokens": queried, "hit_tokens": hits,
        "hit_rate": hits / queried if queried else 0.0,
        "evictions": sum(c.get("evictions", 0) for c in caches)}}
  _write_json(summary_path(output), summary)
  return summary


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_json(path: str, obj: dict) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=_json_default)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


# Report ---------------------------------------------------------------------------


def _fmt_pct(d: dict | None, scale: float = 1e3, unit: str = "ms") -> str:
  if not d:
    return "n/a"
  return " / ".join(f"{d[f'p{p}'] * scale:.1f}" for p in _PERCENTILES) + f" {unit}"


def _flat(d: dict, prefix: str = "") -> Iterable[tuple[str, Any]]:
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flat(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def format_summary(summary: dict) -> str:
  """The summary for people."""
  s = summary
  run = s.get("run", {})
  noop = run.get("rerun_noop")
  lines = [f"requests      {s['requests']} ({s['ok']} ok, {s['errors']} errors)" + (
      "; all already in the output (the figures below are from the run that wrote them)"
      if noop else f"; {run.get('skipped', 0)} were already done" if run.get("skipped") else ""),
           f"tokens        in {s['prompt_tokens']}, out {s['output_tokens']}",
           f"throughput    {run.get('output_tokens_per_s', 0):.1f} output tokens/s "
           f"({run.get('output_tokens', 0)} tokens in {run.get('wall_time_s', 0):.1f} s"
           + (f", after {run['load_time_s']:.1f} s loading" if "load_time_s" in run else "")
           + ")"]
  if "decode_batch_mean" in run:
    lines.append(f"decode batch  mean {run['decode_batch_mean']:.1f}, "
                 f"max {run['decode_batch_max']}")
    lines.append(f"KV cache      utilization mean {run['kv_utilization_mean']:.1%}, "
                 f"max {run['kv_utilization_max']:.1%}")
  lines += [f"TTFT          p50 / p90 / p99 {_fmt_pct(s.get('ttft_s'))}",
            f"TPOT          p50 / p90 / p99 {_fmt_pct(s.get('tpot_s'))}",
            f"preemptions   {run.get('preemptions', 0)}"]
  engine = s.get("engine")
  if not engine:
    lines.append("engine        no engine metrics (prefix cache, intensity, MFU/MBU): n/a")
  else:
    pc = engine.get("prefix_cache") or {}
    if "hit_rate" in pc:
      lines.append(f"prefix cache  hit rate {pc['hit_rate']:.1%} ({pc.get('hit_tokens', 0)} of "
                   f"{pc.get('queried_tokens', 0)} prompt tokens), "
                   f"evictions {pc.get('evictions', 0)}")
    steps = engine.get("steps") or {}
    if "ridge_point" in engine and steps:
      kinds = "; ".join(
          f"{kind} {st.get('achieved_intensity', 0):.1f} FLOP/B, MFU "
          f"{st.get('mfu', 0):.2%}, MBU {st.get('mbu', 0):.2%}"
          for kind, st in steps.items())
      lines.append(f"roofline      ridge {engine['ridge_point']:.1f} FLOP/B; {kinds}")
    if not pc and not steps:
      lines.append("engine        " + ", ".join(
          f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
          for k, v in _flat(engine) if isinstance(v, (int, float, str))))
  if s.get("finish_reasons"):
    lines.append("finish        " + ", ".join(f"{k} {v}" for k, v in s["finish_reasons"].items()))
  return "\n".join(lines)
