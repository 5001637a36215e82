"""Glue over megatron-core's indexed dataset: `PREFIX.bin` + `PREFIX.idx`, and our `PREFIX.json` sidecar.

Layout: one item (sequence) per document, holding the document's token ids without special
tokens, each followed by `end_document()`. So `dataset[i]` is document i and
`dataset.document_indices == [0, 1, ..., N]`. The sidecar records the tokenizer (path and
fingerprint), counts and inputs; the trainer takes the tokenizer from it.

megatron-core is imported on first use: the import costs seconds and warns about Transformer
Engine and Apex, which a CPU or plain-PyTorch user does not need to read.
"""
import json
import os
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
            writer.add_document(ids)
            writer.sidecar = {...}

    Everything goes to temporary names beside the prefix; a clean exit renames them into place
    (sidecar last, so its presence marks a finished dataset), an exception deletes them.
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
        builder_class = _indexed_dataset_module().IndexedDatasetBuilder
        self._builder = builder_class(str(bin_path(self._tmp_prefix)), dtype=self.dtype)
        return self

    def add_document(self, ids: np.ndarray | list[int]) -> None:
        ids = np.asarray(ids, dtype=self.dtype)
        # one sequence that is the whole document: the same as add_item + end_document, minus torch
        self._builder.add_document(ids, [ids.size])
        self.documents += 1
        self.tokens += int(ids.size)

    def __exit__(self, exc_type, exc, tb) -> None:
        tmp_files = [bin_path(self._tmp_prefix), idx_path(self._tmp_prefix), sidecar_path(self._tmp_prefix)]
        try:
            if exc_type is None:
                self._builder.finalize(str(idx_path(self._tmp_prefix)))
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
            if self._builder is not None and not self._builder.data_file.closed:
                self._builder.data_file.close()
            for path in tmp_files:
                path.unlink(missing_ok=True)

