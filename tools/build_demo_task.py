"""Build a small labelled task from the demo corpus: which library does a docstring come from?

    python tools/build_demo_task.py --corpus demo/corpus/demo.jsonl --output demo/task [--num-classes 4]

The demo corpus (tools/build_demo_corpus.py) keeps only the text. This tool walks the same source
files in the same order, finds each corpus docstring again (by the corpus builder's dedup key)
and labels it with its top-level package (`email`, `asyncio`, `numpy`, ...: the first path
component under the stdlib or site-packages root). The `--num-classes` libraries with the most
docstrings are kept, balanced to the same number of examples each, and split by a hash of the
text into train.tsv and validation.tsv with GLUE's columns `sentence` and `label`, so the
fine-tuning recipes read them as they read GLUE. A model must tell the libraries apart from
vocabulary and style alone: a task the demo's tiny pretrained model can learn in a minute.
"""
import argparse
import hashlib
import logging
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from data.errors import UserError
from data.jsonio import read_jsonl_texts
from data.tasks import write_sentence_tsv
from trainer.core.cli import run_cli
from tools.build_demo_corpus import _dedup_key, default_roots, file_docstrings, source_files

log = logging.getLogger(__name__)


def library_of(path: Path, roots: Sequence[Path]) -> str:
    """Top-level package (or module) of a source file under one of the roots."""
    for root in roots:
        try:
            first = path.relative_to(root).parts[0]
        except ValueError:
            continue
        return first[:-3] if first.endswith(".py") else first
    return path.parent.name


def corpus_libraries(corpus: Path, roots: Optional[Iterable[Path]] = None) -> Dict[str, List[str]]:
    """library -> the corpus docstrings found in its files (each docstring once, corpus order kept)."""
    if not corpus.is_file():
        raise UserError(f"--corpus {corpus} does not exist; build it with tools/build_demo_corpus.py")
    texts: Dict[bytes, str] = {}
    for _, text in read_jsonl_texts(corpus):
        texts.setdefault(_dedup_key(text), text)
    roots = [Path(r) for r in (roots if roots is not None else default_roots())]
    found: Dict[str, List[str]] = defaultdict(list)
    remaining = set(texts)
    for path in source_files(roots):
        if not remaining:
            break  # the corpus is a prefix of the walk: stop where its builder stopped
        for doc in file_docstrings(path) or ():
            key = _dedup_key(doc)
            if key in remaining:
                remaining.discard(key)
                found[library_of(path, roots)].append(texts[key])
    if remaining:
        log.warning("%d corpus docstrings were not found under %s (another installation?)", len(remaining),
                    ", ".join(map(str, roots)))
    return found


def one_line(text: str, max_chars: int) -> str:
    """Whitespace collapsed (a TSV field holds no tab or newline), cut at a word boundary."""
    text = " ".join(text.split())
    return text if len(text) <= max_chars else text[:max_chars].rsplit(" ", 1)[0]


def build_demo_task(corpus: str | Path, output: str | Path, num_classes: int = 4, per_class: int = 300,
                    validation_fraction: float = 0.2, max_chars: int = 400,
                    roots: Optional[Iterable[Path]] = None) -> Dict:
    """Writes output/train.tsv and output/validation.tsv; returns a summary (classes, sizes)."""
    if num_classes < 2:
        raise UserError(f"--num-classes must be at least 2, got {num_classes}")
    if not 0 < validation_fraction < 1:
        raise UserError(f"--validation-fraction must be in (0, 1), got {validation_fraction}")
    found = corpus_libraries(Path(corpus), roots)
    ranked = sorted(found, key=lambda lib: (-len(found[lib]), lib))[:num_classes]
    if len(ranked) < num_classes:
        raise UserError(f"{corpus}: docstrings of only {len(ranked)} libraries; lower --num-classes")
    size = min(per_class, min(len(found[lib]) for lib in ranked))
    splits: Dict[str, List[str]] = {"train": [], "validation": []}
    for lib in sorted(ranked):
        for text in found[lib][:size]:
            line = one_line(text, max_chars)
            bucket = int.from_bytes(hashlib.sha1(line.encode()).digest()[:4], "big") / 2**32
            splits["validation" if bucket < validation_fraction else "train"].append(f"{line}\t{lib}\n")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        # ordered by the hash (not by class), so the file's head is no sample of one class
        rows.sort(key=lambda row: hashlib.sha1(row.encode()).digest())
        write_sentence_tsv(output / f"{name}.tsv", rows)
    return {"classes": sorted(ranked), "per_class": size, "train": len(splits["train"]),
            "validation": len(splits["validation"])}


def main(argv: Optional[Sequence[str]] = None) -> int:
    # Alike in shape to build_word_order_task.main (argparse lines), intentionally: each task tool owns its flags.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="the demo corpus JSONL (tools/build_demo_corpus.py)")
    parser.add_argument("--output", required=True, help="directory for train.tsv and validation.tsv")
    parser.add_argument("--num-classes", type=int, default=4, help="libraries to tell apart; default 4")
    parser.add_argument("--per-class", type=int, default=300, help="examples per library at most; default 300")
    parser.add_argument("--validation-fraction", type=float, default=0.2, help="default 0.2")
    parser.add_argument("--max-chars", type=int, default=400, help="characters kept per docstring; default 400")
    args = parser.parse_args(argv)
    s = build_demo_task(args.corpus, args.output, args.num_classes, args.per_class, args.validation_fraction,
                        args.max_chars)
    print(f"wrote {args.output}/train.tsv ({s['train']}) and validation.tsv ({s['validation']}): "
          f"{len(s['classes'])} libraries ({', '.join(s['classes'])}), {s['per_class']} docstrings each")
    return 0


if __name__ == "__main__":
    run_cli(main)
