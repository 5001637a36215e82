"""Loader throughput: masked, collated tokens per second in one loader process (one core).

    python bench/loader.py                          # seq 512, batch 32, BPE, whole-word masking off and on
    python bench/loader.py --packing doc_sentences --max-span 3 --seconds 5

The demo corpus of docstrings is tokenized with a byte-level BPE (both built here, kept in --work-dir)
and preprocessed to an IndexedDataset. Per setting, side by side in this process, on one thread:
- ours: `PretrainLoader.next_step()` with no workers (the work a loader worker does): sample
  indices, reading the memory-mapped tokens, packing, per-batch masking, collation to tensors;
- peer: Hugging Face `DataCollatorForLanguageModeling` (`whole_word_mask=True` for the whole-word
  setting, given offsets and special-token masks that mark our word starts, since it finds words by
  offsets) collating the same samples, their token ids already in memory as lists (its usual input).

Tokens are the real (non-padding) positions of the collated batches. Medians over --repeats. The last
line per setting is the result:
    RESULT loader wwm=off packing=full_sentences tok_s=2.9e6 ratio_vs_hf=4.1      (target tok_s >= 1e6)
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--packing", choices=("full_sentences", "doc_sentences"), default="full_sentences")
    parser.add_argument("--max-span", type=int, default=1)
    parser.add_argument("--corpus-mb", type=float, default=4.0)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", default=None, help="keeps corpus, tokenizer and data between runs")
    return parser.parse_args()


def prepare(work: Path, corpus_mb: float, vocab_size: int):
    from data.preprocess import preprocess
    from data.tokenizer import load_tokenizer
    from data.tokenizer_train import train_bpe
    from tools.build_demo_corpus import build_demo_corpus

    corpus, tok_dir, prefix = work / "corpus.jsonl", work / "bpe", work / "bin" / "corpus"
    if not corpus.is_file():
        build_demo_corpus(corpus, max_mb=corpus_mb)
    if not (tok_dir / "tokenizer.json").is_file():
        train_bpe([corpus], vocab_size, tok_dir)
    if not Path(f"{prefix}.json").is_file():
        preprocess([corpus], tok_dir, prefix, workers=1)
    return load_tokenizer(tok_dir), prefix


def measure(fn, seconds: float) -> float:
    """Tokens per second of repeated fn() (which returns its tokens) for about `seconds`."""
    fn()  # warm up
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += fn()
    return tokens / (time.perf_counter() - start)


def main():
    args = parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    from data.blending import SampleStream
    from data.indexed import open_indexed
    from data.loader import MaskedSamples, PretrainLoader
    from data.masking import MaskingRecipe
    from data.packing import build_packed

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        tokenizer, prefix = prepare(work, args.corpus_mb, args.vocab_size)
        dataset = open_indexed(prefix)
        packed = build_packed(args.packing, dataset, 0, len(dataset.document_indices) - 1, args.seq_length,
                              tokenizer.bos_id, tokenizer.eos_id)
        stream = SampleStream([packed], seed=1)
        hf = AutoTokenizer.from_pretrained(str(tokenizer.path))
        starts = tokenizer.word_start_ids()
        print(f"corpus: {len(dataset)} documents, {len(packed)} samples of <= {args.seq_length} tokens "
              f"({args.packing}), batch {args.batch}, vocabulary {tokenizer.vocab_size}", flush=True)
        for wwm in (False, True):
            recipe = MaskingRecipe(mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                                   special_ids=tuple(tokenizer.special_ids), word_starts=starts if wwm else None,
                                   max_span=args.max_span)
            samples = MaskedSamples(stream, recipe, args.seq_length, tokenizer.pad_id, seed=1)
            loader = PretrainLoader(samples, args.batch, args.batch, 0, 1)

            def ours():
                (batch,) = loader.next_step()
                return int((batch["attention_mask"] != 0).sum())

            # the peer's input: the same samples' ids as lists, with offsets that put a gap before each word start
            examples = []
            for g in range(min(len(packed), 64 * args.batch)):
                corpus, sample = stream.locate([g])
                ids = stream.tokens(int(corpus[0]), int(sample[0]))
                special = np.isin(ids, tokenizer.special_ids)
                begin = np.cumsum(starts[ids] | special) * 2 + np.arange(len(ids))
                pad = args.seq_length - len(ids)  # padded here: HF's tokenizer.pad cannot pad offsets
                example = {"input_ids": ids.tolist() + [tokenizer.pad_id] * pad}
                if wwm:
                    example["offset_mapping"] = np.stack([begin, begin + 1], 1).tolist() + [[0, 0]] * pad
                    example["special_tokens_mask"] = special.astype(int).tolist() + [1] * pad
                examples.append(example)
            collator = DataCollatorForLanguageModeling(hf, mlm_probability=0.15, whole_word_mask=wwm,
                                                       pad_to_multiple_of=args.seq_length)
            position = [0]

            def peer():
                i = position[0]
                position[0] = (i + args.batch) % (len(examples) - args.batch)
                batch = collator(examples[i:i + args.batch])
                return int((batch["input_ids"] != hf.pad_token_id).sum())

            rates = []
            for _ in range(args.repeats):
                rates.append((measure(ours, args.seconds), measure(peer, args.seconds)))
            ours_rate = statistics.median(r[0] for r in rates)
            peer_rate = statistics.median(r[1] for r in rates)
            name = "wwm=on" if wwm else "wwm=off"
            print(f"{name}: ours {ours_rate / 1e6:.2f}M tok/s, HF DataCollatorForLanguageModeling"
                  f"{'(whole_word_mask)' if wwm else ''} {peer_rate / 1e6:.2f}M tok/s", flush=True)
            print(f"RESULT loader {name} packing={args.packing} max_span={args.max_span} seq={args.seq_length} "
                  f"tok_s={ours_rate:.3g} ratio_vs_hf={ours_rate / peer_rate:.2f}", flush=True)


if __name__ == "__main__":
    main()
