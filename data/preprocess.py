"""Raw text to an indexed dataset: read documents, tokenize them in worker processes, write `.bin/.idx`.

Inputs are files, directories or globs of `.jsonl` (one JSON object per line, text under a key) or
`.txt` (one document per line), optionally gzipped. The main process reads raw lines in chunks;
workers decode, parse and tokenize a chunk each; results come back in input order (`Pool.imap`),
so the output bytes do not depend on the number of workers.
"""
import glob
import gzip
import itertools
import json
import logging
import multiprocessing
import os
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from data.errors import UserError
from data.indexed import IndexedWriter
from data.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

INPUT_SUFFIXES = (".jsonl", ".txt", ".jsonl.gz", ".txt.gz")
CHUNK_DOCS = 512  # lines per task: large enough to amortise IPC, small enough to balance 2-16 workers


# -- finding and reading inputs --------------------------------------------------------------

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


def _raw_lines(path: Path) -> Iterator[bytes]:
    """Lines of a file split on b"\\n" only (a lone \\r inside a text line is not a break)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            yield from f
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise UserError(f"{path}: not a readable gzip file ({err}); recompress or remove it") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None


def parse_line(raw: bytes, kind: str, json_key: str, path: str, line_no: int) -> tuple[Optional[str], str]:
    """One input line to (document text, "") or (None, reason it is skipped). Bad input raises UserError."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}:{line_no}: not valid UTF-8 (byte {err.start}); re-encode the file as UTF-8") from None
    line = line.rstrip("\r\n")
    if line_no == 1:
        line = line.removeprefix("\ufeff")
    if kind == "txt":
        text = line
    else:
        if not line.strip():
            return None, "blank line"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{line_no}: malformed JSON (column {err.colno}: {err.msg}); "
                            f"fix or remove the line") from None
        if not isinstance(obj, dict) or json_key not in obj:
            raise UserError(f"{path}:{line_no}: no key {json_key!r} in the JSON object; "
                            f"pass --json-key to name the text field")
        text = obj[json_key]
        if not isinstance(text, str):
            raise UserError(f"{path}:{line_no}: {json_key!r} is {type(text).__name__}, not a string; "
                            f"fix the line or pass another --json-key")
    if not text.strip():
        return None, "empty text"
    return text, ""


def iter_texts(paths: Iterable[Path], json_key: str = "text") -> Iterator[str]:
    """The documents of input files, in order, empty ones left out (used by tokenizer training)."""
    for path in paths:
        kind = _kind(path)
        for line_no, raw in enumerate(_raw_lines(path), start=1):
            text, _ = parse_line(raw, kind, json_key, str(path), line_no)
            if text is not None:
                yield text


@dataclass
class _Chunk:
    path: str
    kind: str
    first_line: int
    lines: list[bytes]


def _chunks(paths: Iterable[Path], chunk_docs: int) -> Iterator[_Chunk]:
    for path in paths:
        kind, lines, first = _kind(path), [], 1
        for line_no, raw in enumerate(_raw_lines(path), start=1):
            lines.append(raw)
            if len(lines) == chunk_docs:
                yield _Chunk(str(path), kind, first, lines)
                lines, first = [], line_no + 1
        if lines:
            yield _Chunk(str(path), kind, first, lines)


# -- tokenizing (in workers) -------------------------------------------------------------------

@dataclass
class _Tokenized:
    ids: np.ndarray  # all documents' ids concatenated, int32
    lengths: list[int]  # tokens per document
    skipped: Counter
    read_bytes: int


_worker_tokenizer: Optional[Tokenizer] = None
_worker_json_key = "text"


def _init_worker(tokenizer_path: str, json_key: str, threads: Optional[int]) -> None:
    """Load the tokenizer in this process. threads: the Rust thread pool's size (None: all cores)."""
    global _worker_tokenizer, _worker_json_key
    # Must precede the first encode: the pool is sized once. One process per core already keeps
    # the cores busy, and more threads per process would only oversubscribe them.
    if threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    elif threads is not None:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    _worker_tokenizer = load_tokenizer(tokenizer_path)
    _worker_json_key = json_key


