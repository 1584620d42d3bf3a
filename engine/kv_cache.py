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
import functools
import hashlib
from typing import Iterable, Sequence

import jax
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


@functools.partial(jax.jit, donate_argnums=(0,))
def copy_pages(kv, src: jax.Array, dst: jax.Array):
  """Copies whole pages src[i] -> dst[i] in every layer's pools (donated, in place)."""
  return jax.tree.map(lambda pool: pool.at[dst].set(pool[src]), kv)


def pool_bytes(kv) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(kv))
