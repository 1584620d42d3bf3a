"""The KV cache: device page pools (a pytree), the host page allocator, the prefix cache.

Device side: one (K, V) pair of `[pages, page_size, kv_heads, head_dim]` pools per
layer (see `model.transformer.init_kv_pages`). Separate arrays per layer rather
than one `[layers, ...]` array: the step's unrolled layer loop then reads and
updates each layer's pool in place, with no slicing of a stacked buffer.

Host side: pages are integers. The allocator keeps a reference count per page; a
page shared by several sequences (a common prompt prefix, the prompt of an `n > 1`
request) is released when its last owner lets go. Block tables are plain lists of
page ids on each sequence, sent to the device as small int32 arrays.

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
    while len(self._free) < n:
      page, _ = self._evictable.popitem(last=False)  # least recently released
      del self._page_of[self._key_of.pop(page)]
      self._free.append(page)
      self.evictions += 1
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


def pages_for(num_tokens: int, page_size: int) -> int:
  return -(-num_tokens // page_size)


class KVCacheManager:
  """The host side of the cache: which pages each sequence owns, the prefix cache,
  eviction and copy-on-write forks. The scheduler asks; only this class edits a
  sequence's `pages` and `page_keys` (the page ids of its block table, and the
  prefix-cache keys of its leading full pages).

  A sequence is anything with `pages: list[int]`, `page_keys: list[bytes]` and
  `num_computed: int`; `tokens` are passed in (the scheduler knows which are
  resolved).
  """

  def __init__(self, num_pages: int, page_size: int):
    self.page_size = page_size
    self.allocator = PageAllocator(num_pages)
    # The runner's scratch page (index num_pages, owned by no sequence): a block-table
    # entry whose page a sliding window has released points there.
    self.scratch = num_pages

  @property
  def num_free(self) -> int:
    return self.allocator.num_free

  def utilization(self) -> float:
    return self.allocator.utilization()

  def pages_needed(self, seq, num_tokens: int) -> int:
    return max(0, pages_for(num_tokens, self.page_size) - len(seq.pages))

  def allocate(self, seq, num_tokens: int) -> bool:
    """Gives `seq` pages for its first `num_tokens` tokens; False (nothing taken)
    if the pool cannot."""
    need = self.pages_needed(seq, num_tokens)
    if need > self.allocator.num_free:
      return False
    if need:
      seq.pages += self.allocator.allocate(need)
    return True

  def release(self, seq) -> None:
    """Drops the sequence's pages (full ones stay in the prefix cache) and resets it
    to nothing computed. Last pages first, so the LRU evicts a sequence's tail
    before its prefix."""
    self.allocator.free(p for p in reversed(seq.pages) if p != self.scratch)
    seq.pages, seq.page_keys, seq.num_computed = [], [], 0

  def release_before(self, seq, position: int) -> None:
    """Frees the pages that hold only positions before `position`, which a sliding
    window has moved past for good (every layer slides): the cache of a long
    sequence stays bounded. Their entries become the scratch page; attention
    masks those positions anyway. A published page stays in the prefix cache."""
    n = min(max(position, 0) // self.page_size, len(seq.pages))
    freed = [p for p in seq.pages[:n] if p != self.scratch]
    if freed:
      self.allocator.free(freed)
      seq.pages[:n] = [self.scratch] * n

  def reuse_prefix(self, seq, tokens: Sequence[int]) -> int:
    """Points a sequence about to start at the cached pages of its longest cached
    prefix and returns the tokens found. At least one token is left to compute:
    its logits are needed."""
    key = b""
    for j in range((len(tokens) - 1) // self.page_size):
      key = page_hash(key, tokens[j * self.page_size:(j + 1) * self.page_size])
      page = self.allocator.lookup(key)
      if page is None:
        break
      self.allocator.acquire(page)
      seq.pages.append(page)
      seq.page_keys.append(key)
    seq.num_computed = len(seq.pages) * self.page_size
    return seq.num_computed

  def publish(self, seq, tokens: Sequence[int]) -> None:
    """Offers every full page of `seq` whose K/V has been dispatched and whose
    tokens are all in `tokens` (the resolved ones) to the prefix cache. Pages
    computed by a step that is still running may be published: any step that
    reads them runs after it (one device stream; within a step every layer
    writes all its K/V before it attends)."""
    s = self.page_size
    for j in range(len(seq.page_keys), min(seq.num_computed, len(tokens)) // s):
      previous = seq.page_keys[-1] if seq.page_keys else b""
      key = page_hash(previous, tokens[j * s:(j + 1) * s])
      if seq.pages[j] != self.scratch:
        self.allocator.cache(seq.pages[j], key)
      seq.page_keys.append(key)

  def fork(self, parent, child, upto: int) -> None:
    """Shares the parent's full pages among its first `upto` tokens with `child`
    (copy-on-write without the copy: the child computes the rest of its prompt,
    fewer than a page of tokens plus the last one, itself; the shared pages are
    never written again)."""
    full = upto // self.page_size
    self.allocator.share(p for p in parent.pages[:full] if p != self.scratch)
    child.pages = list(parent.pages[:full])
    child.page_keys = list(parent.page_keys[:full])
    child.num_computed = full * self.page_size
