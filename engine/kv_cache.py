"""The KV cache: device page pools (a pytree), the host page allocator, the prefix cache.

Device side: one (K, V) pair of `[pages, page_size, kv_heads, head_dim]` pools per
layer (see `model.transformer.init_kv_pages`). Separate arrays per layer rather
than one `[layers, ...]` array: the step's unrolled layer loop then reads and
updates each layer's pool in place, with no slicing of a stacked buffer.

Host side: pages are integers. The allocator keeps a reference count per page; a
page shared by several sequences (a common prompt prefix, the prompt of an `n > 1`
request) is released when its last owner lets go. Block tables are rows of one
int32 array, one row per slot of the live batch, sent to the device as they are.

Prefix cache: a page whose every slot has been computed is keyed by a hash chain
over the token ids up to and including it (`page_hash`), so equal keys mean equal
K/V. A released page that has a key is not freed but kept, evictable, in
least-recently-released order; a new sequence (or the next turn of a
conversation) that starts with the same tokens takes those pages instead of
recomputing them. Evictable pages are reclaimed, oldest first, only when the free
list is empty.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Iterable, Sequence

import numpy as np

from ridgeline.util import ceil_div


class OutOfPages(RuntimeError):
  """Raised when an allocation cannot be satisfied."""


def page_hash(previous: bytes, tokens: Sequence[int]) -> bytes:
  """Key of a full page: a hash of the previous page's key and this page's tokens.

  The chain makes a key depend on every token before it, so two pages share a
  key only if their whole prefixes are equal. 128-bit BLAKE2b: collisions (which
  would silently reuse wrong K/V) are out of reach at any realistic cache size.
  """
  h = hashlib.blake2b(previous, digest_size=16)
  h.update(np.asarray(tokens, np.int64).tobytes())
  return h.digest()


class PageAllocator:
  """Reference-counted pages with a prefix cache of released full pages."""

  def __init__(self, num_pages: int):
    if num_pages < 1:
      raise ValueError(f"num_pages must be >= 1, got {num_pages}")
    self.num_pages = num_pages
    self._free = collections.deque(range(num_pages))
    self._refs = [0] * num_pages
    self._key_of: dict[int, bytes] = {}  # page -> its prefix-cache key
    self._page_of: dict[bytes, int] = {}  # key -> page
    self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
    self.evictions = 0
    # With a host tier (engine/kv_host.py): called with the pages an allocation
    # evicted and their keys, before any later step can overwrite them.
    self.on_evict = None

  @property
  def num_free(self) -> int:
    """Pages an allocation can get: free ones plus evictable cached ones."""
    return len(self._free) + len(self._evictable)

  @property
  def num_used(self) -> int:
    """Pages owned by at least one sequence."""
    return self.num_pages - self.num_free

  @property
  def num_cached(self) -> int:
    return len(self._page_of)

  def utilization(self) -> float:
    return self.num_used / self.num_pages

  def allocate(self, n: int) -> list[int]:
    if n > self.num_free:
      raise OutOfPages(f"asked for {n} pages, {self.num_free} free")
    evicted, keys = [], []
    while len(self._free) < n:
      page, _ = self._evictable.popitem(last=False)  # least recently released
      key = self._key_of.pop(page)
      del self._page_of[key]
      evicted.append(page)
      keys.append(key)
      self._free.append(page)
      self.evictions += 1
    if evicted and self.on_evict is not None:
      self.on_evict(evicted, keys)
    pages = [self._free.popleft() for _ in range(n)]
    for p in pages:
      self._refs[p] = 1
    return pages

  def share(self, pages: Iterable[int]) -> None:
    """Adds an owner to pages already allocated."""
    for p in pages:
      if self._refs[p] <= 0:
        raise ValueError(f"page {p} is not allocated")
      self._refs[p] += 1

  def free(self, pages: Iterable[int]) -> None:
    """Drops one owner from each page. A page left with no owner becomes free, or,
    if it holds a cached prefix, evictable (most recently released last)."""
    for p in pages:
      if self._refs[p] <= 0:
        raise ValueError(f"page {p} freed twice")
      self._refs[p] -= 1
      if self._refs[p] == 0:
        if p in self._key_of:
          self._evictable[p] = None
        else:
          self._free.append(p)

  def refcount(self, page: int) -> int:
    return self._refs[page]

  # Prefix cache -------------------------------------------------------------

  def cache(self, page: int, key: bytes) -> None:
    """Publishes a full, computed page under `key`. If another page already holds
    the same key (two sequences computed the same prefix), that one is kept."""
    if key not in self._page_of and page not in self._key_of:
      self._page_of[key] = page
      self._key_of[page] = key

  def lookup(self, key: bytes) -> int | None:
    return self._page_of.get(key)

  def acquire(self, page: int) -> None:
    """Takes an owner's reference to a cached page (reviving it if evictable)."""
    if self._refs[page] == 0:
      del self._evictable[page]
    self._refs[page] += 1


