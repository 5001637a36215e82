"""Tokenizers behind one interface, loaded from a saved directory.

A tokenizer directory holds the backend's own files plus `tokenizer_meta.json`, whose `type`
field picks the backend class ("bpe" today; "spm" is the slot for SentencePiece). Byte-level BPE
is saved as a Hugging Face fast tokenizer (`tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`), so `transformers.AutoTokenizer.from_pretrained(dir)` loads the same
tokenizer and, with `add_special_tokens=False`, encodes exactly as `Tokenizer.encode`.

`encode` never adds special tokens: the data pipeline stores bare token ids per document and the
sample builder places `<s>`/`</s>` itself. As in Hugging Face, special-token strings written in
the text (e.g. "<mask>") are matched as those tokens.
"""
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar, Iterable, Iterator, Sequence

from data.errors import UserError

META_FILE = "tokenizer_meta.json"
META_FORMAT_VERSION = 1

# RoBERTa's specials in RoBERTa's order, so ids match: <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4.
ROBERTA_SPECIALS = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}
SPECIAL_ROLES = ("bos", "eos", "pad", "unk", "mask")


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

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------
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

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


BACKENDS: dict[str, type[Tokenizer]] = {BPETokenizer.type: BPETokenizer}


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Open a tokenizer directory written by `train_bpe` (or tools/train_tokenizer.py)."""
    path = Path(path).resolve()
    meta_path = path / META_FILE
    if not path.is_dir():
        raise UserError(f"tokenizer directory {path} does not exist; train one with tools/train_tokenizer.py")
    if not meta_path.is_file():
        raise UserError(f"{path} is not a tokenizer directory (no {META_FILE}); "
                        f"train one with tools/train_tokenizer.py")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{meta_path}: not valid JSON ({err}); retrain the tokenizer") from None
    kind = meta.get("type")
    if kind not in BACKENDS:
        raise UserError(f"{meta_path}: unknown tokenizer type {kind!r}; expected one of {sorted(BACKENDS)}")
    if not isinstance(meta.get("special_tokens"), dict) or set(SPECIAL_ROLES) - set(meta["special_tokens"]):
        raise UserError(f"{meta_path}: 'special_tokens' must name {', '.join(SPECIAL_ROLES)}; retrain the tokenizer")
    missing = [name for name in BACKENDS[kind].files if not (path / name).is_file()]
    if missing:
        raise UserError(f"{path}: missing tokenizer file(s) {', '.join(missing)}; retrain the tokenizer")
    return BACKENDS[kind](path, meta)


# -- training ----------------------------------------------------------------------------------

def _hf_config_files(model_max_length: int) -> dict[str, dict]:
    """`tokenizer_config.json` and `special_tokens_map.json` for Hugging Face transformers.

    `PreTrainedTokenizerFast` makes transformers load tokenizer.json as it is; a model class such as
    `RobertaTokenizerFast` would rebuild the pipeline from the vocabulary and merges instead.
    """
    mask = {"content": "<mask>", "lstrip": True, "rstrip": False, "normalized": False,
            "single_word": False, "special": True}
    specials = {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
        "pad_token": "<pad>", "cls_token": "<s>", "mask_token": mask,
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "trim_offsets": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": specials}


def _training_texts(files_or_iterator, json_key: str) -> Iterator[str]:
    if isinstance(files_or_iterator, (str, os.PathLike)):
        files_or_iterator = [files_or_iterator]
    if isinstance(files_or_iterator, (list, tuple)) and all(
            isinstance(f, (str, os.PathLike)) for f in files_or_iterator):
        from data.preprocess import iter_texts  # the readers live with the preprocessing pipeline

        return iter_texts([Path(f) for f in files_or_iterator], json_key=json_key)
    return iter(files_or_iterator)


def train_bpe(
    files_or_iterator,
    vocab_size: int,
    output_dir: str | Path,
    min_frequency: int = 2,
    json_key: str = "text",
    model_max_length: int = 512,
) -> Tokenizer:
    """Train a RoBERTa-style byte-level BPE and save it to output_dir (replaced atomically).

    files_or_iterator: a list of .jsonl/.txt(.gz) paths (read like tools/preprocess_data.py, JSON
    field `json_key`), or any other iterable of document strings. `vocab_size` counts the five
    specials and the 256 byte symbols; a small corpus may stop short of it (see `vocab_size`).
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as HFTokenizer

    specials = list(ROBERTA_SPECIALS.values())
    if vocab_size < len(specials) + 256:
        raise UserError(f"vocab size {vocab_size} is too small for byte-level BPE; use at least "
                        f"{len(specials) + 256} (5 specials + 256 bytes)")
    tok = HFTokenizer(models.BPE())  # no unk: every byte has a symbol
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
    tok.train_from_iterator(_training_texts(files_or_iterator, json_key), trainer=trainer)
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
    }
    output_dir = Path(output_dir)
    with _atomic_dir(output_dir) as tmp:
        tok.save(str(tmp / "tokenizer.json"))
        for name, content in {**_hf_config_files(model_max_length), META_FILE: meta}.items():
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return load_tokenizer(output_dir)


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
