"""Static masking (BERT; RoBERTa section 4.1): masks drawn once at preprocessing time, N copies stored.

BERT duplicated its data 10 times, each copy with its own masks, so that a sequence is seen with
N different masks over training; RoBERTa compares that with a new mask per presentation (dynamic
masking, data/masking.py). Here preprocessing writes, beside PREFIX.bin/.idx/.json, a companion
megatron-core IndexedDataset `PREFIX.static_masks.bin/.idx` of int32 values:

    copy k's item j is item k * num_items + j (the same length as item j of PREFIX);
    a value is -1 where the position is not predicted, else the id the model is fed there
    (<mask>, a random id, or the original id when it is kept unchanged).

The masks are drawn per document with the masking recipe of data/masking.py (`MaskingRecipe`, the
same flags as data.mask_prob etc.) from a generator seeded by (mask seed, copy, document), so they do
not depend on packing, sequence length or the run. PREFIX.json records them under `static_masks`
(copies, seed, the recipe, the companion's .idx sha256); the trainer (data.masking=static) checks
that entry against its config and the files, then reads for a presentation of a packed sample in
epoch e of its corpus the same token span of copy e mod N (validation: copy 0). `<s>`, `</s>` and
the separators between documents are never predicted. With whole-word masking, a dataset preprocessed
with a word segmenter takes its words from the segmenter's flags (PREFIX.wordstarts, data/segmenter.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from data.errors import UserError
from data.indexed import (check_idx_and_bin, indexed_dataset_module, bin_path, idx_path, idx_sha256,
                          read_sidecar, sidecar_path)
from data.masking import IGNORE_INDEX, MaskingRecipe
from data.seeding import derive_rng

SUFFIX = ".static_masks"
NOT_PREDICTED = -1
STATIC_MASK_STREAM = 0x53544154  # "STAT": keeps these generators apart from the dynamic ones
RECIPE_KEYS = ("mask_prob", "mask_token_prob", "random_token_prob", "whole_word_mask", "max_span")
_BATCH_CELLS = 1 << 18  # documents masked together: at most this many (documents x longest) cells
_WINDOW_TOKENS = 1 << 22  # documents read (and sorted by length into batches) at a time
_FLAG = "--static-masks N"


def companion_prefix(prefix: str | Path) -> Path:
    return Path(f"{prefix}{SUFFIX}")


# Same shape as a trainer config section by coincidence (documented flags); the recipe fields mirror
# data.mask_* on purpose: RECIPE_KEYS compares them.
@dataclass(frozen=True)
class StaticMaskOptions:
    """How preprocessing draws static masks (tools/preprocess_data.py flags); copies=0: none."""

    copies: int = 0
    seed: int = 1234
    mask_prob: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    whole_word_mask: bool = False
    max_span: int = 1

    def __post_init__(self):
        if self.copies < 0:
            raise UserError(f"--static-masks {self.copies} must be 0 (off) or a number of copies, e.g. 10")
        for flag, value in (("--mask-prob", self.mask_prob), ("--mask-token-prob", self.mask_token_prob),
                            ("--random-token-prob", self.random_token_prob)):
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{flag} {value} must be between 0 and 1")
        if self.mask_token_prob + self.random_token_prob > 1.0:
            raise UserError("--mask-token-prob + --random-token-prob must not exceed 1")
        if self.max_span < 1:
            raise UserError(f"--max-span {self.max_span} must be >= 1")

    def recipe_values(self) -> dict:
        return {key: getattr(self, key) for key in RECIPE_KEYS}


def recipe_for(tokenizer, values: dict) -> MaskingRecipe:
    """The MaskingRecipe of `values` (RECIPE_KEYS) for `tokenizer`, as the trainer builds it."""
    return MaskingRecipe(mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                         special_ids=tuple(tokenizer.special_ids), mask_prob=values["mask_prob"],
                         mask_token_prob=values["mask_token_prob"], random_token_prob=values["random_token_prob"],
                         word_starts=tokenizer.word_start_ids() if values["whole_word_mask"] else None,
                         max_span=values["max_span"])


def document_rng(seed: int, copy: int, document: int) -> np.random.Generator:
    return derive_rng(seed, copy, document, STATIC_MASK_STREAM)


def _masked_values(recipe: MaskingRecipe, documents: Sequence[np.ndarray], seed: int, copy: int,
                   first_document: int, word_starts: Optional[Sequence[np.ndarray]] = None) -> list[np.ndarray]:
    """The stored values (int32, -1 = not predicted) of documents first_document, ... A row of
    `apply_batch` depends on its own tokens and draws only, so the documents are masked in batches of
    similar lengths (little padding) and the values are those of each document masked alone.
    word_starts: per document, its word-start flags (a segmenter's), used as the masking units."""
    lengths = np.array([len(d) for d in documents], dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    out: list = [None] * len(documents)
    start = 0
    while start < len(order):
        end = start + 1  # rows order[start:end], longest last
        while end < len(order) and (end + 1 - start) * lengths[order[end]] <= _BATCH_CELLS:
            end += 1
        rows = order[start:end]
        tokens = np.zeros((len(rows), max(1, int(lengths[rows[-1]]))), dtype=np.int64)
        starts = np.zeros(tokens.shape, dtype=bool) if word_starts is not None else None
        draws = []
        for row, d in enumerate(rows):
            tokens[row, :lengths[d]] = documents[d]
            if starts is not None:
                starts[row, :lengths[d]] = word_starts[d]
            draws.append(recipe.draws(document_rng(seed, copy, first_document + int(d)), int(lengths[d])))
        inputs, labels = recipe.apply_batch(tokens, lengths[rows], draws, word_starts=starts)
        values = np.where(labels != IGNORE_INDEX, inputs, NOT_PREDICTED).astype(np.int32)
        for row, d in enumerate(rows):
            out[d] = values[row, :lengths[d]]
        start = end
    return out


def _document(dataset, docs: np.ndarray, d: int) -> np.ndarray:
    ids = [dataset.get(i) for i in range(int(docs[d]), int(docs[d + 1]))]
    return ids[0] if len(ids) == 1 else np.concatenate(ids) if ids else np.zeros(0, np.int64)


def _document_windows(dataset, docs: np.ndarray, word_starts=None
                      ) -> Iterator[Tuple[int, list[np.ndarray], Optional[list[np.ndarray]]]]:
    """(first document, token ids of documents first, ..., their word-start flags or None) in windows
    of about _WINDOW_TOKENS tokens; word_starts: the dataset's word-start companion (same layout)."""
    first, window, flags, size = 0, [], [], 0
    for d in range(len(docs) - 1):
        window.append(_document(dataset, docs, d))
        if word_starts is not None:
            flags.append(_document(word_starts, docs, d))
        size += len(window[-1])
        if size >= _WINDOW_TOKENS:
            yield first, window, flags if word_starts is not None else None
            first, window, flags, size = d + 1, [], [], 0
    if window:
        yield first, window, flags if word_starts is not None else None


def write_static_masks(dataset_prefix: str | Path, out_prefix: str | Path, tokenizer,
                       options: StaticMaskOptions, word_starts_suffix: Optional[str] = None) -> dict:
    """Write `options.copies` masked copies of the dataset at `dataset_prefix` to `out_prefix`.bin/.idx;
    returns the sidecar entry that records them (the caller renames the files: see IndexedWriter).
    word_starts_suffix: the dataset has word-start flags at `dataset_prefix`{suffix}.bin/.idx (a
    segmenter's, data/segmenter.py): whole-word masks take their words from them."""
    recipe = recipe_for(tokenizer, options.recipe_values())
    dataset = indexed_dataset_module().IndexedDataset(str(dataset_prefix))
    word_starts = None
    if options.whole_word_mask and word_starts_suffix:
        word_starts = indexed_dataset_module().IndexedDataset(f"{dataset_prefix}{word_starts_suffix}")
    docs = np.asarray(dataset.document_indices, dtype=np.int64)
    item_lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)
    total = int(item_lengths.sum()) * options.copies
    builder = indexed_dataset_module().IndexedDatasetBuilder(str(bin_path(out_prefix)), dtype=np.int32)
    try:
        with tqdm(total=total, desc="static masks", unit="tok", unit_scale=True, leave=False) as progress:
            for copy in range(options.copies):
                for first, documents, flags in _document_windows(dataset, docs, word_starts):
                    values = _masked_values(recipe, documents, options.seed, copy, first, flags)
                    for d, v in enumerate(values, start=first):
                        builder.add_document(v, item_lengths[docs[d]:docs[d + 1]].tolist())
                    progress.update(sum(len(v) for v in values))
        builder.finalize(str(idx_path(out_prefix)))
    finally:
        if not builder.data_file.closed:
            builder.data_file.close()
    return {"copies": options.copies, "seed": options.seed, **options.recipe_values(),
            "idx_sha256": idx_sha256(out_prefix)}


def companion_writer(tokenizer, options: StaticMaskOptions,
                     word_starts_suffix: Optional[str] = None) -> Tuple[str, Callable[[Path, Path], dict]]:
    """`IndexedWriter.companion` for these options: the companion is written from the finished
    temporary dataset and renamed into place with it, so nothing half-written is ever visible.
    word_starts_suffix: see write_static_masks."""
    return SUFFIX, lambda dataset, out: {"static_masks": write_static_masks(dataset, out, tokenizer, options,
                                                                            word_starts_suffix)}


# -- training ----------------------------------------------------------------------------------------------

def check_static_masks(prefix: str | Path, recipe_values: dict) -> dict:
    """Raise a one-line `UserError` unless PREFIX has static masks drawn with `recipe_values` (the
    training config's data.mask_prob etc.) whose companion files agree with PREFIX.json; returns the
    recorded entry."""
    out = companion_prefix(prefix)
    missing = [str(p) for p in (bin_path(out), idx_path(out)) if not p.is_file()]
    if missing:
        raise UserError(f"data.masking=static: {' and '.join(missing)} not found; preprocess {prefix} with "
                        f"tools/preprocess_data.py {_FLAG} (or set data.masking=dynamic)")
    sidecar, side = read_sidecar(prefix), sidecar_path(prefix)
    entry = sidecar.get("static_masks")
    if (not isinstance(entry, dict) or any(k not in entry for k in ("copies", "idx_sha256", *RECIPE_KEYS))
            or not isinstance(entry["copies"], int) or entry["copies"] < 1):
        raise UserError(f"data.masking=static: {side} records no static masks (left from an earlier run?); "
                        f"preprocess {prefix} again with tools/preprocess_data.py {_FLAG}")
    for key in RECIPE_KEYS:
        if recipe_values[key] != entry[key]:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"data.{key}={recipe_values[key]}, but the static masks of {prefix} were drawn with "
                            f"{entry[key]}; set data.{key}={entry[key]} or preprocess again with {flag}")
    redo = f"preprocess {prefix} again with tools/preprocess_data.py {_FLAG}"
    try:
        dtype, documents, tokens = check_idx_and_bin(idx_path(out), bin_path(out))
        actual_sha = idx_sha256(out)
    except OSError as err:
        raise UserError(f"cannot read {err.filename or idx_path(out)}: {err.strerror or err}") from None
    copies = entry["copies"]
    for key, actual, needed in (("dtype", dtype.name, "int32"),
                                ("documents", documents, copies * sidecar.get("documents", -1)),
                                ("tokens", tokens, copies * sidecar.get("tokens", -1))):
        if actual != needed:
            raise UserError(f"{idx_path(out)}: {actual} {key}, but {copies} copies of {prefix} need {needed} "
                            f"(from another dataset?); {redo}")
    if actual_sha != entry["idx_sha256"]:
        raise UserError(f"{idx_path(out)}: sha256 {actual_sha[:12]}..., but {side.name} recorded "
                        f"{str(entry['idx_sha256'])[:12]}... (modified, or from another dataset?); {redo}")
    return entry


