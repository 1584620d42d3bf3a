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

Batch lines reach the engine through the server's driver (engine/driver.py), like HTTP
requests, with priority BATCH_PRIORITY: the scheduler admits interactive
requests first, preempts batch work first, and starts batch work only while a
reserve of KV pages stays free (engine/admission.py). At most `max_in_flight`
batch lines are in the engine at once (all batches together, taken round-robin),
so the queue holds room for interactive requests.

The parts: frontends/batch_store.py (the files and the batch objects, and the
upload check), frontends/batch_runner.py (the thread that runs the batches);
this module is their HTTP endpoints (`add_routes`).

Status machine (OpenAI's): validating -> in_progress -> finalizing -> completed;
failed (the input does not match the batch's endpoint); cancelling -> cancelled
(`POST /v1/batches/{id}/cancel`: lines in the engine are aborted, the finished
ones kept in the output file); expired (the completion window passed first, the
finished lines kept likewise).
"""

from __future__ import annotations

import asyncio
import os
import uuid

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import FileResponse

from ridgeline.frontends import openai_format as oaf
from ridgeline.frontends.batch_runner import BATCH_PRIORITY, BatchRunner
from ridgeline.frontends.batch_store import (ENDPOINTS, BatchStore, FileStore, check_upload,
                                            cursor_page)
from ridgeline.frontends.completions import json_body

__all__ = ["add_routes", "BatchRunner", "BatchStore", "FileStore", "check_upload",
           "BATCH_PRIORITY", "ENDPOINTS"]


def add_routes(app: FastAPI, batches: BatchRunner | None, engine) -> None:
  """OpenAI's Files and Batches endpoints over `batches` (a BatchRunner; None:
  every one of them says how to enable it)."""

  def runner():
    if batches is None:
      raise oaf.OpenAIError("the Batch API is off: start the server with --batch_dir DIR "
                            "(create_app(batch_dir=...))", status=404,
                            code="batch_api_disabled")
    return batches

  def public(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("_")}

  @app.post("/v1/files")
  async def create_file(file: UploadFile = File(...), purpose: str = Form(...)):
    store = runner().files
    if purpose != "batch":
      raise oaf.OpenAIError(f"purpose must be 'batch' (the only one this server keeps), "
                            f"got {purpose!r}", "purpose")
    tmp = os.path.join(store.dir, f"upload-{uuid.uuid4().hex}.tmp")
    try:
      with open(tmp, "wb") as f:  # noqa: ASYNC230 -- the writes go to a thread
        while chunk := await file.read(1 << 20):
          await asyncio.to_thread(f.write, chunk)
      # Checked off the event loop (it tokenizes every prompt).
      await asyncio.get_running_loop().run_in_executor(
          None, check_upload, tmp, engine.check_request)
      return store.add(f"file-{uuid.uuid4().hex}", file.filename or "upload.jsonl", purpose,
                       tmp)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)

  @app.get("/v1/files")
  async def list_files(purpose: str | None = None, limit: int = 10000, order: str = "desc",
                       after: str | None = None):
    if not 1 <= limit <= 10000:
      raise oaf.OpenAIError(f"limit must be in [1, 10000], got {limit}", "limit")
    if order not in ("asc", "desc"):
      raise oaf.OpenAIError(f"order must be 'asc' or 'desc', got {order!r}", "order")
    files = runner().files.list(purpose)  # newest first
    return cursor_page(files[::-1] if order == "asc" else files, limit, after, "file")

  @app.get("/v1/files/{file_id}")
  async def get_file(file_id: str):
    return runner().files.get(file_id)

  @app.get("/v1/files/{file_id}/content")
  async def file_content(file_id: str):
    store = runner().files
    meta = store.get(file_id)
    return FileResponse(store.path(file_id), media_type="application/jsonl",
                        filename=meta["filename"])

  @app.delete("/v1/files/{file_id}")
  async def delete_file(file_id: str):
    return runner().files.delete(file_id)

  @app.post("/v1/batches")
  async def create_batch(request: Request):
    return public(runner().batches.create(await json_body(request)))

  @app.get("/v1/batches")
  async def list_batches(limit: int = 20, after: str | None = None):
    if not 1 <= limit <= 100:
      raise oaf.OpenAIError(f"limit must be in [1, 100], got {limit}", "limit")
    page = runner().batches.list(limit, after)
    page["data"] = [public(b) for b in page["data"]]
    return page

  @app.get("/v1/batches/{batch_id}")
  async def get_batch(batch_id: str):
    return public(runner().batches.get(batch_id))

  @app.post("/v1/batches/{batch_id}/cancel")
  async def cancel_batch(batch_id: str):
    return public(runner().batches.cancel(batch_id))
