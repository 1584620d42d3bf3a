"""Small helpers shared by the engine, the batch job, the checkpoint code and the scripts.

One copy each: ceiling division, shape buckets, percentile summaries and atomic
JSON writes. Nothing here imports the rest of the project (model/ uses it too).
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


def ceil_div(a: int, b: int) -> int:
  """ceil(a / b) for integers, exactly (no float rounding for large a)."""
  return -(-a // b)


def bucket_size(n: int, minimum: int = 1) -> int:
  """The smallest power-of-two multiple of `minimum` that holds n."""
  b = minimum
  while b < n:
    b *= 2
  return b


def power_of_two_buckets(limit: int, start: int = 1) -> tuple[int, ...]:
  """start, 2*start, 4*start, ... and finally `limit` itself (if not a power)."""
  out, b = [], start
  while b < limit:
    out.append(b)
    b *= 2
  out.append(limit)
  return tuple(out)


def bucket(n: int, buckets: Sequence[int]) -> int:
  """The first bucket that holds n."""
  for b in buckets:
    if n <= b:
      return b
  raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def percentiles(values: Iterable[float], ps: Sequence[int] = PERCENTILES, *,
                count: bool = False, maximum: bool = False) -> dict | None:
  """{"p50", "p90", "p99", "mean"} (plus "count" / "max" when asked) of `values`,
  or None when there are none."""
  a = np.asarray(list(values) if not hasattr(values, "__len__") else values, np.float64)
  if a.size == 0:
    return None
  out: dict[str, Any] = {}
  if count:
    out["count"] = int(a.size)
  out["mean"] = float(a.mean())
  out.update({f"p{p}": float(np.percentile(a, p)) for p in ps})
  if maximum:
    out["max"] = float(a.max())
  return out


def json_default(x):
  """json.dump's `default` for numpy values (and anything else: its str)."""
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", fsync: bool = True) -> Iterator[Any]:
  """A file to write `path` through: a temporary file beside it, flushed (and
  fsynced) and renamed over `path` when the block ends, removed if it raises,
  so a reader never sees half a file and a crash leaves the old one."""
  path = os.fspath(path)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, mode) as f:
      yield f
      f.flush()
      if fsync:
        os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json_atomic(path: str | os.PathLike, obj: Any = None, *, text: str | None = None,
                      indent: int | None = 2) -> None:
  """Writes `obj` as JSON (or `text` as is) through `atomic_write`."""
  if text is None:
    text = json.dumps(obj, indent=indent, default=json_default) + "\n"
  with atomic_write(path) as f:
    f.write(text)
