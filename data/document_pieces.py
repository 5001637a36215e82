"""Long documents cut into pieces before tokenizing, so that the tokenizer's memory is bounded by the
piece, not by the longest document (data/preprocess.py joins the pieces' ids back into one document)."""
import re
from typing import Optional

from data.tokenizer import CLOSING_MARKS, SENTENCE_END_MARKS

DEFAULT_MAX_DOCUMENT_BYTES = 4 << 20  # tokenizing holds ~110 bytes a byte (BPE): ~0.5 GB a piece
MIN_MAX_DOCUMENT_BYTES = 64
# Where a long document is cut, best first. Each cut falls on a whitespace character that ends a run
# of whitespace (the next piece starts with it), where byte-level BPE's pre-tokenizer ends a token
# anyway: the pieces then tokenize as the whole did. SentencePiece gives the same ids at a space; at
# a line break it starts the next piece with its word marker, as at the start of any text.
# Text without spaces (Chinese) is cut right after a sentence mark (。！？ ..., data/tokenizer.py) and
# its closing marks, where a letter or digit follows: there byte-level BPE's pre-tokenizer ends a
# punctuation run, so the ids are the whole's again; SentencePiece starts the next piece with its
# word marker, as at a line break.
def _alternatives(chars: str) -> bytes:
    return b"|".join(re.escape(c.encode("utf-8")) for c in chars)


_MARK = b"(?:" + _alternatives(SENTENCE_END_MARKS) + b")"
_CLOSERS = b"(?:" + _alternatives(CLOSING_MARKS) + b")*"
# a letter or digit next: ASCII ones, or CJK ideographs U+4000-9FFF (UTF-8 lead bytes E4-E9) except
# the Yijing hexagram symbols U+4DC0-4DFF (E4 B7 80-BF), which are punctuation to the pre-tokenizer
_WORD_NEXT = rb"(?=[A-Za-z0-9]|[\xe5-\xe9]|\xe4(?!\xb7))"
_CUTS = (
    re.compile(rb"\n(?=\S)"),  # a line break
    re.compile(_MARK + _CLOSERS + rb"(?:\s*?(\s)(?=\S)|()" + _WORD_NEXT + b")"),  # after a sentence
    re.compile(rb"\s(?=\S)"),  # the whitespace before a word
)
_CUT_SEARCH_BYTES = 1 << 12  # searched backwards from the limit in windows of 4 KiB, 8 KiB, ...


def _last_cut(data: bytes, pattern: re.Pattern, low: int, high: int) -> Optional[int]:
    """The last cut of `pattern` (its group 1, or its start) in low < cut <= high, or None."""
    span = _CUT_SEARCH_BYTES
    while True:
        begin = max(low + 1, high - span)
        found = None
        for match in pattern.finditer(data, begin, min(len(data), high + 3)):  # + the lookahead's bytes
            cut = match.start(match.lastindex or 0)
            if cut <= high:
                found = cut
        if found is not None or begin == low + 1:
            return found
        span *= 4


def pieces(text: str, max_bytes: int) -> list[str]:
    """`text` itself, or when longer than max_bytes of UTF-8, cut into pieces of at most that many:
    at the last line break, else sentence end, else word, else character within the limit (never
    before half of it, so pieces stay large)."""
    if len(text) * 4 <= max_bytes:  # short in any encoding: the common case, nothing encoded
        return [text]
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return [text]
    pieces, start = [], 0
    while len(data) - start > max_bytes:
        low, high = start + max_bytes // 2, start + max_bytes
        cut = next((c for c in (_last_cut(data, p, low, high) for p in _CUTS) if c is not None), None)
        if cut is None:  # no whitespace: between two characters
            cut = high
            while data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte
                cut -= 1
        pieces.append(data[start:cut].decode("utf-8"))
        start = cut
    pieces.append(data[start:].decode("utf-8"))
    return pieces
