"""Training the project's tokenizers: byte-level BPE (`tokenizers`) and SentencePiece, saved as
directories that `data.tokenizer.load_tokenizer` and Hugging Face `AutoTokenizer` both load.

Training reads a sample of the lines of large inputs rather than all of them. The SentencePiece
directory ships a `tokenizer.json` built here from the model itself (byte fallback, the model's
normalisation, a byte-fallback decoder), because transformers 5.x's `DebertaV2Tokenizer`
rebuilds the model without byte fallback and with its own normaliser.

Normalisation (both backends, `normalization=`): "identity" (the default: none) or "fullwidth", which
folds the width forms that Chinese text mixes in, one character to one character, as NFKC folds each
of them alone (see WIDTH_FOLDS). It is written into both files a tokenizer is read from (SentencePiece:
a rule table compiled into `spm.model`; `tokenizer.json`: one Replace per character), so `load_tokenizer`
and `AutoTokenizer` fold identically; full NFKC cannot be mirrored exactly (see train_spm).
"""
import io
import json
import os
import random
import re
import shutil
import string
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

from data.errors import UserError
from data.tokenizer import (DEBERTA_V3_SPECIALS, META_FILE, META_FORMAT_VERSION, ROBERTA_SPECIALS, BPETokenizer,
                            SentencePieceTokenizer, Tokenizer, load_tokenizer)


def _hf_config_files(specials: dict, model_max_length: int, **extra) -> dict[str, dict]:
    """`tokenizer_config.json` and `special_tokens_map.json` for Hugging Face transformers.

    `PreTrainedTokenizerFast` makes transformers load tokenizer.json as it is; a model class such as
    `RobertaTokenizerFast` or `DebertaV2Tokenizer` would rebuild the pipeline from the vocabulary
    (and, for DeBERTa, without byte fallback and with its own normaliser) instead.
    """
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, **extra}
    return {"tokenizer_config.json": config, "special_tokens_map.json": specials}


def _width_folds() -> dict[str, str]:
    """The "fullwidth" normalisation: U+3000 ideographic space, the full-width ASCII forms U+FF01-FF5E,
    the half-width CJK punctuation U+FF5F-FF64 and the full-width signs U+FFE0-FFE6, each to its NFKC
    form where that is one character ("Ａ１！" -> "A1!", U+3000 -> " ", "｡" -> "。", "￥" -> "¥";
    U+FFE3 "￣", NFKC " ̄", stays). Character by character: nothing is composed or reordered, so a
    combining mark after a folded letter stays a separate character on both sides. Half-width
    Katakana and Hangul are left alone (their NFKC composes voiced marks).
    """
    import unicodedata

    codes = [0x3000, *range(0xFF01, 0xFF65), *range(0xFFE0, 0xFFE7)]
    folds = {chr(c): unicodedata.normalize("NFKC", chr(c)) for c in codes}
    folds = {c: f for c, f in folds.items() if len(f) == 1 and f != c}
    assert not set(folds.values()) & set(folds), "a fold's result is folded again"  # order-free Replaces
    return folds


WIDTH_FOLDS = _width_folds()  # 107 characters
NORMALIZATIONS = {"identity": {}, "fullwidth": WIDTH_FOLDS}
# SentencePiece's own default, which train_spm used before it was an option: a model trained with it
# stays byte-identical to one trained without naming it (its value is then not written in spm.model)
DEFAULT_CHARACTER_COVERAGE = 0.9995
# --preset: the settings of one language's tokenizers together (explicit options win)
PRESETS = {"zh": {"normalization": "fullwidth", "character_coverage": 0.9995}}


def _folds_of(normalization: str) -> dict[str, str]:
    if normalization not in NORMALIZATIONS:
        raise UserError(f"normalization {normalization!r} is not supported; use one of {', '.join(NORMALIZATIONS)}")
    return NORMALIZATIONS[normalization]


