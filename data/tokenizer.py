"""Tokenizers behind one interface, loaded from a saved directory.

A tokenizer directory holds the backend's own files plus `tokenizer_meta.json`, whose `type`
field picks the backend class. Both backends save a Hugging Face fast tokenizer (`tokenizer.json`,
`tokenizer_config.json`, `special_tokens_map.json`), so `transformers.AutoTokenizer.from_pretrained(dir)`
loads the same tokenizer and, with `add_special_tokens=False`, encodes exactly as `Tokenizer.encode`.

- "bpe": RoBERTa-style byte-level BPE through `tokenizers`. Specials <s>=0 <pad>=1 </s>=2 <unk>=3
  <mask>=4. As in Hugging Face, every special-token string written in the text (e.g. "<mask>") is
  matched as that token.
- "spm": SentencePiece (`spm.model`, Unigram or BPE) with byte fallback and DeBERTa-v3's layout:
  [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3, the 256 byte pieces <0x00>..<0xFF> at 4..259, the learnt pieces,
  and [MASK] last (id vocab_size - 1; 128000 with the default 128000 pieces, as in DeBERTa-v3).
  bos/eos are [CLS]/[SEP]. `encode` is exactly `sentencepiece`'s: of the specials only [MASK] (a
  user-defined piece) is matched in text; "[CLS]", "[SEP]", "[PAD]", "[UNK]" written in text are
  ordinary characters. No Unicode normalisation (`identity`), for the reason given in
  `data.tokenizer_train.train_spm`.

`encode` never adds special tokens: the data pipeline stores bare token ids per document and the
sample builder places bos/eos itself.
"""
import hashlib
import itertools
import os
import re
import shutil
from pathlib import Path
from typing import ClassVar, Iterable, Sequence

import numpy as np

from data import jsonio
from data.errors import UserError

META_FILE = "tokenizer_meta.json"
META_FORMAT_VERSION = 1

# RoBERTa's specials in RoBERTa's order, so ids match: <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4.
ROBERTA_SPECIALS = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}
# DeBERTa-v3's: [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3 as SentencePiece meta pieces, [MASK] appended last.
DEBERTA_V3_SPECIALS = {"bos": "[CLS]", "eos": "[SEP]", "pad": "[PAD]", "unk": "[UNK]", "mask": "[MASK]"}
SPECIAL_ROLES = ("bos", "eos", "pad", "unk", "mask")
# Sentence ends (data/pairs.py through sentence_end_ids; data/document_pieces.py): a mark, then closing
# quotes/brackets. Marks: . ! ?, the Chinese full stop 。 and its half-width ｡, full-width ！ ？, the
# doubled ‼ ⁇ ⁈ ⁉, the vertical and small forms ︒ ︕ ︖ ﹒ ﹗ ﹖; an ellipsis (… ⋯, as in "……") only
# when a closing quote or bracket follows it (a trailing-off quotation), since it also pauses mid-sentence.
SENTENCE_END_MARKS = ".!?\u3002\uff61\uff01\uff1f\u203c\u2047\u2048\u2049\ufe12\ufe15\ufe16\ufe52\ufe57\ufe56"
ELLIPSES = "\u2026\u22ef"
CLOSING_MARKS = ("\"'\u201d\u2019)]}\u00bb\u203a\u300d\u300f\uff09\u300b\u3011\u3009\u3015\u3017\u3019\u301b"
                 "\uff02\uff07\uff3d\uff5d\uff63")  # ” ’ ) ] } » › 」 』 ） 》 】 〉 〕 〗 〙 〛 ＂ ＇ ］ ｝ ｣
