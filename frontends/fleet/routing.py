"""Routing (pure: no Ray, no engine): which engine of a fleet takes a request.

A prompt is cut into a hash chain of its leading blocks (`prefix_blocks`); a router
chooses among the engines' loads (`EngineLoad`, what the driver or the ingress knows
of each engine). `PrefixAffinity` sends a prefix back to the engine that saw it, so
that engine's prefix cache hits, unless it is the most loaded; `RoundRobin` is the
baseline. The batch job (frontends/fleet/job.py) and the Serve ingress
(frontends/fleet/serve.py) route with the same rule.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from typing import Any, Sequence


def prefix_blocks(prompt: Any, block_tokens: int = 16, block_chars: int = 64) -> list[bytes]:
  """Hash chain of a prompt's leading blocks: entry i stands for the whole prefix
  up to block i, so two prompts share entry i exactly when they share that prefix.

  Token-id prompts are cut every `block_tokens` ids (the KV page size by default,
  the unit the prefix cache reuses), text every `block_chars` characters, and chat
  prompts message by message (the system prompt, then each turn). A trailing
  partial block is left out: it cannot be a cached page.
  """
  if isinstance(prompt, str):
    units = [prompt[i:i + block_chars].encode("utf-8", "replace")
             for i in range(0, len(prompt) - block_chars + 1, block_chars)]
  elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
    units = [json.dumps(m, sort_keys=True, ensure_ascii=False).encode("utf-8", "replace")
             for m in prompt]
  elif isinstance(prompt, (list, tuple)):
    units = [",".join(str(t) for t in prompt[i:i + block_tokens]).encode()
             for i in range(0, len(prompt) - block_tokens + 1, block_tokens)]
  else:
    return []
  chain, h = [], b""
  for u in units:
    h = hashlib.blake2b(h + b"\0" + u, digest_size=12).digest()
    chain.append(h)
  return chain


@dataclasses.dataclass(frozen=True)
class EngineLoad:
  """What the router knows of one engine.

  requests: requests sent to it and not yet answered (running + waiting there).
  capacity: most requests the driver keeps in flight on it.
  max_batch: its decode batch (EngineConfig.max_batch).
  kv_utilization: fraction of its KV pages owned by sequences (its metrics).
  """

  requests: int
  capacity: int
  max_batch: int
  kv_utilization: float = 0.0

  @property
  def utilization(self) -> float:
    """How loaded: requests in flight per decode batch (past 1, a queue), or the
    KV cache's used fraction, whichever is higher."""
    return max(self.requests / self.max_batch, self.kv_utilization)

  @property
  def full(self) -> bool:
    return self.requests >= self.capacity


def _least_loaded(loads: Sequence[EngineLoad], candidates: Sequence[int]) -> int:
  # Most free capacity; among equals the one with fewer requests, then the lowest index.
  return min(candidates, key=lambda i: (loads[i].utilization, loads[i].requests, i))


class RoundRobin:
  """The baseline: engine 0, 1, 2, ... in turn, skipping full ones."""

  name = "round_robin"

  def __init__(self):
    self._next = 0

  def choose(self, blocks: Sequence[bytes], loads: Sequence[EngineLoad]) -> int | None:
    del blocks
    n = len(loads)
    for k in range(n):
      i = (self._next + k) % n
      if not loads[i].full:
        self._next = i + 1
        return i
    return None


class PrefixAffinity:
  """Prefix affinity, then least loaded.

  A request goes to the engine that was last sent its longest known prefix (at
  least `min_blocks` blocks of `prefix_blocks`), so that engine's prefix cache
  hits, unless that engine is the most loaded of the fleet by more than
  `tolerance` (in `EngineLoad.utilization`, 0 to 1) over the least loaded one;
  otherwise, and for requests with no known prefix, it goes to the engine with the
  most free capacity. Without the tolerance two engines a request apart would trade
  every group back and forth; the default, half a batch, lets an engine queue a
  little for its prefix before its requests go elsewhere. The prefix table is bounded (`max_entries`,
  least-recently-used first out), like the caches it stands for.
  """

  name = "prefix_affinity"

  def __init__(self, tolerance: float = 0.5, min_blocks: int = 1,
               max_entries: int = 1 << 20):
    self.tolerance = tolerance
    self.min_blocks = min_blocks
    self.max_entries = max_entries
    self._owner: collections.OrderedDict[bytes, int] = collections.OrderedDict()
    self.affinity_hits = self.spills = self.misses = 0

  def _match(self, blocks: Sequence[bytes]) -> tuple[int, int | None]:
    for depth in range(len(blocks), self.min_blocks - 1, -1):
      if depth and blocks[depth - 1] in self._owner:
        return depth, self._owner[blocks[depth - 1]]
    return 0, None

  def choose(self, blocks: Sequence[bytes], loads: Sequence[EngineLoad]) -> int | None:
    open_ = [i for i, load in enumerate(loads) if not load.full]
    if not open_:
      return None
    depth, owner = self._match(blocks)
    least = _least_loaded(loads, open_)
    if owner is None:
      self.misses += 1
    else:
      top = max(loads[i].utilization for i in open_)
      crowded = owner not in open_ or (
          loads[owner].utilization >= top
          and loads[owner].utilization - loads[least].utilization > self.tolerance)
      if not crowded:
        self.affinity_hits += 1
        self._remember(blocks, owner, depth)
        return owner
      self.spills += 1
    self._remember(blocks, least, depth)
    return least

  def _remember(self, blocks: Sequence[bytes], engine: int, matched: int) -> None:
    # A prefix keeps its engine (that cache holds it); blocks past the match are new.
    for k, h in enumerate(blocks):
      if k >= matched or h not in self._owner:
        self._owner[h] = engine
      self._owner.move_to_end(h)
    while len(self._owner) > self.max_entries:
      self._owner.popitem(last=False)

  def stats(self) -> dict:
    return {"affinity": self.affinity_hits, "spilled": self.spills, "no_prefix": self.misses}


def make_router(name: str, **kwargs):
  if name in ("prefix_affinity", "affinity", "prefix"):
    return PrefixAffinity(**kwargs)
  if name in ("round_robin", "rr"):
    return RoundRobin()
  raise ValueError(f"unknown routing policy {name!r}; known: prefix_affinity, round_robin")