def _hf_fold_normalizers(folds: dict[str, str]) -> list:
    """`tokenizers` normalisers applying `folds` (independent single characters: order does not matter)."""
    from tokenizers import normalizers

    return [normalizers.Replace(src, dst) for src, dst in folds.items()]


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# Ids are int32 in the data pipeline, but the BPE trainer allocates ~66 bytes per requested id up
# front (2**31 asks for 141 GB and aborts the process): 4M ids is 16x the largest vocabularies in use.
MAX_VOCAB_SIZE = 1 << 22


def _check_vocab_size(vocab_size: int, smallest: int, kind: str, why: str) -> None:
    if not smallest <= vocab_size <= MAX_VOCAB_SIZE:
        size = "small" if vocab_size < smallest else "large"
        raise UserError(f"vocab size {vocab_size} is too {size} for {kind}; use --vocab-size {smallest} to "
                        f"{MAX_VOCAB_SIZE} ({why})")


class _CountingTexts:
    """The training documents, counting those with text: an empty corpus is an error, not a tokenizer."""

    def __init__(self, files_or_iterator, read_options):
        if isinstance(files_or_iterator, (str, os.PathLike)):
            files_or_iterator = [files_or_iterator]
        if isinstance(files_or_iterator, (list, tuple)) and all(
                isinstance(f, (str, os.PathLike)) for f in files_or_iterator):
            from data.reading import ReadOptions, iter_texts  # the readers preprocessing uses

            self.source = ", ".join(map(str, files_or_iterator)) or "no input files"
            self._texts = iter_texts([Path(f) for f in files_or_iterator], read_options or ReadOptions())
        else:
            self.source, self._texts = "the given texts", iter(files_or_iterator)
        self.documents = 0

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            if text.strip():
                self.documents += 1
            yield text

    def empty_error(self) -> UserError:
        return UserError(f"no text in {self.source}: every document is empty or skipped; "
                         f"check the files, --json-key and --txt-docs")


def train_bpe(
    files_or_iterator,
    vocab_size: int,
    output_dir: str | Path,
    min_frequency: int = 2,
    json_key: str = "text",
    model_max_length: int = 512,
    read_options=None,
    normalization: str = "identity",
) -> Tokenizer:
    """Train a RoBERTa-style byte-level BPE and save it to output_dir (replaced atomically).

    files_or_iterator: a list of .jsonl/.txt(.gz) paths (read like tools/preprocess_data.py, with
    `read_options`, a `data.preprocess.ReadOptions`, or just JSON field `json_key`), or any other
    iterable of document strings. `vocab_size` counts the five specials and the 256 byte symbols; a
    small corpus may stop short of it (see `vocab_size`). normalization: "identity" or "fullwidth"
    (module docstring). Text of any script round-trips (`decode(encode(text)) == text`, up to the
    folds): a character the merges do not cover is spelt in several byte tokens, each of which alone
    decodes to U+FFFD.
    """
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as HFTokenizer

    specials = list(ROBERTA_SPECIALS.values())
    _check_vocab_size(vocab_size, len(specials) + 256, "byte-level BPE", "5 specials + 256 bytes at least")
    if read_options is None:
        from data.reading import ReadOptions

        read_options = ReadOptions(json_key=json_key)
    folds = _folds_of(normalization)
    tok = HFTokenizer(models.BPE())  # no unk: every byte has a symbol
    if folds:
        tok.normalizer = normalizers.Sequence(_hf_fold_normalizers(folds))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special_tokens = [
        AddedToken(t, special=True, normalized=False, lstrip=(t == "<mask>"), rstrip=False) for t in specials
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,  # added first, in order: ids 0..4
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    texts = _CountingTexts(files_or_iterator, read_options)
    tok.train_from_iterator(texts, trainer=trainer)
    if texts.documents == 0:
        raise texts.empty_error()
    # (sep, cls, trim_offsets, add_prefix_space); positional only in the Rust binding
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")), True, False
    )
    ids = [tok.token_to_id(t) for t in specials]
    assert ids == list(range(len(specials))), f"special token ids {ids} are not 0..4"

    meta = {
        "format_version": META_FORMAT_VERSION,
        "type": BPETokenizer.type,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "special_tokens": dict(ROBERTA_SPECIALS),
        "special_ids": {role: tok.token_to_id(t) for role, t in ROBERTA_SPECIALS.items()},
        "min_frequency": min_frequency,
        "requested_vocab_size": vocab_size,
        "normalization": normalization,
    }
    mask = {"content": "<mask>", "lstrip": True, "rstrip": False, "normalized": False,
            "single_word": False, "special": True}
    hf_specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                   "pad_token": "<pad>", "cls_token": "<s>", "mask_token": mask}
    hf_files = _hf_config_files(hf_specials, model_max_length, add_prefix_space=False, trim_offsets=True,
                                errors="replace")
    output_dir = Path(output_dir)
    with _atomic_dir(output_dir) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        for name, content in {**hf_files, META_FILE: meta}.items():
            _write_json(tmp / name, content)
    return load_tokenizer(output_dir)


