"""SEGMENT-PAIR and SENTENCE-PAIR samples with next-sentence labels (BERT; RoBERTa section 4.2, table 2).

A sample is a pair framed as fine-tuning frames sentence pairs (data/tasks.py `encode`):

    [bos] A [eos] ([eos] x pair_separators-1) B [eos]
    (RoBERTa: <s> A </s></s> B </s>; DeBERTa: [CLS] A [SEP] B [SEP])

with label 0 when B is A's continuation in its document and 1 when B comes from another, random
document (Hugging Face / BERT convention). The room for A and B is seq_length - 2 - pair_separators.

Sentences are found from the tokens when the index is built, not at preprocessing: `sentence_ends`
(data/tokenizer.py `Tokenizer.sentence_marks`) marks the ids whose text ends a sentence (1, or True in
a boolean table) and those whose text is only closing marks (2: ” 」 ） ...). A sentence ends after an
end token and the closing tokens that follow it in its document, unless the next token ends a sentence
too (so `."`, `?!` or 。 followed by a separate ” end once); a document's end always ends a sentence.
This is a heuristic on tokens: "Mr." or "3." end a sentence too.

- segment_pair: each document is cut into chunks of whole consecutive sentences, filled greedily up
  to the room (a sentence longer than the room is cut into pieces of the room, each then counting
  as a sentence). A chunk is split at a random sentence boundary into A and B (at a random token
  when it holds one sentence; chunks of one token are dropped). With probability 0.5, B is replaced
  by a span of a random other document, from a random sentence start, of at most the room A leaves.
- sentence_pair: consecutive sentences (2j, 2j + 1) of a document make a pair (a document's last
  sentence without a partner is left out); with probability 0.5 B is replaced by a random sentence
  of another document. When A and B do not fit, the longer is truncated first (as fine-tuning does).

A split of one document has no other document: its random Bs come from the same document.
`word_starts(index)` reads a sample's word-start flags (data/word_starts.py) over the same spans,
True at [bos] and every [eos].
Every random choice comes from one generator seeded by (seed, kind), so the pairs of a packed
sample are fixed for the run (BERT's static pairs) and the same on every rank; the sample stream
(data/blending.py) shuffles the samples per epoch.

Cost of building the index (once per node, then from the cache of data/sample_cache.py): the
split's tokens are read once from the .bin in chunks of 16M and looked up in the table (vectorised,
memory-bound; only sentence boundaries are kept: 8 bytes per sentence); sentences, pieces and
SENTENCE-PAIR pairs are vectorised numpy; SEGMENT-PAIR's greedy fill is one Python iteration per
sentence (about 0.2 us each: ~20 s per 100M sentences). The index holds 33 bytes per sample.
"""
from __future__ import annotations

import hashlib
from typing import Dict, Optional

import numpy as np

from data.seeding import derive_rng
from data.errors import UserError
from data.tokenizer import SENTENCE_CLOSER, SENTENCE_END

Arrays = Dict[str, np.ndarray]
PAIR_KINDS = ("segment_pair", "sentence_pair")
PAIR_STREAM = 0x50414952  # "PAIR": keeps this generator apart from the masking and order ones
_READ_CHUNK = 1 << 24  # tokens looked up at a time while finding sentence ends


def pair_room(seq_length: int, pair_separators: int) -> int:
    """Tokens left for A and B once [bos], the separators and the final [eos] are in."""
    return seq_length - 2 - pair_separators


def table_digest(sentence_ends: np.ndarray) -> str:
    """Short hash of a sentence-mark table (part of the sample-index cache key)."""
    return hashlib.sha256(np.asarray(sentence_ends, dtype=np.int8).tobytes()).hexdigest()[:16]


def _with_closers(ends: np.ndarray, closers: np.ndarray, carry: bool, document_starts: np.ndarray) -> np.ndarray:
    """`ends` (bool, one chunk of the stream) also True at each closing token that follows an end token
    through closing tokens only, within its document; `carry`: the token before the chunk was such an end.
    Vectorised: a closer takes the flag of the last token before it that is not a closer (or that starts
    a document, which a closer of the document before cannot reach)."""
    position = np.arange(len(ends))
    barrier = ~closers
    barrier[document_starts] = True
    last = np.maximum.accumulate(np.where(barrier, position, -1))
    inherited = np.where(last >= 0, ends[np.maximum(last, 0)], carry)
    return np.where(barrier, ends, inherited)


