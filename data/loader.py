"""Resumable batches for one data-parallel rank, driven by the run's consumed-sample count.

The run consumes a stream of global sample indices g = 0, 1, 2, ... Optimizer step s (from 1) takes
g in [(s-1) B, s B) for global batch B; rank r of D takes the r-th contiguous slice of B/D of those and
cuts it into micro-batches. Which packed sample g reads is a per-epoch permutation seeded by
(seed, epoch), and its mask is seeded by (seed, g). The loader's state is the consumed count alone, so
a resumed run, or one with another data-parallel size, continues at the same global position.
"""
from __future__ import annotations

from typing import Dict, Iterator, List

import numpy as np
import torch

from data.masking import (IGNORE_INDEX, ORDER_STREAM, TRAIN_MASK_STREAM, VALID_MASK_STREAM, MaskingRecipe,
                          sample_rng)


class MaskedSamples(torch.utils.data.Dataset):
    """Global sample index -> padded, masked sample (dict of int64 tensors of length seq_length)."""

    def __init__(self, packed, recipe: MaskingRecipe, seq_length: int, pad_id: int, seed: int,
                 shuffle: bool = True, mask_stream: int = TRAIN_MASK_STREAM):
        self.packed, self.recipe = packed, recipe
        self.seq_length, self.pad_id, self.seed = seq_length, pad_id, seed
        self.shuffle, self.mask_stream = shuffle, mask_stream
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return len(self.packed)

    def sample_id(self, global_index: int) -> int:
        """Epoch e = g // N reads a fresh permutation of the N packed samples."""
        n = len(self.packed)
        epoch, position = divmod(global_index, n)
        if not self.shuffle:
            return position
        if epoch != self._epoch:
            self._order = sample_rng(self.seed, epoch, ORDER_STREAM).permutation(n)
            self._epoch = epoch
        return int(self._order[position])

    def __getitem__(self, global_index: int) -> Dict[str, torch.Tensor]:
        tokens = self.packed.tokens(self.sample_id(global_index))
        inputs, labels = self.recipe.apply(tokens, sample_rng(self.seed, global_index, self.mask_stream))
        length = len(tokens)
        input_ids = np.full(self.seq_length, self.pad_id, dtype=np.int64)
        target = np.full(self.seq_length, IGNORE_INDEX, dtype=np.int64)
        input_ids[:length], target[:length] = inputs, labels
        mask = np.zeros(self.seq_length, dtype=np.int64)
        mask[:length] = 1
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(target),
                "attention_mask": torch.from_numpy(mask),
                # keys the randomness of replaced-token sampling (RTD) to the sample, like its mask
                "sample_index": torch.tensor(global_index, dtype=torch.int64)}


class _RankBatches(torch.utils.data.Sampler):
    """Yields this rank's micro-batches of global indices from `consumed` on, forever."""

    def __init__(self, consumed: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int):
        self.consumed, self.global_batch, self.micro_batch = consumed, global_batch, micro_batch
        self.per_rank = global_batch // dp_size
        self.dp_rank = dp_rank

    def __iter__(self) -> Iterator[List[int]]:
        start = self.consumed
        while True:
            first = start + self.dp_rank * self.per_rank
            for m in range(0, self.per_rank, self.micro_batch):
                yield list(range(first + m, first + m + self.micro_batch))
            start += self.global_batch


class PretrainLoader:
    """Micro-batches for one optimizer step at a time; `state_dict` is the consumed-sample count."""

    def __init__(self, samples: MaskedSamples, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 num_workers: int = 0, consumed_samples: int = 0):
        if global_batch % (micro_batch * dp_size):
            raise ValueError("global batch must be a multiple of micro batch x data-parallel size")
        self.samples, self.global_batch, self.micro_batch = samples, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        self.accumulation = global_batch // (micro_batch * dp_size)
        self.consumed_samples = consumed_samples
        self._iterator = None

    def _start(self) -> None:
        sampler = _RankBatches(self.consumed_samples, self.global_batch, self.micro_batch, self.dp_rank, self.dp_size)
        # A private generator: creating an iterator must not draw from the global torch RNG, which
        # drives dropout (a resumed run creates its iterator at a different point than an uninterrupted one).
        loader = torch.utils.data.DataLoader(self.samples, batch_sampler=sampler, num_workers=self.num_workers,
                                             persistent_workers=self.num_workers > 0,
                                             generator=torch.Generator().manual_seed(0))
        self._iterator = iter(loader)

    def next_step(self) -> List[Dict[str, torch.Tensor]]:
        """The `accumulation` micro-batches of the next optimizer step for this rank."""
        if self._iterator is None:
            self._start()
        batches = [next(self._iterator) for _ in range(self.accumulation)]
        self.consumed_samples += self.global_batch
        return batches

    def state_dict(self) -> Dict[str, int]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.consumed_samples = int(state["consumed_samples"])
        self._iterator = None


def validation_batches(samples: MaskedSamples, count: int, micro_batch: int, dp_rank: int, dp_size: int
                       ) -> Iterator[Dict[str, torch.Tensor]]:
    """This rank's share of the first `count` held-out samples, in fixed order with fixed masks.

    Every rank gets at least one sample (wrapping around a tiny split), so that every rank joins
    the evaluation's all-reduce."""
    count = max(min(count, len(samples)), dp_size)
    mine = [i % len(samples) for i in range(dp_rank, count, dp_size)]
    for start in range(0, len(mine), micro_batch):
        items = [samples[i] for i in mine[start:start + micro_batch]]
        yield {key: torch.stack([item[key] for item in items]) for key in items[0]}


def validation_samples(packed, recipe: MaskingRecipe, seq_length: int, pad_id: int, seed: int) -> MaskedSamples:
    return MaskedSamples(packed, recipe, seq_length, pad_id, seed, shuffle=False, mask_stream=VALID_MASK_STREAM)
