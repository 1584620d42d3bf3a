"""A step's model-pass inputs: every decode row and prefill chunk packed as one flat batch.

A step is every decoding sequence's next token and the prefill chunks chosen for
it, packed as one flat batch (`ModelInputs`, see `attention.StepLayout`): the
weights are read once per step, for all of its tokens. The decode region comes
first, one token a row (`DecodeRows`: host arrays, built from the live batch's
columns with no Python per row); then the prefill region, in tiles of
`prefill_tile` tokens, one `Chunk` after another. Both regions are padded to the
step's shape (`StepShape`, a bucket each), and block tables are at full width,
so a step's arrays have one of a fixed set of shapes (engine/step_compiler.py
compiles them).

A decode row's input token may be one the previous step sampled and the host has
not read yet: it names that step's output row (`DecodeRows.src`, -1 when the
host knows the token), and the device takes the token from the previous output
directly, so the host can dispatch step N+1 before it reads step N.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

from ridgeline.engine import config as config_lib
from ridgeline.engine.config import EngineConfig, StepShape
from ridgeline.model import attention
from ridgeline.util import ceil_div


class DecodeRows(NamedTuple):
  """The decoding sequences of a step, one token each (host arrays, [d] rows):
  the token at `positions` is `tokens` if the host knows it, else the previous
  step's output row `src` sampled it; `tables` are their block tables."""

  tokens: np.ndarray  # [d] i32
  src: np.ndarray  # [d] i32, -1: the token is in `tokens`
  positions: np.ndarray  # [d] i32
  tables: np.ndarray  # [d, NB] i32


@dataclasses.dataclass
class Chunk:
  """Prompt tokens of one sequence at positions start, start+1, ...; `sample`:
  the chunk ends the prompt, so its last token's logits are sampled.

  Scoring (prompt log-probabilities): the positions score_start, score_start+1,
  ... (len(score_targets) of them, inside the chunk) get the log-probability of
  their next token (`score_targets`) and their top `score_k` alternatives."""

  tokens: np.ndarray
  start: int
  pages: np.ndarray
  sample: bool = False
  score_start: int = 0
  score_targets: np.ndarray | None = None
  score_k: int = 0


@dataclasses.dataclass
class Row:
  """A sequence's tokens at positions start, start+1, ... (benchmarks and tests):
  one token is a decode row, more a prefill chunk."""

  tokens: Sequence[int]
  start: int
  pages: Sequence[int]


class ModelInputs(NamedTuple):
  """The device inputs of one step's model pass (a pytree of int32 arrays)."""

  tokens: np.ndarray  # [N]
  positions: np.ndarray  # [N], -1 for padding
  slots: np.ndarray  # [N]
  src: np.ndarray  # [Bd] previous step's output row of a decode row's token, -1: `tokens`
  layout: attention.StepLayout
  sample_index: np.ndarray  # [R] token whose logits each sample row reads
  # Prompt positions scored (prompt log-probabilities): S of them, 0 when no
  # chunk of the step asks (a bucket otherwise: a variant of its own).
  score_index: np.ndarray  # [S] token whose logits are scored
  score_target: np.ndarray  # [S] the token whose log-probability is read there
  score_k: np.ndarray  # [S] alternatives wanted there (-1: padding)



def build(config: EngineConfig, shape: StepShape, decode: DecodeRows, chunks: Sequence[Chunk],
          scratch_slot: int) -> ModelInputs:
  """The host arrays of a step's model pass: the decode region as whole-array
  operations (no Python per row), then a few lines per prefill chunk. Padding
  tokens write their K/V to `scratch_slot` (a page no sequence owns)."""
  cfg = config
  num_decode, num_prefill = shape.decode, shape.prefill
  tile, page = cfg.prefill_tile, cfg.page_size
  num_tiles = num_prefill // tile
  n = num_decode + num_prefill
  width = cfg.max_pages_per_seq
  tokens = np.zeros(n, np.int32)
  positions = np.full(n, -1, np.int32)
  slots = np.full(n, scratch_slot, np.int32)
  src = np.full(num_decode, -1, np.int32)
  decode_tables = np.zeros((num_decode, width), np.int32)
  decode_lens = np.zeros(num_decode, np.int32)
  tile_tables = np.zeros((num_tiles, width), np.int32)
  tile_lens = np.zeros(num_tiles, np.int32)
  num_samples = cfg.sample_rows(shape)
  sample_index = np.zeros(num_samples, np.int32)

  d = len(decode.tokens)
  if d:
    pos = decode.positions
    tokens[:d] = decode.tokens
    src[:d] = decode.src
    decode_tables[:d] = decode.tables
    positions[:d] = pos
    slots[:d] = decode.tables[np.arange(d), pos // page] * page + pos % page
    decode_lens[:d] = pos + 1
    sample_index[:d] = np.arange(d)

  score_index, score_target, score_k = [], [], []
  t = 0  # next tile
  for j, c in enumerate(chunks):
    m = len(c.tokens)
    at = num_decode + t * tile
    pos = np.arange(c.start, c.start + m, dtype=np.int32)
    pages = np.asarray(c.pages, np.int32)
    tokens[at:at + m] = c.tokens
    positions[at:at + m] = pos
    slots[at:at + m] = pages[pos // page] * page + pos % page
    used = ceil_div(m, tile)
    tile_tables[t:t + used, :len(pages)] = pages
    # Each tile's own last position bounds its loop; every tile of the chunk
    # sees the same pages.
    ends = np.minimum(c.start + (np.arange(used) + 1) * tile, c.start + m)
    tile_lens[t:t + used] = ends
    sample_index[num_decode + j] = at + m - 1
    if c.score_targets is not None and len(c.score_targets):
      n_score = len(c.score_targets)
      score_index.append(at + c.score_start - c.start + np.arange(n_score))
      score_target.append(c.score_targets)
      score_k.append(np.full(n_score, c.score_k))
    t += used
  layout = attention.StepLayout(decode_tables, decode_lens, tile_tables, tile_lens)
  n_score = sum(len(x) for x in score_index)
  width = config_lib.bucket(n_score, score_buckets(cfg)) if n_score else 0
  scores = [np.zeros(width, np.int32), np.zeros(width, np.int32), np.full(width, -1, np.int32)]
  if n_score:
    for a, parts in zip(scores, (score_index, score_target, score_k)):
      a[:n_score] = np.concatenate(parts)
  return ModelInputs(tokens, positions, slots, src, layout, sample_index, *scores)


def score_buckets(config: EngineConfig) -> tuple[int, ...]:
  """Scored positions of a step (prompt log-probabilities): 16, 64, ... up to
  the largest prefill bucket (each a variant, compiled when first used)."""
  return config_lib.geometric_buckets(config.prefill_token_buckets[-1], 16, 4)


def no_decode(config: EngineConfig) -> DecodeRows:
  """The decode rows of a step that has none."""
  empty = np.zeros(0, np.int32)
  return DecodeRows(empty, empty, empty, np.zeros((0, config.max_pages_per_seq), np.int32))
