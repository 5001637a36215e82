"""Dynamic masking for MLM (BERT 80/10/10, RoBERTa's new mask per presentation), per batch.

Every random number comes from a generator seeded by (seed, global sample index, stream tag): the
global index counts samples in the run's consumed-sample stream, so a sample gets a new mask each
epoch, tensor-parallel peers agree, and a resumed run, or one with another data-parallel size or
batch composition, draws exactly the same masks.

The batch path draws each sample's random numbers from its own generator (a few arrays of the
sample's length), then makes every decision for the whole (B, L) batch at once in numpy:

- units: tokens, or whole words when `whole_word` (a word starts at a token with the tokenizer's
  word-start mark, 'Ġ' for byte-level BPE or '▁' for SentencePiece, and after any special token);
  `apply_batch(word_starts=...)` gives the word starts per position instead (a segmenter's words,
  read from a corpus' word-start companion: data/word_starts.py), specials, padding and document
  starts still starting units; rows of a corpus without one take `id_word_starts(tokens)`;
- spans: with `max_span` n > 1, the non-special units are tiled into blocks of k + 1 units with k
  drawn from p(k) ∝ 1/k on 1..n (ALBERT's n-gram masking); only the first k units of a block can be
  masked, so masked spans never touch and each is at most n units long. A row of several documents
  (data.packing=packed_documents: `documents` holds their ids) is tiled per document, each from its
  own first position's draws, so no word or span crosses a document and a row of one document is
  masked as before;
- selection: blocks in random order are taken while the midpoint of their token count stays
  within the budget round(mask_prob x candidate tokens) (randomised rounding, as fairseq), so the
  masked fraction is mask_prob on average whatever the word lengths;
- 80/10/10: <mask>, a random non-special token, unchanged. Special tokens and padding are never
  selected.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from data.seeding import derive_rng

IGNORE_INDEX = -100  # label of positions that are not predicted (torch cross_entropy's default)

# Stream tags keep the generators of different uses apart for the same (seed, index).
TRAIN_MASK_STREAM = 0x4D41534B  # "MASK"
VALID_MASK_STREAM = 0x56414C49  # "VALI"
ORDER_STREAM = 0x4F524452  # "ORDR"


def sample_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return derive_rng(seed, index, stream)


@dataclass(frozen=True)
class MaskingRecipe:
    mask_id: int
    vocab_size: int
    """The real vocabulary; random replacements are drawn from its non-special ids."""
    special_ids: Tuple[int, ...]
    mask_prob: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    word_starts: Optional[np.ndarray] = None
    """Boolean over the ids (Tokenizer.word_start_ids()): given, whole words are masked."""
    max_span: int = 1
    """Longest masked span in units (tokens, or words with whole-word masking); 1 = no spans."""

    def __post_init__(self):
        specials = np.zeros(self.vocab_size, dtype=bool)
        specials[list(self.special_ids)] = True
        object.__setattr__(self, "_is_special", specials)
        object.__setattr__(self, "_random_ids", np.flatnonzero(~specials))
        if self.word_starts is not None:
            starts = np.zeros(self.vocab_size, dtype=bool)
            given = np.asarray(self.word_starts, dtype=bool)[: self.vocab_size]
            starts[: len(given)] = given
            object.__setattr__(self, "_word_start", starts | specials)
        if self.max_span < 1:
            raise ValueError("max_span must be >= 1")
        weights = 1.0 / np.arange(1, self.max_span + 1)
        object.__setattr__(self, "_span_cdf", np.cumsum(weights) / weights.sum())

    @property
    def whole_word(self) -> bool:
        return self.word_starts is not None

    def draws(self, rng: np.random.Generator, length: int) -> np.ndarray:
        """One sample's random numbers, float64 (rows: priority, 80/10/10, replacement, span, rounding)."""
        return rng.random((5, length))

    def apply(self, tokens: np.ndarray, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        """One sample: (input_ids, labels); labels hold the original id at predicted positions, else -100."""
        tokens = np.asarray(tokens, dtype=np.int64)
        inputs, labels = self.apply_batch(tokens[None], np.array([len(tokens)]), [self.draws(rng, len(tokens))])
        return inputs[0], labels[0]

    def id_word_starts(self, tokens: np.ndarray) -> np.ndarray:
        """The tokenizer's word starts of `tokens` (any shape), bool: what `apply_batch` uses for rows
        without per-position `word_starts` (fill those rows with it when others have them)."""
        if not self.whole_word:
            raise ValueError("id_word_starts needs a whole-word recipe (word_starts ids)")
        return self._word_start[tokens]

    def apply_batch(self, tokens: np.ndarray, lengths: np.ndarray, draws: Sequence[np.ndarray],
                    documents: Optional[np.ndarray] = None, word_starts: Optional[np.ndarray] = None
                    ) -> Tuple[np.ndarray, np.ndarray]:
        """tokens (B, L) int64, padded past `lengths`; draws[b] = self.draws(rng_b, >= lengths[b]);
        documents (B, L): document ids 1..k of the row's tokens, 0 past `lengths` (None: one per row);
        word_starts (B, L) bool: whether each position begins a word (a masking unit), replacing the
        tokenizer's id-based starts, so that whole words are masked by them even without them in the
        recipe (specials, the token after one, padding and document starts begin units all the same).

        Returns (inputs, labels), both (B, L). Row b depends on tokens[b], draws[b], documents[b] and
        word_starts[b] only.
        """
        batch, width = tokens.shape
        positions = np.arange(width)
        real = positions[None, :] < np.asarray(lengths)[:, None]
        if documents is None:
            documents = real.astype(np.int64)
        # a segment is a run of one document id (padding included)
        new_segment = np.ones((batch, width), dtype=bool)
        new_segment[:, 1:] = documents[:, 1:] != documents[:, :-1]
        u = np.ones((5, batch, width))  # padding gets priority 1.0 (never first) and no span
        for b, d in enumerate(draws):
            n = int(lengths[b])
            u[:, b, :n] = d[:, :n]
        special = self._is_special[tokens] | ~real  # (B, L)
        candidate = ~special

        # units: a unit starts at every token, or at word starts and at/after specials
        if word_starts is not None or self.whole_word:
            if word_starts is not None:
                word_starts = np.asarray(word_starts, dtype=bool)
                if word_starts.shape != tokens.shape:
                    raise ValueError(f"word_starts {word_starts.shape} is not shaped as tokens {tokens.shape}")
                word_starts = word_starts | self._is_special[tokens]
            else:
                word_starts = self._word_start[tokens]  # specials included
            starts = word_starts | ~real | new_segment
            starts[:, 1:] |= special[:, :-1]
        else:
            starts = np.ones_like(special)
        unit = np.cumsum(starts, axis=1) - 1  # (B, L) unit index of each token

        # blocks of units (spans); a unit's rank counts the non-special units before it
        unit_is_candidate = starts & candidate
        if self.max_span > 1:
            # per segment: rank of a unit among the segment's non-special units, and the segment's blocks,
            # block j of the segment sized by the draw at the segment's j-th position
            segment = np.cumsum(new_segment.ravel()) - 1  # flat: every segment of the batch numbered
            segment_start = np.flatnonzero(new_segment.ravel())[segment]  # flat index of its first token

            def within_segment(values):  # cumulative sum restarted at every segment, flat
                total = np.cumsum(values.ravel())
                return total - (total - values.ravel())[segment_start]

            rank = within_segment(unit_is_candidate.astype(np.int64)) - 1  # valid on candidate tokens
            spans = np.searchsorted(self._span_cdf, u[3]) + 1  # (B, L)
            spans = np.minimum(spans, self.max_span).ravel()
            block_ends = within_segment(spans + 1)  # exclusive unit-rank end of each block of the segment
            # one 1-D searchsorted for the whole batch: segments shifted apart by more than any rank
            shift = segment * (int(block_ends.max()) + width + 1)
            block = np.searchsorted(block_ends + shift, rank + shift, side="right")  # flat index of the block
            block = np.clip(block, 0, batch * width - 1)  # (a segment has fewer blocks than tokens)
            offset = rank - (block_ends - (spans + 1))[block]
            maskable = candidate & (offset < spans[block]).reshape(batch, width)
            row_position = block.reshape(batch, width) - (np.arange(batch) * width)[:, None]
            group = np.where(maskable, row_position, width)  # width: the bin of tokens never selected
        else:
            maskable = candidate
            group = np.where(maskable, unit, width)

        # tokens per group (a unit, or a span's maskable units), and each group's random priority
        flat = group + (np.arange(batch) * (width + 1))[:, None]
        counts = np.bincount(flat.ravel(), weights=maskable.ravel(), minlength=batch * (width + 1))
        counts = counts.reshape(batch, width + 1)[:, :width]
        priority = np.ones((batch, width + 1))
        # one of the group's tokens' draws (numpy keeps the last write): deterministic and uniform
        np.put_along_axis(priority, group, u[0], axis=1)
        priority = np.where(counts > 0, priority[:, :width], 2.0)
        order = np.argsort(priority, axis=1, kind="stable")
        sorted_counts = np.take_along_axis(counts, order, axis=1)
        after = np.cumsum(sorted_counts, axis=1)
        budget = np.floor(self.mask_prob * candidate.sum(axis=1) + u[4][:, 0])[:, None]
        take_sorted = (after - sorted_counts / 2.0 < budget) & (sorted_counts > 0)
        take = np.zeros((batch, width + 1), dtype=bool)
        np.put_along_axis(take, order, take_sorted, axis=1)
        chosen = np.take_along_axis(take, group, axis=1) & maskable

        inputs = tokens.copy()
        labels = np.where(chosen, tokens, IGNORE_INDEX)
        to_mask = chosen & (u[1] < self.mask_token_prob)
        to_random = chosen & (u[1] >= self.mask_token_prob) & (u[1] < self.mask_token_prob + self.random_token_prob)
        inputs[to_mask] = self.mask_id
        pick = np.minimum((u[2] * len(self._random_ids)).astype(np.int64), len(self._random_ids) - 1)
        inputs[to_random] = self._random_ids[pick[to_random]]
        return inputs, labels


def mask_prob_at(schedule: Sequence[Tuple[int, float]], step: int, default: float) -> float:
    """The masking rate of optimizer step `step` (from 1) under a curriculum [[0, p0], [n1, p1], ...]:
    p_k for the steps after n_k up to n_{k+1} (data.mask_prob_schedule); `default` when it is empty."""
    rate = default
    for start, prob in schedule:
        if step > start:
            rate = float(prob)
    return rate
