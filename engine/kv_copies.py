"""Page copies between the device's KV pools and the host tier (engine/kv_host.py).

A page in the host tier is a few JAX arrays in the `pinned_host` memory kind: on
a GPU, page-locked host memory that the copy engines read and write directly; on
this CPU an ordinary host buffer, through the same code. One array per group of
like pool leaves (same dtype and page shape: every layer's K and V of a float
pool together; an 8-bit pool's values and scales apart), `[leaves, page_size,
kv_heads, head_dim]`, sharded like the pools: each device's KV heads go to its
own host memory and come back to it.

`save_pages` is one jitted gather whose outputs are those host arrays,
dispatched when the prefix cache evicts the pages, so before any later step can
overwrite them: the transfer to the host runs in the device's stream after the
step in flight, and the host waits for nothing. `load_pages` is one jitted
program that brings a hit's pages to the device and scatters them into the
donated pools, dispatched before the step that reads them (a page whose save
has not finished yet is waited for by that program, on the device, not by the
host). A copy's width is padded to a power of two with the scratch page, so
there is one compiled gather and scatter a width (up to MAX_WIDTH pages; more
go in several); `warm_copies` compiles every width ahead of time and measures what a copy costs besides its bytes (the
planner's price of a hit includes it).

`PageCopies` is a part of `Runner`, kept apart: it reads and replaces the
runner's pools (`kv`) and reads `num_pages`, `mesh` and `_kv_shardings`.
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

HOST_MEMORY = "pinned_host"
MAX_WIDTH = 64  # pages one gather or scatter moves; more go in several

HostPage = tuple[jax.Array, ...]  # one page: an array per group of like pool leaves


class PageCopies:
  """The host tier's copies of the runner's pools (see the module docstring)."""

  def _init_copies(self) -> None:
    leaves = jax.tree.leaves(self.kv)
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(leaves):
      groups.setdefault((x.dtype, x.shape[1:], x.sharding.spec), []).append(i)
    self._copy_groups = list(groups.values())
    device = self.mesh.devices.flat[0]
    if (self.config.host_kv_cache_bytes is not None
        and HOST_MEMORY not in {m.kind for m in device.addressable_memories()}):
      raise ValueError(f"the host KV tier needs a '{HOST_MEMORY}' memory; {device.platform} "
                       f"devices have {[m.kind for m in device.addressable_memories()]}")

    def page_sharding(group: list[int], kind: str) -> NamedSharding:
      x = leaves[group[0]]
      spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
      return NamedSharding(self.mesh, P(None, *spec[1:]), memory_kind=kind)
    self._host_page = tuple(page_sharding(g, HOST_MEMORY) for g in self._copy_groups)
    self._device_page = tuple(page_sharding(g, "device") for g in self._copy_groups)
    self._gathers: dict[int, jax.stages.Wrapped] = {}
    self._scatter = jax.jit(self._scatter_pages, donate_argnums=(0,),
                            out_shardings=self._kv_shardings)

  def save_pages(self, pages: Sequence[int]) -> list[HostPage]:
    """`pages` of the pools, gathered into host memory by a program dispatched
    now (so before any later step writes them); one HostPage each."""
    out = []
    for at in range(0, len(pages), MAX_WIDTH):
      part = pages[at:at + MAX_WIDTH]
      idx = self._page_index(part)
      out += self._gather(len(idx))(self.kv, idx)[:len(part)]
    return out

  def load_pages(self, pages: Sequence[int], copies: Sequence[HostPage]) -> None:
    """Writes host pages into device `pages`, dispatched now (before the step that
    reads them), the pools donated."""
    for at in range(0, len(pages), MAX_WIDTH):
      part = copies[at:at + MAX_WIDTH]
      idx = self._page_index(pages[at:at + MAX_WIDTH])
      padded = tuple(part) + (part[0],) * (len(idx) - len(part))  # into the scratch page
      self.kv = self._scatter(self.kv, idx, padded)

  def warm_copies(self) -> float:
    """Compiles the host tier's gathers and scatters of every width up front;
    returns the fixed cost of a copy back: the best of 5 one-page round trips
    (to the host, back), dispatch and synchronisation included, in seconds."""
    width = 1
    while True:
      self.load_pages([self.num_pages] * width, self.save_pages([self.num_pages] * width))
      if width >= min(self.num_pages, MAX_WIDTH):
        break
      width *= 2
    jax.block_until_ready(self.kv)
    best = float("inf")
    for _ in range(5):
      t0 = time.perf_counter()
      saved = jax.block_until_ready(self.save_pages([self.num_pages]))
      self.load_pages([self.num_pages], saved)
      jax.block_until_ready(self.kv)
      best = min(best, time.perf_counter() - t0)
    return best

  def export_copies(self, width: int = 2, platforms: Sequence[str] = ("cuda",)
                    ) -> tuple[jax.export.Exported, jax.export.Exported]:
    """The gather and the scatter of `width` pages lowered for `platforms` with
    jax.export (their host memory kinds included), on any host: like
    `Runner.export`, a check that the GPU path lowers, run on a CPU."""
    pages = [self.num_pages] * width
    idx = self._page_index(pages)
    gather = jax.export.export(self._gather(len(idx)), platforms=platforms)(self.kv, idx)
    scatter = jax.export.export(self._scatter, platforms=platforms)(
        self.kv, idx, tuple(self.save_pages(pages)))
    return gather, scatter

  def _gather(self, width: int) -> jax.stages.Wrapped:
    """The compiled gather of `width` pages into host memory."""
    if width not in self._gathers:
      self._gathers[width] = jax.jit(self._gather_pages,
                                     out_shardings=(self._host_page,) * width)
    return self._gathers[width]

  def _gather_pages(self, kv, idx) -> tuple[HostPage, ...]:
    leaves = jax.tree.leaves(kv)
    stacks = [jnp.stack([leaves[i][idx] for i in g], axis=1) for g in self._copy_groups]
    return tuple(tuple(s[j] for s in stacks) for j in range(len(idx)))

  def _scatter_pages(self, kv, idx, pages: tuple[HostPage, ...]):
    pages = jax.device_put(pages, (self._device_page,) * len(pages))
    leaves, treedef = jax.tree.flatten(kv)
    for g, group in enumerate(self._copy_groups):
      rows = jnp.stack([p[g] for p in pages])  # [width, leaves, page_size, ...]
      for k, i in enumerate(group):
        leaves[i] = leaves[i].at[idx].set(rows[:, k])
    return jax.tree.unflatten(treedef, leaves)

  def _page_index(self, pages: Sequence[int]) -> np.ndarray:
    """`pages`, padded with the scratch page to a power of two."""
    n = len(pages)
    idx = np.full(1 << max(0, (n - 1).bit_length()), self.num_pages, np.int32)
    idx[:n] = pages
    return idx

  @property
  def page_bytes(self) -> int:
    """Bytes of one page across every layer's pools (8-bit values and scales as
    they are)."""
    return sum(x.nbytes // x.shape[0] for x in jax.tree.leaves(self.kv))
