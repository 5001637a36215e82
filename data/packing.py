"""FULL-SENTENCES and DOC-SENTENCES sample indices over an IndexedDataset (RoBERTa, section 4.2).

The items of a split are laid end to end as one token stream. FULL-SENTENCES puts `</s>` between
documents:

    doc0 </s> doc1 </s> doc2          (no separator after the last document)

and sample i is stream[i*C : (i+1)*C] framed as `<s> ... </s>`, with C = seq_length - 2, so samples
may cross document boundaries and every token of the split appears in exactly one sample (the last
sample may be shorter).

DOC-SENTENCES cuts each document on its own into pieces of C tokens: no sample crosses a document,
and a document's last piece, or a short document, gives a short sample (the token-budget batches
of data/loader.py then take more of them). Empty documents give no sample.

PACKED-DOCUMENTS fills rows with whole documents, each framed as DOC-SENTENCES frames it alone
(`<s> doc </s>`; a document longer than C is first cut into DOC-SENTENCES' pieces, each its own
document), so that no row wastes space on padding and attention can still be kept inside each
document: the collator (data/loader.py) gives the row's k-th document the id k in `attention_mask`
(0 = padding). Rows are built by best-fit decreasing within windows of PACKING_WINDOW documents in
corpus order: longest first, each into the open row with the least room that still holds it, else a
new row. The rows are fixed for the run (like every packing here); the sample stream shuffles them
per (seed, epoch). Building costs one Python iteration per document (~2 us: ~20 s per 10M documents).

SEGMENT-PAIR and SENTENCE-PAIR (sentence pairs with next-sentence labels) are data/pairs.py's;
`build_packed` builds and caches all five the same way.

A corpus' word-start companion (data/word_starts.py, `build_packed(word_starts=...)`) is read like the
tokens: `word_starts(index)` gives a sample's flags over the same spans, True at every `<s>`, `</s>`
and separator (they start masking units anyway).

The index (per-item stream offsets; for DOC-SENTENCES the (begin, length) of every sample) is built
with vectorised numpy and can come from data/sample_cache.py; only offsets are held in memory,
never the text.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import bisect

import numpy as np

from data.errors import UserError
from data.pairs import PAIR_KINDS, PairSamples, pair_index, table_digest

Arrays = Dict[str, np.ndarray]


def stream_index(item_lengths: np.ndarray, first_item: int, last_item: int, document_ends: Sequence[int],
                 separators: bool) -> Arrays:
    """Stream offset of each item of [first_item, last_item), with `</s>` after document ends if `separators`."""
    lengths = np.asarray(item_lengths[first_item:last_item], dtype=np.int64)
    separator = np.zeros(len(lengths), dtype=np.int64)
    if separators and len(lengths):
        # A separator follows an item that ends a document, except the split's last item.
        separator = np.isin(np.arange(first_item + 1, last_item + 1), np.asarray(document_ends)).astype(np.int64)
        separator[-1] = 0
    span = lengths + separator
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(span[:-1], out=starts[1:])
    return {"lengths": lengths, "separator": separator, "starts": starts}


def doc_sentences_index(item_lengths: np.ndarray, document_indices: Sequence[int], first_doc: int, last_doc: int,
                        chunk: int) -> Arrays:
    """(begin, length) in the split's stream of every DOC-SENTENCES sample, documents in order."""
    docs = np.asarray(document_indices, dtype=np.int64)[first_doc:last_doc + 1]
    stream = stream_index(item_lengths, int(docs[0]), int(docs[-1]), docs[1:], separators=False)
    item_end = np.concatenate([[0], np.cumsum(stream["lengths"])])
    doc_begin = item_end[docs[:-1] - docs[0]]
    doc_length = item_end[docs[1:] - docs[0]] - doc_begin
    pieces = -(-doc_length // chunk)  # 0 for an empty document
    owner = np.repeat(np.arange(len(doc_length)), pieces)
    within = np.arange(len(owner)) - np.repeat(np.cumsum(pieces) - pieces, pieces)  # piece number in its document
    begin = doc_begin[owner] + within * chunk
    length = np.minimum(chunk, doc_length[owner] - within * chunk)
    return {**stream, "begin": begin, "length": length, "document": owner + first_doc}


PACKING_WINDOW = 1000  # documents packed together: bounds memory and keeps rows near corpus order


def best_fit_rows(framed: np.ndarray, capacity: int) -> np.ndarray:
    """Row number (from 0, in order of opening) of each item of `framed` (lengths <= capacity):
    best-fit decreasing, i.e. longest first (ties in given order), each into the open row with the
    least room that still holds it (the latest opened of equals), else into a new row."""
    rows = np.empty(len(framed), dtype=np.int64)
    by_room: Dict[int, list] = {}  # room left -> open rows with that room
    rooms: list = []  # sorted rooms that have open rows
    opened = 0
    smallest = int(framed.min()) if len(framed) else 0
    for i in np.argsort(-framed, kind="stable").tolist():
        need = int(framed[i])
        k = bisect.bisect_left(rooms, need)
        if k < len(rooms):
            room = rooms[k]
            waiting = by_room[room]
            row = waiting.pop()
            if not waiting:
                del by_room[room]
                rooms.pop(k)
        else:
            room, row = capacity, opened
            opened += 1
        rows[i] = row
        left = room - need
        if left >= smallest:  # a row with less room than the shortest item is closed
            if left not in by_room:
                by_room[left] = []
                bisect.insort(rooms, left)
            by_room[left].append(row)
    return rows


def packed_documents_index(item_lengths: np.ndarray, document_indices: Sequence[int], first_doc: int,
                           last_doc: int, seq_length: int, window: int = PACKING_WINDOW) -> Arrays:
    """DOC-SENTENCES' pieces grouped into rows: the pieces (begin, length, document) in row order,
    row r holding pieces row_start[r]:row_start[r + 1] in corpus order."""
    pieces = doc_sentences_index(item_lengths, document_indices, first_doc, last_doc, seq_length - 2)
    framed = pieces["length"] + 2  # <s> piece </s>
    bounds = np.searchsorted(pieces["document"], np.arange(first_doc, last_doc + window, window))
    row = np.empty(len(framed), dtype=np.int64)
    opened = 0
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if hi > lo:
            row[lo:hi] = best_fit_rows(framed[lo:hi], seq_length) + opened
            opened = int(row[lo:hi].max()) + 1
    order = np.lexsort((np.arange(len(row)), row))  # by row, then corpus order
    row_start = np.searchsorted(row[order], np.arange(opened + 1))
    return {**{k: pieces[k] for k in ("lengths", "separator", "starts")},
            "begin": pieces["begin"][order], "length": pieces["length"][order],
            "document": pieces["document"][order], "row_start": row_start}


class _PackedStream:
    """Reads token ranges of the split's stream (items end to end, optional `</s>` separators)."""

    word_start_source = None
    """The corpus' word-start companion (data/word_starts.py), laid out as `dataset`; None: not read."""

    def __init__(self, dataset, first_item: int, index: Arrays, seq_length: int, bos_id: int, eos_id: int):
        self.dataset = dataset
        self.bos_id, self.eos_id = bos_id, eos_id
        self.seq_length = seq_length
        self.chunk = seq_length - 2  # room left by <s> and </s>
        self.lengths, self.separator, self.starts = index["lengths"], index["separator"], index["starts"]
        self.first_item = first_item
        self.stream_length = int(self.starts[-1] + self.lengths[-1] + self.separator[-1]) if len(self.starts) else 0

    def __len__(self) -> int:
        return self.num_samples

    def span(self, index: int):
        raise NotImplementedError

    def sample_lengths(self) -> np.ndarray:
        """Tokens of every sample, `<s>` and `</s>` included (for token-budget batches)."""
        raise NotImplementedError

    def tokens(self, index: int) -> np.ndarray:
        """Sample `index` as int64 token ids `<s> ... </s>` (length <= seq_length)."""
        return self.read(index, self.dataset, 0, self.bos_id, self.eos_id)

    def word_starts(self, index: int) -> Optional[np.ndarray]:
        """Sample `index`'s word starts (bool, as long as `tokens(index)`): the companion's flags over
        the same spans, True at `<s>`, `</s>` and the separators; None without a companion."""
        if self.word_start_source is None:
            return None
        return self.read(index, self.word_start_source, 0, 1, 1).astype(bool)

    def read(self, index: int, source, item_offset: int, bos, eos) -> np.ndarray:
        """Sample `index`'s span read from `source`, an IndexedDataset whose item `item_offset + i` is
        laid out as item i of ours (static masks' copies: data/static_masks.py), with `bos` at `<s>`
        and `eos` at `</s>` and at the separators."""
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        begin, end = self.span(index)
        return np.concatenate(self._framed(source, item_offset, begin, end, bos, eos))

    def _framed(self, source, item_offset: int, begin: int, end: int, bos, eos) -> list:
        """Stream range [begin, end) as arrays `<s>`, its tokens (separators as `eos`), `</s>`."""
        pieces = [np.array([bos], dtype=np.int64)]
        k = int(np.searchsorted(self.starts, begin, side="right")) - 1
        position = begin
        while position < end:
            while position >= self.starts[k] + self.lengths[k] + self.separator[k]:
                k += 1  # past item k (or item k is empty)
            offset = position - int(self.starts[k])
            length = int(self.lengths[k])
            if offset < length:  # inside the item's tokens
                take = min(length - offset, end - position)
                item = item_offset + self.first_item + k
                pieces.append(source.get(item, offset=offset, length=take).astype(np.int64))
                position += take
            else:  # on the separator after the item
                pieces.append(np.array([eos], dtype=np.int64))
                position += 1
        pieces.append(np.array([eos], dtype=np.int64))
        return pieces


class FullSentences(_PackedStream):
    """Random access to packed samples of items [first_item, last_item) of an IndexedDataset."""

    def __init__(self, dataset, first_item: int, last_item: int, document_ends: Sequence[int],
                 seq_length: int, bos_id: int, eos_id: int, index: Optional[Arrays] = None):
        """`document_ends`: item indices at which documents end (megatron's document_indices[1:])."""
        if last_item <= first_item:
            raise UserError("the data split is empty: lower data.valid_fraction / data.test_fraction or add documents")
        if index is None:
            index = stream_index(dataset.sequence_lengths, first_item, last_item, document_ends, separators=True)
        super().__init__(dataset, first_item, index, seq_length, bos_id, eos_id)
        if self.stream_length == 0:
            raise UserError("the data split holds no tokens")
        self.num_samples = -(-self.stream_length // self.chunk)

    def span(self, index: int):
        begin = index * self.chunk
        return begin, min(begin + self.chunk, self.stream_length)

    def sample_lengths(self) -> np.ndarray:
        lengths = np.full(self.num_samples, self.seq_length, dtype=np.int64)
        lengths[-1] = self.stream_length - (self.num_samples - 1) * self.chunk + 2
        return lengths


class DocSentences(_PackedStream):
    """Samples that never cross a document: documents [first_doc, last_doc) cut into pieces of C tokens."""

    def __init__(self, dataset, first_doc: int, last_doc: int, seq_length: int, bos_id: int, eos_id: int,
                 index: Optional[Arrays] = None):
        if last_doc <= first_doc:
            raise UserError("the data split is empty: lower data.valid_fraction / data.test_fraction or add documents")
        docs = dataset.document_indices
        if index is None:
            index = doc_sentences_index(dataset.sequence_lengths, docs, first_doc, last_doc, seq_length - 2)
        super().__init__(dataset, int(docs[first_doc]), index, seq_length, bos_id, eos_id)
        self.begin, self.length, self.document = index["begin"], index["length"], index["document"]
        self.num_samples = len(self.begin)
        if self.num_samples == 0:
            raise UserError("the data split holds no tokens")

    def span(self, index: int):
        begin = int(self.begin[index])
        return begin, begin + int(self.length[index])

    def sample_lengths(self) -> np.ndarray:
        return np.asarray(self.length, dtype=np.int64) + 2


class PackedDocuments(DocSentences):
    """Rows of whole documents (pieces of C tokens for longer ones), each framed `<s> ... </s>`;
    `document_ids` numbers them 1..k within the row."""

    def __init__(self, dataset, first_doc: int, last_doc: int, seq_length: int, bos_id: int, eos_id: int,
                 index: Optional[Arrays] = None):
        if index is None and last_doc > first_doc:
            index = packed_documents_index(dataset.sequence_lengths, dataset.document_indices, first_doc, last_doc,
                                           seq_length)
        super().__init__(dataset, first_doc, last_doc, seq_length, bos_id, eos_id, index=index)
        self.row_start = np.asarray(index["row_start"], dtype=np.int64)
        self.num_samples = len(self.row_start) - 1
        self.num_pieces = len(self.begin)  # framed documents (pieces) in all rows

    def span(self, index: int):
        raise TypeError("a packed row is several spans: use tokens / read")

    def read(self, index: int, source, item_offset: int, bos, eos) -> np.ndarray:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        parts = []
        for p in range(int(self.row_start[index]), int(self.row_start[index + 1])):
            begin = int(self.begin[p])
            parts.extend(self._framed(source, item_offset, begin, begin + int(self.length[p]), bos, eos))
        return np.concatenate(parts)

    def pieces(self, index: int) -> np.ndarray:
        """Indices (into begin / length / document) of row `index`'s pieces, in order."""
        return np.arange(int(self.row_start[index]), int(self.row_start[index + 1]))

    def document_ids(self, index: int) -> np.ndarray:
        """int64 id of each token of row `index`: k for its k-th framed document (from 1)."""
        framed = np.asarray(self.length[self.row_start[index]:self.row_start[index + 1]], dtype=np.int64) + 2
        return np.repeat(np.arange(1, len(framed) + 1, dtype=np.int64), framed)

    def sample_lengths(self) -> np.ndarray:
        framed = np.concatenate([[0], np.cumsum(np.asarray(self.length, dtype=np.int64) + 2)])
        return framed[self.row_start[1:]] - framed[self.row_start[:-1]]


PACKINGS = {"full_sentences": FullSentences, "doc_sentences": DocSentences, "packed_documents": PackedDocuments,
            "segment_pair": PairSamples, "sentence_pair": PairSamples}  # the pairs: data/pairs.py


def build_packed(kind: str, dataset, first_doc: int, last_doc: int, seq_length: int, bos_id: int, eos_id: int,
                 cache=None, identity: Optional[dict] = None, sentence_ends: Optional[np.ndarray] = None,
                 pair_separators: int = 1, seed: int = 0, word_starts=None) -> _PackedStream:
    """The packed split [first_doc, last_doc) of `dataset`, its index from `cache` when one is given;
    `word_starts`, the corpus' word-start companion (data/word_starts.py), is read beside the tokens.

    The pair formats also need the tokenizer's `sentence_ends` table, the model family's
    `pair_separators` (RoBERTa 2, else 1) and the run's `seed` (data/pairs.py)."""
    docs = dataset.document_indices
    first_item, last_item = int(docs[first_doc]), int(docs[last_doc])
    if kind == "full_sentences":
        build = lambda: stream_index(dataset.sequence_lengths, first_item, last_item, docs[1:], separators=True)
        params = {"first_item": first_item, "last_item": last_item}
    elif kind == "doc_sentences":
        build = lambda: doc_sentences_index(dataset.sequence_lengths, docs, first_doc, last_doc, seq_length - 2)
        params = {"first_doc": first_doc, "last_doc": last_doc, "seq_length": seq_length}
    elif kind == "packed_documents":
        build = lambda: packed_documents_index(dataset.sequence_lengths, docs, first_doc, last_doc, seq_length)
        params = {"first_doc": first_doc, "last_doc": last_doc, "seq_length": seq_length, "window": PACKING_WINDOW}
    elif kind in PAIR_KINDS:
        if sentence_ends is None:
            raise ValueError(f"data.packing={kind} needs the tokenizer's sentence_ends table")
        build = lambda: pair_index(kind, dataset, first_doc, last_doc, seq_length, sentence_ends, pair_separators, seed)
        params = {"first_doc": first_doc, "last_doc": last_doc, "seq_length": seq_length, "seed": seed,
                  "pair_separators": pair_separators, "sentence_ends": table_digest(sentence_ends)}
    else:
        raise UserError(f"data.packing={kind!r} is not one of {', '.join(PACKINGS)}")
    index = None
    if cache is not None and last_item > first_item:
        index = cache.get(kind, {**params, "dataset": identity or {}}, build)
    if kind == "full_sentences":
        packed = FullSentences(dataset, first_item, last_item, docs[1:], seq_length, bos_id, eos_id, index=index)
    elif kind in PAIR_KINDS:
        packed = PairSamples(kind, dataset, first_doc, last_doc, seq_length, bos_id, eos_id, sentence_ends,
                             pair_separators, seed, index=index)
    elif kind == "packed_documents":
        packed = PackedDocuments(dataset, first_doc, last_doc, seq_length, bos_id, eos_id, index=index)
    else:
        packed = DocSentences(dataset, first_doc, last_doc, seq_length, bos_id, eos_id, index=index)
    packed.word_start_source = word_starts
    return packed


def split_ranges(num_documents: int, valid_fraction: float, test_fraction: float = 0.0):
    """(train_end, valid_end): documents [0, train_end) train, [train_end, valid_end) validate, the rest test.

    The held-out parts are the last documents; each with a fraction > 0 gets at least one."""
    held = [max(1, int(round(num_documents * f))) if f > 0 else 0 for f in (valid_fraction, test_fraction)]
    if sum(held) >= num_documents:
        raise UserError(f"data.valid_fraction={valid_fraction} and data.test_fraction={test_fraction} leave no "
                        f"training documents out of {num_documents}; lower them")
    train_end = num_documents - sum(held)
    return train_end, train_end + held[0]


def split_documents(num_documents: int, valid_fraction: float) -> int:
    """Number of training documents: the last `valid_fraction` (at least one if > 0) are held out."""
    return split_ranges(num_documents, valid_fraction)[0]
