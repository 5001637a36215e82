"""FULL-SENTENCES sample index over an IndexedDataset (RoBERTa, section 4.2).

The documents of a split are laid end to end as one token stream, with `</s>` between documents:

    doc0 </s> doc1 </s> doc2          (no separator after the last document)

Sample i is stream[i*C : (i+1)*C] framed as `<s> ... </s>`, with C = seq_length - 2, so samples may
cross document boundaries and every token of the split appears in exactly one sample (the last
sample may be shorter). Only per-item offsets are held in memory, never the text.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from data.errors import UserError


class FullSentences:
    """Random access to packed samples of items [first_item, last_item) of an IndexedDataset."""

    def __init__(self, dataset, first_item: int, last_item: int, document_ends: Sequence[int],
                 seq_length: int, bos_id: int, eos_id: int):
        """`document_ends`: item indices at which documents end (megatron's document_indices[1:])."""
        if last_item <= first_item:
            raise UserError("the data split is empty: lower data.valid_fraction or add documents")
        self.dataset = dataset
        self.bos_id, self.eos_id = bos_id, eos_id
        self.chunk = seq_length - 2  # room left by <s> and </s>
        lengths = np.asarray(dataset.sequence_lengths[first_item:last_item], dtype=np.int64)
        ends = np.asarray(document_ends, dtype=np.int64)
        # A separator follows an item that ends a document, except the split's last item.
        separator = np.isin(np.arange(first_item + 1, last_item + 1), ends).astype(np.int64)
        separator[-1] = 0
        self.items = np.arange(first_item, last_item, dtype=np.int64)
        self.lengths = lengths
        self.separator = separator
        span = lengths + separator
        self.starts = np.concatenate([[0], np.cumsum(span)[:-1]])  # stream offset of each item
        self.stream_length = int(span.sum())
        if self.stream_length == 0:
            raise UserError("the data split holds no tokens")
        self.num_samples = -(-self.stream_length // self.chunk)

    def __len__(self) -> int:
        return self.num_samples

    def tokens(self, index: int) -> np.ndarray:
        """Sample `index` as int64 token ids `<s> ... </s>` (length <= seq_length)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        begin = index * self.chunk
        end = min(begin + self.chunk, self.stream_length)
        pieces = [np.array([self.bos_id], dtype=np.int64)]
        k = int(np.searchsorted(self.starts, begin, side="right")) - 1
        position = begin
        while position < end:
            while position >= self.starts[k] + self.lengths[k] + self.separator[k]:
                k += 1  # past item k (or item k is empty)
            offset = position - int(self.starts[k])
            length = int(self.lengths[k])
            if offset < length:  # inside the item's tokens
                take = min(length - offset, end - position)
                pieces.append(self.dataset.get(int(self.items[k]), offset=offset, length=take).astype(np.int64))
                position += take
            else:  # on the separator after the item
                pieces.append(np.array([self.eos_id], dtype=np.int64))
                position += 1
        pieces.append(np.array([self.eos_id], dtype=np.int64))
        return np.concatenate(pieces)


def split_documents(num_documents: int, valid_fraction: float) -> int:
    """Number of training documents: the last `valid_fraction` (at least one if > 0) are held out."""
    if valid_fraction <= 0:
        return num_documents
    held_out = max(1, int(round(num_documents * valid_fraction)))
    if held_out >= num_documents:
        raise UserError(f"data.valid_fraction={valid_fraction} leaves no training documents "
                        f"out of {num_documents}; lower it")
    return num_documents - held_out
