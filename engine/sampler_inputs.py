"""The sampler's inputs: every sequence's parameters as columns, a step's rows as gathers.

Every per-request parameter travels to the device as a row of an array, so a new
combination of parameters never recompiles: the sampler is the second executable
of the step (engine/runner.py), and which optional work it does is decided on
the device from those arrays (engine/sampling.py). A sequence's parameters are
written once into a `SamplingTable` (a column per parameter, a row per slot of
the live batch) and a step's `SamplerInputs` are gathers of its rows. Only a few
shapes can change: the penalty history (HISTORY_TOKENS pairs unless the step's
penalized rows hold more), the banned ids (BAN_WIDTH a row unless longer); each
compiles its own sampler variant the first time it is used. The allowed-token
masks are always [R, ceil(V/32)].

Nothing here touches the device: this is host work on numpy arrays, per step.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

from ridgeline.engine.sampling_params import SamplingParams
from ridgeline.util import bucket_size, ceil_div


class SamplerInputs(NamedTuple):
  """Per-row sampling state, host-built, padded to the step's sample rows R.

  Arrays rather than Python scalars so every value is data to the compiled step,
  not part of its cache key. Which work runs (penalties, bans, the random draw,
  the top-k/top-p thresholds, log-probabilities, allowed-token masks) is decided on
  the device from these arrays (`lax.cond`), so one compiled step serves every
  mix of parameters, and a row that uses none of them costs nothing extra.
  """

  temperature: np.ndarray  # [R] f32, 0 = greedy
  top_k: np.ndarray  # [R] i32, 0 = off (clamped to the vocabulary)
  top_p: np.ndarray  # [R] f32
  min_p: np.ndarray  # [R] f32
  repetition_penalty: np.ndarray  # [R] f32
  presence_penalty: np.ndarray  # [R] f32
  frequency_penalty: np.ndarray  # [R] f32
  seed: np.ndarray  # [R, 2] u32 (low, high words of the 64-bit seed)
  token_index: np.ndarray  # [R] i32, the sequence's own output position
  logprobs: np.ndarray  # [R] bool, the row wants log-probabilities
  banned: np.ndarray  # [R, NBAN] i32 ids that may not be sampled (min_tokens), -1 pad
  # The token history of the rows that use penalties, as H (row, id) pairs
  # (row -1: padding). An entry whose token the host has not read yet (the one
  # in flight) has id -1 and names the previous step's output row that holds it
  # in `history_src`; the runner fills it in on the device.
  history_rows: np.ndarray  # [H] i32
  history_ids: np.ndarray  # [H] i32
  history_src: np.ndarray  # [H] i32, -1: the id is known
  history_is_output: np.ndarray  # [H] bool
  # Allowed-token bitmasks (allowed_token_ids, structured outputs): bit t % 32 of
  # word t // 32 set when token t may be sampled. None when no row has one: the
  # runner then sends an all-zero array it keeps on the device, so masked and
  # unmasked steps share one compiled sampler.
  allowed: np.ndarray | None  # [R, ceil(V/32)] u32
  allowed_row: np.ndarray  # [R] i32 which mask a row uses, -1: none


BAN_WIDTH = 8  # banned ids per row in the standard step; longer lists widen it
# (row, id) pairs of penalty history in the standard step: the prompts and outputs
# of all its rows that use penalties; a longer history widens it (a new variant).
HISTORY_TOKENS = 4096


@dataclasses.dataclass(frozen=True)
class History:
  """The penalty history of one sample row: its tokens so far and, if its last
  output token is still on the device, the previous step's output row that
  sampled it (`inflight_row`, -1: none)."""

  prompt: np.ndarray  # [P] i32
  output: np.ndarray  # [O] i32, the resolved output tokens
  inflight_row: int = -1


class SamplingTable:
  """Every started sequence's sampling parameters as columns, one row per slot.

  A sequence's parameters are written once, when it gets its slot (`set`); a
  step's `SamplerInputs` are then gathers of these columns by the step's rows
  (`inputs`), not a loop over Python objects: building them for 256 rows this
  way costs tens of microseconds, a per-row loop cost ~8 us a row.
  """

  _COLUMNS = (("temperature", np.float32, 0), ("top_k", np.int32, 0),
              ("top_p", np.float32, 1), ("min_p", np.float32, 0),
              ("repetition_penalty", np.float32, 1), ("presence_penalty", np.float32, 0),
              ("frequency_penalty", np.float32, 0), ("logprobs", bool, False))

  def __init__(self, capacity: int, vocab_size: int):
    self.vocab_size = vocab_size
    self.capacity = 0
    self.columns: dict[str, np.ndarray] = {}
    self.seed = np.zeros((0, 2), np.uint32)
    self.allowed: dict[int, np.ndarray] = {}  # slot -> [W] u32 mask of allowed_token_ids
    self.grow(capacity)

  def grow(self, capacity: int) -> None:
    for name, dtype, fill in self._COLUMNS:
      col = np.full(capacity, fill, dtype)
      col[:self.capacity] = self.columns.get(name, col[:0])
      self.columns[name] = col
    seed = np.zeros((capacity, 2), np.uint32)
    seed[:self.capacity] = self.seed
    self.seed, self.capacity = seed, capacity

  def set(self, slot: int, params: SamplingParams, seed: int) -> None:
    c = self.columns
    c["temperature"][slot] = params.temperature
    c["top_k"][slot] = min(params.top_k, self.vocab_size)
    c["top_p"][slot] = params.top_p
    c["min_p"][slot] = params.min_p
    c["repetition_penalty"][slot] = params.repetition_penalty
    c["presence_penalty"][slot] = params.presence_penalty
    c["frequency_penalty"][slot] = params.frequency_penalty
    c["logprobs"][slot] = params.logprobs is not None
    self.seed[slot] = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    self.allowed.pop(slot, None)
    if params.allowed_token_ids is not None:
      self.allowed[slot] = token_mask(params.allowed_token_ids, self.vocab_size)

  def inputs(self, row_slots: np.ndarray, token_index: np.ndarray,
             banned: np.ndarray | None = None, histories: dict[int, History] | None = None,
             history_width: int | None = None) -> SamplerInputs:
    """The inputs of R = len(row_slots) sample rows: row r samples for slot
    row_slots[r] (-1: a padding row, greedy and plain); token_index [R] the
    output position each row samples; banned [R, n] ids a row may not sample
    (-1 pad; None: none); histories: the penalty history of each penalized row
    (by row); history_width: the number of history pairs (default
    HISTORY_TOKENS; a longer history rounds up to a power of two)."""
    b = len(row_slots)
    live = row_slots >= 0
    at = np.where(live, row_slots, 0)
    cols = {}
    for name, dtype, fill in self._COLUMNS:
      cols[name] = np.where(live, self.columns[name][at], fill).astype(dtype)
    seed = np.where(live[:, None], self.seed[at], 0).astype(np.uint32)
    # Banned ids are left-packed in each row; the width is BAN_WIDTH unless a
    # row bans more.
    need = 0 if banned is None else int((banned >= 0).sum(axis=1).max(initial=0))
    width = bucket_size(need, BAN_WIDTH)
    ban = np.full((b, width), -1, np.int32)
    if banned is not None:
      n = min(width, banned.shape[1])
      ban[:, :n] = banned[:, :n]
    histories = histories or {}
    total = sum(len(h.prompt) + len(h.output) + (h.inflight_row >= 0)
                for h in histories.values())
    hist_width = history_width or HISTORY_TOKENS
    if total > hist_width:
      hist_width = bucket_size(total, 16)
    history_rows = np.full(hist_width, -1, np.int32)
    history_ids = np.full(hist_width, -1, np.int32)
    history_src = np.full(hist_width, -1, np.int32)
    is_output = np.zeros(hist_width, bool)
    k = 0
    for row, h in histories.items():
      n_prompt, n = len(h.prompt), len(h.prompt) + len(h.output)
      history_rows[k:k + n] = row
      history_ids[k:k + n_prompt] = h.prompt
      history_ids[k + n_prompt:k + n] = h.output
      is_output[k + n_prompt:k + n] = True
      k += n
      if h.inflight_row >= 0:  # the token in flight, filled in on the device
        history_rows[k], history_src[k], is_output[k] = row, h.inflight_row, True
        k += 1
    allowed, allowed_row = None, np.full(b, -1, np.int32)
    masked = [r for r in range(b) if live[r] and int(row_slots[r]) in self.allowed]
    if masked:
      allowed = np.zeros((b, ceil_div(self.vocab_size, 32)), np.uint32)
      for r in masked:
        allowed[r] = self.allowed[int(row_slots[r])]
        allowed_row[r] = r
    return SamplerInputs(cols["temperature"], cols["top_k"], cols["top_p"], cols["min_p"],
                         cols["repetition_penalty"], cols["presence_penalty"],
                         cols["frequency_penalty"], seed, token_index.astype(np.int32),
                         cols["logprobs"], ban, history_rows, history_ids, history_src,
                         is_output, allowed, allowed_row)


def token_mask(token_ids: Sequence[int], vocab_size: int) -> np.ndarray:
  """[ceil(V/32)] u32: bit t % 32 of word t // 32 is set for each token t."""
  mask = np.zeros(ceil_div(vocab_size, 32), np.uint32)
  ids = np.asarray(token_ids, np.int64)
  np.bitwise_or.at(mask, ids // 32, (1 << (ids % 32)).astype(np.uint32))
  return mask


@dataclasses.dataclass(frozen=True)
class SampleRow:
  """One sample row for `inputs_for` (tests and benchmarks): its parameters,
  seed, output position, banned ids and penalty history."""

  params: SamplingParams
  seed: int = 0
  token_index: int = 0
  banned: Sequence[int] = ()
  history: History | None = None


def inputs_for(rows: Sequence[SampleRow | None], num_rows: int, vocab_size: int
               ) -> SamplerInputs:
  """SamplerInputs of `num_rows` rows from explicit rows (None or missing: padding)."""
  table = SamplingTable(max(1, num_rows), vocab_size)
  slots = np.full(num_rows, -1, np.int64)
  index = np.zeros(num_rows, np.int32)
  banned = np.full((num_rows, max([len(r.banned) for r in rows if r] + [1])), -1, np.int32)
  histories = {}
  for i, r in enumerate(rows):
    if r is None:
      continue
    table.set(i, r.params, r.seed)
    slots[i], index[i] = i, r.token_index
    banned[i, :len(r.banned)] = r.banned
    if r.history is not None and r.params.uses_penalties:
      histories[i] = r.history
  return table.inputs(slots, index, banned, histories)

