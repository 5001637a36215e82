"""Glue over megatron-core's indexed dataset: `PREFIX.bin` + `PREFIX.idx`, and our `PREFIX.json` sidecar.

Layout: one item (sequence) per document, holding the document's token ids without special
tokens, each followed by `end_document()`. So `dataset[i]` is document i and
`dataset.document_indices == [0, 1, ..., N]`. The sidecar records the tokenizer (path and
fingerprint), counts, inputs and the sha256 of the `.idx`; the trainer takes the tokenizer from it.

`check_dataset` (run by `open_indexed`, and by the trainer's rank 0 before anything else) checks
the three files agree before a sample is read: a `.bin` cut short, an `.idx` from another dataset
or a sidecar of another tokenizer is a one-line `UserError`, not a crash at step 1 or silent garbage.
It stats the `.bin` and reads the `.idx`, never the `.bin` itself.

megatron-core is imported on first use: the import costs seconds and warns about Transformer
Engine and Apex, which a CPU or plain-PyTorch user does not need to read. Preprocessing workers
never import it: each writes its shard with `ShardWriter` (the same bytes as megatron-core's
builder, checked by tests/test_preprocess.py), and the main process merges the shards in order
with megatron-core's `IndexedDatasetBuilder.add_index`.
"""
import gc
import hashlib
import json
import os
import struct
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Tuple

import numpy as np

from data import jsonio
from data.errors import UserError

if TYPE_CHECKING:
    from data.tokenizer import Tokenizer

SIDECAR_FORMAT_VERSION = 1


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def sidecar_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.json")


def token_dtype(vocab_size: int) -> type[np.integer]:
    """uint16 holds ids below 65536 in half the space of int32."""
    return np.uint16 if vocab_size < 65536 else np.int32


def indexed_dataset_module():
    """megatron-core's `indexed_dataset` module (IndexedDataset, IndexedDatasetBuilder), imported quietly."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.jit use inside megatron
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def open_indexed(prefix: str | Path, tokenizer: "Tokenizer | None" = None, check: bool = True):
    """The megatron-core `IndexedDataset` at prefix (memory-mapped), checked first by `check_dataset`
    unless `check=False` (a caller that has checked it already, such as the trainer's non-zero ranks)."""
    if check:
        check_dataset(prefix, tokenizer)
    else:
        _require_files(prefix)
    return indexed_dataset_module().IndexedDataset(str(prefix))


def _require_files(prefix: str | Path) -> None:
    missing = [str(p) for p in (bin_path(prefix), idx_path(prefix)) if not p.is_file()]
    if missing:
        raise UserError(f"indexed dataset not found: {' and '.join(missing)} missing; "
                        f"run tools/preprocess_data.py --output-prefix {prefix}")


def read_sidecar(prefix: str | Path) -> dict:
    path = sidecar_path(prefix)
    if not path.is_file():
        raise UserError(f"{path} not found: {prefix} was not written by tools/preprocess_data.py; rerun it")
    sidecar = jsonio.read_json_object(path, "rerun tools/preprocess_data.py")
    if sidecar.get("format_version") != SIDECAR_FORMAT_VERSION:
        raise UserError(f"{path}: format_version {sidecar.get('format_version')!r} is not "
                        f"{SIDECAR_FORMAT_VERSION}; rerun tools/preprocess_data.py")
    return sidecar


# megatron-core's .idx layout (version 1): header, version, dtype code, sequence and document counts,
# then int32 sequence lengths, int64 byte offsets of the sequences, int64 document indices.
_IDX_HEADER = b"MMIDIDX\x00\x00"
_IDX_FIXED_BYTES = len(_IDX_HEADER) + 8 + 1 + 8 + 8  # 34: what precedes the arrays
_IDX_DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.uint16): 8, np.dtype(np.int32): 4}
# every code megatron-core's DType knows (it writes others for other token types)
_IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
_CHECK_CHUNK = 1 << 22  # entries compared at a time: memory stays bounded for any .idx size
_REDO = "rerun tools/preprocess_data.py"