def _split_layout(dataset, first_doc: int, last_doc: int):
    """(first item, item starts in the split's stream, item lengths, document begins, document ends)."""
    docs = np.asarray(dataset.document_indices, dtype=np.int64)[first_doc:last_doc + 1]
    lengths = np.asarray(dataset.sequence_lengths[docs[0]:docs[-1]], dtype=np.int64)
    item_end = np.concatenate([[0], np.cumsum(lengths)])
    return (int(docs[0]), item_end[:-1], lengths, item_end[docs[:-1] - docs[0]], item_end[docs[1:] - docs[0]])


def sentences(dataset, first_doc: int, last_doc: int, sentence_ends: np.ndarray) -> Arrays:
    """(begin, length, document) of every sentence of documents [first_doc, last_doc), in the split's
    stream (their items end to end, no separators); documents are numbered from 0 within the split."""
    first_item, _, _, doc_begin, doc_end = _split_layout(dataset, first_doc, last_doc)
    total = int(doc_end[-1]) if len(doc_end) else 0
    marks = np.asarray(sentence_ends).astype(np.int8)
    table, closing = marks == SENTENCE_END, marks == SENTENCE_CLOSER
    base = int(dataset.index.sequence_pointers[first_item]) if total else 0
    dtype = dataset.index.dtype
    itemsize = np.dtype(dtype).itemsize
    ends = [np.zeros(0, dtype=np.int64)]
    carry = False  # the chunk before ended on an end token (or its closers)
    for start in range(0, total, _READ_CHUNK):
        count = min(_READ_CHUNK + 1, total - start)  # one token of look-ahead
        tokens = dataset.bin_reader.read(dtype=dtype, count=count, offset=base + start * itemsize).astype(np.int64)
        flag = table[tokens]
        if closing.any():
            starts = doc_end[(doc_end >= start) & (doc_end < start + count)] - start
            flag = _with_closers(flag, closing[tokens], carry, starts)
        take = min(_READ_CHUNK, total - start)
        carry = bool(flag[take - 1])
        after = np.zeros(take, dtype=bool)  # the next token ends a sentence too
        after[:count - 1] = flag[1:count]
        ends.append(start + 1 + np.flatnonzero(flag[:take] & ~after))
    bounds = np.unique(np.concatenate([[0], *ends, doc_end]))  # doc_end holds every document begin too
    begin, length = bounds[:-1], np.diff(bounds)
    document = np.searchsorted(doc_end, begin, side="right")
    return {"begin": begin, "length": length, "document": document, "doc_begin": doc_begin, "doc_end": doc_end}


