"""Dynamic masking for MLM (BERT 80/10/10, RoBERTa's new mask per presentation).

Every random choice comes from a generator seeded by (seed, global sample index, stream tag): the
global index counts samples in the run's consumed-sample stream, so a sample gets a new mask each
epoch, tensor-parallel peers agree, and a resumed run, or one with another data-parallel size,
draws exactly the same masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

IGNORE_INDEX = -100  # label of positions that are not predicted (torch cross_entropy's default)

# Stream tags keep the generators of different uses apart for the same (seed, index).
TRAIN_MASK_STREAM = 0x4D41534B  # "MASK"
VALID_MASK_STREAM = 0x56414C49  # "VALI"
ORDER_STREAM = 0x4F524452  # "ORDR"


def sample_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index, stream]))


@dataclass(frozen=True)
class MaskingRecipe:
    mask_id: int
    vocab_size: int
    """The real vocabulary; random replacements are drawn from its non-special ids."""
    special_ids: Tuple[int, ...]
    mask_prob: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1

    def __post_init__(self):
        specials = np.zeros(self.vocab_size, dtype=bool)
        specials[list(self.special_ids)] = True
        object.__setattr__(self, "_is_special", specials)
        object.__setattr__(self, "_random_ids", np.flatnonzero(~specials))

    def apply(self, tokens: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """Returns (input_ids, labels); labels hold the original id at predicted positions, else -100.

        As fairseq: select round-randomly mask_prob x (number of candidates) positions without
        replacement among non-special tokens, then 80% <mask>, 10% random, 10% unchanged.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        candidates = np.flatnonzero(~self._is_special[tokens])
        count = int(self.mask_prob * len(candidates) + rng.random())
        chosen = rng.choice(candidates, size=min(count, len(candidates)), replace=False)
        inputs = tokens.copy()
        labels = np.full_like(tokens, IGNORE_INDEX)
        labels[chosen] = tokens[chosen]
        u = rng.random(len(chosen))
        to_mask = chosen[u < self.mask_token_prob]
        to_random = chosen[(u >= self.mask_token_prob) & (u < self.mask_token_prob + self.random_token_prob)]
        inputs[to_mask] = self.mask_id
        inputs[to_random] = rng.choice(self._random_ids, size=len(to_random))
        return inputs, labels

