"""Tokenize raw text into a megatron-core indexed dataset (PREFIX.bin + PREFIX.idx + PREFIX.json).

    python tools/preprocess_data.py --input 'corpus/*.jsonl' --tokenizer tok/ --output-prefix bin/corpus --workers 8

Each document (a .jsonl line's --json-key field, or a .txt line) becomes one sequence of token
ids without special tokens. The sidecar PREFIX.json records the tokenizer for the trainer.
"""
import argparse
from typing import Optional, Sequence

from data.preprocess import available_cpus, preprocess
from tools._cli import run_cli


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="files, directories or quoted globs")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory from tools/train_tokenizer.py")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    parser.add_argument("--workers", type=int, default=available_cpus(),
                        help="tokenizing processes; default: the CPUs available")
    parser.add_argument("--json-key", default="text", help="field holding the text in .jsonl inputs")
    args = parser.parse_args(argv)

    s = preprocess(args.input, args.tokenizer, args.output_prefix, workers=args.workers, json_key=args.json_key)
    skipped = ", ".join(f"{n} {reason}" for reason, n in s.skipped.items()) or "none"
    print(f"wrote {s.prefix}.bin/.idx/.json: {s.documents} documents, {s.tokens} tokens ({s.dtype}) "
          f"from {s.files} file(s), {s.read_bytes / 1e6:.1f} MB, in {s.seconds:.1f} s "
          f"({s.tokens / max(s.seconds, 1e-9) / 1e6:.2f}M tokens/s); skipped: {skipped}")
    return 0


if __name__ == "__main__":
    run_cli(main)
