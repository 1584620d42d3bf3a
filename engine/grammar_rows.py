"""Structured outputs in the host loop: a step's constrained rows, their masks and their tokens.

Between a step's model pass and its sampler the host reads the step before; the
grammars of the constrained sequences (structured outputs, engine/grammar.py)
then advance by the tokens just read (`advance`), and fill their rows of the
sampler's allowed-token mask (`masked`), while the model pass runs on the
device: a grammar sees every token before the mask of the next one is made.
Both touch only the constrained rows; the scheduler times them
(`Scheduler.grammar_seconds`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ridgeline.engine.grammar_matcher import Matcher, fill_rows
from ridgeline.engine.sampler_inputs import SamplerInputs


def masked(sampler: SamplerInputs, rows: Sequence[int], matchers: Sequence[Matcher],
           mask_words: int) -> SamplerInputs:
  """The sampler's inputs with rows[i] restricted to what matchers[i] allows next
  (a row that also has allowed_token_ids gets both masks' intersection)."""
  masks = (sampler.allowed.copy() if sampler.allowed is not None else
           np.zeros((len(sampler.allowed_row), mask_words), np.uint32))
  static = sampler.allowed_row.copy()
  fill_rows(matchers, masks, rows)
  both = [r for r in rows if static[r] >= 0]
  if both:
    masks[both] &= sampler.allowed[static[both]]
  allowed_row = sampler.allowed_row.copy()
  allowed_row[rows] = rows
  return sampler._replace(allowed=masks, allowed_row=allowed_row)


def advance(matchers: Sequence[Matcher], tokens: Sequence[int]
            ) -> tuple[np.ndarray, np.ndarray]:
  """Advances matchers[i] by tokens[i]. Returns, per matcher, whether its grammar
  has ended (complete and nothing can follow, or EOS taken: the sequence stops
  there) and whether it refused the token (which the mask should have made
  impossible: the sequence fails rather than emit output outside its grammar)."""
  done = np.zeros(len(matchers), bool)
  rejected = np.zeros(len(matchers), bool)
  for i, (matcher, token) in enumerate(zip(matchers, tokens)):
    if not matcher.accept(int(token)):
      rejected[i] = True
    elif matcher.is_terminated() or matcher.must_end():
      done[i] = True
  return done, rejected