# -- SentencePiece ------------------------------------------------------------------------------

SPM_MAX_LINE_BYTES = 4096  # sentencepiece skips longer training lines; we cut them at spaces first
# Printable ASCII is always a piece of its own, whatever the character coverage: then every literal
# "[CLS]", "[UNK]" or "<0xE6>" in text has a path of ordinary pieces, which tokenizer.json needs
# (see _hf_tokenizer_from_spm) and which costs 94 ids.
SPM_REQUIRED_CHARS = "".join(c for c in string.printable if not c.isspace())
# Score given in tokenizer.json to pieces sentencepiece never matches in text (control, unknown, byte).
# `tokenizers` puts every vocabulary entry in its lattice; this keeps them off every best path.
_UNREACHABLE_SCORE = -1e6
SCORE_GRID = 8  # Unigram scores are rounded to multiples of 1/SCORE_GRID (see train_spm)


def _spm_training_lines(texts: Iterable[str]) -> Iterator[str]:
    """Documents to SentencePiece training lines: their non-blank lines, long ones cut at spaces."""
    for text in texts:
        for line in text.split("\n"):
            line = line.strip()
            if len(line) * 4 <= SPM_MAX_LINE_BYTES:  # short enough in any encoding: the common case
                if line:
                    yield line
            else:
                yield from _cut_utf8(line.encode("utf-8"), SPM_MAX_LINE_BYTES)


def _reservoir_sample(items: Iterable[str], size: int, seed: int) -> tuple[list[str], int]:
    """A uniform random sample of `size` items from a stream read once (Algorithm R), and the stream's length."""
    rng, sample, seen = random.Random(seed), [], 0
    for seen, item in enumerate(items, start=1):
        if seen <= size:
            sample.append(item)
        else:
            slot = rng.randrange(seen)
            if slot < size:
                sample[slot] = item
    return sample, seen


def _cut_utf8(data: bytes, limit: int) -> Iterator[str]:
    """UTF-8 text in pieces of at most `limit` bytes, cut at the last space of each (or between characters)."""
    start = 0
    while len(data) - start > limit:
        cut = data.rfind(b" ", start + 1, start + limit + 1)
        if cut < 0:
            cut = start + limit
            while data[cut] & 0xC0 == 0x80:  # not inside a character
                cut -= 1
        yield data[start:cut].decode("utf-8")
        start = cut + (data[cut:cut + 1] == b" ")
    if start < len(data):
        yield data[start:].decode("utf-8")


