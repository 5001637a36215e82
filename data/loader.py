"""Resumable batches for one data-parallel rank, driven by the run's consumed-sample count.

The run consumes a stream of global sample indices g = 0, 1, 2, ... (data/blending.py says which
corpus and packed sample g reads; its mask is seeded by (seed, g)). Optimizer step s takes the next
run of the stream:

- fixed batches: B = train.global_batch_size samples;
- token budget (RoBERTa's DOC-SENTENCES batches): as many samples as fit in `tokens_per_step`
  tokens (`<s>`/`</s>` included, at least one sample), so that short samples make larger batches and
  tokens per step stay about constant.

Either way the step's samples depend on the consumed count (and the step) only, never on the data-parallel size.

Two curricula follow the optimizer step:
- batch-size warmup (train.batch_warmup_steps, needs the token budget): step s <= N has the budget
  `batch_budget(T, N, a, s)`, rising linearly from a x T at step 1 to T after step N;
- sequence length in phases (data.seq_length_schedule): the steps of phase k take rows of length L_k from
  the stream of samples packed at L_k (as many as the budget holds, or B rows), read from its position 0
  when the phase begins. Global indices stay the run's consumed-sample stream: phase k's first sample has
  global index G_k (the count consumed when it began) and global index g reads position g - G_k of its
  stream (`StepIndices.offset`); masks and RTD sampling stay keyed by g. G_k is the loader's `phase_start`,
  kept in its state (or replayed from the plans).
A batch's `attention_mask` holds document ids: 1..k for the row's k documents (several only with
data.packing=packed_documents), 0 for padding; `check_document_ids` enforces that where batches are built.
Rank r of D takes the r-th of D near-equal contiguous slices and cuts it into K micro-batches of at
most `micro_batch` samples, with K the same on every rank (ZeRO-2/3 run collectives in every
backward/forward, so every rank must run as many). The loader's state is the consumed count alone, so
a resumed run, or one with another data-parallel size, continues at the same global position.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from data.blending import SampleStream
from data.masking import TRAIN_MASK_STREAM, VALID_MASK_STREAM, MaskingRecipe, mask_prob_at, sample_rng
from data.static_masks import StaticMasks, stored_batch


def check_document_ids(ids: np.ndarray, sample_index: Sequence[int] = (),
                       lengths: Optional[np.ndarray] = None) -> None:
    """Raise ValueError unless every row of `ids` (B, W) is 1 1 .. 2 2 .. k k 0 .. 0: starts at 1 (or is
    all padding), never decreases, steps by at most 1, has 0 (padding) only after its last token, and
    (given `lengths`) has as many nonzero ids as the row has tokens."""
    ids = np.asarray(ids)
    step = np.diff(ids, axis=1)
    padding = ids == 0
    bad = (ids[:, 0] != 1) & ~padding[:, 0]  # starts at 1
    bad |= (ids < 0).any(axis=1)
    bad |= ((step < 0) & ~padding[:, 1:]).any(axis=1)  # only a fall to padding
    bad |= ((step > 1) | ((step == 1) & padding[:, :-1])).any(axis=1)  # consecutive; nothing after padding
    if lengths is not None:
        bad |= (~padding).sum(axis=1) != np.asarray(lengths)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        which = f" (global sample {int(sample_index[row])})" if len(sample_index) > row else ""
        raise ValueError(f"malformed document ids in row {row}{which} of a batch: {ids[row].tolist()}; "
                         f"expected 1..k in order, each consecutive, then 0 padding at the end only "
                         f"(a corrupt sample-index cache? delete data.cache_dir's index and rebuild)")


class StepIndices(list):
    """A micro-batch's global indices and `step`, the optimizer step that consumes them (what the
    sampler hands `MaskedSamples.__getitems__`, through DataLoader workers too); with a length curriculum
    also its `phase` and `offset`, the global index of position 0 of the phase's stream."""

    def __init__(self, indices=(), step: Optional[int] = None, phase: int = 0, offset: int = 0):
        super().__init__(indices)
        self.step, self.phase, self.offset = step, phase, offset


