"""Reading raw text into documents: the inputs the preprocessing pipeline (data/preprocess.py) and tokenizer
training (data/tokenizer_train.py) take.

Inputs are files, directories or globs of `.jsonl` (one JSON object per line, text under a key) or
`.txt`, optionally gzipped. A `.txt` holds one document per line, or with `txt_docs="blank-line"`
documents of several lines separated by blank (whitespace-only) lines. Plain files are cut at document
boundaries into byte ranges (`_split_points`) so that several workers share one file; gzipped files are
streamed in blocks (`_stream_blocks`).

Bad input, and what happens to it (counted by reason in `_Counts`):
- invalid UTF-8 (and lone surrogates escaped in JSON) is replaced by U+FFFD; `strict` rejects it;
- NUL characters are stripped; `strict` rejects them;
- empty (whitespace-only) documents are skipped;
- a malformed JSON line, or one without the text key (or with a non-string value), is an error
  naming file:line; `skip_bad_lines` skips and counts it instead.
"""

import glob
import gzip
import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from data import jsonio
from data.errors import UserError

MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 1 << 20, 64 << 20  # the byte ranges a plain file is cut into
INPUT_SUFFIXES = (".jsonl", ".txt", ".jsonl.gz", ".txt.gz")
TXT_DOCS = ("line", "blank-line")
MAX_EXAMPLES = 5  # skipped lines named in the log
WHITESPACE = " \t\n\r\x0b\x0c"  # ASCII: what makes a line blank, the same in bytes and in text
_WHITESPACE_BYTES = WHITESPACE.encode()
_BLANK_LINE = re.compile(rb"(?m)^[ \t\r\x0b\x0c]*\n")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class ReadOptions:
    """How documents are read from input files (shared by preprocessing and tokenizer training)."""

    json_key: str = "text"
    txt_docs: str = "line"  # "line": one document per line; "blank-line": blank lines separate documents
    strict: bool = False  # reject invalid UTF-8 and NUL characters instead of repairing them
    skip_bad_lines: bool = False  # skip and count malformed JSON lines and missing keys instead of failing

    def __post_init__(self):
        if self.txt_docs not in TXT_DOCS:
            raise UserError(f"--txt-docs {self.txt_docs!r} is not one of {', '.join(TXT_DOCS)}")


def _is_input(path: Path) -> bool:
    return path.name.endswith(INPUT_SUFFIXES)


def expand_inputs(specs: Sequence[str | Path]) -> list[Path]:
    """Files, directories (searched recursively) and globs to a list of input files, in order.

    Globs and directories expand in sorted order; a file named twice is read once.
    """
    if not specs:
        raise UserError("no --input given; name .jsonl/.txt files, directories or globs")
    found: list[Path] = []
    for spec in map(str, specs):
        if glob.has_magic(spec):
            matches = [Path(p) for p in sorted(glob.glob(spec, recursive=True))]
            files = [p for p in matches if p.is_file() and _is_input(p)]
            if not files:
                raise UserError(f"--input {spec!r} matches no {'/'.join(INPUT_SUFFIXES)} files; check the pattern")
        elif os.path.isdir(spec):
            files = sorted(p for p in Path(spec).rglob("*") if p.is_file() and _is_input(p))
            if not files:
                raise UserError(f"--input directory {spec} holds no {'/'.join(INPUT_SUFFIXES)} files")
        elif os.path.isfile(spec):
            if not _is_input(Path(spec)):
                raise UserError(f"--input {spec}: unsupported file type; use {', '.join(INPUT_SUFFIXES)}")
            files = [Path(spec)]
        else:
            raise UserError(f"--input {spec} does not exist; give files, directories or quoted globs")
        found.extend(files)
    unique = {p.resolve(): None for p in found}  # keeps first-seen order
    return list(unique)


def _kind(path: Path) -> str:
    return "jsonl" if path.name.endswith((".jsonl", ".jsonl.gz")) else "txt"


