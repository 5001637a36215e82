"""The run's sample stream: global sample index g -> (corpus, packed sample), over one or several corpora.

One corpus: epoch e = g // N reads a permutation of its N packed samples seeded by (seed, e).

Several corpora with weights w_d (normalised): a blended epoch has N = Σ n_d positions, of which
c_d = round(w_d N) (largest remainders) go to corpus d, interleaved deterministically so that every
prefix of the epoch follows the weights to within a sample per corpus: the k-th position of corpus d
sits at the rank of (k + 1/2) / c_d among all corpora's such times (a vectorised argsort, cached on
disk by data/sample_cache.py). Corpus d reads its own stream: blended epoch e, k-th position ->
position p = e c_d + k of corpus d, i.e. its epoch p // n_d and a permutation of its samples seeded
by (seed, that epoch, d). So a small corpus with a large weight is repeated, a large one with a
small weight is spread over several blended epochs, and each still sees every sample once per own epoch.

Everything is a function of (seed, g): the loader's state stays the consumed-sample count.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from data.seeding import derive_rng
from data.errors import UserError
from data.masking import ORDER_STREAM, sample_rng


def blend_counts(weights: Sequence[float], total: int) -> np.ndarray:
    """Positions per corpus in a blended epoch of `total`: round(w_d total), largest remainders."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise UserError(f"data.blend weights {list(weights)} must be non-negative and not all zero")
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:remainder]] += 1
    return counts


def blend_order(counts: Sequence[int]) -> Dict[str, np.ndarray]:
    """Corpus and within-corpus position k of each position of a blended epoch."""
    corpus = np.repeat(np.arange(len(counts)), counts)
    k = np.concatenate([np.arange(c) for c in counts]) if len(counts) else np.zeros(0, np.int64)
    times = (k + 0.5) / np.asarray(counts, dtype=np.float64)[corpus]
    order = np.argsort(times, kind="stable")  # ties go to the lower corpus index
    return {"corpus": corpus[order].astype(np.int32), "k": k[order].astype(np.int64)}


class SampleStream:
    """g -> (corpus id, packed sample id); `shuffle=False` (validation) reads samples in order."""

    def __init__(self, corpora: List, weights: Optional[Sequence[float]] = None, seed: int = 0,
                 shuffle: bool = True, cache=None, cache_params: Optional[dict] = None):
        self.corpora, self.seed, self.shuffle = corpora, seed, shuffle
        self.sizes = np.array([len(c) for c in corpora], dtype=np.int64)
        if len(corpora) == 1:
            self.counts = self.sizes.copy()
            self.order = None  # the identity: position k of corpus 0
        else:
            weights = [1.0] * len(corpora) if weights is None else list(weights)
            self.counts = blend_counts(weights, int(self.sizes.sum()))
            build = lambda: blend_order(self.counts)
            self.order = (cache.get("blend", {"counts": self.counts.tolist(), **(cache_params or {})}, build)
                          if cache is not None else build())
        self.epoch_size = int(self.counts.sum())
        self._permutations: Dict[Tuple[int, int], np.ndarray] = {}
        self._lengths = None

    def __len__(self) -> int:
        """Positions in one (blended) epoch."""
        return self.epoch_size

    def _permutation(self, corpus: int, epoch: int) -> np.ndarray:
        key = (corpus, epoch)
        if key not in self._permutations:
            if len(self._permutations) > 8:  # a few epochs at a time are ever in use
                self._permutations.clear()
            # corpus 0 keeps the seeding of the single-corpus stream
            rng = (sample_rng(self.seed, epoch, ORDER_STREAM) if corpus == 0 else
                   derive_rng(self.seed, epoch, ORDER_STREAM, corpus))
            self._permutations[key] = rng.permutation(int(self.sizes[corpus]))
        return self._permutations[key]

    def _corpus_positions(self, global_indices) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(corpus ids, epochs of those corpora, positions within those epochs) of global indices."""
        g = np.asarray(global_indices, dtype=np.int64)
        epoch, position = np.divmod(g, self.epoch_size)
        if self.order is None:
            corpus, k = np.zeros_like(g, dtype=np.int32), position
        else:
            corpus, k = np.asarray(self.order["corpus"])[position], np.asarray(self.order["k"])[position]
        corpus_position = epoch * self.counts[corpus] + k  # position in the corpus' own stream
        corpus_epoch, within = np.divmod(corpus_position, self.sizes[corpus])
        return corpus, corpus_epoch, within

    def corpus_epochs(self, global_indices) -> np.ndarray:
        """The epoch of its own corpus that each global index reads (static masks: which copy)."""
        return self._corpus_positions(global_indices)[1]

    def locate(self, global_indices) -> Tuple[np.ndarray, np.ndarray]:
        """(corpus ids, sample ids) of an array of global indices."""
        corpus, corpus_epoch, within = self._corpus_positions(global_indices)
        if not self.shuffle:
            return corpus, within
        samples = np.empty_like(within)
        for c, e in set(zip(corpus.tolist(), corpus_epoch.tolist())):
            where = (corpus == c) & (corpus_epoch == e)
            samples[where] = self._permutation(c, e)[within[where]]
        return corpus, samples

    def lengths(self, global_indices) -> np.ndarray:
        """Tokens (with `<s>`, `</s>`) of the samples at these global indices."""
        if self._lengths is None:
            self._lengths = [c.sample_lengths() for c in self.corpora]
        corpus, samples = self.locate(global_indices)
        out = np.empty(len(samples), dtype=np.int64)
        for c in np.unique(corpus):
            where = corpus == c
            out[where] = self._lengths[c][samples[where]]
        return out

    def tokens(self, corpus: int, sample: int) -> np.ndarray:
        return self.corpora[corpus].tokens(int(sample))

    @property
    def has_word_starts(self) -> bool:
        """Whether any corpus reads a word-start companion (data/word_starts.py)."""
        return any(getattr(c, "word_start_source", None) is not None for c in self.corpora)

    def word_starts(self, corpus: int, sample: int) -> Optional[np.ndarray]:
        """The sample's per-position word starts from its corpus' companion; None when it has none."""
        packed = self.corpora[corpus]
        if getattr(packed, "word_start_source", None) is None:
            return None
        return packed.word_starts(int(sample))

    def next_sentence_labels(self, corpus: np.ndarray, samples: np.ndarray) -> Optional[np.ndarray]:
        """int64 NSP labels of these samples (pair formats, data/pairs.py); None when the corpora have none."""
        if not all(hasattr(c, "next_sentence_labels") for c in self.corpora):
            return None
        return np.array([self.corpora[c].next_sentence_labels[s] for c, s in zip(corpus.tolist(), samples.tolist())],
                        dtype=np.int64)
