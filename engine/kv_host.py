"""The host tier of the KV cache: prefix pages evicted from the device, kept in
host memory by their hash-chain key, copied back when a later request needs
them and the copy is cheaper than recomputing them.

The device pool is the scarce tier. When the device's prefix cache evicts a
page (engine/kv_cache.py: a released, published page reclaimed for new work),
its K/V would be gone, and the next turn of that conversation would recompute
its whole history. With a host tier the evicted pages are first copied out:
the scheduler gathers them from the device pools (one jitted gather, dispatched
before the step that may overwrite them, so the copy is of the old contents;
`Runner.save_pages`) and starts their transfer to host memory without waiting
(`copy_to_host_async`); after the scheduler reads the next step (which ran after
the gather) they settle into numpy, and the device copies are dropped. A hit on
pages gathered in the same step copies them back device to device. The tier keeps
them in least-recently-used order within its byte budget.

On a prefix lookup (`KVCacheManager.reuse_prefix`) the device's own pages come
first; where they end, consecutive pages found here are a host hit. Whether to
copy them back or recompute them is priced per hit from the device's numbers
(`Planner.prefer_copy`): the bytes over the host link's bandwidth against the
prefill of those tokens on the roofline (their FLOPs and the weight and KV bytes
that step reads). A short prefix of a small model recomputes faster than it
crosses PCIe; a long conversation of a large model does not. A copy takes fresh
device pages, published under the same keys, and the scheduler writes the rows
into them (`Runner.load_pages`, one jitted scatter into the donated pools)
before the step that reads them.

Keys are the device cache's hash chain over the whole prefix, so a host page is
never served to a conversation whose earlier tokens differ. 8-bit pools move
their 8-bit values and scales as they are (every leaf of the pool pytree has the
page as its leading axis). On a GPU the gather's output is fetched into host
memory asynchronously; on this CPU the same path is a memcpy.
"""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np


class _Group:
  """The pages of one gather: device arrays (one per pool leaf, page-major) until
  `settle` moves them into host memory (numpy)."""

  __slots__ = ("arrays", "host")

  def __init__(self, arrays: Sequence):
    self.arrays = list(arrays)
    for a in self.arrays:
      a.copy_to_host_async()
    self.host: list[np.ndarray] | None = None

  def settle(self) -> None:
    self.host = [np.asarray(a) for a in self.arrays]
    self.arrays = []  # the device copies can go

  def rows(self, i: int) -> list:
    return [a[i] for a in (self.host if self.host is not None else self.arrays)]


class HostTier:
  """Evicted prefix pages in host memory, by key, least recently used first out.

  capacity_pages: how many pages the budget holds (`host_kv_cache_bytes` over
  the bytes of one page across all layers).
  """

  def __init__(self, capacity_pages: int, page_bytes: int):
    if capacity_pages < 1:
      raise ValueError(f"the host KV tier holds no page: capacity {capacity_pages} pages of "
                       f"{page_bytes} bytes; raise host_kv_cache_bytes")
    self.capacity = capacity_pages
    self.page_bytes = page_bytes
    self._entries: collections.OrderedDict[bytes, tuple[_Group, int]] = (
        collections.OrderedDict())
    self._unsettled: list[_Group] = []
    self.evictions = 0  # pages dropped from this tier (the budget was full)
    self.pages_in = 0  # pages copied device -> host
    self.pages_out = 0  # pages copied host -> device

  def __len__(self) -> int:
    return len(self._entries)

  def __contains__(self, key: bytes) -> bool:
    return key in self._entries

  def put(self, keys: Sequence[bytes], arrays: Sequence) -> None:
    """Keeps the pages of one gather (`arrays`: per pool leaf, row i is keys[i]'s
    page), evicting the least recently used beyond the budget."""
    group = _Group(arrays)
    self._unsettled.append(group)
    for i, key in enumerate(keys):
      self._entries[key] = (group, i)
      self._entries.move_to_end(key)
    self.pages_in += len(keys)
    while len(self._entries) > self.capacity:
      self._entries.popitem(last=False)
      self.evictions += 1

  @property
  def unsettled(self) -> int:
    """Gathers not yet in host memory."""
    return len(self._unsettled)

  def settle(self, count: int) -> None:
    """Moves the pages of the oldest `count` gathers into host memory. The
    scheduler passes the gathers made before the step it has just read was
    dispatched: they ran before it, so nothing waits."""
    for group in self._unsettled[:count]:
      group.settle()
    del self._unsettled[:count]

  def take(self, keys: Sequence[bytes]) -> list:
    """The rows of `keys` (all present), stacked per pool leaf: [len(keys), ...]
    (numpy; or device arrays for pages gathered since the last settle, which
    then go back device to device, without waiting for the gather)."""
    parts = []
    for key in keys:
      group, i = self._entries[key]
      self._entries.move_to_end(key)
      parts.append(group.rows(i))
    self.pages_out += len(keys)
    if all(isinstance(x, np.ndarray) for x in parts[0]):
      return [np.stack(leaf) for leaf in zip(*parts)]
    import jax.numpy as jnp
    return [jnp.stack([jnp.asarray(x) for x in leaf]) for leaf in zip(*parts)]

  @property
  def bytes_used(self) -> int:
    return len(self._entries) * self.page_bytes