def _blank_line_docs(kind: str, options: ReadOptions) -> bool:
    return kind == "txt" and options.txt_docs == "blank-line"


def _split_points(path: Path, size: int, blank_line_docs: bool, chunk_bytes: int) -> list[int]:
    """Offsets that cut a plain file into ranges of about chunk_bytes, each starting a document."""
    points = [0]
    with open(path, "rb") as f:
        while points[-1] + chunk_bytes < size:
            f.seek(points[-1] + chunk_bytes - 1)
            f.readline()  # to the end of the line holding that byte
            point = f.tell()
            if blank_line_docs:  # on to the end of the next blank line
                for line in iter(f.readline, b""):
                    point += len(line)
                    if not line.strip(_WHITESPACE_BYTES):
                        break
            if point >= size:
                break
            points.append(point)
    return points


def _stream_blocks(path: Path, blank_line_docs: bool, block_bytes: int) -> Iterator[tuple[bytes, int]]:
    """A file read in order (gzip or plain) as blocks of whole documents: (block, bytes of the file
    read so far). Each byte is scanned for a boundary once, so a huge document costs linear time."""
    try:
        with open(path, "rb") as raw:
            f = gzip.GzipFile(fileobj=raw, mode="rb") if path.name.endswith(".gz") else raw
            pending, scan_from = bytearray(), 0  # pending[scan_from:] holds no boundary yet; scan_from starts a line
            while data := f.read(block_bytes):
                pending += data
                if blank_line_docs:
                    ends = [m.end() for m in _BLANK_LINE.finditer(pending, scan_from)]
                    cut = ends[-1] if ends else 0
                    last_start = pending.rfind(b"\n", scan_from) + 1
                    scan_from = max(last_start, scan_from)
                else:
                    cut = pending.rfind(b"\n", scan_from) + 1
                    scan_from = len(pending)
                if cut:
                    yield bytes(pending[:cut]), raw.tell()
                    del pending[:cut]
                    scan_from = max(0, scan_from - cut)
            if pending:
                yield bytes(pending), raw.tell()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise UserError(f"{path}: not a readable gzip file ({err}); recompress or remove it") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None


class _LineError(Exception):
    """Bad input at `line`, counted from the block's first line; the reader adds the file and offset."""

    def __init__(self, line: int, message: str):
        super().__init__(line, message)
        self.line, self.message = line, message


@dataclass
class _Counts:
    skipped: Counter = field(default_factory=Counter)  # reason -> documents left out
    repaired: Counter = field(default_factory=Counter)  # reason -> documents kept after a repair
    examples: list = field(default_factory=list)  # (line in block, reason) of the first skipped bad lines
    split: int = 0  # documents longer than max_document_bytes, tokenized in pieces

    def skip(self, reason: str, line: int) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append((line, reason))


def _lines(block: bytes, at_file_start: bool, strict: bool) -> Iterator[tuple[int, str, tuple]]:
    """(line number from 1, text without the line break, the repairs made to it)."""
    has_nul = b"\x00" in block
    lines = block.split(b"\n")  # split before decoding: one non-BMP character would widen a whole decoded block
    if not lines[-1]:
        lines.pop()  # the block ends with a line break
    for number, raw in enumerate(lines, start=1):
        repairs = ()
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if strict:
                raise _LineError(number, f"not valid UTF-8 (byte {err.start + 1} of the line); re-encode "
                                         f"the file as UTF-8, or drop --strict to replace bad bytes") from None
            line, repairs = raw.decode("utf-8", "replace"), ("invalid utf-8 replaced",)
        if has_nul and "\x00" in line:
            line, repairs = _strip_nul(line, number, strict), repairs + ("nul stripped",)
        if at_file_start and number == 1:
            line = line.removeprefix("\ufeff")
        yield number, line.removesuffix("\r"), repairs


def _strip_nul(text: str, number: int, strict: bool) -> str:
    if strict:
        raise _LineError(number, "NUL character in the text; remove it, or drop --strict to strip NULs")
    return text.replace("\x00", "")


