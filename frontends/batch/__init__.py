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
4. Exactly once: every finished record goes to the file in one `write` followed by
   `fsync` (a record per call: the job sees one finished request at a time). On start the output is read back; a torn tail (no final
   newline, or a line that does not parse) is truncated away, and the lines already
   there are skipped. Error records count as done (they are deterministic). So the
   job may be killed at any instant, SIGKILL included, and rerun with the same input.
   Every writer of an output (this one, the merge of parts, the fleet's blocks)
   takes its lock and commits through the one journal, journal.py's `Journal`.
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
batch output lines instead (the objects are built by frontends/openai_format.py, as
the server's responses are):

  {"id": "batch_req_...", "custom_id", "response": {"status_code": 200,
   "request_id", "body": chat.completion | text_completion}, "error": null,
   "line", "metrics"}
  {"id", "custom_id", "response": null, "error": {"code", "message"}, "line"}

`line` and `metrics` are Ridgeline's additions (resuming and merging key on the
line; OpenAI readers ignore unknown fields).
"""

from __future__ import annotations

# The package's public parts: callers use `ridgeline.frontends.batch.X` (or the
# module: records, journal, merge, blocks, report, job).
from ridgeline.frontends.batch.records import (
    Item, JsonlSource, derive_seed, encode_record, error_record, make_dataset, parse_line,
    record_view, result_record)
from ridgeline.frontends.batch.journal import (
    JobLock, Journal, LockedError, ResultWriter, Tally, part_path, read_json, read_records,
    summary_path)
from ridgeline.frontends.batch.merge import merge_parts
from ridgeline.frontends.batch.blocks import BlockJournal, block_dir, block_name
from ridgeline.frontends.batch.report import format_summary
from ridgeline.frontends.batch.job import BatchJob, run_batch

__all__ = ["BatchJob", "JobLock", "Journal", "LockedError", "JsonlSource", "Item",
           "parse_line", "make_dataset", "derive_seed", "ResultWriter", "Tally", "run_batch",
           "merge_parts", "part_path", "summary_path", "format_summary", "read_records",
           "read_json", "record_view", "encode_record", "error_record", "result_record",
           "BlockJournal", "block_dir", "block_name"]