def train_spm(
    files_or_iterator,
    vocab_size: int,
    output_dir: str | Path,
    model_type: str = "unigram",
    sample_lines: int = 5_000_000,
    read_options=None,
    model_max_length: int = 512,
    seed: int = 0,
    threads: Optional[int] = None,
    normalization: str = "identity",
    character_coverage: float = DEFAULT_CHARACTER_COVERAGE,
) -> Tokenizer:
    """Train a SentencePiece model (DeBERTa-v3 style) and save it to output_dir (replaced atomically).

    files_or_iterator: input paths (read with `read_options`, a `data.preprocess.ReadOptions`) or an
    iterable of document strings; each document's non-blank lines are the training "sentences".
    vocab_size: ids in all, [MASK] included: the SentencePiece model gets vocab_size - 1 pieces
    (a small corpus may give fewer: the size is a ceiling, as for BPE).
    model_type: "unigram" (DeBERTa-v3's) or "bpe".
    sample_lines: the inputs are read once, as a stream, keeping a uniform random sample of this many
    lines (reservoir sampling), so memory does not grow with the corpus. The sample is drawn here,
    from `seed`, rather than by SentencePiece's own `input_sentence_size` + `shuffle_input_sentence`,
    whose reservoir ignores its seed: two runs would train two different models. The model is
    reproducible for the same inputs, seed and `threads` (SentencePiece's EM sums per thread).

    character_coverage: the share of the sample's characters that get pieces of their own (0.9995,
    SentencePiece's default and the value for Chinese/Japanese; 1.0 for small alphabets); the rarest
    characters beyond it are spelt in byte pieces (byte fallback), never [UNK].

    Normalisation `identity` (the default): no Unicode normalisation, only SentencePiece's whitespace
    rules (spaces stripped at both ends, runs of spaces collapsed; tabs and newlines are kept as
    characters, so `decode` gives them back). `fullwidth` (for Chinese) first folds WIDTH_FOLDS, one
    character to one, through a rule table compiled into the model (sentencepiece's
    normalization_rule_tsv), mirrored by Replace normalisers in tokenizer.json: the two agree on all
    text, since both replace single characters; an ideographic space then counts as a space.
    DeBERTa-v3 used `nmt_nfkc`, but a tokenizer.json can carry that
    rule table only through `tokenizers`' Precompiled normaliser, which parts from sentencepiece on
    combining sequences: it leaves "e\u0301" decomposed where sentencepiece composes "é", treats
    decomposed Hangul likewise, and drops a combining mark after a full-width letter. AutoTokenizer
    would then not encode as the data was preprocessed; with `identity` the two agree on all text.
    The cost: compatibility forms (ligatures, decomposed accents; full-width forms under `identity`)
    stay distinct characters with their own pieces; normalise the corpus beforehand to fold them. Byte fallback
    spells characters outside the vocabulary in UTF-8 bytes, so nothing becomes [UNK].

    Unigram scores are rounded to multiples of 1/8 (see SCORE_GRID) so that Hugging Face's lattice
    breaks ties as sentencepiece does. With model_type "bpe", one corner differs in Hugging Face:
    "[MASK]" written directly before the literal name of a control or byte piece ("[MASK][SEP]",
    "[MASK]<0x41>", up to the next space) gives that piece's id, where sentencepiece spells it.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    from data.preprocess import available_cpus

    if model_type not in ("unigram", "bpe"):
        raise UserError(f"SentencePiece model type {model_type!r} is not supported; use unigram or bpe")
    meta_pieces = 4 + 256 + 1  # [PAD] [CLS] [SEP] [UNK], the bytes, [MASK]
    _check_vocab_size(vocab_size, meta_pieces + len(SPM_REQUIRED_CHARS), "SentencePiece with byte fallback",
                      "specials, 256 bytes and printable ASCII at least")
    if sample_lines < 1:
        raise UserError(f"--sample-lines must be at least 1, got {sample_lines}")
    if not 0.9 <= character_coverage <= 1.0:  # sentencepiece's own bounds
        raise UserError(f"--character-coverage must be within 0.9 to 1.0, got {character_coverage}")
    folds = _folds_of(normalization)
    threads = threads or available_cpus()
    texts = _CountingTexts(files_or_iterator, read_options)
    sample, lines_read = _reservoir_sample(_spm_training_lines(texts), sample_lines, seed)
    if not sample:
        raise texts.empty_error()
    model = io.BytesIO()
    rules = tempfile.TemporaryDirectory(prefix="spm-rules-")
    if folds:
        tsv = Path(rules.name) / "rules.tsv"  # source code points TAB target code points, in hex
        tsv.write_text("".join(f"{ord(a):X}\t{ord(b):X}\n" for a, b in folds.items()), encoding="ascii")
        normalization_args = {"normalization_rule_tsv": str(tsv)}
    else:
        normalization_args = {"normalization_rule_name": normalization}
    if character_coverage != DEFAULT_CHARACTER_COVERAGE:
        normalization_args["character_coverage"] = character_coverage
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size - 1,  # [MASK] is appended below
            hard_vocab_limit=False,
            byte_fallback=True,
            pad_id=0, pad_piece="[PAD]", bos_id=1, bos_piece="[CLS]", eos_id=2, eos_piece="[SEP]",
            unk_id=3, unk_piece="[UNK]",
            **normalization_args,
            required_chars=SPM_REQUIRED_CHARS,
            # pieces never span a space (▁ only leads a piece): tokenizer.json relies on it
            split_by_whitespace=True,
            treat_whitespace_as_suffix=False,
            allow_whitespace_only_pieces=False,
            input_sentence_size=0,  # all of the sample
            max_sentence_length=SPM_MAX_LINE_BYTES,
            num_threads=threads,
            minloglevel=2,
        )
    except RuntimeError as err:  # sentencepiece reports bad settings and empty inputs this way
        reason = str(err).split("]")[-1].strip() or str(err)
        raise UserError(f"SentencePiece training failed: {reason}") from None
    finally:
        rules.cleanup()

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    if folds:  # the table is compiled into precompiled_charsmap; the temporary file's path is no setting
        proto.normalizer_spec.name = normalization
        proto.normalizer_spec.ClearField("normalization_rule_tsv")
    if model_type == "unigram":
        # sentencepiece sums scores along the text in float32, tokenizers per word in float64: their
        # roundings break exact ties (the same pieces in another order, as "((" "(" and "(" "((")
        # differently. Scores on a 1/8 grid make float32 sums exact up to 2**21 (~170K pieces of a
        # text); both then take the same path, ties included.
        for piece in proto.pieces:
            piece.score = round(piece.score * SCORE_GRID) / SCORE_GRID
    mask = proto.pieces.add()  # DeBERTa-v3 puts [MASK] after the SentencePiece vocabulary
    mask.piece, mask.score, mask.type = "[MASK]", 0.0, sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    pieces = len(proto.pieces)

    meta = {
        "format_version": META_FORMAT_VERSION,
        "type": SentencePieceTokenizer.type,
        "vocab_size": pieces,
        "special_tokens": dict(DEBERTA_V3_SPECIALS),
        "special_ids": {"pad": 0, "bos": 1, "eos": 2, "unk": 3, "mask": pieces - 1},
        "model_type": model_type,
        "normalization": normalization,
        "character_coverage": character_coverage,
        "byte_fallback": True,
        "requested_vocab_size": vocab_size,
        "sample_lines": sample_lines,
        "lines_read": lines_read,
        "seed": seed,
        "threads": threads,
    }
    hf_specials = {"bos_token": "[CLS]", "eos_token": "[SEP]", "unk_token": "[UNK]", "sep_token": "[SEP]",
                   "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
    # split_special_tokens: specials written in text are text, as for sentencepiece; [MASK] is still
    # matched, by tokenizer.json's own pipeline (a user-defined piece, as in sentencepiece)
    hf_files = _hf_config_files(hf_specials, model_max_length, split_special_tokens=True)
    output_dir = Path(output_dir)
    with _atomic_dir(output_dir) as tmp:
        (tmp / "spm.model").write_bytes(proto.SerializeToString())
        _hf_tokenizer_from_spm(proto, folds).save(str(tmp / "tokenizer.json"))
        for name, content in {**hf_files, META_FILE: meta}.items():
            _write_json(tmp / name, content)
    return load_tokenizer(output_dir)


def _hf_tokenizer_from_spm(proto, folds: Optional[dict[str, str]] = None):
    """A `tokenizers.Tokenizer` that encodes as sentencepiece does with a model from train_spm (a ModelProto).

    The steps mirror sentencepiece's, for the settings train_spm uses (identity normalisation or the
    single-character `folds` its rule table was compiled from, whitespace rules on, byte fallback,
    pieces never spanning a space):
    - normaliser: the folds (sentencepiece applies its table before the whitespace rules), spaces
      stripped at both ends and runs collapsed, spaces escaped as "▁" (at the end sentencepiece strips
      escaped spaces, so a "▁" written in the text goes too), the dummy "▁" prefix;
    - pre-tokenizer: split before each "▁" and isolate the user-defined pieces ([MASK]), which
      sentencepiece always emits whole;
    - model: the pieces with byte fallback. `tokenizers` would also match control, unknown and byte
      pieces when their names ("[CLS]", "<0xE6>") are written in text, where sentencepiece never does
      (transformers' SpmConverter leaves them so): in a Unigram they get a score no path takes, since
      each of their characters is a piece (SPM_REQUIRED_CHARS);
    - decoder: "▁" to spaces, bytes back to characters, leading spaces dropped as sentencepiece does;
    - post-processor: "[CLS] A [SEP]" and "[CLS] A [SEP] B [SEP]", as DeBERTa.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    if bool(spec.precompiled_charsmap) != bool(folds) or not (spec.add_dummy_prefix and spec.remove_extra_whitespaces
                                         and spec.escape_whitespaces and trainer.byte_fallback):
        raise ValueError("only models with train_spm's settings can be converted to tokenizer.json")
    kind = sentencepiece_model_pb2.ModelProto.SentencePiece
    pieces = list(proto.pieces)
    if trainer.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        matchable = (kind.NORMAL, kind.USER_DEFINED)
        vocab = [(p.piece, p.score if p.type in matchable else _UNREACHABLE_SCORE) for p in pieces]
        model = models.Unigram(vocab, unk_id=trainer.unk_id, byte_fallback=True)
    else:
        # sentencepiece's BPE merges the adjacent pair whose concatenation is the best-scored piece:
        # every split of a piece into two pieces is a merge, ranked by the whole piece's score.
        # ignore_merges takes a pre-token that is a piece as it is: how [MASK] stays whole.
        normal = {p.piece: (-p.score, i) for i, p in enumerate(pieces) if p.type == kind.NORMAL}
        ranked = sorted((normal[piece], piece[:cut], piece[cut:]) for piece in normal
                        for cut in range(1, len(piece)) if piece[:cut] in normal and piece[cut:] in normal)
        model = models.BPE({p.piece: i for i, p in enumerate(pieces)}, [(a, b) for _, a, b in ranked],
                           unk_token=trainer.unk_piece, fuse_unk=True, byte_fallback=True, ignore_merges=True)
    tok = HFTokenizer(model)
    tok.normalizer = normalizers.Sequence([
        *_hf_fold_normalizers(folds or {}),
        normalizers.Replace(Regex(r"\A +"), ""),
        normalizers.Replace(Regex(" {2,}"), " "),
        normalizers.Replace(" ", "▁"),
        normalizers.Replace(Regex(r"▁+\z"), ""),
        normalizers.Prepend("▁"),  # not to an empty text, as sentencepiece
    ])
    splits = [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)]
    user_defined = sorted((p.piece for p in pieces if p.type == kind.USER_DEFINED), key=len, reverse=True)
    if user_defined:
        splits.append(pre_tokenizers.Split(Regex("|".join(map(re.escape, user_defined))), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Replace(Regex(r"\A +"), "")])
    cls, sep = pieces[trainer.bos_id].piece, pieces[trainer.eos_id].piece
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, trainer.bos_id), (sep, trainer.eos_id)])
    return tok


@contextmanager
def _atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success swap it into place as `final`.

    An existing tokenizer directory (or an empty one) at `final` is replaced; any other existing
    content is refused rather than deleted. On failure the temporary directory is removed.
    """
    if final.exists():
        if not final.is_dir():
            raise UserError(f"output {final} exists and is not a directory; choose another --output")
        if any(final.iterdir()) and not (final / META_FILE).is_file():
            raise UserError(f"output {final} is a non-empty directory that holds no tokenizer; "
                            f"choose another --output or remove it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; make it an ordinary directory
    if final.exists():
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
        os.replace(final, old / final.name)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
