"""The Batch API's runner: the thread that feeds batch lines to the engine driver
and writes their records, exactly once across restarts.

A batch runs through the batch job's own journal (frontends/batch/journal.py,
`ResultWriter`): each finished line is one record appended with one write and one
fsync, a torn tail is cut on restart, and the lines already there are not run
again. Its records are exactly the ones the offline job writes for OpenAI batch
lines (frontends/batch/records.py). When every line has a record the batch is
"finalizing": the journal is split, in input order, into the output file (lines
that ran) and the error file (lines that did not), both registered as files, and
the batch is "completed". A restart during finalizing does it again (the same
file ids, written atomically).

Lines reach the engine through the server's driver (engine/driver.py), like HTTP
requests, with priority BATCH_PRIORITY: the scheduler admits interactive
requests first, preempts batch work first, and starts batch work only while a
reserve of KV pages stays free (engine/admission.py). At most `max_in_flight`
lines are in the engine at once (all batches together, taken round-robin), so
the queue holds room for interactive requests. A line the engine had no room
for (its queue full, or the driver stopping) is submitted again later.

Each turn the runner looks at the active batches (in memory: frontends/
batch_store.py), opens new ones, drops cancelled or expired ones, finalizes
finished ones, feeds lines and records what the driver reported.
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

from ridgeline.engine import driver as driver_lib
from ridgeline.frontends import openai_format as oaf
from ridgeline.frontends.batch import journal, records
from ridgeline.frontends.batch_store import BatchStore, FileStore, now
from ridgeline.util import atomic_write

log = logging.getLogger("ridgeline.batch_api")

BATCH_PRIORITY = 1  # below interactive requests (0)


class _Run:
  """A batch being run: its journal, its input lines not yet submitted, its
  lines in the engine."""

  def __init__(self, batch: dict, input_path: str, journal_path: str):
    self.id = batch["id"]
    self.input_path = input_path
    self.writer = journal.ResultWriter(journal_path)
    self.items = _items(input_path)
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


def _items(input_path: str):
  """The parsed lines of a batch's input file, in order."""
  import grain
  return iter(records.make_dataset(input_path).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


# What OpenAI's error file says of a line a cancelled or expired batch never ran.
NOT_RUN = {"cancelled": ("batch_cancelled", "The batch was cancelled before this request "
                         "executed."),
           "expired": ("batch_expired", "The request could not be executed before the "
                       "completion window ended.")}


class BatchRunner:
  """Owns the batches of one `--batch_dir`: the stores (`files`, `batches`), and
  the thread that feeds their lines to `driver` and writes their records."""

  def __init__(self, root: str, driver, engine, model_name: str, registry=None,
               max_in_flight: int | None = None):
    import prometheus_client as prom
    os.makedirs(root, exist_ok=True)
    self._dir_lock = os.open(os.path.join(root, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._dir_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(self._dir_lock)
      raise RuntimeError(f"another server is using the batch directory {root}") from None
    self._wake = threading.Event()
    self.files = FileStore(root)
    self.batches = BatchStore(root, self.files, model_name, on_change=self._wake.set)
    self.driver = driver
    self.model_name = model_name
    self.max_in_flight = max_in_flight or 2 * engine.config.max_batch
    self.token_text = oaf.TokenText(engine.tokenizer)
    self._events: queue.Queue = queue.Queue()  # (run, request id, driver event)
    self._stop = False
    self._thread = threading.Thread(target=self._run, name="ridgeline-batches", daemon=True)
    self.lines = prom.Gauge("ridgeline_batch_lines", "Lines of each Batch API batch, by state",
                            ["batch", "state"], registry=registry)

  def start(self) -> None:
    self._thread.start()

  def stop(self, timeout: float = 10.0) -> None:
    self._stop = True
    self._wake.set()
    self._thread.join(timeout)
    os.close(self._dir_lock)

  def _run(self) -> None:
    runs: dict[str, _Run] = {}
    try:
      while not self._stop:
        self.driver.ready.wait()
        self._wake.clear()
        for batch in self.batches.active():
          if batch["id"] not in runs:
            run = self._open(batch)
            if run is not None:
              runs[batch["id"]] = run
        for run in list(runs.values()):
          batch = self.batches.get(run.id)
          status = batch["status"]
          expired = status == "in_progress" and now() > batch["expires_at"]
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
        self.driver.abort(list(run.live))
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
        self.batches.update(batch["id"], status="failed", failed_at=now(), errors={
            "object": "list", "data": [{
                "code": "mismatched_endpoint", "line": bad, "param": "url",
                "message": f"line {bad}: the url differs from the batch's endpoint "
                           f"{batch['endpoint']}"}]})
        return None
      batch = self.batches.update(batch["id"], status="in_progress", in_progress_at=now(),
                                  request_counts={"total": total, "completed": 0, "failed": 0})
    run = _Run(batch, input_path, self.batches.path(batch["id"], ".results.jsonl"))
    self._count(run, batch)
    return run

  def _feed(self, runs: dict[str, _Run]) -> None:
    """Submits lines, round-robin over the batches, up to max_in_flight in all."""
    live = sum(len(r.live) for r in runs.values())
    feeding = [r for r in runs.values() if self.batches.get(r.id)["status"] == "in_progress"]
    subs = []
    while feeding and live < self.max_in_flight:
      for run in list(feeding):
        item = run.next_item()
        if item is None:
          feeding.remove(run)
          continue
        if item.error is not None:
          self._record(run, records.error_record(item, item.error))
          continue
        rid = f"{run.id}:{item.line}"
        run.live[rid] = item
        live += 1
        # Only the final output is read (its log-probabilities and prompt included).
        subs.append(driver_lib.Submission(
            rid, item.prompt, item.params, lambda e, run=run, rid=rid: self._events.put(
                (run, rid, e)), priority=BATCH_PRIORITY))
    if subs:
      self.driver.submit(subs)

  def _drain(self, runs: dict[str, _Run], timeout: float) -> None:
    """Records what the driver reported (waiting up to `timeout` for it)."""
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
      if isinstance(event, driver_lib.Done):
        del run.live[rid]
        self._record(run, records.result_record(item, event.output, False, self.token_text,
                                                 self.model_name))
      elif isinstance(event, driver_lib.Failed):
        del run.live[rid]
        if event.cause in (driver_lib.CAPACITY, driver_lib.STOPPED):  # later
          run.retry.append(item)
        else:
          error = oaf.driver_error(event, item.api)
          self._record(run, records.error_record(item, f"line {item.line}: "
                                                  f"{error.message}", error.code))

  def _record(self, run: _Run, record: dict) -> None:
    run.writer.append([record])
    self._count(run)

  def _count(self, run: _Run, batch: dict | None = None) -> None:
    """The batch's request_counts from its journal (saved at most every 0.5 s,
    and always at the end) and its /metrics gauges."""
    failed = run.writer.tally.errors
    done = len(run.writer.done)
    batch = batch or self.batches.get(run.id)
    total = batch["request_counts"]["total"]
    counts = {"total": total, "completed": done - failed, "failed": failed}
    self.lines.labels(run.id, "done").set(done - failed)
    self.lines.labels(run.id, "failed").set(failed)
    self.lines.labels(run.id, "pending").set(total - done)
    t = time.monotonic()
    if counts != batch["request_counts"] and (t - run.saved > 0.5 or run.finished):
      run.saved = t
      self.batches.update(run.id, request_counts=counts)

  def _drop(self, run: _Run) -> None:
    """Stops a cancelled or expired batch: its lines in the engine are aborted."""
    self.driver.abort(list(run.live))
    run.live.clear()
    run.retry.clear()
    run.exhausted = True

  def _finalize(self, run: _Run, batch: dict, final: str) -> None:
    """The output and error files from the journal, in input order (a cancelled or
    expired batch's error file also lists the lines it never ran, with OpenAI's
    codes, uncounted in request_counts.failed); the batch's final status (`final`:
    completed, cancelled, expired; kept in the batch while finalizing). Idempotent:
    a restart during it does it again."""
    if batch["status"] != "finalizing":
      batch = self.batches.update(run.id, status="finalizing", finalizing_at=now(),
                                  _final_status=final)
    self._count(run, batch)
    run.writer.close()
    rows = sorted(journal.read_records(run.writer.path), key=lambda r: r["line"])
    ok = [r for r in rows if r.get("response")]
    bad = [r for r in rows if not r.get("response")]
    failed = len(bad)
    if final in NOT_RUN:  # the lines it never ran, in the error file as OpenAI's
      code, message = NOT_RUN[final]
      ran = {r["line"] for r in rows}
      bad = sorted(bad + [records.openai_error_record(item.line, item.id, message, code)
                          for item in _items(run.input_path) if item.line not in ran],
                   key=lambda r: r["line"])
    fields = {}
    digest = hashlib.blake2b(run.id.encode(), digest_size=12).hexdigest()
    for name, lines in (("output", ok), ("error", bad)):
      if not lines and name == "error":
        continue
      file_id = f"file-{digest}{name[0]}"
      tmp = self.files.path(file_id) + ".tmp"
      with atomic_write(tmp, "wb") as f:
        f.write(b"".join(records.encode_record(r) for r in lines))
      self.files.add(file_id, f"{run.id}_{name}.jsonl", f"batch_{name}", tmp)
      fields[f"{name}_file_id"] = file_id
    counts = {"total": batch["request_counts"]["total"], "completed": len(ok),
              "failed": failed}
    self.batches.update(run.id, status=final, request_counts=counts,
                        **{f"{final}_at": now()}, **fields)
    self.lines.labels(run.id, "pending").set(0)  # ended: nothing of it waits any more
