"""OpenAI's Batch API on the server: `/v1/files` and `/v1/batches`, exactly once
across restarts, run in the valleys of interactive traffic.

A user uploads a JSONL file of requests (`POST /v1/files`, purpose "batch"; each
line `{"custom_id", "method": "POST", "url", "body"}`), creates a batch over it
(`POST /v1/batches`), polls it (`GET /v1/batches/{id}`) and downloads its output
file (`GET /v1/files/{id}/content`). Everything lives under one directory
(`--batch_dir`), so a server killed at any moment and started again over the
same directory carries on:

  files/<file_id>.jsonl, files/<file_id>.json      a file's content and metadata
  batches/<batch_id>.json                          a batch (OpenAI's Batch object)
  batches/<batch_id>.results.jsonl                 its journal

An upload is checked line by line before it is kept (JSON, a unique string
`custom_id`, `method` POST, a supported `url`, a body the endpoint accepts, a
prompt plus max_tokens within the model length): the first bad line is a 400
naming it, with OpenAI's error object. A batch then runs through the batch job's
own journal (frontends/batch/journal.py, `ResultWriter`): each finished line is one
record appended with one write and one fsync, a torn tail is cut on restart, and
the lines already there are not run again. Its records are exactly the ones the
offline job writes for OpenAI batch lines (frontends/batch/records.py). When every
line has a record the batch is "finalizing": the journal is split, in input
order, into the output file (lines that ran) and the error file (lines that did
not), both registered as files, and the batch is "completed". A restart during
finalizing does it again (the same file ids, written atomically).

Batch lines reach the engine through the server's `EngineLoop`, like HTTP
requests, with priority BATCH_PRIORITY: the scheduler admits interactive
requests first, preempts batch work first, and starts batch work only while a
reserve of KV pages stays free (engine/scheduler.py). At most `max_in_flight`
batch lines are in the engine at once (all batches together, taken round-robin),
so the queue holds room for interactive requests.

Status machine (OpenAI's): validating -> in_progress -> finalizing -> completed;
failed (the input does not match the batch's endpoint); cancelling -> cancelled
(`POST /v1/batches/{id}/cancel`: lines in the engine are aborted, the finished
ones kept in the output file); expired (the completion window passed first, the
finished lines kept likewise).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import queue
import threading
import time
import uuid
from typing import Any, Callable

from ridgeline.frontends import openai_format as oaf
from ridgeline.frontends.batch import journal, records
from ridgeline.util import atomic_write, write_json_atomic

log = logging.getLogger("ridgeline.batch_api")

BATCH_PRIORITY = 1  # below interactive requests (0)
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
WINDOWS = {"24h": 24 * 3600}
_ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")


def _now() -> int:
  return int(time.time())


def _not_found(kind: str, id_: str) -> oaf.OpenAIError:
  return oaf.OpenAIError(f"No such {kind}: {id_}", status=404, code="not_found")


class FileStore:
  """Uploaded files and the batches' output files, on disk with their metadata."""

  def __init__(self, root: str):
    self.dir = os.path.join(root, "files")
    os.makedirs(self.dir, exist_ok=True)
    self._lock = threading.Lock()

  def path(self, file_id: str) -> str:
    return os.path.join(self.dir, f"{file_id}.jsonl")

  def _meta_path(self, file_id: str) -> str:
    return os.path.join(self.dir, f"{file_id}.json")

  def add(self, file_id: str, filename: str, purpose: str, content_path: str) -> dict:
    """Registers a file whose content is at `content_path` (moved in place)."""
    meta = {"id": file_id, "object": "file", "bytes": os.path.getsize(content_path),
            "created_at": _now(), "filename": filename, "purpose": purpose,
            "status": "processed", "status_details": None}
    with self._lock:
      os.replace(content_path, self.path(file_id))
      write_json_atomic(self._meta_path(file_id), meta)
    return meta

  def get(self, file_id: str) -> dict:
    meta = journal._read_json(self._meta_path(os.path.basename(file_id)))
    if meta is None:
      raise _not_found("file", file_id)
    return meta

  def list(self, purpose: str | None = None) -> list[dict]:
    metas = [journal._read_json(os.path.join(self.dir, n)) for n in os.listdir(self.dir)
             if n.endswith(".json")]
    metas = [m for m in metas if m and (purpose is None or m["purpose"] == purpose)]
    return sorted(metas, key=lambda m: (m["created_at"], m["id"]), reverse=True)

  def delete(self, file_id: str) -> dict:
    self.get(file_id)
    with self._lock:
      os.remove(self._meta_path(file_id))
      if os.path.exists(self.path(file_id)):
        os.remove(self.path(file_id))
    return {"id": file_id, "object": "file", "deleted": True}


