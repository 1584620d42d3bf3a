"""A job's output committed block by block: the journal of a job run by many
engines at once (the fleet's, frontends/fleet/job.py).

Input lines are cut into blocks of `block_size` in input order; a block is named by
its first and last line (`lines-0000000001-0000000064.jsonl`) and committed whole
under `OUTPUT.blocks/` through the output's Journal (frontends/batch/journal.py):
written beside its name, fsynced and renamed, or absent. A rerun finds the committed
blocks by name, checks each against the input's lines and ids, and skips it; a
manifest records the block size, since blocks of another size would not line up.
When every block is committed the output is assembled from them in input order,
atomically too.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Sequence

from ridgeline.frontends.batch.journal import Journal, Tally, read_json, read_records
from ridgeline.frontends.batch.records import Item, encode_record, record_view

_BLOCK_RE = re.compile(r"^lines-(\d{10})-(\d{10})\.jsonl$")


def block_dir(output: str) -> str:
  return output + ".blocks"


def block_name(first: int, last: int) -> str:
  return f"lines-{first:010d}-{last:010d}.jsonl"


class BlockJournal:
  """The committed blocks of one job's output, under the exclusive lock of
  `OUTPUT.blocks/lock` (a second job on the output raises LockedError)."""

  def __init__(self, output: str, input: str, block_size: int, fsync: bool = True):
    self.dir = block_dir(output)
    os.makedirs(self.dir, exist_ok=True)
    self.journal = Journal(os.path.join(self.dir, "lock"), f"another job is writing {output}",
                           stale=[os.path.join(glob.escape(self.dir), "*.tmp-*")])
    self.fsync = fsync
    manifest = os.path.join(self.dir, "manifest.json")
    old = read_json(manifest)
    if old is None:
      self.journal.write_json(manifest, {"input": os.path.abspath(input),
                                         "block_size": block_size})
    elif old.get("block_size") != block_size:
      self.close()
      raise ValueError(f"{self.dir} was written with block_size={old.get('block_size')}; "
                       f"rerun with the same block size, or delete it to start over")
    self.committed = {m.group(0) for m in map(_BLOCK_RE.match, os.listdir(self.dir)) if m}

  def path(self, name: str) -> str:
    return os.path.join(self.dir, name)

  def check(self, name: str, block: Sequence[Item]) -> list[dict]:
    """A committed block's records, checked against the input's lines and ids."""
    records = read_records(self.path(name))
    views = [record_view(r) for r in records]
    got = [(v["line"], None if v.get("id") is None else str(v["id"])) for v in views]
    want = [(it.line, it.key) for it in block]
    if got != want:
      raise RuntimeError(f"{self.path(name)} does not hold the input's lines and ids "
                         f"({len(got)} records for {len(want)} lines): the output belongs "
                         "to another input; delete it to start over")
    return records

  def commit(self, name: str, records: Sequence[dict]) -> None:
    """The block there whole, or not at all."""
    with self.journal.replace(self.path(name), fsync=self.fsync) as f:
      f.write(b"".join(encode_record(r) for r in records))
    self.committed.add(name)

  def assemble(self, names: Sequence[str], output: str) -> Tally:
    """The output: every block's records in input order, replaced atomically."""
    tally = Tally()
    with self.journal.replace(output) as out:
      for name in names:
        with open(self.path(name), "rb") as f:
          data = f.read()
        for raw in data.splitlines(keepends=True):
          tally.add(json.loads(raw))
        out.write(data)
    return tally

  def write_json(self, path: str, obj) -> None:
    self.journal.write_json(path, obj)

  def close(self) -> None:
    self.journal.release()
