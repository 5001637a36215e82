"""Helper of the data tests: token documents written as a megatron-core IndexedDataset."""
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch


def write_indexed(prefix: str | Path, documents: Iterable[Sequence[int]]):
    """PREFIX.bin/.idx (uint16 tokens, one document per item; empty ones too), opened again."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for doc in documents:
        builder.add_item(torch.from_numpy(np.asarray(doc, dtype=np.int64)))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return IndexedDataset(str(prefix))