# A token of closing marks alone (then spaces): it belongs to the sentence an end token before it closes.
# Not the straight quotes " ' ＂ ＇, which open sentences as often as they close them, nor a token with a
# space before its mark (byte-level BPE's ' "' or ' )' starts something new).
UNAMBIGUOUS_CLOSING_MARKS = "".join(c for c in CLOSING_MARKS if c not in "\"'\uff02\uff07")
_CLOSERS_ONLY = re.compile(f"[{re.escape(UNAMBIGUOUS_CLOSING_MARKS)}]+\\s*$")
SENTENCE_END, SENTENCE_CLOSER = 1, 2  # the codes of Tokenizer.sentence_marks
# a mark, then closing marks and spaces, at the end of a token's text; or a line break
_SENTENCE_END = re.compile(f"(?:[{re.escape(SENTENCE_END_MARKS)}]|[{ELLIPSES}](?=[{re.escape(CLOSING_MARKS)}]))"
                           f"[{re.escape(CLOSING_MARKS)}\\s]*$|[\n\r]")


class Tokenizer:
    """A saved tokenizer directory. Subclasses implement one backend (selected by meta `type`)."""

    type: ClassVar[str]
    defining_files: ClassVar[tuple[str, ...]]  # what the fingerprint hashes: the tokenization itself
    files: ClassVar[tuple[str, ...]]  # everything save_copy copies besides tokenizer_meta.json

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.meta = meta
        self._special_ids = {}
        for role in SPECIAL_ROLES:
            token = meta["special_tokens"][role]
            token_id = self.token_to_id(token)
            if token_id is None:
                raise UserError(f"{path / META_FILE}: special token {token!r} ({role}) is not in the "
                                f"vocabulary; retrain the tokenizer with tools/train_tokenizer.py")
            self._special_ids[role] = token_id
        if meta.get("vocab_size") != self.vocab_size:
            raise UserError(f"{path / META_FILE}: vocab_size {meta.get('vocab_size')} disagrees with the "
                            f"tokenizer files ({self.vocab_size}); retrain the tokenizer")

    # -- backend interface -----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included."""
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts, through the backend's parallel batch path."""
        raise NotImplementedError

    def encode_batch_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """`encode_batch` as (all ids concatenated, int32; tokens per text, int64), without Python lists
        where the backend allows: the preprocessing workers' path."""
        encoded = self.encode_batch(texts)
        lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
        return np.fromiter(itertools.chain.from_iterable(encoded), np.int32, int(lengths.sum())), lengths

    def encode_batch_offsets(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """`encode_batch` with where each token comes from: per text (ids int32, begins int64, ends
        int64), the token's span in CHARACTERS of the text (data/segmenter.py maps word starts by it).
        A token holding bytes of a multi-byte character (byte-level BPE, SentencePiece byte fallback)
        spans that whole character; a token of no text (a lone word mark) may have an empty span."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def limit_threads(self, threads: int) -> None:
        """Use at most `threads` threads in encode_batch; call it before the first encode_batch."""
        raise NotImplementedError

    def word_start_ids(self) -> np.ndarray:
        """Boolean array over the ids: True for tokens that begin a word (for whole-word masking).

        Those are the tokens whose surface starts with the backend's word-boundary mark ('Ġ' for
        byte-level BPE, '▁' for SentencePiece). Specials are False. A text's first token starts a
        word even without the mark (byte-level BPE adds no prefix space): callers treat the token
        after a special as a word start.
        """
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------
    def sentence_end_ids(self) -> np.ndarray:
        """Boolean array over the ids: True for tokens whose text ends a sentence (data/pairs.py).

        A token's decoded text ends in a sentence mark (SENTENCE_END_MARKS: . ! ? and the Chinese 。！？
        and relatives; an ellipsis before a closing mark), possibly followed by closing quotes or
        brackets (CLOSING_MARKS: ” 」 』 ） 》 ...) and spaces, or contains a line break. Specials are
        False. One decode per id (about a second for 128K ids); a byte-level token holding only part of
        a multi-byte mark does not decode to it and is missed: on a Chinese byte-level BPE the marks
        are frequent enough to be whole tokens (tests/test_tokenizer_zh.py counts none missed).
        """
        return self.sentence_marks() == SENTENCE_END

    def sentence_marks(self) -> np.ndarray:
        """int8 array over the ids: SENTENCE_END (1) for the tokens `sentence_end_ids` flags, SENTENCE_CLOSER
        (2) for those whose text is only closing marks (and spaces: ” 」 ） ...), 0 else and for specials.
        data/pairs.py ends a sentence after an end token and the closers that follow it, so a closing quote
        the tokenizer keeps apart from its 。 or . stays with its sentence (。 ” -> one sentence end)."""
        texts = [self.decode([i]) for i in range(self.vocab_size)]
        marks = np.array([SENTENCE_END if _SENTENCE_END.search(text) else
                          SENTENCE_CLOSER if _CLOSERS_ONLY.match(text) else 0 for text in texts], dtype=np.int8)
        marks[self.special_ids] = 0
        return marks

    @property
    def bos_id(self) -> int:
        return self._special_ids["bos"]

    @property
    def eos_id(self) -> int:
        return self._special_ids["eos"]

    @property
    def pad_id(self) -> int:
        return self._special_ids["pad"]

    @property
    def unk_id(self) -> int:
        return self._special_ids["unk"]

    @property
    def mask_id(self) -> int:
        return self._special_ids["mask"]

    @property
    def special_ids(self) -> list[int]:
        return sorted(set(self._special_ids.values()))

    def fingerprint(self) -> str:
        """sha256 of the defining files' names and contents: equal for copies, different for retrains."""
        digest = hashlib.sha256()
        for name in sorted(self.defining_files):
            digest.update(name.encode() + b"\0")
            digest.update((self.path / name).read_bytes())
            digest.update(b"\0")
        return digest.hexdigest()

    def save_copy(self, dest_dir: str | Path) -> Path:
        """Copy this tokenizer's files into dest_dir (created if needed); returns dest_dir."""
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        for name in (*self.files, META_FILE):
            shutil.copyfile(self.path / name, dest / name)
        return dest

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r}, vocab_size={self.vocab_size})"