def check_upload(path: str, check: Callable[[Any, Any], None]) -> int:
  """Checks a Batch API input file line by line; returns its number of requests.
  Raises OpenAIError naming the first bad line (1-based, blank lines counted) and
  OpenAI's code for it. `check(prompt, params)` raises ValueError for a request
  the engine would refuse (the model length, token ids, ...)."""
  seen: dict[str, int] = {}
  count = 0
  with open(path, "rb") as f:
    for number, raw in enumerate(f, 1):
      if not raw.strip():
        continue
      try:
        obj = json.loads(raw)
      except ValueError:
        raise oaf.OpenAIError(f"line {number}: not valid JSON", "file",
                              code="invalid_json_line") from None
      if not isinstance(obj, dict) or "custom_id" not in obj or "url" not in obj:
        raise oaf.OpenAIError(f"line {number}: a batch request is an object with "
                              "custom_id, method, url and body", "file",
                              code="invalid_request")
      if not isinstance(obj["custom_id"], str):
        raise oaf.OpenAIError(f"line {number}: custom_id must be a string", "file",
                              code="invalid_custom_id")
      if obj["url"] not in ENDPOINTS:
        raise oaf.OpenAIError(f"line {number}: url {obj['url']!r} is not supported; use "
                              f"one of {sorted(ENDPOINTS)}", "file", code="invalid_url")
      item = records.parse_line(number, raw)
      if item.error is not None:
        raise oaf.OpenAIError(item.error, "file", code=item.error_code or "invalid_request")
      if item.key in seen:
        raise oaf.OpenAIError(f"line {number}: duplicate custom_id {item.id!r} (first on "
                              f"line {seen[item.key]})", "file", code="duplicate_custom_id")
      seen[item.key] = number
      try:
        check(item.prompt, item.params)
      except (ValueError, TypeError, UnicodeError) as e:
        code = oaf.engine_error(str(e), item.api).code or "invalid_request"
        raise oaf.OpenAIError(f"line {number}: {e}", "file", code=code) from None
      count += 1
  if not count:
    raise oaf.OpenAIError("the file has no requests", "file", code="empty_file")
  return count


class _Run:
  """A batch being run: its journal, its input lines not yet submitted, its
  lines in the engine."""

  def __init__(self, batch: dict, input_path: str, journal_path: str):
    self.id = batch["id"]
    self.writer = journal.ResultWriter(journal_path)
    import grain
    ds = records.make_dataset(input_path)
    self.items = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0,
                                                           prefetch_buffer_size=0)))
    self.exhausted = False
    self.retry: list = []  # lines the engine refused for capacity: submitted again
    self.live: dict[str, records.Item] = {}  # engine request id -> its line
    self.saved = 0.0  # when request_counts were last saved (time.monotonic)

  def next_item(self):
    if self.retry:
      return self.retry.pop()
    while not self.exhausted:
      item = next(self.items, None)
      if item is None:
        self.exhausted = True
      elif item.line not in self.writer.done:
        return item
    return None

  @property
  def finished(self) -> bool:
    return self.exhausted and not self.retry and not self.live