class KVCacheManager:
  """The host side of the cache: the block table of every slot of the live batch
  (engine/live_batch.py), the prefix cache, eviction and copy-on-write forks.
  The scheduler asks; only this class edits block tables and prefix keys.

  Block tables are one int32 array `tables[slot, :num_pages[slot]]`, so a step's
  tables are a gather of its rows (the runner sends them as they are), and a
  page is added to a row only when its sequence crosses a page boundary (one
  step in `page_size`). `keys[slot]` are the prefix-cache keys of the slot's
  leading full pages (`num_keys[slot]` of them): a page is published once, when
  it has filled.
  """

  def __init__(self, num_pages: int, page_size: int, max_pages_per_seq: int,
               capacity: int = 1):
    self.page_size = page_size
    self.allocator = PageAllocator(num_pages)
    self.host = None  # the host tier (engine/kv_host.HostTier), see attach_host
    # The last reuse_prefix's host hit: tokens found there, copied back, recomputed.
    self.last_host = (0, 0, 0)
    # The runner's scratch page (index num_pages, owned by no sequence): a block-table
    # entry whose page a sliding window has released points there.
    self.scratch = num_pages
    self.width = max_pages_per_seq
    self.tables = np.zeros((0, max_pages_per_seq), np.int32)
    self.num_pages = np.zeros(0, np.int32)
    self.num_keys = np.zeros(0, np.int32)
    self.released = np.zeros(0, np.int32)  # leading pages a sliding window released
    self.keys: list[list[bytes]] = []
    self.grow(capacity)

  def grow(self, capacity: int) -> None:
    old = len(self.num_pages)
    tables = np.zeros((capacity, self.width), np.int32)
    tables[:old] = self.tables
    self.tables = tables
    for name in ("num_pages", "num_keys", "released"):
      a = np.zeros(capacity, np.int32)
      a[:old] = getattr(self, name)
      setattr(self, name, a)
    self.keys += [[] for _ in range(capacity - old)]

  @property
  def num_free(self) -> int:
    return self.allocator.num_free

  def utilization(self) -> float:
    return self.allocator.utilization()

  def pages(self, slot: int) -> np.ndarray:
    return self.tables[slot, :self.num_pages[slot]]

  def pages_needed(self, slot: int, num_tokens: int) -> int:
    return max(0, ceil_div(num_tokens, self.page_size) - int(self.num_pages[slot]))

  def allocate(self, slot: int, num_tokens: int) -> bool:
    """Gives the slot pages for its first `num_tokens` tokens; False (nothing
    taken) if the pool cannot."""
    need = self.pages_needed(slot, num_tokens)
    if need > self.allocator.num_free:
      return False
    if need:
      n = int(self.num_pages[slot])
      self.tables[slot, n:n + need] = self.allocator.allocate(need)
      self.num_pages[slot] = n + need
    return True

  def release(self, slot: int) -> None:
    """Drops the slot's pages (full ones stay in the prefix cache). Last pages
    first, so the LRU evicts a sequence's tail before its prefix."""
    pages = self.pages(slot)
    self.allocator.free(int(p) for p in pages[::-1] if p != self.scratch)
    self.num_pages[slot] = self.num_keys[slot] = self.released[slot] = 0
    self.keys[slot] = []

  def release_before(self, slot: int, position: int) -> None:
    """Frees the pages that hold only positions before `position`, which a sliding
    window has moved past for good (every layer slides): the cache of a long
    sequence stays bounded. Their entries become the scratch page; attention
    masks those positions anyway. A published page stays in the prefix cache."""
    n = min(max(position, 0) // self.page_size, int(self.num_pages[slot]))
    done = int(self.released[slot])
    if n > done:
      self.allocator.free(int(p) for p in self.tables[slot, done:n])
      self.tables[slot, done:n] = self.scratch
      self.released[slot] = n

  def reuse_prefix(self, slot: int, tokens: np.ndarray, limit: int | None = None) -> int:
    """Points a sequence about to start (holding no pages) at the cached pages of
    its longest cached prefix (of at most `limit` tokens) and returns the tokens
    found. At least one token is left to compute: its logits are needed."""
    key, found, keys = b"", [], []
    s = self.page_size
    most = len(tokens) - 1 if limit is None else min(len(tokens) - 1, limit)
    j = 0
    for j in range(most // s):
      key = page_hash(key, tokens[j * s:(j + 1) * s])
      page = self.allocator.lookup(key)
      if page is None:
        break
      self.allocator.acquire(page)
      found.append(page)
      keys.append(key)
    else:
      j = most // s
    self.last_host = (0, 0, 0)
    if self.host is not None and j < most // s:
      self._reuse_from_host(tokens, j, most // s, key, found, keys)
    self.tables[slot, :len(found)] = found
    self.num_pages[slot] = self.num_keys[slot] = len(found)
    self.keys[slot] = keys
    return len(found) * s

  def attach_host(self, host, save, load, prefer_copy) -> None:
    """Puts a host tier under the device pool. save(pages) -> a host copy of each
    page (a gather dispatched now, so before any later step writes them);
    load(pages, copies) writes host copies into device pages (dispatched now, so
    before the step that reads them); prefer_copy(context tokens, tokens,
    tokens after them): whether copying a host hit back beats recomputing it."""
    self.host, self._load, self.prefer_copy = host, load, prefer_copy
    self.allocator.on_evict = lambda pages, keys: host.put(keys, save(pages))

  def _reuse_from_host(self, tokens: np.ndarray, j: int, end: int, key: bytes,
                       found: list[int], keys: list[bytes]) -> None:
    """Extends a device prefix hit (pages before j; `key` is page j's key, a
    device miss) with the consecutive pages the host tier holds, if copying
    them back is priced cheaper than recomputing them and the pool has room:
    they get fresh device pages, published under their keys, their contents
    written in at once (ahead of any step that reads them)."""
    s = self.page_size
    hits = []
    while key in self.host:
      hits.append(key)
      j += 1
      if j >= end:
        break
      key = page_hash(key, tokens[j * s:(j + 1) * s])
    if not hits:
      return
    n = len(hits) * s
    rest = len(tokens) - (len(found) + len(hits)) * s
    if not self.prefer_copy(len(found) * s, n, rest) or len(hits) > self.allocator.num_free:
      self.last_host = (n, 0, n)
      return
    copies = self.host.take(hits)  # before allocating: that may evict host entries
    pages = self.allocator.allocate(len(hits))
    self._load(pages, copies)
    for page, k in zip(pages, hits):
      self.allocator.cache(page, k)
    self.last_host = (n, n, 0)
    found += pages
    keys += hits

  def publish(self, slot: int, tokens: np.ndarray, upto: int) -> None:
    """Offers every full page among the slot's first `upto` tokens (computed by a
    dispatched step and resolved: all in `tokens`) to the prefix cache. Pages
    computed by a step that is still running may be published: any step that
    reads them runs after it (one device stream; within a step every layer
    writes all its K/V before it attends)."""
    s = self.page_size
    keys = self.keys[slot]
    for j in range(len(keys), upto // s):
      key = page_hash(keys[-1] if keys else b"", tokens[j * s:(j + 1) * s])
      page = int(self.tables[slot, j])
      if page != self.scratch:
        self.allocator.cache(page, key)
      keys.append(key)
    self.num_keys[slot] = len(keys)

  def fork(self, parent: int, child: int, upto: int) -> int:
    """Shares the parent's full pages among its first `upto` tokens with `child`
    (copy-on-write without the copy: the child computes the rest of its prompt,
    fewer than a page of tokens plus the last one, itself; the shared pages are
    never written again). Returns the tokens the child has computed."""
    full = upto // self.page_size
    pages = self.tables[parent, :full]
    self.allocator.share(int(p) for p in pages if p != self.scratch)
    self.tables[child, :full] = pages
    self.num_pages[child] = full
    self.keys[child] = list(self.keys[parent][:full])
    self.num_keys[child] = len(self.keys[child])
    self.released[child] = self.released[parent]
    return full * self.page_size
