"""Raw text to an indexed dataset: read documents, tokenize them in worker processes, write `.bin/.idx`.

The inputs (`.jsonl` / `.txt`, gzipped or not) and what happens to bad input are data/reading.py's;
documents that tokenize to nothing are skipped here too. Skips and repairs are counted by reason in the
summary and the sidecar.

Parallelism. Each plain file is cut at document boundaries into byte ranges (about `chunk_bytes`),
so that `workers` processes share even a single large file; a gzipped file cannot be cut, so the
main process decompresses it and hands blocks to the workers. A worker reads its range, tokenizes
it and writes its own shard (`data.indexed.ShardWriter`, no megatron-core import) into a temporary
directory; the main process merges the shards in input order with megatron-core's
`IndexedDatasetBuilder.add_index`. The output bytes do not depend on the number of workers or on
the range size, and nothing is left at the output prefix (or beside it) when a run fails.

Memory per document is bounded: a document longer than `max_document_bytes` (default 4 MiB) is
tokenized in pieces, cut at a line break, else after a sentence, else before a word, else between
characters, and its pieces' ids are joined into one document (counted as split in the summary and
the sidecar). The tokenizer's state (~110 bytes per byte with byte-level BPE) then grows with the
piece, not the document; the document's own text and ids are still held (a few bytes per byte).

Failures of the machine: SIGTERM unwinds like SIGINT (workers stopped, temporary files removed,
exit 143); a worker that dies (SIGKILL, out of memory) fails the run with a one-line error instead
of waiting forever; a full disk or an unwritable output directory is a one-line `UserError`; and a
run removes the shard directories that killed runs on this host left beside its output prefix.
"""
import contextlib
import itertools
import logging
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from data import segmenter as segmenters
from data.errors import UserError
from data.document_pieces import DEFAULT_MAX_DOCUMENT_BYTES, MIN_MAX_DOCUMENT_BYTES, pieces as document_pieces
from data.indexed import IndexedWriter, ShardWriter, bin_path, idx_path, token_dtype
from data.output_staging import make_shard_dir, write_error
from data.reading import (MAX_CHUNK_BYTES, MAX_EXAMPLES, MIN_CHUNK_BYTES, ReadOptions, _blank_line_docs, _Counts,
                          _documents, _kind, _LineError, _split_points, _stream_blocks, expand_inputs)
from data.static_masks import StaticMaskOptions, companion_writer
from data.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

BATCH_CHARS = 1 << 20  # text per encode_batch call: enough documents for the tokenizer's threads


# -- finding inputs -----------------------------------------------------------------------------


# -- cutting files at document boundaries ---------------------------------------------------------


# -- documents of a block -----------------------------------------------------------------------


def _encode_documents(tok: Tokenizer, texts: Iterable[str], max_bytes: int, counts: "_Counts",
                      segmenter=None) -> Iterator[tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]]:
    """(token ids, tokens per document, word-start flags or None) of the documents, a batch at a time;
    documents without tokens are left out and counted. A document longer than max_bytes is tokenized
    a piece at a time (`data.document_pieces`) and stays one document: its pieces' ids (and flags,
    each piece segmented on its own) are joined. The tokenizer's memory then grows with max_bytes
    (and BATCH_CHARS), not with the longest document. segmenter: a data.segmenter segmenter, whose
    flags (uint8, one per token) come third; None: no flags."""
    batch, size = [], 0
    for text in texts:
        pieces = document_pieces(text, max_bytes)
        if len(pieces) == 1:
            batch.append(text)
            size += len(text)
            if size < BATCH_CHARS:
                continue
        if batch:
            yield _encode_batch(tok, batch, counts, segmenter)
            batch, size = [], 0
        if len(pieces) > 1:
            counts.split += 1
            ids, flags = [], []
            while pieces:  # a piece is let go once tokenized
                piece_ids, _, piece_flags = _encode_flat(tok, [pieces.pop(0)], segmenter)
                ids.append(piece_ids)
                flags.append(piece_flags)
            joined = np.concatenate(ids)
            if len(joined):
                yield joined, np.array([len(joined)], np.int64), np.concatenate(flags) if segmenter else None
            else:
                counts.skipped["no tokens"] += 1
    if batch:
        yield _encode_batch(tok, batch, counts, segmenter)


