"""Word boundaries from a word segmenter (jieba for Chinese), as per-token word-start flags.

Whole-word masking needs to know where words begin. Chinese text has no spaces, so the tokenizer's
word marks ('Ġ', '▁') say nothing there; a segmenter does. Preprocessing with `--word-segmenter
jieba` stores, beside each document's tokens, one flag per token (data/preprocess.py writes them
to the companion PREFIX.wordstarts.bin/.idx; data/word_starts.py reads them):

    1 = the token begins a word (a masking unit), 0 = it continues the previous token's word.

A character begins a word when `jieba.lcut(text)` (defaults, HMM on) starts a word there AND the
rule of its character class agrees, so a unit is always a union of whole jieba words:
- Han: jieba decides;
- digits: only at the start of a digit run;
- punctuation and symbols: always (each its own word);
- other text (Latin etc.): after whitespace or a change of character class;
- whitespace and combining marks: never.
A token begins a word when its first non-whitespace character does and no earlier token of the text
already covers that character: the 2nd..nth tokens holding bytes of one character (byte-level BPE,
SentencePiece's byte fallback) are 0, so are a token that starts inside a word and a token of
whitespace only. Token offsets come from `Tokenizer.encode_batch_offsets` (characters of the text).
"""
import functools
import logging
import unicodedata
import numpy as np

from data.errors import UserError

SEGMENTERS = ("jieba",)
WORD_STARTS_SUFFIX = ".wordstarts"  # PREFIX.wordstarts.bin/.idx beside the token dataset
SIDECAR_KEY = "word_starts"
INSTALL = "pip install -e '.[zh]'"

# character classes
SPACE, HAN, DIGIT, PUNCT, MARK, OTHER = range(6)
_HAN_RANGES = ((0x3007, 0x3007), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF),  # 〇, Ext A, URO, compat
               (0x20000, 0x2FFFF), (0x30000, 0x3134F))  # Ext B-F, compat supplement, Ext G


def _class_of(char: str) -> int:
    code = ord(char)
    if any(low <= code <= high for low, high in _HAN_RANGES):
        return HAN
    if char.isspace():
        return SPACE
    category = unicodedata.category(char)
    if category == "Nd":
        return DIGIT
    if category[0] in "PS":
        return PUNCT
    if category[0] == "M":
        return MARK
    return OTHER


@functools.cache
def _bmp_classes() -> np.ndarray:
    """The Basic Multilingual Plane's classes, looked up by code point (built once: ~40 ms)."""
    return np.fromiter((_class_of(chr(c)) if not 0xD800 <= c <= 0xDFFF else OTHER for c in range(0x10000)),
                       np.uint8, 0x10000)


def code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def char_classes(points: np.ndarray) -> np.ndarray:
    """The class (SPACE, HAN, ...) of each code point."""
    classes = _bmp_classes()[np.minimum(points, 0xFFFF)]
    astral = np.flatnonzero(points > 0xFFFF)
    for i in astral:  # rare: Han extensions, emoji
        classes[i] = _class_of(chr(points[i]))
    return classes


def class_starts(classes: np.ndarray) -> np.ndarray:
    """Where the class rule allows a word to begin (see the module docstring), bool per character."""
    previous = np.empty_like(classes)
    previous[:1] = SPACE  # the text's start is as after whitespace
    previous[1:] = classes[:-1]
    return (((classes == HAN) | (classes == PUNCT))
            | ((classes == DIGIT) & (previous != DIGIT))
            | ((classes == OTHER) & (previous != OTHER)))


def token_starts(char_starts: np.ndarray, is_space: np.ndarray, begins: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """uint8 flag per token: its first non-whitespace character begins a word and no earlier token
    covers it. char_starts, is_space: bool per character; begins, ends: the tokens' character spans."""
    n = len(char_starts)
    # next_word_char[i]: the first non-whitespace character at or after i (n: none)
    next_char = np.full(n + 1, n, dtype=np.int64)
    solid = np.flatnonzero(~is_space)
    if len(solid):
        # for each i, the smallest solid index >= i
        next_char[:n] = np.append(solid, n)[np.searchsorted(solid, np.arange(n))]
    begins = np.asarray(begins, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    first = next_char[np.clip(begins, 0, n)]
    covered_to = np.zeros(len(ends), dtype=np.int64)  # the furthest end of the tokens before
    if len(ends) > 1:
        covered_to[1:] = np.maximum.accumulate(ends[:-1])
    inside = (first < ends) & (first >= covered_to)
    flags = np.zeros(len(ends), dtype=np.uint8)
    flags[inside] = char_starts[first[inside]]
    return flags


class JiebaSegmenter:
    """jieba's default segmentation (`jieba.lcut(text)`, HMM on), loaded once per process."""

    name = "jieba"

    def __init__(self):
        self._jieba = import_jieba()
        self._jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict..." banner in our progress output
        self._jieba.initialize()
        self.version = getattr(self._jieba, "__version__", "unknown")

    def word_lengths(self, text: str) -> np.ndarray:
        words = self._jieba.lcut(text)
        lengths = np.fromiter(map(len, words), np.int64, len(words))
        if int(lengths.sum()) != len(text):  # jieba returns every character once; guard the offsets
            raise RuntimeError(f"jieba's words do not spell the text back ({len(text)} characters)")
        return lengths

    def char_starts(self, text: str, classes: np.ndarray) -> np.ndarray:
        """bool per character: jieba begins a word there and the class rule agrees."""
        starts = np.zeros(len(text), dtype=bool)
        lengths = self.word_lengths(text)
        if len(lengths):
            starts[np.concatenate([[0], np.cumsum(lengths[:-1])])] = True
        return starts & class_starts(classes)

    def token_flags(self, text: str, begins: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """The word-start flags (uint8) of the tokens of `text` at character spans begins/ends."""
        classes = char_classes(code_points(text))
        return token_starts(self.char_starts(text, classes), classes == SPACE, begins, ends)

    def info(self) -> dict:
        """What PREFIX.json records (`word_starts`, the .idx sha256 added by the writer)."""
        return {"suffix": WORD_STARTS_SUFFIX, "segmenter": self.name, "segmenter_version": self.version}


def import_jieba():
    try:
        import jieba
    except ImportError:
        raise UserError(f"--word-segmenter jieba needs the jieba package, which is not installed; "
                        f"install it with {INSTALL}") from None
    return jieba


def load_segmenter(name: str) -> JiebaSegmenter:
    if name not in SEGMENTERS:
        raise UserError(f"--word-segmenter {name!r} is not one of {', '.join(SEGMENTERS)}")
    return JiebaSegmenter()

