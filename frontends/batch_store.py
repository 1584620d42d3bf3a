"""The Batch API's store: uploaded files, and the batch objects (OpenAI's Batch).

Everything lives under one `--batch_dir`, so that a server killed at any moment
and started again over the same directory carries on (frontends/batch_api.py):

  files/<file_id>.jsonl, files/<file_id>.json      a file's content and metadata
  batches/<batch_id>.json                          a batch (OpenAI's Batch object)

Files are read from disk when asked for (an upload can be large, and is read
rarely). Batch objects are small and read all the time (the runner looks at
every active batch's status each turn, clients poll): `BatchStore` holds them in
memory and writes each change through to disk atomically, and reads the disk
only once, when the server starts. One server owns a directory (the runner's
lock), so nothing else writes them meanwhile.

An upload is checked line by line before it is kept (`check_upload`): JSON, a
unique string `custom_id`, `method` POST, a supported `url`, a body the endpoint
accepts, a prompt plus max_tokens within the model length; the first bad line is
a 400 naming it, with OpenAI's error object.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from typing import Any, Callable

from ridgeline.frontends import openai_format as oaf
from ridgeline.frontends.batch import journal, records
from ridgeline.util import write_json_atomic

ENDPOINTS = oaf.URLS  # the urls a batch line may name, and the kind of request each is
WINDOWS = {"24h": 24 * 3600}
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")


def now() -> int:
  return int(time.time())


def not_found(kind: str, id_: str) -> oaf.OpenAIError:
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
            "created_at": now(), "filename": filename, "purpose": purpose,
            "status": "processed", "status_details": None}
    with self._lock:
      os.replace(content_path, self.path(file_id))
      write_json_atomic(self._meta_path(file_id), meta)
    return meta

  def get(self, file_id: str) -> dict:
    meta = journal.read_json(self._meta_path(os.path.basename(file_id)))
    if meta is None:
      raise not_found("file", file_id)
    return meta

  def list(self, purpose: str | None = None) -> list[dict]:
    metas = [journal.read_json(os.path.join(self.dir, n)) for n in os.listdir(self.dir)
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


def cursor_page(items: list[dict], limit: int, after: str | None, what: str) -> dict:
  """OpenAI's list object over `items` (in the listing's order): at most `limit`
  of them after the one whose id is `after`."""
  if after is not None:
    ids = [x["id"] for x in items]
    if after not in ids:
      raise oaf.OpenAIError(f"after: no {what} {after}", "after")
    items = items[ids.index(after) + 1:]
  page = items[:limit]
  return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
          "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


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


class BatchStore:
  """The batch objects of one directory, in memory and written through to disk.
  Callers get copies (the runner's thread and the event loop share them);
  `on_change` is called after a batch is created or cancelled (it wakes the
  runner)."""

  def __init__(self, root: str, files: FileStore, model_name: str,
               on_change: Callable[[], None] = lambda: None):
    self.dir = os.path.join(root, "batches")
    os.makedirs(self.dir, exist_ok=True)
    self.files = files
    self.model_name = model_name
    self._on_change = on_change
    self._lock = threading.Lock()
    # The one read of the disk: what a restart finds, active batches included.
    found = (journal.read_json(os.path.join(self.dir, n)) for n in os.listdir(self.dir)
             if n.endswith(".json"))
    self._batches: dict[str, dict] = {b["id"]: b for b in found if b}

  def path(self, batch_id: str, suffix: str = ".json") -> str:
    return os.path.join(self.dir, os.path.basename(batch_id) + suffix)

  def get(self, batch_id: str) -> dict:
    with self._lock:
      batch = self._batches.get(batch_id)
    if batch is None:
      raise not_found("batch", batch_id)
    return dict(batch)

  def _put(self, batch: dict) -> dict:
    """Saves `batch` (a new dict: the old one may still be read elsewhere); the
    caller holds the lock."""
    write_json_atomic(self.path(batch["id"]), batch)
    self._batches[batch["id"]] = batch
    return dict(batch)

  def update(self, batch_id: str, **fields) -> dict:
    with self._lock:
      return self._put({**self._batches[batch_id], **fields})

  def _sorted(self, newest_first: bool) -> list[dict]:
    with self._lock:
      batches = list(self._batches.values())
    return [dict(b) for b in sorted(batches, key=lambda b: (b["created_at"], b["id"]),
                                    reverse=newest_first)]

  def active(self) -> list[dict]:
    """The batches still to run or finish, oldest first."""
    return [b for b in self._sorted(False) if b["status"] in ACTIVE]

  def list(self, limit: int = 20, after: str | None = None) -> dict:
    return cursor_page(self._sorted(True), limit, after, "batch")

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
    if metadata is not None and not (
        isinstance(metadata, dict) and len(metadata) <= 16
        and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                for k, v in metadata.items())):
      raise oaf.OpenAIError("metadata must be an object of at most 16 pairs: string keys of "
                            "at most 64 characters, string values of at most 512", "metadata")
    t = now()
    batch = {
        "id": f"batch_{uuid.uuid4().hex}", "object": "batch", "endpoint": endpoint,
        "errors": None, "input_file_id": file_id, "completion_window": window,
        "status": "validating", "output_file_id": None, "error_file_id": None,
        "created_at": t, "in_progress_at": None, "expires_at": t + WINDOWS[window],
        "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
        "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": metadata, "model": self.model_name}
    with self._lock:
      batch = self._put(batch)
    self._on_change()
    return batch

  def cancel(self, batch_id: str) -> dict:
    with self._lock:
      batch = self._batches.get(batch_id)
      if batch is None:
        raise not_found("batch", batch_id)
      if batch["status"] in ("validating", "in_progress"):
        batch = self._put({**batch, "status": "cancelling", "cancelling_at": now()})
      batch = dict(batch)
    self._on_change()
    return batch