def _tokenize_chunk(chunk: _Chunk) -> _Tokenized:
    texts, skipped = [], Counter()
    for offset, raw in enumerate(chunk.lines):
        text, reason = parse_line(raw, chunk.kind, _worker_json_key, chunk.path, chunk.first_line + offset)
        if text is None:
            skipped[reason] += 1
        else:
            texts.append(text)
    encoded = _worker_tokenizer.encode_batch(texts) if texts else []
    kept = [ids for ids in encoded if ids]
    skipped["no tokens"] += len(encoded) - len(kept)
    ids = np.array(list(itertools.chain.from_iterable(kept)), dtype=np.int32)
    return _Tokenized(ids, [len(doc) for doc in kept], +skipped, sum(map(len, chunk.lines)))


# -- the pipeline ------------------------------------------------------------------------------

@dataclass
class PreprocessSummary:
    prefix: str
    files: int
    documents: int
    tokens: int
    skipped: dict = field(default_factory=dict)  # reason -> documents
    read_bytes: int = 0
    dtype: str = ""
    seconds: float = 0.0


def available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # the CPUs this process may use (containers, taskset)
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _tool_version() -> str:
    try:
        return metadata.version("encoder-pretrain")
    except metadata.PackageNotFoundError:
        return "unknown"


def preprocess(
    inputs: Sequence[str | Path],
    tokenizer: str | Path,
    output_prefix: str | Path,
    workers: int = 1,
    json_key: str = "text",
    chunk_docs: int = CHUNK_DOCS,
) -> PreprocessSummary:
    """Tokenize every document of `inputs` into `output_prefix`.bin/.idx/.json.

    workers=1 tokenizes in this process (the tokenizer's own threads run each batch on all cores);
    workers>1 starts that many processes, sharing the cores' threads between them.
    """
    start = time.perf_counter()
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    paths = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    output_prefix = Path(output_prefix)
    if output_prefix.is_dir() or str(output_prefix).endswith(os.sep):
        raise UserError(f"--output-prefix {output_prefix} names a directory; give a path prefix such as "
                        f"{output_prefix / 'corpus'}")
    log.info("tokenizing %d file(s) with %s, %d worker(s)", len(paths), tok, workers)

    skipped, read_bytes = Counter(), 0
    pool = None
    if workers > 1:
        threads = max(1, available_cpus() // workers)
        # spawn, not fork: the parent may hold Rust and OpenMP thread pools that fork would break
        pool = multiprocessing.get_context("spawn").Pool(
            workers, _init_worker, (str(tok.path), json_key, threads))
        results = pool.imap(_tokenize_chunk, _chunks(paths, chunk_docs))
    else:
        _init_worker(str(tok.path), json_key, None)
        results = map(_tokenize_chunk, _chunks(paths, chunk_docs))
    try:
        with tqdm(desc="preprocess", unit="doc", unit_scale=True, leave=False) as progress, \
                IndexedWriter(output_prefix, tok.vocab_size) as writer:
            for result in results:
                bounds = np.cumsum([0, *result.lengths])
                for a, b in zip(bounds[:-1], bounds[1:]):
                    writer.add_document(result.ids[a:b])
                skipped.update(result.skipped)
                read_bytes += result.read_bytes
                progress.update(len(result.lengths))
                rate = writer.tokens / max(progress.format_dict["elapsed"], 1e-9)
                progress.set_postfix_str(f"{writer.tokens / 1e6:.2f}M tokens, {rate / 1e6:.2f}M tok/s", refresh=False)
            if writer.documents == 0:
                raise UserError(f"no documents in {', '.join(map(str, paths))} (skipped: {dict(skipped)}); "
                                f"check the files and --json-key")
            writer.sidecar = {
                "tokenizer": {"path": str(tok.path), "fingerprint": tok.fingerprint(),
                              "type": tok.type, "vocab_size": tok.vocab_size},
                "inputs": [str(p) for p in paths],
                "json_key": json_key,
                "skipped": dict(sorted(skipped.items())),
                "tool": "preprocess_data",
                "tool_version": _tool_version(),
            }
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return PreprocessSummary(str(output_prefix), len(paths), writer.documents, writer.tokens,
                             dict(sorted(skipped.items())), read_bytes, np.dtype(writer.dtype).name,
                             time.perf_counter() - start)
