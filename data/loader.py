"""Resumable batches for one data-parallel rank, driven by the run's consumed-sample count.

The run consumes a stream of global sample indices g = 0, 1, 2, ... (data/blending.py says which
corpus and packed sample g reads; its mask is seeded by (seed, g)). Optimizer step s takes the next
run of the stream:

- fixed batches: B = train.global_batch_size samples;
- token budget (RoBERTa's DOC-SENTENCES batches): as many samples as fit in `tokens_per_step`
  tokens (`<s>`/`</s>` included, at least one sample), so that short samples make larger batches and
  tokens per step stay about constant.

Either way the step's samples depend on the consumed count only, never on the data-parallel size.
Rank r of D takes the r-th of D near-equal contiguous slices and cuts it into K micro-batches of at
most `micro_batch` samples, with K the same on every rank (ZeRO-2/3 run collectives in every
backward/forward, so every rank must run as many). The loader's state is the consumed count alone, so
a resumed run, or one with another data-parallel size, continues at the same global position.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from data.blending import SampleStream
from data.masking import IGNORE_INDEX, TRAIN_MASK_STREAM, VALID_MASK_STREAM, MaskingRecipe, sample_rng
from data.static_masks import StaticMasks, stored_batch


def already_collated(batch):
    """collate_fn for datasets whose __getitems__ returns a whole batch (module level: picklable)."""
    return batch


class MaskedSamples(torch.utils.data.Dataset):
    """Global sample index -> padded, masked sample; `__getitems__` masks a whole batch at once."""

    def __init__(self, packed, recipe: MaskingRecipe, seq_length: int, pad_id: int, seed: int,
                 shuffle: bool = True, mask_stream: int = TRAIN_MASK_STREAM, pad_to_multiple_of: int = 0,
                 static_masks: Optional[Sequence[StaticMasks]] = None, static_copy: Optional[int] = None):
        """`packed`: one packed corpus (data/packing.py) or a SampleStream over several.

        pad_to_multiple_of > 0: a batch is as wide as its longest sample rounded up to that multiple
        (at most seq_length); 0: always seq_length wide. The width never changes a token or a mask
        draw: the narrow batch is the wide one's first columns.

        static_masks (one per corpus of the stream): the masks stored at preprocessing replace the
        recipe's, copy = the sample's corpus epoch mod copies, or `static_copy` when given (validation: 0).
        """
        self.stream = packed if isinstance(packed, SampleStream) else SampleStream([packed], seed=seed, shuffle=shuffle)
        self.recipe = recipe
        self.seq_length, self.pad_id, self.seed = seq_length, pad_id, seed
        self.shuffle, self.mask_stream = shuffle, mask_stream
        self.pad_to_multiple_of = pad_to_multiple_of
        self.static_masks, self.static_copy = static_masks, static_copy

    def __len__(self) -> int:
        return len(self.stream)

    def sample_id(self, global_index: int) -> int:
        """The packed sample that global index g reads (its corpus: `self.stream.locate`)."""
        return int(self.stream.locate([global_index])[1][0])

    def __getitems__(self, global_indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        """A collated micro-batch: input_ids, labels, attention_mask (B, W), sample_index (B,)
        (next_sentence_label (B,) too for the pair formats); W is
        seq_length, or the longest sample rounded up to pad_to_multiple_of."""
        indices = [int(g) for g in global_indices]
        corpus, samples = self.stream.locate(indices)
        rows = [self.stream.tokens(c, s) for c, s in zip(corpus.tolist(), samples.tolist())]
        lengths = np.array([len(row) for row in rows], dtype=np.int64)
        width = self.seq_length
        if self.pad_to_multiple_of > 0 and len(rows):
            multiple = self.pad_to_multiple_of
            width = min(self.seq_length, -(-int(lengths.max()) // multiple) * multiple)
        tokens = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        draws = []
        for row, (g, sample) in enumerate(zip(indices, rows)):
            tokens[row, : len(sample)] = sample
            if self.static_masks is None:
                draws.append(self.recipe.draws(sample_rng(self.seed, g, self.mask_stream), len(sample)))
        if self.static_masks is not None:
            copies = (self.stream.corpus_epochs(indices) if self.static_copy is None
                      else np.full(len(indices), self.static_copy))
            inputs, labels = stored_batch(self.static_masks, self.stream.corpora, corpus, samples, copies, tokens)
        else:
            inputs, labels = self.recipe.apply_batch(tokens, lengths, draws)
        attention = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        batch = {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
                 "attention_mask": torch.from_numpy(attention),
                 # keys the randomness of replaced-token sampling (RTD) to the sample, like its mask
                 "sample_index": torch.tensor(indices, dtype=torch.int64)}
        next_sentence = self.stream.next_sentence_labels(corpus, samples)  # pair formats only
        if next_sentence is not None:
            batch["next_sentence_label"] = torch.from_numpy(next_sentence)  # (B,) 0 = B continues A
        return batch

    def __getitem__(self, global_index: int) -> Dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([global_index]).items()}


class StepPlanner:
    """Which global indices each optimizer step takes, and this rank's micro-batches of them."""

    def __init__(self, stream: SampleStream, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 tokens_per_step: int = 0):
        self.stream, self.global_batch, self.micro_batch = stream, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.tokens_per_step = dp_rank, dp_size, tokens_per_step
        # consumed -> (step size, micro-batches): the sampler (running ahead) and next_step both ask
        self._plans: "OrderedDict[int, Tuple[int, List[List[int]]]]" = OrderedDict()

    def plan(self, consumed: int) -> Tuple[int, List[List[int]]]:
        """(samples the step starting at `consumed` takes, this rank's micro-batches of them)."""
        if consumed not in self._plans:
            count = self._step_size(consumed)
            self._plans[consumed] = (count, self._micro_batches(consumed, count))
            if len(self._plans) > 16:
                self._plans.popitem(last=False)
        return self._plans[consumed]

    def step_size(self, consumed: int) -> int:
        """Samples the step starting at global index `consumed` takes."""
        return self.plan(consumed)[0]

    def micro_batches(self, consumed: int) -> List[List[int]]:
        """This rank's micro-batches (lists of global indices) of the step starting at `consumed`."""
        return self.plan(consumed)[1]

    def _step_size(self, consumed: int) -> int:
        if not self.tokens_per_step:
            return self.global_batch
        window = max(16, 2 * self.tokens_per_step // max(1, self.stream.corpora[0].seq_length) + 16)
        while True:
            lengths = self.stream.lengths(np.arange(consumed, consumed + window))
            total = np.cumsum(lengths)
            if total[-1] > self.tokens_per_step:
                return max(1, int(np.searchsorted(total, self.tokens_per_step, side="right")))
            window *= 2

    def _micro_batches(self, consumed: int, count: int) -> List[List[int]]:
        shares = np.array_split(np.arange(consumed, consumed + count), self.dp_size)
        k = -(-max(len(s) for s in shares) // self.micro_batch)  # the same on every rank
        mine = shares[self.dp_rank]
        if len(mine) < k:
            raise ValueError(f"a step of {count} samples leaves data-parallel rank {self.dp_rank} fewer samples "
                             f"than the {k} micro-batches of its peers; raise train.tokens_per_step")
        if not self.tokens_per_step:  # fixed batches: full micro-batches as before
            return [mine[i:i + self.micro_batch].tolist() for i in range(0, len(mine), self.micro_batch)]
        return [part.tolist() for part in np.array_split(mine, k)]


class _RankBatches(torch.utils.data.Sampler):
    """Yields this rank's micro-batches of global indices from `consumed` on, forever."""

    def __init__(self, planner: StepPlanner, consumed: int):
        self.planner, self.consumed = planner, consumed

    def __iter__(self) -> Iterator[List[int]]:
        consumed = self.consumed
        while True:
            count, parts = self.planner.plan(consumed)
            yield from parts
            consumed += count


class PretrainLoader:
    """Micro-batches for one optimizer step at a time; `state_dict` is the consumed-sample count."""

    def __init__(self, samples: MaskedSamples, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 num_workers: int = 0, consumed_samples: int = 0, tokens_per_step: int = 0):
        if not tokens_per_step and global_batch % (micro_batch * dp_size):
            raise ValueError("global batch must be a multiple of micro batch x data-parallel size")
        self.samples, self.global_batch, self.micro_batch = samples, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        self.planner = StepPlanner(samples.stream, global_batch, micro_batch, dp_rank, dp_size, tokens_per_step)
        self.consumed_samples = consumed_samples
        self.last_step_samples = 0
        self._iterator = None

    def _start(self) -> None:
        sampler = _RankBatches(self.planner, self.consumed_samples)
        # A private generator: creating an iterator must not draw from the global torch RNG, which
        # drives dropout (a resumed run creates its iterator at a different point than an uninterrupted one).
        loader = torch.utils.data.DataLoader(self.samples, batch_sampler=sampler, num_workers=self.num_workers,
                                             collate_fn=already_collated,
                                             persistent_workers=self.num_workers > 0,
                                             generator=torch.Generator().manual_seed(0))
        self._iterator = iter(loader)

    def next_step(self) -> List[Dict[str, torch.Tensor]]:
        """The micro-batches of the next optimizer step for this rank (as many on every rank)."""
        if self._iterator is None:
            self._start()
        count, parts = self.planner.plan(self.consumed_samples)
        batches = [next(self._iterator) for _ in parts]
        self.consumed_samples += count
        self.last_step_samples = count
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
        yield samples.__getitems__(mine[start:start + micro_batch])


def validation_samples(packed, recipe: MaskingRecipe, seq_length: int, pad_id: int, seed: int,
                       pad_to_multiple_of: int = 0, static_masks: Optional[Sequence[StaticMasks]] = None
                       ) -> MaskedSamples:
    """Fixed order and fixed masks: the recipe's validation stream, or copy 0 of static masks."""
    return MaskedSamples(packed, recipe, seq_length, pad_id, seed, shuffle=False, mask_stream=VALID_MASK_STREAM,
                         pad_to_multiple_of=pad_to_multiple_of, static_masks=static_masks, static_copy=0)