def idx_sha256(prefix: str | Path) -> str:
    """sha256 of PREFIX.idx: the sidecar records it, `check_dataset` compares it."""
    with open(idx_path(prefix), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_dataset(prefix: str | Path, tokenizer: "Tokenizer | None" = None) -> None:
    """Raise a one-line `UserError` naming the file and what differs unless PREFIX.bin, PREFIX.idx
    and PREFIX.json belong together (and PREFIX.json to `tokenizer`, when given).

    The .idx must be well formed (header, version, dtype code, its size from its counts, sequences
    back to back, document indices from 0 to the sequence count); the .bin as long as the .idx says;
    the sidecar's documents, tokens, dtype and, when recorded, the .idx's sha256 (sidecars from before
    it was recorded pass on the other checks) must match the .idx; the tokenizer's fingerprint and
    vocabulary size those recorded, and the dtype must hold its ids.
    """
    _require_files(prefix)
    sidecar = read_sidecar(prefix)
    idx, data, side = idx_path(prefix), bin_path(prefix), sidecar_path(prefix)
    try:
        layout = check_idx_and_bin(idx, data)
        recorded_sha = sidecar.get("idx_sha256")
        actual_sha = idx_sha256(prefix) if recorded_sha is not None else None
    except OSError as err:
        raise UserError(f"cannot read {err.filename or idx}: {err.strerror or err}") from None
    dtype, documents, tokens = layout
    for key, actual in (("documents", documents), ("tokens", tokens), ("dtype", dtype.name)):
        if key in sidecar and sidecar[key] != actual:
            raise UserError(f"{idx}: {actual} {key}, but {side.name} says {sidecar[key]} "
                            f"(.idx from another dataset?); {_REDO}")
    if recorded_sha is not None and actual_sha != recorded_sha:
        raise UserError(f"{idx}: sha256 {actual_sha[:12]}..., but {side.name} recorded {str(recorded_sha)[:12]}... "
                        f"(modified, or from another dataset?); {_REDO}")
    recorded = sidecar.get("tokenizer", {})
    vocab_size = recorded.get("vocab_size")
    if tokenizer is not None:
        fingerprint = recorded.get("fingerprint")
        if fingerprint and fingerprint != tokenizer.fingerprint():
            raise UserError(f"{side}: preprocessed with tokenizer {recorded.get('path')} (fingerprint "
                            f"{fingerprint[:12]}...), not {tokenizer.path} ({tokenizer.fingerprint()[:12]}...); "
                            f"use that tokenizer or preprocess again")
        if vocab_size is not None and vocab_size != tokenizer.vocab_size:
            raise UserError(f"{side}: preprocessed with a vocabulary of {vocab_size}, but tokenizer "
                            f"{tokenizer.path} has {tokenizer.vocab_size}; use that tokenizer or preprocess again")
        vocab_size = tokenizer.vocab_size
    if vocab_size is not None and np.issubdtype(dtype, np.integer) and np.iinfo(dtype).max < vocab_size - 1:
        raise UserError(f"{data}: {dtype.name} tokens cannot hold the ids of a vocabulary of {vocab_size}; {_REDO}")


def check_idx_and_bin(idx: Path, data: Path) -> tuple[np.dtype, int, int]:
    """(token dtype, documents, tokens) of a well-formed .idx whose .bin has the size it says."""
    idx_bytes = idx.stat().st_size
    with open(idx, "rb") as f:
        head = f.read(_IDX_FIXED_BYTES)
    if len(head) < _IDX_FIXED_BYTES or head[:len(_IDX_HEADER)] != _IDX_HEADER:
        raise UserError(f"{idx}: not a megatron-core index (no MMIDIDX header); {_REDO}")
    version, code, sequences, doc_entries = struct.unpack("<QBQQ", head[len(_IDX_HEADER):])
    if version != 1:
        raise UserError(f"{idx}: index version {version}, only version 1 is read; {_REDO}")
    if code not in _IDX_DTYPES:
        raise UserError(f"{idx}: unknown dtype code {code} (corrupt?); {_REDO}")
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = _IDX_FIXED_BYTES + 12 * sequences + 8 * doc_entries  # int32 + int64 per sequence, int64 per entry
    if idx_bytes != expected:
        raise UserError(f"{idx}: {idx_bytes} bytes, but its header's {sequences} sequences and {doc_entries - 1} "
                        f"documents need {expected} (truncated or corrupt?); {_REDO}")
    if doc_entries < 1:
        raise UserError(f"{idx}: no document index entries (corrupt?); {_REDO}")
    def array(dtype, count: int, offset: int) -> np.ndarray:
        return np.memmap(idx, dtype=dtype, mode="r", offset=offset, shape=(count,)) if count else np.zeros(0, dtype)

    lengths = array(np.int32, sequences, _IDX_FIXED_BYTES)
    pointers = array(np.int64, sequences, _IDX_FIXED_BYTES + 4 * sequences)
    doc_index = array(np.int64, doc_entries, _IDX_FIXED_BYTES + 12 * sequences)
    tokens, end = 0, 0  # end: where the next sequence must start in the .bin, in bytes
    for start in range(0, sequences, _CHECK_CHUNK):
        chunk_lengths = lengths[start:start + _CHECK_CHUNK].astype(np.int64)
        if (chunk_lengths < 0).any():
            i = start + int(np.flatnonzero(chunk_lengths < 0)[0])
            raise UserError(f"{idx}: sequence {i} has negative length {int(lengths[i])} (corrupt?); {_REDO}")
        ends = end + np.cumsum(chunk_lengths * dtype.itemsize)
        starts = np.concatenate([[end], ends[:-1]])
        bad = np.flatnonzero(pointers[start:start + _CHECK_CHUNK] != starts)
        if len(bad):
            i = start + int(bad[0])
            raise UserError(f"{idx}: sequence {i} starts at byte {int(pointers[i])}, but the sequences before it "
                            f"end at byte {int(starts[bad[0]])} (corrupt?); {_REDO}")
        tokens += int(chunk_lengths.sum())
        end = int(ends[-1])
    falls = any((np.diff(doc_index[start:start + _CHECK_CHUNK + 1]) < 0).any()
                for start in range(0, doc_entries, _CHECK_CHUNK))
    if doc_index[0] != 0 or doc_index[-1] != sequences or falls:
        raise UserError(f"{idx}: document indices do not rise from 0 to its {sequences} sequences (corrupt?); {_REDO}")
    del lengths, pointers, doc_index  # close the memory maps
    bin_bytes = data.stat().st_size
    if bin_bytes != end:
        raise UserError(f"{data}: {bin_bytes} bytes, but {idx.name} says {end} "
                        f"(truncated or from another dataset?); {_REDO}")
    return dtype, doc_entries - 1, tokens


class ShardWriter:
    """Writes one document-per-sequence IndexedDataset (`PREFIX.bin/.idx`) without megatron-core.

        with ShardWriter("tmp/shard-000", np.uint16) as shard:
            shard.add(ids, lengths)  # ids of several documents back to back, tokens per document

    The files are what `IndexedDatasetBuilder` writes for the same documents (one `add_document`
    each), so `IndexedDatasetBuilder.add_index` merges them. A failed shard is left for the caller's
    temporary directory to remove.
    """

    def __init__(self, prefix: str | Path, dtype: type[np.integer]):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.documents = 0
        self.tokens = 0
        self._lengths: list[np.ndarray] = []

    def __enter__(self) -> "ShardWriter":
        self._bin = open(bin_path(self.prefix), "wb")
        return self

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        self._bin.write(np.asarray(ids).astype(self.dtype, copy=False).tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int32))
        self.documents += len(lengths)
        self.tokens += int(np.sum(lengths, dtype=np.int64))

    def __exit__(self, exc_type, exc, tb) -> None:
        self._bin.close()
        if exc_type is not None:
            return
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        with open(idx_path(self.prefix), "wb") as f:
            f.write(_IDX_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", _IDX_DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(lengths) + 1))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())


def write_sidecar(path: str | Path, sidecar: dict) -> None:
    """Write sidecar JSON to `path` (temp file + rename). `format_version` is filled in."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps({"format_version": SIDECAR_FORMAT_VERSION, **sidecar}, indent=2) + "\n",
                   encoding="utf-8")
    os.replace(tmp, path)


class IndexedWriter:
    """Writes documents to `PREFIX.bin/.idx/.json`, visible only once complete.

        with IndexedWriter("bin/corpus", vocab_size) as writer:
            writer.add_document(ids)       # one document, or
            writer.add_shard(shard_prefix)  # all documents of a ShardWriter shard, in order
            writer.sidecar = {...}

    Everything goes to temporary names beside the prefix; a clean exit renames them into place
    (sidecar last, so its presence marks a finished dataset), an exception deletes them.
    megatron-core is imported at the first document or shard, not before.

    `companion = (suffix, write)`: on a clean exit, `write(dataset prefix, companion prefix)` writes
    a dataset derived from the finished one (static masks: data/static_masks.py) at temporary names
    too, returns entries for the sidecar, and its PREFIX{suffix}.bin/.idx are renamed with the rest.

    `add_parallel(suffix, dtype, sidecar_key)`: PREFIX{suffix}.bin/.idx are written alongside, one
    document per document (word starts: data/segmenter.py), merged from each shard's SHARD{suffix}
    in `add_shard`; they are finished before `companion` runs (it may read them at the temporary
    prefix), renamed with the rest, and the sidecar's `sidecar_key` entry gets their .idx sha256.
    """

    def __init__(self, prefix: str | Path, vocab_size: int):
        self.prefix = Path(prefix)
        self.dtype = token_dtype(vocab_size)
        self.documents = 0
        self.tokens = 0
        self.sidecar: dict = {}
        self.companion: Optional[Tuple[str, Callable[[Path, Path], dict]]] = None
        self._tmp_prefix = self.prefix.with_name(f".{self.prefix.name}.tmp-{uuid.uuid4().hex[:8]}")
        self._builder = None
        self._parallel: dict[str, tuple[type[np.integer], str]] = {}  # suffix -> (dtype, sidecar key)
        self._parallel_builders: dict = {}

    def __enter__(self) -> "IndexedWriter":
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        return self

    def _ensure_builder(self):
        if self._builder is None:
            builder_class = indexed_dataset_module().IndexedDatasetBuilder
            self._builder = builder_class(str(bin_path(self._tmp_prefix)), dtype=self.dtype)
        return self._builder

    def add_parallel(self, suffix: str, dtype: type[np.integer], sidecar_key: str) -> None:
        """Also write PREFIX{suffix}.bin/.idx from the shards' SHARD{suffix} (see the class docstring);
        call it before the first shard."""
        if self._builder is not None:
            raise RuntimeError("add_parallel after the first document")
        self._parallel[suffix] = (dtype, sidecar_key)

    def _parallel_builder(self, suffix: str):
        """The builder of PREFIX{suffix} at the temporary prefix, made on first use."""
        if suffix not in self._parallel_builders:
            builder_class = indexed_dataset_module().IndexedDatasetBuilder
            self._parallel_builders[suffix] = builder_class(str(bin_path(f"{self._tmp_prefix}{suffix}")),
                                                            dtype=self._parallel[suffix][0])
        return self._parallel_builders[suffix]

    def add_document(self, ids: np.ndarray | list[int]) -> None:
        if self._parallel:
            raise RuntimeError("add_document cannot feed the parallel datasets; write shards")
        ids = np.asarray(ids, dtype=self.dtype)
        # one sequence that is the whole document: the same as add_item + end_document, minus torch
        self._ensure_builder().add_document(ids, [ids.size])
        self.documents += 1
        self.tokens += int(ids.size)

    def add_shard(self, prefix: str | Path, documents: int, tokens: int) -> None:
        """Append a shard written by `ShardWriter` (same dtype); its counts keep the totals."""
        builder = self._ensure_builder()
        # add_index runs gc.collect(), which walks every object in the process (megatron-core and
        # torch: ~400K, 0.1-0.4 s a shard); frozen objects are skipped, and ours are acyclic
        gc.freeze()
        builder.add_index(str(prefix))
        for suffix in self._parallel:
            self._parallel_builder(suffix).add_index(f"{prefix}{suffix}")
        self.documents += documents
        self.tokens += tokens

    def __exit__(self, exc_type, exc, tb) -> None:
        tmp_files = [bin_path(self._tmp_prefix), idx_path(self._tmp_prefix), sidecar_path(self._tmp_prefix)]
        suffix = self.companion[0] if self.companion else None
        companion = [(f(f"{self._tmp_prefix}{suffix}"), f(f"{self.prefix}{suffix}"))
                     for f in (bin_path, idx_path)] if suffix else []
        tmp_files += [tmp for tmp, _ in companion]
        parallel = [(f(f"{self._tmp_prefix}{s}"), f(f"{self.prefix}{s}"))
                    for s in self._parallel for f in (bin_path, idx_path)]
        tmp_files += [tmp for tmp, _ in parallel]
        try:
            if exc_type is None:
                self._ensure_builder().finalize(str(idx_path(self._tmp_prefix)))
                entries = {}
                for s, (_, key) in self._parallel.items():
                    tmp = f"{self._tmp_prefix}{s}"
                    self._parallel_builder(s).finalize(str(idx_path(tmp)))  # built here when no shard came
                    entries[key] = {**self.sidecar.get(key, {}), "idx_sha256": idx_sha256(tmp)}
                derived = self.companion[1](self._tmp_prefix, Path(f"{self._tmp_prefix}{suffix}")) if suffix else {}
                write_sidecar(sidecar_path(self._tmp_prefix), {
                    **self.sidecar,
                    **entries,
                    **derived,
                    "documents": self.documents,
                    "tokens": self.tokens,
                    "dtype": np.dtype(self.dtype).name,
                    "idx_sha256": idx_sha256(self._tmp_prefix),  # check_dataset: this .idx, unmodified
                })
                # a stale sidecar must not vouch for new .bin/.idx while they are being swapped
                sidecar_path(self.prefix).unlink(missing_ok=True)
                os.replace(bin_path(self._tmp_prefix), bin_path(self.prefix))
                os.replace(idx_path(self._tmp_prefix), idx_path(self.prefix))
                for tmp, final in companion + parallel:
                    os.replace(tmp, final)
                os.replace(sidecar_path(self._tmp_prefix), sidecar_path(self.prefix))
        finally:
            gc.unfreeze()
            for builder in (self._builder, *self._parallel_builders.values()):
                if builder is not None and not builder.data_file.closed:
                    builder.data_file.close()
            for path in tmp_files:
                path.unlink(missing_ok=True)
