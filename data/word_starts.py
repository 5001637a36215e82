"""Reading a corpus' word-start companion: where a word segmenter's words begin, per token.

Preprocessing with `--word-segmenter jieba` writes, beside PREFIX.bin/.idx/.json, a megatron-core
IndexedDataset `PREFIX.wordstarts.bin/.idx` of uint8 flags laid out as the token dataset (one
sequence per document, each exactly as long as its token sequence): 1 where a token begins a word
(a masking unit), 0 where it continues the previous token's word. PREFIX.json records it as

    "word_starts": {"suffix": ".wordstarts", "segmenter": "jieba", "segmenter_version": "0.42.1",
                    "idx_sha256": "<sha256 of PREFIX.wordstarts.idx>"}

With data.whole_word_mask the packed streams (data/packing.py, data/pairs.py) read the flags over the
same spans as the tokens and the loader masks whole words by them (data/masking.py `apply_batch`).
A corpus without the entry keeps the tokenizer's id-based word starts.

Files missing, of another document count or length, or an .idx other than the one recorded are a
one-line `UserError` naming the token .bin and the companion file; a segmenter version other than
the installed one, or than another corpus' of the run, is one warning (`warn_segmenter_versions`).
"""
from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from data.errors import UserError
from data.indexed import (check_idx_and_bin, indexed_dataset_module, bin_path, idx_path, idx_sha256,
                          read_sidecar, sidecar_path)
from data.segmenter import SIDECAR_KEY, WORD_STARTS_SUFFIX as SUFFIX  # the writer's names

logger = logging.getLogger(__name__)

_ENTRY_KEYS = ("suffix", "segmenter", "segmenter_version", "idx_sha256")


def companion_prefix(prefix: str | Path, suffix: str = SUFFIX) -> Path:
    return Path(f"{prefix}{suffix}")


def _redo(entry: Optional[dict]) -> str:
    segmenter = (entry or {}).get("segmenter") or "jieba"
    return f"preprocess again with tools/preprocess_data.py --word-segmenter {segmenter}"


def word_starts_entry(prefix: str | Path) -> Optional[dict]:
    """PREFIX.json's `word_starts` entry, or None when it records no companion."""
    entry = read_sidecar(prefix).get(SIDECAR_KEY)
    if entry is None:
        return None
    if not isinstance(entry, dict) or any(not isinstance(entry.get(k), str) for k in _ENTRY_KEYS):
        raise UserError(f"{sidecar_path(prefix)}: malformed {SIDECAR_KEY!r} entry (needs {', '.join(_ENTRY_KEYS)}); "
                        f"{_redo(entry if isinstance(entry, dict) else None)}")
    return entry


def open_word_starts(prefix: str | Path, dataset, check: bool = True):
    """The word-start companion of PREFIX (indexable like `dataset`, the token IndexedDataset:
    companion[i] is document i's uint8 flags), or None when PREFIX.json records none.

    Raises a one-line `UserError` naming PREFIX.bin and the companion file when its files are missing
    or malformed, its documents or any sequence length differ from `dataset`'s, or (with `check`) its
    .idx is not the one PREFIX.json recorded."""
    entry = word_starts_entry(prefix)
    if entry is None:
        return None
    tokens_bin, out = bin_path(prefix), companion_prefix(prefix, entry["suffix"])
    redo = _redo(entry)
    missing = [str(p) for p in (bin_path(out), idx_path(out)) if not p.is_file()]
    if missing:
        raise UserError(f"{tokens_bin}: its word-start companion {' and '.join(missing)} not found "
                        f"({sidecar_path(prefix).name} records one); {redo}")
    try:
        dtype, documents, _ = check_idx_and_bin(idx_path(out), bin_path(out))
        actual_sha = idx_sha256(out) if check else None
    except UserError as err:
        raise UserError(f"{tokens_bin}: its word-start companion is unreadable: {err}") from None
    except OSError as err:
        raise UserError(f"{tokens_bin}: cannot read its word-start companion {err.filename or idx_path(out)}: "
                        f"{err.strerror or err}") from None
    if dtype != np.uint8:
        raise UserError(f"{tokens_bin}: its word-start companion {idx_path(out)} holds {dtype.name}, not uint8 "
                        f"flags; {redo}")
    expected_documents = len(dataset.document_indices) - 1
    if documents != expected_documents:
        raise UserError(f"{tokens_bin} has {expected_documents} documents, but its word-start companion "
                        f"{bin_path(out)} has {documents} (from another dataset?); {redo}")
    if check and actual_sha != entry["idx_sha256"]:
        raise UserError(f"{tokens_bin}: its word-start companion {idx_path(out)} has sha256 {actual_sha[:12]}..., "
                        f"but {sidecar_path(prefix).name} recorded {entry['idx_sha256'][:12]}... "
                        f"(modified, or from another dataset?); {redo}")
    companion = indexed_dataset_module().IndexedDataset(str(out))
    ours, theirs = np.asarray(dataset.sequence_lengths), np.asarray(companion.sequence_lengths)
    if len(ours) != len(theirs) or not np.array_equal(dataset.document_indices, companion.document_indices):
        raise UserError(f"{tokens_bin} has {len(ours)} sequences, but its word-start companion {bin_path(out)} "
                        f"has {len(theirs)} laid out otherwise (from another dataset?); {redo}")
    differ = np.flatnonzero(ours != theirs)
    if len(differ):
        i = int(differ[0])
        raise UserError(f"{tokens_bin}: sequence {i} has {int(ours[i])} tokens, but its word-start companion "
                        f"{bin_path(out)} has {int(theirs[i])} flags for it (from another dataset?); {redo}")
    return companion


def _installed_version(segmenter: str) -> Optional[str]:
    try:
        return importlib.metadata.version(segmenter)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def segmenter_version_problems(prefixes: Sequence[str | Path]) -> list[str]:
    """What differs between the segmenter versions the corpora were preprocessed with and the
    installed segmenter, or among the corpora (empty when nothing does)."""
    entries = [(prefix, word_starts_entry(prefix)) for prefix in prefixes]
    entries = [(prefix, entry) for prefix, entry in entries if entry is not None]
    problems, first = [], {}
    for prefix, entry in entries:
        name, version = entry["segmenter"], entry["segmenter_version"]
        installed = _installed_version(name)
        if installed is not None and installed != version:
            problems.append(f"{prefix} was segmented with {name} {version}, but {name} {installed} is installed")
        if name in first and first[name][1] != version:
            problems.append(f"{prefix} was segmented with {name} {version}, but {first[name][0]} with "
                            f"{name} {first[name][1]}")
        first.setdefault(name, (prefix, version))
    return problems


def warn_segmenter_versions(prefixes: Sequence[str | Path]) -> Optional[str]:
    """Log one warning for all of `segmenter_version_problems(prefixes)` (the trainer's rank 0 calls
    it once per run); returns its text, or None when there is nothing to say."""
    problems = segmenter_version_problems(prefixes)
    if not problems:
        return None
    message = (f"word-start data from another segmenter version: {'; '.join(problems)}; words may be "
               f"segmented differently (preprocess again with the installed segmenter to match)")
    logger.warning(message)
    return message
