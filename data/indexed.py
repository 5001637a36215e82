"""Glue over megatron-core's indexed dataset: `PREFIX.bin` + `PREFIX.idx`, and our `PREFIX.json` sidecar.

Layout: one item (sequence) per document, holding the document's token ids without special
tokens, each followed by `end_document()`. So `dataset[i]` is document i and
`dataset.document_indices == [0, 1, ..., N]`. The sidecar records the tokenizer (path and
fingerprint), counts and inputs; the trainer takes the tokenizer from it.

megatron-core is imported on first use: the import costs seconds and warns about Transformer
Engine and Apex, which a CPU or plain-PyTorch user does not need to read. Preprocessing workers
never import it: each writes its shard with `ShardWriter` (the same bytes as megatron-core's
builder, checked by tests/test_preprocess.py), and the main process merges the shards in order
with megatron-core's `IndexedDatasetBuilder.add_index`.
"""
import gc
import json
import os
import struct
import uuid
import warnings
from pathlib import Path

import numpy as np

from data.errors import UserError

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


def _indexed_dataset_module():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # torch.jit use inside megatron
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def open_indexed(prefix: str | Path):
    """The megatron-core `IndexedDataset` at prefix (memory-mapped)."""
    missing = [str(p) for p in (bin_path(prefix), idx_path(prefix)) if not p.is_file()]
    if missing:
        raise UserError(f"indexed dataset not found: {' and '.join(missing)} missing; "
                        f"run tools/preprocess_data.py --output-prefix {prefix}")
    return _indexed_dataset_module().IndexedDataset(str(prefix))


def read_sidecar(prefix: str | Path) -> dict:
    path = sidecar_path(prefix)
    if not path.is_file():
        raise UserError(f"{path} not found: {prefix} was not written by tools/preprocess_data.py; rerun it")
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err}); rerun tools/preprocess_data.py") from None
    if sidecar.get("format_version") != SIDECAR_FORMAT_VERSION:
        raise UserError(f"{path}: format_version {sidecar.get('format_version')!r} is not "
                        f"{SIDECAR_FORMAT_VERSION}; rerun tools/preprocess_data.py")
    return sidecar


# megatron-core's .idx layout (version 1): header, version, dtype code, sequence and document counts,
# then int32 sequence lengths, int64 byte offsets of the sequences, int64 document indices.
_IDX_HEADER = b"MMIDIDX\x00\x00"
_IDX_DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}


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
    """

    def __init__(self, prefix: str | Path, vocab_size: int):
        self.prefix = Path(prefix)
        self.dtype = token_dtype(vocab_size)
        self.documents = 0
        self.tokens = 0
        self.sidecar: dict = {}
        self._tmp_prefix = self.prefix.with_name(f".{self.prefix.name}.tmp-{uuid.uuid4().hex[:8]}")
        self._builder = None

    def __enter__(self) -> "IndexedWriter":
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        return self

    def _ensure_builder(self):
        if self._builder is None:
            builder_class = _indexed_dataset_module().IndexedDatasetBuilder
            self._builder = builder_class(str(bin_path(self._tmp_prefix)), dtype=self.dtype)
        return self._builder

    def add_document(self, ids: np.ndarray | list[int]) -> None:
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
        self.documents += documents
        self.tokens += tokens

    def __exit__(self, exc_type, exc, tb) -> None:
        tmp_files = [bin_path(self._tmp_prefix), idx_path(self._tmp_prefix), sidecar_path(self._tmp_prefix)]
        try:
            if exc_type is None:
                self._ensure_builder().finalize(str(idx_path(self._tmp_prefix)))
                write_sidecar(sidecar_path(self._tmp_prefix), {
                    **self.sidecar,
                    "documents": self.documents,
                    "tokens": self.tokens,
                    "dtype": np.dtype(self.dtype).name,
                })
                # a stale sidecar must not vouch for new .bin/.idx while they are being swapped
                sidecar_path(self.prefix).unlink(missing_ok=True)
                os.replace(bin_path(self._tmp_prefix), bin_path(self.prefix))
                os.replace(idx_path(self._tmp_prefix), idx_path(self.prefix))
                os.replace(sidecar_path(self._tmp_prefix), sidecar_path(self.prefix))
        finally:
            gc.unfreeze()
            if self._builder is not None and not self._builder.data_file.closed:
                self._builder.data_file.close()
            for path in tmp_files:
                path.unlink(missing_ok=True)
