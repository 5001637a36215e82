"""Preprocessing throughput against the raw tokenizer on the same text and the same CPU budget.

    python bench/preprocess.py                      # both tokenizers, --workers = the CPUs available
    python bench/preprocess.py --tokenizer spm --workers 2 --repeats 5

For each tokenizer (byte-level BPE, SentencePiece Unigram; both trained here on the demo corpus of
docstrings) and each repeat, side by side in this one process:
- raw: the documents already in memory, tokenized by the library itself with `--workers` threads, in
  batches of 1 MiB of text: `tokenizers` `encode_batch_fast` (ids read out), or `sentencepiece`
  `encode(num_threads=...)` returning numpy arrays or lists (whichever is faster);
- preprocess: `data.preprocess.preprocess` with `--workers` processes, from the .jsonl file on disk
  to the merged .bin/.idx. Its steady-state rate is measured by difference: a corpus and its first
  quarter, (tokens_full - tokens_quarter) / (seconds_full - seconds_quarter), so that the fixed
  costs (spawning workers, loading the tokenizer, the final merge) cancel. The corpus is the demo
  corpus repeated until the raw pass takes --min-raw-seconds, so that differences are not noise;
- startup: tools/preprocess_data.py as a fresh process on a one-document input (imports, megatron-core
  included, spawning the workers, writing the output), reported separately.

Medians over the repeats. The last line per tokenizer is the result:
    RESULT preprocess_bpe workers=2 tok_ratio=0.85        (steady-state preprocess / raw; target >= 0.8)

    python bench/preprocess.py --segmenter jieba [--workers 2 --repeats 3 --zh-documents 4000]

measures `--word-segmenter jieba` instead, on Chinese text (tools/build_zh_corpus.py's generated
documents, a BPE trained on them), one run, in characters per second of the same text:
- jieba alone: `jieba.lcut` over the documents in `--workers` processes (jieba loaded beforehand);
- preprocess with the segmenter, and without it, both at their steady rate (difference of the corpus
  and its first quarter, as above).
    RESULT preprocess_segmenter_jieba workers=2 vs_jieba=0.80 vs_plain=0.20
(vs_jieba: with-segmenter preprocess / jieba alone; vs_plain: with / without the segmenter.)
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args():
    from data.preprocess import available_cpus

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", choices=("bpe", "spm", "both"), default="both")
    parser.add_argument("--workers", type=int, default=available_cpus())
    parser.add_argument("--corpus-mb", type=float, default=8.0, help="size of the demo corpus to build")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-raw-seconds", type=float, default=2.0, help="repeat the corpus until raw takes this long")
    parser.add_argument("--work-dir", default=None, help="keeps corpus and tokenizers between runs (default: temporary)")
    parser.add_argument("--segmenter", choices=("jieba",), default=None,
                        help="measure preprocessing with this word segmenter on Chinese text instead")
    parser.add_argument("--zh-documents", type=int, default=4000, help="generated Chinese documents (--segmenter)")
    return parser.parse_args()


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def raw_tokenize(kind: str, tok_dir: Path, texts: list[str], workers: int):
    """Functions that tokenize `texts` with the bare library and return the number of tokens.

    The texts go in batches of about 1 MiB, as in the workers (data.preprocess.BATCH_CHARS): one call
    on the whole corpus is slower (it holds every result at once), which would flatter preprocessing."""
    from data.preprocess import BATCH_CHARS

    batches, batch, size = [], [], 0
    for text in texts:  # as data.preprocess._encode_documents groups them
        batch.append(text)
        size += len(text)
        if size >= BATCH_CHARS:
            batches.append(batch)
            batch, size = [], 0
    if batch:
        batches.append(batch)
    if kind == "bpe":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))  # pool sized by RAYON_NUM_THREADS

        def run():
            return sum(len(e.ids) for batch in batches for e in tok.encode_batch_fast(batch, add_special_tokens=False))
        return {"encode_batch_fast": run}
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tok_dir / "spm.model"))
    return {"encode numpy": lambda: sum(len(ids) for batch in batches
                                        for ids in sp.encode(batch, num_threads=workers, return_type="numpy")),
            "encode lists": lambda: sum(len(ids) for batch in batches for ids in sp.encode(batch, num_threads=workers))}


def cli_startup(tok_dir: Path, work: Path, workers: int) -> float:
    tiny = work / "tiny.jsonl"
    tiny.write_text(json.dumps({"text": "one short document"}) + "\n")
    seconds, _ = timed(subprocess.run, [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input",
                                        str(tiny), "--tokenizer", str(tok_dir), "--output-prefix",
                                        str(work / "out" / "tiny"), "--workers", str(workers)],
                       check=True, capture_output=True)
    return seconds


def bench(kind: str, tok_dir: Path, base: Path, work: Path, args) -> None:
    from data.preprocess import preprocess

    with open(base, encoding="utf-8") as f:
        lines = f.readlines()
    texts = [json.loads(line)["text"] for line in lines]
    seconds, _ = timed(next(iter(raw_tokenize(kind, tok_dir, texts, args.workers).values())))
    scale = max(1, math.ceil(args.min_raw_seconds / seconds))
    texts *= scale
    corpus, quarter = work / f"{kind}-corpus.jsonl", work / f"{kind}-quarter.jsonl"
    corpus.write_text("".join(lines * scale), encoding="utf-8")
    quarter.write_text("".join((lines * scale)[:len(lines) * scale // 4]), encoding="utf-8")

    raw_modes = raw_tokenize(kind, tok_dir, texts, args.workers)
    preprocess([base], tok_dir, work / "out" / "warm", workers=args.workers)  # imports megatron-core once
    rows = []
    for _ in range(args.repeats):
        raw = {mode: timed(fn) for mode, fn in raw_modes.items()}
        t_full, full = timed(preprocess, [corpus], tok_dir, work / "out" / "full", workers=args.workers)
        t_quarter, part = timed(preprocess, [quarter], tok_dir, work / "out" / "quarter", workers=args.workers)
        rows.append({"raw": {mode: n / s for mode, (s, n) in raw.items()},
                     "steady": (full.tokens - part.tokens) / (t_full - t_quarter),
                     "end_to_end": full.tokens / t_full, "tokens": full.tokens})
    startup = statistics.median(cli_startup(tok_dir, work, args.workers) for _ in range(3))

    raw_rates = {mode: statistics.median(r["raw"][mode] for r in rows) for mode in raw_modes}
    best_mode = max(raw_rates, key=raw_rates.get)
    steady = statistics.median(r["steady"] for r in rows)
    end_to_end = statistics.median(r["end_to_end"] for r in rows)
    size_mb = corpus.stat().st_size / 1e6
    print(f"\n{kind}: {len(texts)} documents ({scale}x the demo corpus), {size_mb:.1f} MB, "
          f"{rows[0]['tokens'] / 1e6:.2f}M tokens, workers={args.workers}, {args.repeats} repeats (medians)")
    for mode, rate in raw_rates.items():
        print(f"  raw {mode:<18} {rate / 1e6:6.2f}M tok/s{'  <- peer' if mode == best_mode else ''}")
    print(f"  preprocess steady      {steady / 1e6:6.2f}M tok/s  (difference of the corpus and its first quarter)")
    print(f"  preprocess end-to-end  {end_to_end / 1e6:6.2f}M tok/s  (one call on the corpus, imports already done)")
    print(f"  CLI startup            {startup:6.2f} s        (fresh process, one-document input)")
    print(f"RESULT preprocess_{kind} workers={args.workers} tok_ratio={steady / raw_rates[best_mode]:.2f}")


_jieba = None


def _jieba_worker_init():
    global _jieba
    from data.segmenter import load_segmenter

    _jieba = load_segmenter("jieba")._jieba  # imported, logging quiet, dictionary loaded


def _lcut_chars(texts: list[str]) -> int:
    return sum(len(w) for t in texts for w in _jieba.lcut(t))


def steady_rate(run, corpus: Path, quarter: Path, chars_full: int, chars_quarter: int) -> float:
    """Characters per second of preprocessing at its steady rate: the difference of two runs."""
    t_full, _ = timed(run, corpus)
    t_quarter, _ = timed(run, quarter)
    return (chars_full - chars_quarter) / (t_full - t_quarter)


def bench_segmenter(args, work: Path) -> None:
    import multiprocessing
    import random

    from data.preprocess import preprocess
    from data.tokenizer_train import train_bpe
    from tools.build_zh_corpus import build_documents

    texts = build_documents(random.Random(0), args.zh_documents)
    corpus, quarter = work / "zh-corpus.jsonl", work / "zh-quarter.jsonl"
    lines = [json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts]
    corpus.write_text("".join(lines), encoding="utf-8")
    quarter.write_text("".join(lines[:len(lines) // 4]), encoding="utf-8")
    chars_full, chars_quarter = sum(map(len, texts)), sum(map(len, texts[:len(texts) // 4]))
    tok_dir = work / "tok-zh-bpe"
    if not (tok_dir / "tokenizer_meta.json").exists():
        train_bpe([corpus], min(args.vocab_size, 4000), tok_dir)
    out = work / "out"
    preprocess([quarter], tok_dir, out / "warm", workers=args.workers, word_segmenter=args.segmenter)  # imports

    pieces = 8 * args.workers  # enough to share between the processes
    batches = [texts[i::pieces] for i in range(pieces)]
    rows = []
    with multiprocessing.get_context("spawn").Pool(args.workers, _jieba_worker_init) as pool:
        pool.map(_lcut_chars, batches[:args.workers])  # warm
        for _ in range(args.repeats):
            seconds, chars = timed(lambda: sum(pool.map(_lcut_chars, batches, chunksize=1)))
            assert chars == chars_full
            seg = steady_rate(lambda p: preprocess([p], tok_dir, out / "seg", workers=args.workers,
                                                   word_segmenter=args.segmenter),
                              corpus, quarter, chars_full, chars_quarter)
            plain = steady_rate(lambda p: preprocess([p], tok_dir, out / "plain", workers=args.workers),
                                corpus, quarter, chars_full, chars_quarter)
            rows.append((chars / seconds, seg, plain))
    jieba_rate, seg, plain = (statistics.median(r[i] for r in rows) for i in range(3))
    print(f"\n{args.segmenter}: {len(texts)} Chinese documents, {corpus.stat().st_size / 1e6:.1f} MB, "
          f"{chars_full / 1e6:.2f}M characters, workers={args.workers}, {args.repeats} repeats (medians)")
    print(f"  {args.segmenter}.lcut alone         {jieba_rate / 1e6:6.3f}M char/s  <- peer")
    print(f"  preprocess + segmenter   {seg / 1e6:6.3f}M char/s  (steady: difference of the corpus and its quarter)")
    print(f"  preprocess, no segmenter {plain / 1e6:6.3f}M char/s")
    print(f"RESULT preprocess_segmenter_{args.segmenter} workers={args.workers} vs_jieba={seg / jieba_rate:.2f} "
          f"vs_plain={seg / plain:.2f}")


def main():
    args = parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)  # the raw BPE peer's thread budget
    if args.segmenter:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.work_dir or tmp)
            work.mkdir(parents=True, exist_ok=True)
            bench_segmenter(args, work)
        return
    from data.tokenizer_train import train_bpe, train_spm
    from tools.build_demo_corpus import build_demo_corpus

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus = work / f"corpus-{args.corpus_mb:g}mb.jsonl"
        if not corpus.exists():
            build_demo_corpus(corpus, max_mb=args.corpus_mb)
        kinds = ("bpe", "spm") if args.tokenizer == "both" else (args.tokenizer,)
        for kind in kinds:
            tok_dir = work / f"tok-{kind}-{args.vocab_size}"
            if not (tok_dir / "tokenizer_meta.json").exists():
                train = train_bpe if kind == "bpe" else train_spm
                train([corpus], args.vocab_size, tok_dir)
            bench(kind, tok_dir, corpus, work, args)


if __name__ == "__main__":
    main()