class BPETokenizer(Tokenizer):
    """Byte-level BPE through the `tokenizers` library (`tokenizer.json`)."""

    type = "bpe"
    defining_files = ("tokenizer.json",)
    files = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

    def __init__(self, path: Path, meta: dict):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as err:  # the Rust side raises a bare Exception on malformed files
            raise UserError(f"{path / 'tokenizer.json'}: not a valid tokenizers file ({err}); "
                            f"retrain the tokenizer") from None
        super().__init__(path, meta)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # the "fast" path skips computing character offsets, which we never use
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def encode_batch_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        lengths = np.fromiter(map(len, encodings), np.int64, len(encodings))
        ids = itertools.chain.from_iterable(e.ids for e in encodings)
        return np.fromiter(ids, np.int32, int(lengths.sum())), lengths

    def encode_batch_offsets(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        # `tokenizers` reports character offsets; each byte token of a multi-byte character gets that
        # character's span (the offset-free "fast" path would give the same ids)
        out = []
        for e in self._tok.encode_batch(list(texts), add_special_tokens=False):
            spans = np.array(e.offsets, dtype=np.int64).reshape(-1, 2)
            out.append((np.array(e.ids, dtype=np.int32), spans[:, 0], spans[:, 1]))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def limit_threads(self, threads: int) -> None:
        # the Rust pool is sized once, on first use, from these variables
        if threads <= 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        else:
            os.environ["RAYON_NUM_THREADS"] = str(threads)

    def word_start_ids(self) -> np.ndarray:
        starts = np.zeros(self.vocab_size, dtype=bool)
        for token, token_id in self._tok.get_vocab(with_added_tokens=False).items():
            starts[token_id] = token.startswith("Ġ")  # ByteLevel's picture of a space byte
        starts[self.special_ids] = False
        return starts


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece through the `sentencepiece` library (`spm.model`); see the module docstring."""

    type = "spm"
    defining_files = ("spm.model",)
    files = ("spm.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

    def __init__(self, path: Path, meta: dict):
        from sentencepiece import SentencePieceProcessor

        try:
            self._sp = SentencePieceProcessor(model_file=str(path / "spm.model"))
        except (RuntimeError, OSError) as err:  # the C++ side raises RuntimeError on malformed files
            raise UserError(f"{path / 'spm.model'}: not a valid SentencePiece model ({err}); "
                            f"retrain the tokenizer") from None
        self._threads = -1  # sentencepiece's "all cores"
        self._is_byte: np.ndarray | None = None  # byte pieces, by id (encode_batch_offsets)
        super().__init__(path, meta)
        # control pieces ([PAD] [CLS] [SEP]) and [UNK]: sentencepiece decodes them to nothing or " ⁇ "
        self._shown_specials = set(self.special_ids) - {self.mask_id}

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def token_to_id(self, token: str) -> int | None:
        token_id = self._sp.piece_to_id(token)  # unknown pieces map to unk_id
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=self._threads)

    def encode_batch_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        try:
            arrays = self._sp.encode(list(texts), num_threads=self._threads, return_type="numpy")
        except TypeError:  # sentencepiece before 0.2.1 returns lists only
            return super().encode_batch_flat(texts)
        lengths = np.fromiter(map(len, arrays), np.int64, len(arrays))
        ids = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        return ids.astype(np.int32, copy=False), lengths

    def encode_batch_offsets(self, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        try:
            encoded = self._sp.encode(list(texts), num_threads=self._threads, return_type="offset_mapping")
        except ValueError:  # an older sentencepiece
            raise UserError("token offsets (--word-segmenter) need sentencepiece>=0.2.3; "
                            "pip install -U sentencepiece") from None
        if self._is_byte is None:
            self._is_byte = np.array([self._sp.is_byte(i) for i in range(self.vocab_size)], dtype=bool)
        out = []
        for e in encoded:
            ids = np.array(e["ids"], dtype=np.int32)
            spans = np.array(e["offsets"], dtype=np.int64).reshape(-1, 2)
            # byte fallback spells a character in byte pieces: all but the last come with an empty span
            # at the character's start; give each the character it spells
            lone_byte = self._is_byte[ids] & (spans[:, 0] == spans[:, 1])
            spans[lone_byte, 1] += 1
            out.append((ids, spans[:, 0], spans[:, 1]))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids` as sentencepiece decodes it, [CLS]/[SEP]/[PAD]/[UNK] shown as words."""
        parts, run = [], []
        for token_id in map(int, ids):
            if token_id in self._shown_specials:
                if run:
                    parts.append(self._sp.decode(run))
                    run = []
                parts.append(self._sp.id_to_piece(token_id))
            else:
                run.append(token_id)
        if run:
            parts.append(self._sp.decode(run))
        return " ".join(parts)

    def limit_threads(self, threads: int) -> None:
        self._threads = max(1, threads)

    def word_start_ids(self) -> np.ndarray:
        starts = np.array([self._sp.id_to_piece(i).startswith("▁") for i in range(self.vocab_size)], dtype=bool)
        starts[self.special_ids] = False
        return starts


BACKENDS: dict[str, type[Tokenizer]] = {BPETokenizer.type: BPETokenizer, SentencePieceTokenizer.type: SentencePieceTokenizer}


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Open a tokenizer directory written by data/tokenizer_train.py (tools/train_tokenizer.py)."""
    path = Path(path).resolve()
    meta_path = path / META_FILE
    if not path.is_dir():
        raise UserError(f"tokenizer directory {path} does not exist; train one with tools/train_tokenizer.py")
    if not meta_path.is_file():
        raise UserError(f"{path} is not a tokenizer directory (no {META_FILE}); "
                        f"train one with tools/train_tokenizer.py")
    meta = jsonio.read_json_object(meta_path, "retrain the tokenizer")
    kind = meta.get("type")
    if kind not in BACKENDS:
        raise UserError(f"{meta_path}: unknown tokenizer type {kind!r}; expected one of {sorted(BACKENDS)}")
    if not isinstance(meta.get("special_tokens"), dict) or set(SPECIAL_ROLES) - set(meta["special_tokens"]):
        raise UserError(f"{meta_path}: 'special_tokens' must name {', '.join(SPECIAL_ROLES)}; retrain the tokenizer")
    missing = [name for name in BACKENDS[kind].files if not (path / name).is_file()]
    if missing:
        raise UserError(f"{path}: missing tokenizer file(s) {', '.join(missing)}; retrain the tokenizer")
    return BACKENDS[kind](path, meta)