class BatchRunner:
  """Owns the batches of one `--batch_dir`: the store, and the thread that feeds
  their lines to the engine loop and writes their records."""

  def __init__(self, root: str, loop, engine, model_name: str, registry=None,
               max_in_flight: int | None = None):
    import prometheus_client as prom
    os.makedirs(os.path.join(root, "batches"), exist_ok=True)
    self.root = root
    self._dir_lock = os.open(os.path.join(root, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._dir_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self._dir_lock)
      raise RuntimeError(f"another server is using the batch directory {root}") from None
    self.files = FileStore(root)
    self.loop = loop
    self.engine = engine
    self.model_name = model_name
    self.max_in_flight = max_in_flight or 2 * engine.config.max_batch
    self.token_text = oaf.TokenText(engine.tokenizer)
    self._events: queue.Queue = queue.Queue()
    self._lock = threading.Lock()  # the batch objects on disk
    self._wake = threading.Event()
    self._stop = False
    self._thread = threading.Thread(target=self._run, name="ridgeline-batches", daemon=True)
    self.lines = prom.Gauge("ridgeline_batch_lines", "Lines of each Batch API batch, by state",
                            ["batch", "state"], registry=registry)

  # The store ----------------------------------------------------------------------

  def _path(self, batch_id: str, suffix: str = ".json") -> str:
    return os.path.join(self.root, "batches", os.path.basename(batch_id) + suffix)

  def get(self, batch_id: str) -> dict:
    batch = journal._read_json(self._path(batch_id))
    if batch is None:
      raise _not_found("batch", batch_id)
    return batch

  def _save(self, batch: dict) -> None:
    write_json_atomic(self._path(batch["id"]), batch)

  def _update(self, batch_id: str, **fields) -> dict:
    with self._lock:
      batch = self.get(batch_id)
      batch.update(fields)
      self._save(batch)
      return batch

  def list(self, limit: int = 20, after: str | None = None) -> dict:
    names = [n for n in os.listdir(os.path.join(self.root, "batches"))
             if n.endswith(".json")]
    batches = sorted((b for b in (journal._read_json(self._path(n[:-5])) for n in names) if b),
                     key=lambda b: (b["created_at"], b["id"]), reverse=True)
    if after is not None:
      ids = [b["id"] for b in batches]
      if after not in ids:
        raise oaf.OpenAIError(f"after: no batch {after}", "after")
      batches = batches[ids.index(after) + 1:]
    page = batches[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(batches) > limit}

  def create(self, body: Any) -> dict:
    if not isinstance(body, dict):
      raise oaf.OpenAIError("the request body must be a JSON object")
    unknown = sorted(set(body) - {"input_file_id", "endpoint", "completion_window",
                                  "metadata", "output_expires_after"})
    if unknown:
      raise oaf.OpenAIError(f"Unrecognized request argument supplied: {unknown[0]}",
                            unknown[0])
    file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
    window = body.get("completion_window", "24h")
    if not isinstance(file_id, str):
      raise oaf.OpenAIError("Missing required parameter: 'input_file_id'", "input_file_id")
    meta = self.files.get(file_id)
    if meta["purpose"] != "batch":
      raise oaf.OpenAIError(f"input_file_id: file {file_id} has purpose "
                            f"{meta['purpose']!r}, not 'batch'", "input_file_id")
    if endpoint not in ENDPOINTS:
      raise oaf.OpenAIError(f"endpoint must be one of {sorted(ENDPOINTS)}, got {endpoint!r}",
                            "endpoint")
    if window not in WINDOWS:
      raise oaf.OpenAIError(f"completion_window must be one of {sorted(WINDOWS)}, got "
                            f"{window!r}", "completion_window")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
      raise oaf.OpenAIError("metadata must be an object", "metadata")
    now = _now()
    batch = {
        "id": f"batch_{uuid.uuid4().hex}", "object": "batch", "endpoint": endpoint,
        "errors": None, "input_file_id": file_id, "completion_window": window,
        "status": "validating", "output_file_id": None, "error_file_id": None,
        "created_at": now, "in_progress_at": None, "expires_at": now + WINDOWS[window],
        "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
        "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": metadata, "model": self.model_name}
    with self._lock:
      self._save(batch)
    self._wake.set()
    return batch

  def cancel(self, batch_id: str) -> dict:
    with self._lock:
      batch = self.get(batch_id)
      if batch["status"] in ("validating", "in_progress"):
        batch.update(status="cancelling", cancelling_at=_now())
        self._save(batch)
    self._wake.set()
    return batch

  # The thread -----------------------------------------------------------------------

  def start(self) -> None:
    self._thread.start()

  def stop(self, timeout: float = 10.0) -> None:
    self._stop = True
    self._wake.set()
    self._thread.join(timeout)
    os.close(self._dir_lock)

  def _active(self) -> list[dict]:
    names = [n[:-5] for n in os.listdir(os.path.join(self.root, "batches"))
             if n.endswith(".json")]
    batches = [journal._read_json(self._path(n)) for n in names]
    return sorted((b for b in batches if b and b["status"] in _ACTIVE),
                  key=lambda b: (b["created_at"], b["id"]))

  def _run(self) -> None:
    runs: dict[str, _Run] = {}
    try:
      while not self._stop:
        self.loop.ready.wait()
        self._wake.clear()
        for batch in self._active():
          if batch["id"] not in runs:
            run = self._open(batch)
            if run is not None:
              runs[batch["id"]] = run
        for run in list(runs.values()):
          batch = self.get(run.id)
          status = batch["status"]
          expired = status == "in_progress" and _now() > batch["expires_at"]
          if status == "cancelling" or expired:
            self._drop(run)
          if run.finished or status == "finalizing":
            final = ("cancelled" if status == "cancelling" else "expired" if expired
                     else batch.get("_final_status", "completed"))
            self._finalize(run, batch, final)
            del runs[run.id]
        if not runs:
          self._wake.wait(1.0)  # a new batch wakes it
          continue
        self._feed(runs)
        self._drain(runs, timeout=0.05)
    except Exception:  # noqa: BLE001 -- the batches stay on disk; a restart resumes them
      log.exception("the batch runner failed")
    finally:
      for run in runs.values():
        self.loop.abort(list(run.live))
        run.writer.close()

  def _open(self, batch: dict) -> _Run | None:
    """A run for an active batch (a new one, or one a restart left active)."""
    input_path = self.files.path(batch["input_file_id"])
    if batch["status"] == "validating":
      # The upload was checked; the lines must also be for this batch's endpoint.
      bad = None
      total = 0
      for number, raw in enumerate(open(input_path, "rb"), 1):
        if raw.strip():
          total += 1
          if bad is None and json.loads(raw).get("url") != batch["endpoint"]:
            bad = number
      if bad is not None:
        self._update(batch["id"], status="failed", failed_at=_now(), errors={
            "object": "list", "data": [{
                "code": "mismatched_endpoint", "line": bad, "param": "url",
                "message": f"line {bad}: the url differs from the batch's endpoint "
                           f"{batch['endpoint']}"}]})
        return None
      batch = self._update(batch["id"], status="in_progress", in_progress_at=_now(),
                           request_counts={"total": total, "completed": 0, "failed": 0})
    run = _Run(batch, input_path, self._path(batch["id"], ".results.jsonl"))
    self._count(run, batch)
    return run

  def _feed(self, runs: dict[str, _Run]) -> None:
    """Submits lines, round-robin over the batches, up to max_in_flight in all."""
    from ridgeline.frontends.server import _Sub
    live = sum(len(r.live) for r in runs.values())
    feeding = [r for r in runs.values() if self.get(r.id)["status"] == "in_progress"]
    subs = []
    while feeding and live < self.max_in_flight:
      for run in list(feeding):
        item = run.next_item()
        if item is None:
          feeding.remove(run)
          continue
        if item.error is not None:
          self._record(run, records._error_record(item, item.error))
          continue
        rid = f"{run.id}:{item.line}"
        run.live[rid] = item
        live += 1
        subs.append(_Sub(rid, 0, item.prompt, item.params, item.top_logprobs is not None,
                         False, lambda e, run=run, rid=rid: self._events.put((run, rid, e)),
                         item.echo, BATCH_PRIORITY))
    if subs:
      self.loop.submit(subs)

  def _drain(self, runs: dict[str, _Run], timeout: float) -> None:
    """Records what the engine loop reported (waiting up to `timeout` for it)."""
    try:
      events = [self._events.get(timeout=timeout)]
    except queue.Empty:
      return
    while True:
      try:
        events.append(self._events.get_nowait())
      except queue.Empty:
        break
    for run, rid, event in events:
      item = run.live.get(rid)
      if item is None or run.id not in runs:
        continue  # aborted (cancel) meanwhile
      kind = event[0]
      if kind == "done":
        del run.live[rid]
        self._record(run, records._result_record(item, event[2], False, self.token_text,
                                                 self.model_name))
      elif kind == "error":
        del run.live[rid]
        error = event[2]
        if error.status in (429, 503):  # a full queue, or shutting down: later
          run.retry.append(item)
        else:
          self._record(run, records._error_record(item, f"line {item.line}: "
                                                  f"{error.message}", error.code))

  def _record(self, run: _Run, record: dict) -> None:
    run.writer.append([record])
    self._count(run)

  def _count(self, run: _Run, batch: dict | None = None) -> None:
    """The batch's request_counts from its journal (saved at most every 0.5 s,
    and always at the end) and its /metrics gauges."""
    failed = run.writer.tally.errors
    done = len(run.writer.done)
    batch = batch or self.get(run.id)
    total = batch["request_counts"]["total"]
    counts = {"total": total, "completed": done - failed, "failed": failed}
    self.lines.labels(run.id, "done").set(done - failed)
    self.lines.labels(run.id, "failed").set(failed)
    self.lines.labels(run.id, "pending").set(total - done)
    now = time.monotonic()
    if counts != batch["request_counts"] and (now - run.saved > 0.5 or run.finished):
      run.saved = now
      self._update(run.id, request_counts=counts)

  def _drop(self, run: _Run) -> None:
    """Stops a cancelled or expired batch: its lines in the engine are aborted."""
    self.loop.abort(list(run.live))
    run.live.clear()
    run.retry.clear()
    run.exhausted = True

  def _finalize(self, run: _Run, batch: dict, final: str) -> None:
    """The output and error files from the journal, in input order; the batch's
    final status (`final`: completed, cancelled, expired; kept in the batch while
    finalizing). Idempotent: a restart during it does it again."""
    if batch["status"] != "finalizing":
      batch = self._update(run.id, status="finalizing", finalizing_at=_now(),
                           _final_status=final)
    self._count(run, batch)
    run.writer.close()
    rows = sorted(journal.read_records(run.writer.path), key=lambda r: r["line"])
    ok = [r for r in rows if r.get("response")]
    bad = [r for r in rows if not r.get("response")]
    fields = {}
    digest = hashlib.blake2b(run.id.encode(), digest_size=12).hexdigest()
    for name, lines in (("output", ok), ("error", bad)):
      if not lines and name == "error":
        continue
      file_id = f"file-{digest}{name[0]}"
      tmp = self.files.path(file_id) + ".tmp"
      with atomic_write(tmp, "wb") as f:
        f.write(b"".join(records._dumps(r) for r in lines))
      self.files.add(file_id, f"{run.id}_{name}.jsonl", f"batch_{name}", tmp)
      fields[f"{name}_file_id"] = file_id
    counts = {"total": batch["request_counts"]["total"], "completed": len(ok),
              "failed": len(bad)}
    self._update(run.id, status=final, request_counts=counts,
                 **{f"{final}_at": _now()}, **fields)
    self.lines.labels(run.id, "pending").set(counts["total"] - len(rows))