class StaticMasks:
    """A corpus' companion opened for reading: (packed sample, copy) -> its stored values."""

    def __init__(self, prefix: str | Path):
        entry = read_sidecar(prefix)["static_masks"]  # check_static_masks has checked it
        self.copies = int(entry["copies"])
        self.dataset = indexed_dataset_module().IndexedDataset(str(companion_prefix(prefix)))
        self.items = len(self.dataset) // self.copies

    def values(self, packed, sample: int, copy: int) -> np.ndarray:
        """Sample `sample` of `packed` (data/packing.py) as stored in copy `copy` mod N, -1 where not
        predicted (`<s>`, `</s>` and separators included)."""
        return packed.read(sample, self.dataset, (copy % self.copies) * self.items, NOT_PREDICTED, NOT_PREDICTED)


def stored_batch(static: Sequence[StaticMasks], corpora: Sequence, corpus: Sequence[int], samples: Sequence[int],
                 copies: Sequence[int], tokens: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of a padded (B, W) token batch from the stored masks: row b is sample
    samples[b] of corpus corpus[b], copy copies[b]; labels = the original where a value is stored,
    else -100; inputs = the value where stored, else the original."""
    values = np.full(tokens.shape, NOT_PREDICTED, dtype=np.int64)
    for row, (c, s, k) in enumerate(zip(corpus, samples, copies)):
        v = static[c].values(corpora[c], int(s), int(k))
        values[row, :len(v)] = v
    predicted = values >= 0
    return np.where(predicted, values, tokens), np.where(predicted, tokens, IGNORE_INDEX)


def recipe_values_of(data_section) -> dict:
    """RECIPE_KEYS of a config's data section (trainer/pretraining/config.py DataSection)."""
    return {key: getattr(data_section, key) for key in RECIPE_KEYS}
