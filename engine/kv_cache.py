"""The KV cache: device page pools (a pytree) and the host-side page allocator.

Device side: one (K, V) pair of `[pages, page_size, kv_heads, head_dim]` pools per
layer (see `model.transformer.init_kv_pages`). Separate arrays per layer rather
than one `[layers, ...]` array: the step's unrolled layer loop then reads and
updates each layer's pool in place, with no slicing of a stacked buffer.

Host side: pages are integers. The allocator keeps a free list and a reference
count per page; a page shared by several sequences (the prompt of an `n > 1`
request) is freed when its last owner lets go. Block tables are plain lists of
page ids on each sequence, sent to the device as small int32 arrays.
"""

from __future__ import annotations

import collections
import functools
from typing import Iterable

import jax


class OutOfPages(RuntimeError):
  """Raised when an allocation cannot be satisfied from free pages."""


class PageAllocator:
  """Free list plus reference counts over `num_pages` pages."""

  def __init__(self, num_pages: int):
    if num_pages < 1:
      raise ValueError(f"num_pages must be >= 1, got {num_pages}")
    self.num_pages = num_pages
    self._free = collections.deque(range(num_pages))
    self._refs = [0] * num_pages

  @property
  def num_free(self) -> int:
    return len(self._free)

  @property
  def num_used(self) -> int:
    return self.num_pages - len(self._free)

  def utilization(self) -> float:
    return self.num_used / self.num_pages

  def allocate(self, n: int) -> list[int]:
    if n > len(self._free):
      raise OutOfPages(f"asked for {n} pages, {len(self._free)} free")
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
    """Drops one owner from each page; pages with no owner left become free."""
    for p in pages:
      if self._refs[p] <= 0:
        raise ValueError(f"page {p} freed twice")
      self._refs[p] -= 1
      if self._refs[p] == 0:
        self._free.append(p)

  def refcount(self, page: int) -> int:
    return self._refs[page]


def pages_for(num_tokens: int, page_size: int) -> int:
  return -(-num_tokens // page_size)


@functools.partial(jax.jit, donate_argnums=(0,))
def copy_pages(kv, src: jax.Array, dst: jax.Array):
  """Copies whole pages src[i] -> dst[i] in every layer's pools (donated, in place)."""
  return jax.tree.map(lambda pool: pool.at[dst].set(pool[src]), kv)


def pool_bytes(kv) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(kv))