def batch_budget(tokens_per_step: int, warmup_steps: int, start: float, step: Optional[int]) -> int:
    """The token budget of optimizer step `step` (from 1) under batch-size warmup (train.batch_warmup_steps):
    a + (T - a) x (step - 1) // N for step <= N, a = round(start x T); T after it (and without warmup)."""
    if not warmup_steps or step is None or step > warmup_steps:
        return tokens_per_step
    first = int(round(start * tokens_per_step))
    return first + (tokens_per_step - first) * (step - 1) // warmup_steps


def phase_at(firsts: Sequence[int], step: Optional[int]) -> int:
    """The phase of step `step` under phases starting after steps `firsts` (firsts[0] = 0): the last k with
    step > firsts[k] (0 for an untracked step)."""
    phase = 0
    for k, first in enumerate(firsts):
        if step is not None and step > first:
            phase = k
    return phase


def already_collated(batch):
    """collate_fn for datasets whose __getitems__ returns a whole batch (module level: picklable)."""
    return batch


class MaskedSamples(torch.utils.data.Dataset):
    """Global sample index -> padded, masked sample; `__getitems__` masks a whole batch at once."""

    def __init__(self, packed, recipe: MaskingRecipe, seq_length: int, pad_id: int, seed: int,
                 shuffle: bool = True, mask_stream: int = TRAIN_MASK_STREAM, pad_to_multiple_of: int = 0,
                 static_masks: Optional[Sequence[StaticMasks]] = None, static_copy: Optional[int] = None,
                 mask_prob_schedule: Sequence[Tuple[int, float]] = ()):
        """`packed`: one packed corpus (data/packing.py) or a SampleStream over several.

        pad_to_multiple_of > 0: a batch is as wide as its longest sample rounded up to that multiple
        (at most seq_length); 0: always seq_length wide. The width never changes a token or a mask
        draw: the narrow batch is the wide one's first columns.

        static_masks (one per corpus of the stream): the masks stored at preprocessing replace the
        recipe's, copy = the sample's corpus epoch mod copies, or `static_copy` when given (validation: 0).

        mask_prob_schedule ([[0, p0], [n1, p1], ...], data.mask_prob_schedule): a batch of `StepIndices` of
        step s is masked at rate `mask_prob_at(schedule, s)`; plain index lists at the recipe's rate.
        """
        self.stream = packed if isinstance(packed, SampleStream) else SampleStream([packed], seed=seed, shuffle=shuffle)
        self.recipe = recipe
        self.seq_length, self.pad_id, self.seed = seq_length, pad_id, seed
        self.shuffle, self.mask_stream = shuffle, mask_stream
        self.pad_to_multiple_of = pad_to_multiple_of
        self.static_masks, self.static_copy = static_masks, static_copy
        self.mask_prob_schedule = [(int(n), float(p)) for n, p in mask_prob_schedule]
        self._recipes = {recipe.mask_prob: recipe}  # one recipe per rate of the curriculum

    def __len__(self) -> int:
        return len(self.stream)

    def sample_id(self, global_index: int) -> int:
        """The packed sample that global index g reads (its corpus: `self.stream.locate`)."""
        return int(self.stream.locate([global_index])[1][0])

    def width(self, lengths: np.ndarray) -> int:
        """Columns of a batch of samples of these lengths."""
        if self.pad_to_multiple_of > 0 and len(lengths):
            multiple = self.pad_to_multiple_of
            return min(self.seq_length, -(-int(np.max(lengths)) // multiple) * multiple)
        return self.seq_length

    def _document_ids(self, corpus: int, sample: int, length: int) -> np.ndarray:
        """The row's document ids: its packing's (data.packing=packed_documents), else one document."""
        packed = self.stream.corpora[corpus]
        if hasattr(packed, "document_ids"):
            return packed.document_ids(sample)
        return np.ones(length, dtype=np.int64)

    def __getitems__(self, global_indices: Sequence[int]) -> Dict[str, torch.Tensor]:
        """A collated micro-batch: input_ids, labels, attention_mask (B, W) (document ids: 1..k, 0 =
        padding), sample_index (B,) (next_sentence_label (B,) too for the pair formats); W is
        seq_length, or the longest sample rounded up to pad_to_multiple_of."""
        indices = [int(g) for g in global_indices]
        offset = getattr(global_indices, "offset", 0)  # a length phase's stream starts at global index `offset`
        positions = [g - offset for g in indices]
        corpus, samples = self.stream.locate(positions)
        rows = [self.stream.tokens(c, s) for c, s in zip(corpus.tolist(), samples.tolist())]
        lengths = np.array([len(row) for row in rows], dtype=np.int64)
        width = self.width(lengths)
        tokens = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        attention = np.zeros((len(rows), width), dtype=np.int64)
        draws = []
        for row, (g, c, s, sample) in enumerate(zip(indices, corpus.tolist(), samples.tolist(), rows)):
            tokens[row, : len(sample)] = sample
            ids = self._document_ids(c, s, len(sample))
            attention[row, : len(ids)] = ids
            if self.static_masks is None:
                draws.append(self.recipe.draws(sample_rng(self.seed, g, self.mask_stream), len(sample)))
        check_document_ids(attention, indices, lengths)
        if self.static_masks is not None:
            copies = (self.stream.corpus_epochs(positions) if self.static_copy is None
                      else np.full(len(indices), self.static_copy))
            inputs, labels = stored_batch(self.static_masks, self.stream.corpora, corpus, samples, copies, tokens)
        else:
            recipe = self.recipe_at(getattr(global_indices, "step", None))
            word_starts = self._word_starts(recipe, tokens, corpus, samples) if recipe.whole_word else None
            inputs, labels = recipe.apply_batch(tokens, lengths, draws, documents=attention, word_starts=word_starts)
        batch = {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
                 "attention_mask": torch.from_numpy(attention),
                 # keys the randomness of replaced-token sampling (RTD) to the sample, like its mask
                 "sample_index": torch.tensor(indices, dtype=torch.int64)}
        next_sentence = self.stream.next_sentence_labels(corpus, samples)  # pair formats only
        if next_sentence is not None:
            batch["next_sentence_label"] = torch.from_numpy(next_sentence)  # (B,) 0 = B continues A
        return batch

    def _word_starts(self, recipe: MaskingRecipe, tokens: np.ndarray, corpus: np.ndarray,
                     samples: np.ndarray) -> Optional[np.ndarray]:
        """(B, W) word starts for whole-word masking: a row of a corpus with a word-start companion
        (data/word_starts.py) takes its flags, any other row the tokenizer's id-based starts; None
        (the recipe's id-based starts throughout) when no corpus of the stream has a companion."""
        if not self.stream.has_word_starts:
            return None
        starts = recipe.id_word_starts(tokens)
        for row, (c, s) in enumerate(zip(corpus.tolist(), samples.tolist())):
            flags = self.stream.word_starts(c, s)
            if flags is not None:
                starts[row, :len(flags)] = flags
        return starts

    def recipe_at(self, step: Optional[int]) -> MaskingRecipe:
        """The recipe of optimizer step `step` (None: the configured rate): the same draws at another rate."""
        if step is None or not self.mask_prob_schedule:
            return self.recipe
        rate = mask_prob_at(self.mask_prob_schedule, step, self.recipe.mask_prob)
        if rate not in self._recipes:
            self._recipes[rate] = dataclasses.replace(self.recipe, mask_prob=rate)
        return self._recipes[rate]

    def __getitem__(self, global_index: int) -> Dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([global_index]).items()}


class StepPlanner:
    """Which stream positions each optimizer step takes, and this rank's micro-batches of them."""

    def __init__(self, stream: SampleStream, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 tokens_per_step: int = 0, warmup_steps: int = 0, warmup_start: float = 1.0):
        self.stream, self.global_batch, self.micro_batch = stream, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.tokens_per_step = dp_rank, dp_size, tokens_per_step
        self.warmup_steps, self.warmup_start = warmup_steps, warmup_start
        # (consumed, step) -> (step size, micro-batches): the sampler (running ahead) and next_step both ask
        self._plans: "OrderedDict[Tuple[int, Optional[int]], Tuple[int, List[List[int]]]]" = OrderedDict()

    def budget(self, step: Optional[int]) -> int:
        """Tokens of step `step` (0: fixed batches of global_batch samples)."""
        if not self.tokens_per_step:
            return 0
        return batch_budget(self.tokens_per_step, self.warmup_steps, self.warmup_start, step)

    def plan(self, consumed: int, step: Optional[int] = None) -> Tuple[int, List[List[int]]]:
        """(samples the step `step` starting at `consumed` takes, this rank's micro-batches of them)."""
        key = (consumed, step if self.warmup_steps else None)
        if key not in self._plans:
            count = self._step_size(consumed, step)
            self._plans[key] = (count, self._micro_batches(consumed, count))
            if len(self._plans) > 16:
                self._plans.popitem(last=False)
        return self._plans[key]

    def step_size(self, consumed: int, step: Optional[int] = None) -> int:
        """Samples the step starting at position `consumed` takes."""
        return self.plan(consumed, step)[0]

    def micro_batches(self, consumed: int, step: Optional[int] = None) -> List[List[int]]:
        """This rank's micro-batches (lists of positions) of the step starting at `consumed`."""
        return self.plan(consumed, step)[1]

    def _step_size(self, consumed: int, step: Optional[int] = None) -> int:
        budget = self.budget(step)
        if not budget:
            return self.global_batch
        window = max(16, 2 * budget // max(1, self.stream.corpora[0].seq_length) + 16)
        while True:
            lengths = self.stream.lengths(np.arange(consumed, consumed + window))
            total = np.cumsum(lengths)
            if total[-1] > budget:
                return max(1, int(np.searchsorted(total, budget, side="right")))
            window *= 2

    def every_rank_micro_batches(self, consumed: int, step: Optional[int] = None) -> List[List[List[int]]]:
        """The micro-batches of every data-parallel rank (in rank order) of the step starting at `consumed`."""
        count = self.step_size(consumed, step)
        return [self._micro_batches(consumed, count, rank) for rank in range(self.dp_size)]

    def _micro_batches(self, consumed: int, count: int, rank: Optional[int] = None) -> List[List[int]]:
        rank = self.dp_rank if rank is None else rank
        shares = np.array_split(np.arange(consumed, consumed + count), self.dp_size)
        k = -(-max(len(s) for s in shares) // self.micro_batch)  # the same on every rank
        mine = shares[rank]
        if len(mine) < k:
            raise ValueError(f"a step of {count} samples leaves data-parallel rank {rank} fewer samples "
                             f"than the {k} micro-batches of its peers; raise train.tokens_per_step")
        if not self.tokens_per_step:  # fixed batches: full micro-batches as before
            return [mine[i:i + self.micro_batch].tolist() for i in range(0, len(mine), self.micro_batch)]
        return [part.tolist() for part in np.array_split(mine, k)]


class _RankBatches(torch.utils.data.Sampler):
    """Yields this rank's micro-batches of global indices from the loader's position on, forever, as
    `StepIndices` of their optimizer step (`steps_taken` + 1 first; None when the step is not tracked)."""

    def __init__(self, loader: "PretrainLoader"):
        self.loader = loader
        step = None if loader.steps_taken is None else loader.steps_taken + 1
        self.position = (loader.consumed_samples, step, loader.phase_start or 0)

    def __iter__(self) -> Iterator[List[int]]:
        position = self.position
        while True:
            count, parts = self.loader.plan(*position)
            yield from parts
            position = self.loader.advance(*position, count)


class _PhasedSamples(torch.utils.data.Dataset):
    """The length phases' MaskedSamples behind one dataset: a micro-batch goes to its `StepIndices.phase`'s."""

    def __init__(self, phases: Sequence[MaskedSamples]):
        self.phases = list(phases)

    def __len__(self) -> int:
        return len(self.phases[0])

    def __getitems__(self, indices) -> Dict[str, torch.Tensor]:
        return self.phases[getattr(indices, "phase", 0)].__getitems__(indices)


class PretrainLoader:
    """Micro-batches for one optimizer step at a time; `state_dict` is the consumed-sample count (and, with a
    length curriculum, `phase_start`: the global index at which the current phase's stream began)."""

    def __init__(self, samples: MaskedSamples, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 num_workers: int = 0, consumed_samples: int = 0, tokens_per_step: int = 0,
                 length_phases: Sequence[Tuple[int, MaskedSamples]] = (), batch_warmup_steps: int = 0,
                 batch_warmup_start: float = 1.0):
        """length_phases: [(n_k, samples_k), ...] for k >= 1: the steps after n_k (up to the next) read samples_k
        (its stream packed at phase k's length); `samples` serves the steps up to n_1 (data.seq_length_schedule);
        without tokens_per_step every phase's steps take global_batch rows. batch_warmup_steps / _start: the
        token budget's warmup (`batch_budget`), which needs tokens_per_step."""
        if not tokens_per_step and global_batch % (micro_batch * dp_size):
            raise ValueError("global batch must be a multiple of micro batch x data-parallel size")
        if not tokens_per_step and batch_warmup_steps:
            raise ValueError("a batch warmup needs a token budget per step")
        self.samples, self.global_batch, self.micro_batch = samples, global_batch, micro_batch
        self.dp_rank, self.dp_size, self.num_workers = dp_rank, dp_size, num_workers
        self.phases = [samples] + [phase for _, phase in length_phases]
        self.phase_firsts = [0] + [int(first) for first, _ in length_phases]
        self.planners = [StepPlanner(phase.stream, global_batch, micro_batch, dp_rank, dp_size, tokens_per_step,
                                     batch_warmup_steps, batch_warmup_start) for phase in self.phases]
        self.planner = self.planners[0]
        self.consumed_samples = consumed_samples
        self.steps_taken: Optional[int] = 0 if consumed_samples == 0 else None
        """Optimizer steps whose batches were taken (None: not known yet, derived from the consumed
        count when a curriculum needs it: `derive_steps_taken`)."""
        self.phase_start: Optional[int] = 0 if consumed_samples == 0 else None
        """Global index of position 0 of the next step's length phase's stream (None: not known yet)."""
        self._saved_phase_start: Optional[int] = None
        self.last_step_samples = 0
        self.last_step_packing_efficiency = 0.0
        """Real (non-padding) tokens / row tokens (B x W) of the last step's micro-batches on every
        rank: the same on every rank, for metrics.jsonl."""
        self._iterator = None

    @property
    def follows_steps(self) -> bool:
        """Whether batches depend on the optimizer step (a curriculum), which must then be known."""
        return bool(self.samples.mask_prob_schedule or len(self.phases) > 1 or self.planner.warmup_steps)

    def plan(self, consumed: int, step: Optional[int], phase_start: int) -> Tuple[int, List[StepIndices]]:
        """(samples the step `step` starting at global index `consumed` takes, this rank's micro-batches)."""
        phase = phase_at(self.phase_firsts, step)
        count, parts = self.planners[phase].plan(consumed - phase_start, step)
        return count, [StepIndices([p + phase_start for p in part], step, phase, phase_start) for part in parts]

    def advance(self, consumed: int, step: Optional[int], phase_start: int, count: int
                ) -> Tuple[int, Optional[int], int]:
        """The position after step `step` took `count` samples: a new phase's stream starts at the new count."""
        consumed += count
        if step is None:
            return consumed, None, phase_start
        if phase_at(self.phase_firsts, step + 1) != phase_at(self.phase_firsts, step):
            phase_start = consumed
        return consumed, step + 1, phase_start

    def _start(self) -> None:
        if self.steps_taken is None and self.follows_steps:
            self.steps_taken = self.derive_steps_taken(self.consumed_samples)
        if self.phase_start is None:
            self.phase_start = self.derive_phase_start()
        sampler = _RankBatches(self)
        dataset = self.samples if len(self.phases) == 1 else _PhasedSamples(self.phases)
        # A private generator: creating an iterator must not draw from the global torch RNG, which
        # drives dropout (a resumed run creates its iterator at a different point than an uninterrupted one).
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers,
                                             collate_fn=already_collated,
                                             persistent_workers=self.num_workers > 0,
                                             generator=torch.Generator().manual_seed(0))
        self._iterator = iter(loader)

    def next_step(self, step: Optional[int] = None) -> List[Dict[str, torch.Tensor]]:
        """The micro-batches of the next optimizer step for this rank (as many on every rank); `step`,
        when given, is its number (the curricula follow it)."""
        if step is not None and self.steps_taken != step - 1:
            self.steps_taken, self.phase_start, self._saved_phase_start, self._iterator = step - 1, None, None, None
        if self._iterator is None:
            self._start()
        step = None if self.steps_taken is None else self.steps_taken + 1
        position = (self.consumed_samples, step, self.phase_start)
        count, parts = self.plan(*position)
        batches = [next(self._iterator) for _ in parts]
        self.last_step_packing_efficiency = self.packing_efficiency(*position)
        self.consumed_samples, _, self.phase_start = self.advance(*position, count)
        self.last_step_samples = count
        self.steps_taken = None if self.steps_taken is None else self.steps_taken + 1
        return batches

    def _walk(self, until_consumed: Optional[int] = None, until_steps: Optional[int] = None
              ) -> Tuple[int, int, int]:
        """(steps, consumed, phase_start) after replaying the plans from sample 0 until `until_consumed` samples
        or `until_steps` steps are taken (the plans depend on the consumed count and the step only)."""
        consumed, step, start = 0, 1, 0
        while (consumed < until_consumed) if until_consumed is not None else (step <= until_steps):
            count = self.planners[phase_at(self.phase_firsts, step)]._step_size(consumed - start, step)
            consumed, step, start = self.advance(consumed, step, start, count)
        return step - 1, consumed, start

    def state_before_step(self, step: int) -> Dict[str, int]:
        """The state a checkpoint taken after step - 1 holds (`load_state_dict`'s), from the plans of steps
        1..step-1 replayed: how a tool positions a loader at any step without training to it."""
        taken, consumed, phase_start = self._walk(until_steps=step - 1)
        state = {"consumed_samples": consumed, "step": taken}
        if len(self.phases) > 1:
            state["phase_start"] = phase_start
        return state

    def derive_steps_taken(self, consumed: int) -> int:
        """The optimizer steps that consumed the first `consumed` samples: consumed / global batch, or, with
        a token budget, the steps replayed from sample 0 (the plans depend on the consumed count only)."""
        if not self.planner.tokens_per_step:
            return consumed // self.global_batch
        return self._walk(until_consumed=consumed)[0]

    def derive_phase_start(self) -> int:
        """`phase_start` for the next step: 0 in the first phase, the consumed count when the next step begins
        a phase, else replayed over the steps taken."""
        step = None if self.steps_taken is None else self.steps_taken + 1
        phase = phase_at(self.phase_firsts, step)
        if phase == 0:
            return 0
        if phase != phase_at(self.phase_firsts, step - 1):
            return self.consumed_samples
        if self._saved_phase_start is not None:  # the checkpoint's: no replay
            return self._saved_phase_start
        return self._walk(until_steps=self.steps_taken)[2]

    def packing_efficiency(self, consumed: int, step: Optional[int] = None, phase_start: int = 0) -> float:
        """Real tokens / row tokens of the step starting at `consumed`, over every rank's micro-batches
        (from the samples' lengths: no batch is read and no rank talks to another)."""
        phase = phase_at(self.phase_firsts, step)
        samples, real, rows = self.phases[phase], 0, 0
        for rank_parts in self.planners[phase].every_rank_micro_batches(consumed - phase_start, step):
            for part in rank_parts:
                lengths = samples.stream.lengths(np.asarray(part, dtype=np.int64))
                real += int(lengths.sum())
                rows += len(part) * samples.width(lengths)
        return real / rows if rows else 0.0

    def state_dict(self) -> Dict[str, int]:
        state = {"consumed_samples": self.consumed_samples}
        if len(self.phases) > 1 and self.phase_start is not None:
            state["phase_start"] = self.phase_start
        return state

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """{"consumed_samples": n} and optionally "step", the optimizer steps already taken (else derived
        from n when a curriculum needs it), and "phase_start" (else replayed when a length phase needs it)."""
        self.consumed_samples = int(state["consumed_samples"])
        self.steps_taken = int(state["step"]) if "step" in state else (0 if self.consumed_samples == 0 else None)
        self.phase_start = 0 if self.consumed_samples == 0 else None
        self._saved_phase_start = int(state["phase_start"]) if "phase_start" in state else None
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