def _encode_flat(tok: Tokenizer, texts: list[str], segmenter) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(all ids, tokens per text, all word-start flags or None) of `texts`."""
    if segmenter is None:
        return (*tok.encode_batch_flat(texts), None)
    encoded = tok.encode_batch_offsets(texts)
    flags = [segmenter.token_flags(text, begins, ends) for text, (_, begins, ends) in zip(texts, encoded)]
    lengths = np.fromiter((len(ids) for ids, _, _ in encoded), np.int64, len(encoded))
    ids = np.concatenate([ids for ids, _, _ in encoded]) if encoded else np.zeros(0, np.int32)
    return ids, lengths, np.concatenate(flags) if flags else np.zeros(0, np.uint8)


def _encode_batch(tok: Tokenizer, texts: list[str], counts: "_Counts",
                  segmenter=None) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    ids, lengths, flags = _encode_flat(tok, texts, segmenter)
    kept = lengths[lengths > 0]
    if len(kept) < len(lengths):
        counts.skipped["no tokens"] += len(lengths) - len(kept)
    return ids, kept, flags


# -- tokenizing (in workers) -----------------------------------------------------------------------

@dataclass
class _Task:
    path: str
    kind: str
    at_file_start: bool
    start: int  # byte range of a plain file, which the worker reads itself
    end: int
    data: Optional[bytes]  # or the block itself (gzip files, decompressed by the main process)
    disk_bytes: int  # bytes of the file on disk this task stands for (progress)
    shard: str  # prefix of the shard the worker writes


@dataclass
class _TaskResult:
    documents: int
    tokens: int
    newlines: int
    read_bytes: int
    counts: _Counts


_worker_tokenizer: Optional[Tokenizer] = None
_worker_options = ReadOptions()
_worker_max_document_bytes = DEFAULT_MAX_DOCUMENT_BYTES
_worker_segmenter = None  # a data.segmenter segmenter when word starts are written


def _init_worker(tokenizer_path: str, options: ReadOptions, threads: Optional[int],
                 max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES, word_segmenter: Optional[str] = None) -> None:
    """Load the tokenizer (and the word segmenter, once) in this process. threads: encode_batch's
    threads (None: all cores)."""
    global _worker_tokenizer, _worker_options, _worker_max_document_bytes, _worker_segmenter
    _worker_tokenizer = load_tokenizer(tokenizer_path)
    if threads is not None:  # one process per core already keeps the cores busy
        _worker_tokenizer.limit_threads(threads)
    _worker_options = options
    _worker_max_document_bytes = max_document_bytes
    _worker_segmenter = segmenters.load_segmenter(word_segmenter) if word_segmenter else None


def _run_task(task: _Task) -> _TaskResult:
    if task.data is not None:
        block = task.data
    else:
        try:
            with open(task.path, "rb") as f:
                f.seek(task.start)
                block = f.read(task.end - task.start)
        except OSError as err:
            raise UserError(f"{task.path}: cannot read ({err.strerror or err})") from None
    tok, segmenter, counts = _worker_tokenizer, _worker_segmenter, _Counts()
    documents = _documents(block, task.kind, _worker_options, task.at_file_start, counts)
    # the word starts' shard (when segmenting) holds one uint8 flag per token, documents as in the tokens' shard
    flag_shard = ShardWriter(f"{task.shard}{segmenters.WORD_STARTS_SUFFIX}", np.uint8) if segmenter else None
    with ShardWriter(task.shard, token_dtype(tok.vocab_size)) as shard, flag_shard or contextlib.nullcontext():
        for ids, lengths, flags in _encode_documents(tok, documents, _worker_max_document_bytes, counts, segmenter):
            shard.add(ids, lengths)
            if flag_shard is not None:
                assert len(flags) == len(ids), "a word-start flag per token"
                flag_shard.add(flags, lengths)
    return _TaskResult(shard.documents, shard.tokens, block.count(b"\n"), len(block), counts)


# -- the pipeline ------------------------------------------------------------------------------------

@dataclass
class PreprocessSummary:
    prefix: str
    files: int
    documents: int
    tokens: int
    skipped: dict = field(default_factory=dict)  # reason -> documents left out
    repaired: dict = field(default_factory=dict)  # reason -> documents kept after a repair
    read_bytes: int = 0
    dtype: str = ""
    seconds: float = 0.0
    workers: int = 1
    split: int = 0  # documents longer than max_document_bytes, tokenized in pieces (still one document)
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES
    static_masks: int = 0  # masked copies in PREFIX.static_masks.bin/.idx (data/static_masks.py)
    word_segmenter: Optional[str] = None  # word starts in PREFIX.wordstarts.bin/.idx (data/segmenter.py)


def available_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # the CPUs this process may use (containers, taskset)
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _tool_version() -> str:
    try:
        return metadata.version("encoder-pretrain")
    except metadata.PackageNotFoundError:
        return "unknown"


def _tasks(paths: Sequence[Path], options: ReadOptions, chunk_bytes: int, shard_dir: Path) -> Iterator[_Task]:
    """The input as tasks, in order: byte ranges of plain files, decompressed blocks of gzip files."""
    shards = (str(shard_dir / f"{n:08d}") for n in itertools.count())
    for path in paths:
        kind = _kind(path)
        blank = _blank_line_docs(kind, options)
        if path.name.endswith(".gz"):
            done = 0
            for block, disk_pos in _stream_blocks(path, blank, chunk_bytes):
                yield _Task(str(path), kind, done == 0, 0, 0, block, disk_pos - done, next(shards))
                done = disk_pos
        else:
            size = path.stat().st_size
            points = _split_points(path, size, blank, chunk_bytes) if size else []
            for start, end in zip(points, [*points[1:], size]):
                yield _Task(str(path), kind, start == 0, start, end, None, end - start, next(shards))


# -- signals and workers ---------------------------------------------------------------------------

@contextlib.contextmanager
def _machine_failures(output_prefix: Path) -> Iterator[None]:
    """SIGTERM ends preprocessing as SIGINT does, by an exception in the main thread, so that the
    workers are stopped and every temporary file removed on the way out (exit status 143). A worker
    that died and a full disk become one-line errors."""
    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the cleanup runs once, uninterrupted
        log.warning("SIGTERM: stopping and removing temporary files")
        raise SystemExit(128 + signal.SIGTERM)

    main_thread = threading.current_thread() is threading.main_thread()  # where handlers may be set
    previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
    try:
        yield
    except BrokenProcessPool:
        raise UserError(f"a preprocessing worker died (killed, or out of memory?); nothing was written to "
                        f"{output_prefix}; rerun, with fewer --workers or a smaller --max-document-bytes") from None
    except OSError as err:
        raise write_error(err, output_prefix) or err from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _init_pool_worker(*args) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    _init_worker(*args)


def _stop_workers(executor: ProcessPoolExecutor) -> None:
    """Stop the workers now, even mid-task, and wait for them: their shards may be removed after.
    (ProcessPoolExecutor offers no terminate before Python 3.14; its process table is the way.)"""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join()


def preprocess(
    inputs: Sequence[str | Path],
    tokenizer: str | Path,
    output_prefix: str | Path,
    workers: int = 1,
    json_key: str = "text",
    txt_docs: str = "line",
    strict: bool = False,
    skip_bad_lines: bool = False,
    chunk_bytes: Optional[int] = None,
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
    static_masks: StaticMaskOptions = StaticMaskOptions(),
    word_segmenter: Optional[str] = None,
) -> PreprocessSummary:
    """Tokenize every document of `inputs` into `output_prefix`.bin/.idx/.json (see the module docstring).

    workers=1 tokenizes in this process (the tokenizer's own threads run each batch on all cores);
    workers>1 starts that many processes, sharing the cores' threads between them. chunk_bytes: the
    size of the ranges files are cut into (default: enough for 4 per worker, 1-64 MiB).
    max_document_bytes: a longer document is tokenized in pieces of at most this many UTF-8 bytes
    (cut at a line break, else a sentence end, else a word, else a character) and its ids joined,
    so it stays one document while the tokenizer's memory is bounded by this size.
    static_masks.copies > 0: also write that many masked copies, PREFIX.static_masks.bin/.idx, from
    the finished dataset before anything is renamed into place (data/static_masks.py); whole-word
    static masks then take their words from the segmenter's flags when there are any.
    word_segmenter="jieba": also write each token's word-start flag (1 = begins a word) to
    PREFIX.wordstarts.bin/.idx, one uint8 sequence per document as long as its tokens, and record
    the segmenter under `word_starts` in PREFIX.json (data/segmenter.py).
    """
    start = time.perf_counter()
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if max_document_bytes < MIN_MAX_DOCUMENT_BYTES:
        raise UserError(f"--max-document-bytes must be at least {MIN_MAX_DOCUMENT_BYTES}, got {max_document_bytes}")
    options = ReadOptions(json_key=json_key, txt_docs=txt_docs, strict=strict, skip_bad_lines=skip_bad_lines)
    paths = expand_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    # loaded here too: a missing package is one error before any worker starts, and the version is recorded
    segmenter = segmenters.load_segmenter(word_segmenter) if word_segmenter else None
    output_prefix = Path(output_prefix)
    total_bytes = sum(p.stat().st_size for p in paths)
    if chunk_bytes is None:
        chunk_bytes = min(max(total_bytes // (4 * workers), MIN_CHUNK_BYTES), MAX_CHUNK_BYTES)
    log.info("tokenizing %d file(s), %.1f MB, with %s, %d worker(s)", len(paths), total_bytes / 1e6, tok, workers)

    shard_dir = make_shard_dir(output_prefix)
    executor, finished = None, False
    skipped, repaired, examples, read_bytes, split = Counter(), Counter(), [], 0, 0
    with _machine_failures(output_prefix):
        try:
            if workers > 1:
                threads = max(1, available_cpus() // workers)
                # spawn, not fork: the parent may hold Rust and OpenMP thread pools that fork would break
                executor = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _init_pool_worker,
                                               (str(tok.path), options, threads, max_document_bytes,
                                                word_segmenter))
                results = _ordered(executor, _tasks(paths, options, chunk_bytes, shard_dir), in_flight=2 * workers)
            else:
                _init_worker(str(tok.path), options, None, max_document_bytes, word_segmenter)
                results = ((task, _try(_run_task, task)) for task in _tasks(paths, options, chunk_bytes, shard_dir))
            with tqdm(total=total_bytes, desc="preprocess", unit="B", unit_scale=True, leave=False) as progress, \
                    IndexedWriter(output_prefix, tok.vocab_size) as writer:
                if segmenter:
                    writer.add_parallel(segmenters.WORD_STARTS_SUFFIX, np.uint8, segmenters.SIDECAR_KEY)
                path, lines_before = None, 0  # results come in input order: lines of the file before this task
                for task, result in results:
                    if task.path != path:
                        path, lines_before = task.path, 0
                    if isinstance(result, _LineError):
                        raise UserError(f"{path}:{lines_before + result.line}: {result.message}")
                    examples += [(path, lines_before + line, reason) for line, reason in result.counts.examples]
                    lines_before += result.newlines
                    writer.add_shard(task.shard, result.documents, result.tokens)
                    for shard in (task.shard, *([f"{task.shard}{segmenters.WORD_STARTS_SUFFIX}"] if segmenter else [])):
                        for suffix in (bin_path, idx_path):
                            suffix(shard).unlink()
                    skipped.update(result.counts.skipped)
                    repaired.update(result.counts.repaired)
                    split += result.counts.split
                    read_bytes += result.read_bytes
                    progress.update(task.disk_bytes)
                    elapsed = max(progress.format_dict["elapsed"], 1e-9)
                    progress.set_postfix_str(f"{writer.documents / elapsed:,.0f} doc/s, "
                                             f"{writer.tokens / elapsed / 1e6:.2f}M tok/s", refresh=False)
                if writer.documents == 0:
                    raise UserError(f"no documents in {', '.join(map(str, paths))} (skipped: {dict(skipped)}); "
                                    f"check the files, --json-key and --txt-docs")
                writer.sidecar = {
                    "tokenizer": {"path": str(tok.path), "fingerprint": tok.fingerprint(),
                                  "type": tok.type, "vocab_size": tok.vocab_size},
                    "inputs": [str(p) for p in paths],
                    "json_key": json_key,
                    "txt_docs": txt_docs,
                    "strict": strict,
                    "skip_bad_lines": skip_bad_lines,
                    "skipped": dict(sorted(skipped.items())),
                    "repaired": dict(sorted(repaired.items())),
                    "max_document_bytes": max_document_bytes,
                    "split_documents": split,
                    "tool": "preprocess_data",
                    "tool_version": _tool_version(),
                }
                if segmenter:
                    writer.sidecar[segmenters.SIDECAR_KEY] = segmenter.info()
                if static_masks.copies:
                    writer.companion = companion_writer(
                        tok, static_masks, segmenters.WORD_STARTS_SUFFIX if segmenter else None)
            finished = True
        finally:
            if executor is not None:
                executor.shutdown() if finished else _stop_workers(executor)
            shutil.rmtree(shard_dir, ignore_errors=True)
    for file, line, reason in examples[:MAX_EXAMPLES]:  # after the progress bar is gone
        log.warning("skipped %s:%d (%s)", file, line, reason)
    return PreprocessSummary(str(output_prefix), len(paths), writer.documents, writer.tokens,
                             dict(sorted(skipped.items())), dict(sorted(repaired.items())), read_bytes,
                             np.dtype(writer.dtype).name, time.perf_counter() - start, workers, split,
                             max_document_bytes, static_masks.copies, word_segmenter)


def _try(fn, task):
    """fn(task), or the _LineError it raised: the caller adds the line number of the task's start."""
    try:
        return fn(task)
    except _LineError as err:
        return err


def _ordered(executor: ProcessPoolExecutor, tasks: Iterator[_Task],
             in_flight: int) -> Iterator[tuple[_Task, object]]:
    """(task, result or _LineError) in task order, at most `in_flight` tasks queued: a gzip file is
    not decompressed into memory faster than the workers tokenize it. A worker that dies (SIGKILL,
    out of memory) raises BrokenProcessPool here rather than leaving its result to wait forever."""
    pending: deque = deque()
    for task in tasks:
        pending.append((task, executor.submit(_try, _run_task, task)))
        if len(pending) >= in_flight:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()
