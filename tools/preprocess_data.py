"""Tokenize raw text into a megatron-core indexed dataset (PREFIX.bin + PREFIX.idx + PREFIX.json).

    python tools/preprocess_data.py --input 'corpus/*.jsonl' --tokenizer tok/ --output-prefix bin/corpus --workers 8

Each document (a .jsonl line's --json-key field, a .txt line, or with --txt-docs blank-line a .txt
paragraph) becomes one sequence of token ids without special tokens. Invalid UTF-8 is replaced and
NUL characters stripped (--strict rejects both); empty documents are skipped; a malformed JSON line
or a missing key stops the run with file:line (--skip-bad-lines skips it). The summary counts every
skipped or repaired document by reason; the sidecar PREFIX.json records them and the tokenizer.
Workers share even a single file (it is cut into byte ranges); the output does not depend on --workers.
"""
import argparse
from typing import Optional, Sequence

from data.preprocess import TXT_DOCS, available_cpus, preprocess
from tools._cli import run_cli


def _counts(counts: dict) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.items()) or "none"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="files, directories or quoted globs")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory from tools/train_tokenizer.py")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    parser.add_argument("--workers", type=int, default=available_cpus(),
                        help="tokenizing processes; default: the CPUs available")
    parser.add_argument("--json-key", default="text", help="field holding the text in .jsonl inputs")
    parser.add_argument("--txt-docs", choices=TXT_DOCS, default="line",
                        help=".txt documents: one per line, or separated by blank lines")
    parser.add_argument("--strict", action="store_true", help="reject invalid UTF-8 and NUL characters")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip and count malformed JSON lines and missing keys instead of failing")
    args = parser.parse_args(argv)

    s = preprocess(args.input, args.tokenizer, args.output_prefix, workers=args.workers, json_key=args.json_key,
                   txt_docs=args.txt_docs, strict=args.strict, skip_bad_lines=args.skip_bad_lines)
    print(f"wrote {s.prefix}.bin/.idx/.json: {s.documents} documents, {s.tokens} tokens ({s.dtype}) "
          f"from {s.files} file(s), {s.read_bytes / 1e6:.1f} MB, in {s.seconds:.1f} s with {s.workers} worker(s) "
          f"({s.tokens / max(s.seconds, 1e-9) / 1e6:.2f}M tokens/s, startup included)\n"
          f"skipped: {_counts(s.skipped)}\nrepaired: {_counts(s.repaired)}")
    return 0


if __name__ == "__main__":
    run_cli(main)
