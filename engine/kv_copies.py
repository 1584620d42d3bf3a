"""Page copies between the device's KV pools and the host tier (engine/kv_host.py).

When the prefix cache evicts a full page, the host tier may keep it: its rows of
every pool leaf are gathered on the device at once (`save_pages`, dispatched
before any later step can overwrite the page) and moved to host memory later,
when the tier settles. A later hit writes them back (`load_pages`), dispatched
before the step that reads them, the pools donated. A copy's width is padded to
a power of two with the scratch page (one compiled gather and scatter a width),
and `warm_copies` compiles every width ahead of time and measures what a copy
costs besides its bytes (the planner's price of a hit includes it).

`PageCopies` is a part of `Runner`, kept apart: it reads and replaces the
runner's pools (`kv`) and reads `num_pages`; `_init_copies` jits the scatter
with the pools' shardings (`_kv_shardings`).
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


class PageCopies:
  """The host tier's copies of the runner's pools (see the module docstring)."""

  def _init_copies(self) -> None:
    self._scatter = jax.jit(_scatter_pages, donate_argnums=(0,),
                            out_shardings=self._kv_shardings)

  def save_pages(self, pages: Sequence[int]) -> list[jax.Array]:
    """The pools' rows of `pages`, gathered now (dispatched before any later step
    writes them): one device array per pool leaf, page-major, padded to a power
    of two of rows (one compiled gather per width)."""
    return _gather_pages(self.kv, self._page_index(pages))

  def load_pages(self, pages: Sequence[int], rows: Sequence) -> None:
    """Writes rows (per pool leaf, [len(pages), ...]; numpy, or device arrays not
    yet moved to the host) into device `pages`, dispatched now (before the step
    that reads them), the pools donated."""
    idx = self._page_index(pages)
    padded = []
    for r in rows:
      extra = len(idx) - len(r)
      if isinstance(r, np.ndarray):
        padded.append(np.concatenate([r, np.zeros((extra,) + r.shape[1:], r.dtype)]))
      else:  # rows still on the device (gathered since the host tier last settled)
        padded.append(jnp.concatenate([r, jnp.zeros((extra,) + r.shape[1:], r.dtype)]))
    self.kv = self._scatter(self.kv, idx, padded)

  def warm_copies(self) -> float:
    """Compiles the host tier's gathers and scatters of every width up front;
    returns the fixed cost of a copy back: the best of 5 one-page round trips
    (gather, to host, scatter), dispatch and synchronisation included, in seconds."""
    width = 1
    while True:
      rows = self.save_pages([self.num_pages] * width)
      self.load_pages([self.num_pages] * width, rows)
      if width >= self.num_pages:
        break
      width *= 2
    jax.block_until_ready(self.kv)
    best = float("inf")
    for _ in range(5):
      t0 = time.perf_counter()
      rows = [np.asarray(x) for x in self.save_pages([self.num_pages])]
      self.load_pages([self.num_pages], [r[:1] for r in rows])
      jax.block_until_ready(self.kv)
      best = min(best, time.perf_counter() - t0)
    return best

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


@jax.jit
def _gather_pages(kv, index):
  return [x[index] for x in jax.tree.leaves(kv)]


def _scatter_pages(kv, index, rows):
  leaves, treedef = jax.tree.flatten(kv)
  return jax.tree.unflatten(treedef, [x.at[index].set(r.astype(x.dtype))
                                      for x, r in zip(leaves, rows)])
