"""The host tier of the KV cache: prefix pages evicted from the device, kept in
host memory by their hash-chain key, copied back when a later request needs
them and the copy is cheaper than recomputing them.

The device pool is the scarce tier. When the device's prefix cache evicts a
page (engine/kv_cache.py: a released, published page reclaimed for new work),
its K/V would be gone, and the next turn of that conversation would recompute
its whole history. With a host tier the evicted pages are first copied out: one
jitted gather into `pinned_host` memory (engine/kv_copies.py,
`Runner.save_pages`), dispatched before the step that may overwrite them, so the
copy is of the old contents; the host does not wait for it. The tier keeps the
pages by key in least-recently-used order within its byte budget. A preempted
sequence's full pages (its answer's too) are published pages like any other:
evicted, they come here, and its recomputation copies them back.

On a prefix lookup (`KVCacheManager.reuse_prefix`) the device's own pages come
first; where they end, consecutive pages found here are a host hit. Whether to
copy them back or recompute them is priced per hit from the device's numbers
(`Planner.prefer_copy`): the bytes over the host link's bandwidth against the
prefill of those tokens on the roofline (their FLOPs and the weight and KV bytes
that step reads), at the share of the roofline this device's prefill steps are
measured to achieve. A short prefix of a small model recomputes faster than it
crosses PCIe; a long conversation of a large model does not. A copy takes fresh
device pages, published under the same keys, and the scheduler writes the pages
into them (`Runner.load_pages`, one jitted program that brings them to the
device and scatters them into the donated pools) before the step that reads
them.

Keys are the device cache's hash chain over the whole prefix, so a host page is
never served to a conversation whose earlier tokens differ. 8-bit pools move
their 8-bit values and scales as they are (every leaf of the pool pytree has the
page as its leading axis); sharded pools move each device's shard to and from
its own host memory.
"""

from __future__ import annotations

import collections
from typing import Sequence

from ridgeline.engine.kv_copies import HostPage


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
    self._entries: collections.OrderedDict[bytes, HostPage] = collections.OrderedDict()
    self.evictions = 0  # pages dropped from this tier (the budget was full)
    self.pages_in = 0  # pages copied device -> host
    self.pages_out = 0  # pages copied host -> device

  def __len__(self) -> int:
    return len(self._entries)

  def __contains__(self, key: bytes) -> bool:
    return key in self._entries

  def put(self, keys: Sequence[bytes], pages: Sequence[HostPage]) -> None:
    """Keeps `pages` under `keys`, evicting the least recently used beyond the
    budget."""
    for key, page in zip(keys, pages):
      self._entries[key] = page
      self._entries.move_to_end(key)
    self.pages_in += len(keys)
    while len(self._entries) > self.capacity:
      self._entries.popitem(last=False)
      self.evictions += 1

  def take(self, keys: Sequence[bytes]) -> list[HostPage]:
    """The pages of `keys` (all present), most recently used now."""
    for key in keys:
      self._entries.move_to_end(key)
    self.pages_out += len(keys)
    return [self._entries[key] for key in keys]

  @property
  def bytes_used(self) -> int:
    return len(self._entries) * self.page_bytes