def _cut(spans: Arrays, room: int) -> Arrays:
    """Sentences longer than `room` cut into pieces of `room` tokens (the last one shorter)."""
    pieces = -(-spans["length"] // room)
    owner = np.repeat(np.arange(len(pieces)), pieces)
    within = np.arange(len(owner)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    return {"begin": spans["begin"][owner] + within * room,
            "length": np.minimum(room, spans["length"][owner] - within * room),
            "document": spans["document"][owner]}


def _greedy_chunks(length: np.ndarray, document: np.ndarray, room: int) -> np.ndarray:
    """First sentence of every chunk: consecutive sentences of one document while they fit in `room`."""
    firsts, fill, current = [], room + 1, -1
    for i, (n, d) in enumerate(zip(length.tolist(), document.tolist())):
        if d != current or fill + n > room:
            firsts.append(i)
            fill, current = 0, d
        fill += n
    return np.asarray(firsts, dtype=np.int64)


def _other_document(rng, own: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """A uniformly random entry of `candidates` (sorted document numbers) other than `own`, per row;
    `own` itself when it is the only candidate."""
    if len(candidates) < 2:
        return np.full(len(own), candidates[0] if len(candidates) else 0, dtype=np.int64)
    pick = rng.integers(0, len(candidates) - 1, size=len(own))
    pick += pick >= np.searchsorted(candidates, own)  # skip the own document's slot
    return candidates[pick]


def segment_pair_index(spans: Arrays, room: int, rng) -> Arrays:
    pieces = _cut(spans, room)
    begin, length, document = pieces["begin"], pieces["length"], pieces["document"]
    firsts = _greedy_chunks(length, document, room)
    lasts = np.append(firsts[1:], len(length))  # exclusive
    chunk_begin = begin[firsts]
    chunk_tokens = np.add.reduceat(length, firsts) if len(firsts) else np.zeros(0, np.int64)
    keep = chunk_tokens >= 2
    firsts, lasts, chunk_begin, chunk_tokens = firsts[keep], lasts[keep], chunk_begin[keep], chunk_tokens[keep]
    n, count = len(firsts), lasts - firsts
    # A: the chunk up to a random sentence boundary inside it, or up to a random token of a one-sentence chunk.
    u = rng.random(n)
    cut = firsts + 1 + np.floor(u * (count - 1)).astype(np.int64)
    a_length = np.where(count >= 2, begin[np.minimum(cut, len(begin) - 1)] - chunk_begin,
                        1 + np.floor(u * (chunk_tokens - 1)).astype(np.int64))
    label = (rng.random(n) < 0.5).astype(np.int8)
    b_begin, b_length = chunk_begin + a_length, chunk_tokens - a_length
    # label 1: B from a random sentence start of another document, up to the room A leaves or its end.
    own = document[firsts]
    other = _other_document(rng, own, np.unique(document))
    first_piece = np.searchsorted(document, other, side="left")
    pieces_in = np.searchsorted(document, other, side="right") - first_piece
    start = first_piece + np.floor(rng.random(n) * pieces_in).astype(np.int64)
    random_begin = begin[np.minimum(start, len(begin) - 1)]
    random_length = np.minimum(room - a_length, spans["doc_end"][other] - random_begin)
    random = label == 1
    b_begin[random], b_length[random] = random_begin[random], random_length[random]
    return {"a_begin": chunk_begin, "a_length": a_length, "b_begin": b_begin, "b_length": b_length,
            "label": label}


def truncate_pair(a_length: np.ndarray, b_length: np.ndarray, room: int):
    """data/tasks.py `truncate_longest_first` on lengths, vectorised: the longer loses tokens first
    (A on a tie) until both fit in `room`."""
    a, b = np.asarray(a_length, np.int64), np.asarray(b_length, np.int64)
    half = room // 2
    fits = a + b <= room
    a_out = np.where(fits, a, np.where(b <= half, room - b, np.where(a <= half, a, half)))
    b_out = np.where(fits, b, np.where(b <= half, b, np.where(a <= half, room - a, room - half)))
    return a_out, b_out


def sentence_pair_index(spans: Arrays, room: int, rng) -> Arrays:
    begin, length, document = spans["begin"], spans["length"], spans["document"]
    first_of_doc = np.searchsorted(document, document, side="left")
    within = np.arange(len(document)) - first_of_doc
    nxt = np.arange(len(document)) + 1
    has_next = np.zeros(len(document), dtype=bool)
    has_next[:-1] = document[1:] == document[:-1]
    a = np.flatnonzero((within % 2 == 0) & has_next)  # pairs (2j, 2j + 1) within each document
    n = len(a)
    label = (rng.random(n) < 0.5).astype(np.int8)
    b = nxt[a]
    # label 1: a uniformly random sentence outside A's document (inside it when it is the only one).
    own = document[a]
    own_first = np.searchsorted(document, own, side="left")
    own_count = np.searchsorted(document, own, side="right") - own_first
    single = len(np.unique(document)) < 2
    outside = len(document) - (0 if single else own_count)
    j = np.floor(rng.random(n) * outside).astype(np.int64)
    if not single:
        j = np.where(j < own_first, j, j + own_count)
    b = np.where(label == 1, j, b)
    a_length, b_length = truncate_pair(length[a], length[b], room)
    return {"a_begin": begin[a], "a_length": a_length, "b_begin": begin[b], "b_length": b_length, "label": label}


def pair_index(kind: str, dataset, first_doc: int, last_doc: int, seq_length: int, sentence_ends: np.ndarray,
               pair_separators: int, seed: int) -> Arrays:
    """The (a_begin, a_length, b_begin, b_length, label) of every pair sample of the split."""
    room = pair_room(seq_length, pair_separators)
    if room < 2:
        raise UserError(f"data.seq_length={seq_length} leaves no room for a sentence pair; raise it")
    spans = sentences(dataset, first_doc, last_doc, sentence_ends)
    rng = derive_rng(seed, PAIR_STREAM, PAIR_KINDS.index(kind))
    build = segment_pair_index if kind == "segment_pair" else sentence_pair_index
    return build(spans, room, rng)


class PairSamples:
    """Random access to the pair samples of documents [first_doc, last_doc) of an IndexedDataset."""

    def __init__(self, kind: str, dataset, first_doc: int, last_doc: int, seq_length: int, bos_id: int,
                 eos_id: int, sentence_ends: Optional[np.ndarray] = None, pair_separators: int = 1, seed: int = 0,
                 index: Optional[Arrays] = None):
        if last_doc <= first_doc:
            raise UserError("the data split is empty: lower data.valid_fraction / data.test_fraction or add documents")
        if index is None:
            index = pair_index(kind, dataset, first_doc, last_doc, seq_length, sentence_ends, pair_separators, seed)
        self.dataset, self.seq_length = dataset, seq_length
        self.bos_id, self.eos_id, self.pair_separators = bos_id, eos_id, pair_separators
        self.first_item, self.item_starts, self.item_lengths, _, _ = _split_layout(dataset, first_doc, last_doc)
        self.a_begin, self.a_length = index["a_begin"], index["a_length"]
        self.b_begin, self.b_length = index["b_begin"], index["b_length"]
        self.next_sentence_labels = index["label"]  # (N,) int8: 0 = B continues A, 1 = B is random
        self.word_start_source = None  # the corpus' word-start companion, laid out as `dataset` (or None)
        if len(self.a_begin) == 0:
            raise UserError(f"data.packing={kind}: a data split holds no sentence pair (documents of one sentence?); "
                            f"use more documents or another data.packing")

    def __len__(self) -> int:
        return len(self.a_begin)

    def sample_lengths(self) -> np.ndarray:
        """Tokens of every sample, specials included (for token-budget batches)."""
        return np.asarray(self.a_length, np.int64) + np.asarray(self.b_length, np.int64) + 2 + self.pair_separators

    def _read(self, begin: int, length: int, source=None) -> list:
        """int64 arrays of the split's stream range [begin, begin + length) of `source` (default: the tokens)."""
        source = self.dataset if source is None else source
        pieces = []
        k = int(np.searchsorted(self.item_starts, begin, side="right")) - 1
        while length > 0:
            offset = begin - int(self.item_starts[k])
            take = min(int(self.item_lengths[k]) - offset, length)
            if take > 0:
                pieces.append(source.get(self.first_item + k, offset=offset, length=take).astype(np.int64))
                begin, length = begin + take, length - take
            k += 1
        return pieces

    def tokens(self, index: int) -> np.ndarray:
        """Sample `index` as int64 ids [bos] A [eos] ([eos] ...) B [eos] (length <= seq_length)."""
        return self._framed(index, self.dataset, self.bos_id, self.eos_id)

    def word_starts(self, index: int) -> Optional[np.ndarray]:
        """Sample `index`'s word starts (bool, as long as `tokens(index)`), True at [bos] and every
        [eos]; None without a word-start companion."""
        if self.word_start_source is None:
            return None
        return self._framed(index, self.word_start_source, 1, 1).astype(bool)

    def _framed(self, index: int, source, bos_value: int, eos_value: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(index)
        bos, eos = np.array([bos_value], np.int64), np.array([eos_value], np.int64)
        return np.concatenate([bos, *self._read(int(self.a_begin[index]), int(self.a_length[index]), source),
                               np.repeat(eos, self.pair_separators),
                               *self._read(int(self.b_begin[index]), int(self.b_length[index]), source), eos])