def _documents(block: bytes, kind: str, options: ReadOptions, at_file_start: bool,
               counts: _Counts) -> Iterator[str]:
    """The documents of a block of whole lines that starts a document, bad input handled per `options`."""
    lines = _lines(block, at_file_start, options.strict)
    if kind == "jsonl":
        raw_docs = _json_texts(lines, options, counts)
    elif options.txt_docs == "blank-line":
        raw_docs = _paragraphs(lines)
    else:
        raw_docs = lines
    for _, text, repairs in raw_docs:
        if not text.strip():
            counts.skipped["empty"] += 1
            continue
        if repairs:
            counts.repaired.update(set(repairs))
        yield text


def _paragraphs(lines: Iterable[tuple[int, str, bool]]) -> Iterator[tuple[int, str, bool]]:
    """Lines to documents separated by blank lines: (first line number, text, repairs of its lines)."""
    first, parts, repairs = 0, [], ()
    for number, line, line_repairs in lines:
        if line.strip(WHITESPACE):
            if not parts:
                first = number
            parts.append(line)
            repairs += line_repairs
        elif parts:
            yield first, "\n".join(parts), repairs
            parts, repairs = [], ()
    if parts:
        yield first, "\n".join(parts), repairs


def _json_texts(lines: Iterable[tuple[int, str, bool]], options: ReadOptions,
                counts: _Counts) -> Iterator[tuple[int, str, bool]]:
    key = options.json_key
    for number, line, repairs in lines:
        if not line.strip(WHITESPACE):
            counts.skipped["empty"] += 1
            continue
        try:
            obj = _json_object(line)
        except json.JSONDecodeError as err:
            problem = ("malformed json", f"malformed JSON (column {err.colno}: {err.msg}); fix or remove the line")
        else:
            if not isinstance(obj, dict) or key not in obj:
                problem = ("missing key", f"no key {key!r} in the JSON object; pass --json-key to name the text field")
            elif not isinstance(obj[key], str):
                problem = ("not a string", f"{key!r} is {type(obj[key]).__name__}, not a string; fix the line "
                                           f"or pass another --json-key")
            else:
                text = obj[key]
                if "\\u" in line:  # escapes may spell what raw bytes could not
                    if "\x00" in text:
                        text, repairs = _strip_nul(text, number, options.strict), repairs + ("nul stripped",)
                    if _SURROGATE.search(text):  # "\ud800" alone: not encodable as UTF-8
                        if options.strict:
                            raise _LineError(number, "lone surrogate escape in the JSON text (not valid UTF-8); "
                                                     "fix the line, or drop --strict to replace it")
                        text, repairs = _SURROGATE.sub("\ufffd", text), repairs + ("invalid utf-8 replaced",)
                yield number, text, repairs
                continue
        if not options.skip_bad_lines:
            raise _LineError(number, f"{problem[1]}, or pass --skip-bad-lines")
        counts.skip(problem[0], number)


_JSON_DECODER = json.JSONDecoder()


def _json_object(line: str):
    """json.loads(line), a little faster for the common line that is exactly one JSON value."""
    try:
        obj, end = _JSON_DECODER.raw_decode(line)
        if end == len(line):
            return obj
    except (json.JSONDecodeError, RecursionError):
        pass
    return jsonio.loads(line)  # surrounding whitespace, extra data, too deep a nesting, and the error message


def iter_texts(paths: Iterable[Path], options: ReadOptions = ReadOptions()) -> Iterator[str]:
    """The documents of input files, in order, read as preprocessing reads them (tokenizer training)."""
    for path in paths:
        kind, lines_before, at_start = _kind(path), 0, True
        for block, _ in _stream_blocks(path, _blank_line_docs(kind, options), MIN_CHUNK_BYTES):
            try:
                yield from _documents(block, kind, options, at_start, _Counts())
            except _LineError as err:
                raise UserError(f"{path}:{lines_before + err.line}: {err.message}") from None
            lines_before += block.count(b"\n")
            at_start = False
