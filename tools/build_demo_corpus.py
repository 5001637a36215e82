"""Build the embedded demo corpus: prose docstrings of the installed Python packages, as JSONL.

    python tools/build_demo_corpus.py --output corpus/demo.jsonl [--max-mb 8] [--min-chars 200]

Every installation carries a few megabytes of English prose in its docstrings, so the demo
pipeline needs no download. Files are parsed with `ast` (never imported), walked in sorted path
order and deduplicated exactly, so the corpus is the same on every run of one installation.
"""
import argparse
import ast
import hashlib
import inspect
import json
import logging
import os
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from tqdm import tqdm

from data.errors import UserError
from trainer.core.cli import run_cli

log = logging.getLogger(__name__)

# Test suites hold fixtures and generated strings rather than prose; `site-packages` inside the
# standard library is walked through its own root (purelib) when it is the active one.
SKIPPED_DIRS = frozenset({"test", "tests", "testing", "idle_test", "__pycache__", "site-packages", "dist-packages"})
DOCSTRING_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
MIN_PROSE_RATIO = 0.8  # letters + whitespace; doctest-heavy and table-like docstrings fall below


@dataclass
class CorpusSummary:
    documents: int
    bytes: int
    files_scanned: int
    files_skipped: int  # could not be decoded or parsed
    seconds: float


def default_roots() -> list[Path]:
    """The running interpreter's standard library and site-packages (purelib and platlib)."""
    paths = sysconfig.get_paths()
    roots = []
    for key in ("stdlib", "purelib", "platlib"):
        root = Path(paths[key])
        if root.is_dir() and root not in roots:
            roots.append(root)
    return roots


def source_files(roots: Iterable[Path]) -> list[Path]:
    """All .py files under the roots outside test directories, deduplicated and sorted."""
    files = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
            files.update(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files)


def file_docstrings(path: Path) -> Optional[list[str]]:
    """Cleaned module, class and function docstrings of one file; None if it does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old code warn on parse
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError):
        return None
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, DOCSTRING_NODES):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                docs.append(inspect.cleandoc(doc).strip())
    return docs


def looks_like_prose(text: str, min_chars: int) -> bool:
    if len(text) < min_chars:
        return False
    prose = sum(c.isalpha() or c.isspace() for c in text)
    return prose >= MIN_PROSE_RATIO * len(text)


def _dedup_key(text: str) -> bytes:
    return hashlib.sha1(" ".join(text.split()).encode("utf-8", "surrogatepass")).digest()


def iter_documents(files: Sequence[Path], min_chars: int, stats: dict) -> Iterator[str]:
    """Prose docstrings in file order, each once. Counts scanned/skipped files into `stats`."""
    seen = set()
    with tqdm(files, desc="docstrings", unit="file", leave=False) as progress:
        for path in progress:
            stats["files_scanned"] += 1
            docs = file_docstrings(path)
            if docs is None:
                stats["files_skipped"] += 1
                continue
            for doc in docs:
                if not looks_like_prose(doc, min_chars):
                    continue
                key = _dedup_key(doc)
                if key not in seen:
                    seen.add(key)
                    yield doc


def build_demo_corpus(
    output: str | Path,
    max_mb: float = 8.0,
    min_chars: int = 200,
    roots: Optional[Iterable[Path]] = None,
) -> CorpusSummary:
    """Write `{"text": docstring}` lines to `output` until the next one would pass `max_mb` (10^6 bytes)."""
    start = time.perf_counter()
    if max_mb <= 0:
        raise UserError(f"--max-mb must be positive, got {max_mb}")
    output = Path(output)
    if output.is_dir():
        raise UserError(f"--output {output} is a directory; give a file path such as {output}/demo.jsonl")
    roots = [Path(r) for r in (roots if roots is not None else default_roots())]
    cap = int(max_mb * 1_000_000)
    stats = {"files_scanned": 0, "files_skipped": 0}
    documents = written = 0

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            files = source_files(roots)
            log.info("reading docstrings of up to %d files under %s", len(files), ", ".join(map(str, roots)))
            docs = iter_documents(files, min_chars, stats)
            for doc in docs:
                try:
                    line = (json.dumps({"text": doc}, ensure_ascii=False) + "\n").encode("utf-8")
                except UnicodeEncodeError:  # lone surrogates written as escapes in a docstring
                    continue
                if written + len(line) > cap:
                    docs.close()
                    break
                f.write(line)
                written += len(line)
                documents += 1
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates it private; make it an ordinary file
        os.replace(tmp, output)
    except BaseException:
        os.unlink(tmp)
        raise
    return CorpusSummary(documents, written, stats["files_scanned"], stats["files_skipped"],
                         time.perf_counter() - start)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSONL file to write, e.g. corpus/demo.jsonl")
    parser.add_argument("--max-mb", type=float, default=8.0, help="size cap in MB (10^6 bytes); default 8")
    parser.add_argument("--min-chars", type=int, default=200, help="shortest docstring kept; default 200")
    args = parser.parse_args(argv)
    s = build_demo_corpus(args.output, max_mb=args.max_mb, min_chars=args.min_chars)
    print(f"wrote {args.output}: {s.documents} documents, {s.bytes / 1e6:.2f} MB, "
          f"{s.files_scanned} files scanned ({s.files_skipped} unparsable), {s.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    run_cli(main)
