"""Real (non-padding) tokens per second of full training steps with data.packing=packed_documents
against doc_sentences (one document a row, padded) and full_sentences (contiguous text across documents).

    .venv/bin/python bench/packing.py [--model roberta] [--size xsmall] [--seq 128,512] [--tokens 2048]
        [--steps 3] [--warmup 1] [--repeats 3] [--threads 1] [--corpus-mb 2] [--work-dir DIR]

Data: the embedded demo corpus (tools/build_demo_corpus.py: docstrings, most of them far shorter
than a row), tokenized with a byte-level BPE and preprocessed (both built here, kept in --work-dir),
so the document lengths are real ones. Each mode is packed at the sequence length and collated by
the trainer's own loader (data/loader.py: dynamic 15% masking, rows padded to a multiple of 8, the
data default), --tokens / seq rows per step, the first --steps steps of the run's stream.

Model: the registry's `--model` at `--size` (vocabulary from the tokenizer), one AdamW; a step is
forward, backward, optimizer step, zero_grad, on the host. The modes alternate every repeat so that
machine noise hits all; after --warmup steps per mode, each repeat times --steps steps of each mode;
tok/s = real tokens of those steps / their time, median over repeats. Batches are built before
timing: the figure is the model's, the loader's speed is bench/loader.py's.

Packing efficiency = real tokens / row tokens (B x W) of the timed batches (the loader's
last_step_packing_efficiency). The model gets the ids in attention_mask as the trainer gives them:
its cost of keeping attention and positions inside each document is part of the figure.

Last line per sequence length (ratio = packed_documents / doc_sentences real tokens/s; target >= 1.3):
    RESULT packing model=roberta-xsmall seq=512 ratio=3.1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("packed_documents", "doc_sentences", "full_sentences")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="roberta", help="registry name (roberta, deberta, electra, deberta_v3)")
    parser.add_argument("--size", default="xsmall")
    parser.add_argument("--seq", default="512", help="comma-separated sequence lengths")
    parser.add_argument("--tokens", type=int, default=2048, help="row tokens per step (rows = tokens // seq)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode per repeat")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--corpus-mb", type=float, default=2.0)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--work-dir", default=None, help="keeps corpus, tokenizer and data between runs")
    return parser.parse_args()


def mode_batches(mode: str, dataset, tokenizer, seq: int, rows: int, steps: int):
    """(micro-batches of the first `steps` steps, their packing efficiency, efficiency of all rows unbatched)."""
    from data.blending import SampleStream
    from data.loader import MaskedSamples, PretrainLoader
    from data.masking import MaskingRecipe
    from data.packing import build_packed

    packed = build_packed(mode, dataset, 0, len(dataset.document_indices) - 1, seq, tokenizer.bos_id,
                          tokenizer.eos_id)
    recipe = MaskingRecipe(mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                           special_ids=tuple(tokenizer.special_ids))
    samples = MaskedSamples(SampleStream([packed], seed=1), recipe, seq, tokenizer.pad_id, seed=1,
                            pad_to_multiple_of=8)
    loader = PretrainLoader(samples, rows, rows, 0, 1)
    batches, real, cells = [], 0, 0
    for _ in range(steps):
        (batch,) = loader.next_step()
        batches.append(batch)
        real += int((batch["attention_mask"] != 0).sum())
        cells += batch["attention_mask"].numel()
    lengths = packed.sample_lengths()
    return batches, real / cells, float(lengths.sum()) / (len(lengths) * seq)


def step_function(net, keys):
    import torch

    from models import rtd

    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step(batch) -> None:
        counts = {"predicted": (batch["labels"] != -100).sum().float(),
                  "tokens": (batch["attention_mask"] != 0).sum().float()}
        out = net(**{k: batch[k] for k in keys if k in batch})  # (no next_sentence_label: not a pair packing)
        loss = rtd.total_loss(out, counts) if "loss_sums" in out else out["loss_sum"] / out["num_predicted"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main():
    args = parse_args()
    import torch

    from bench.loader import prepare
    from data.indexed import open_indexed
    from models.registry import batch_keys, build_config, build_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        tokenizer, prefix = prepare(work, args.corpus_mb, args.vocab_size)
        dataset = open_indexed(prefix)
        print(f"corpus: {len(dataset.document_indices) - 1} documents, {int(dataset.sequence_lengths.sum())} "
              f"tokens; model {args.model}-{args.size}, {args.threads} thread(s)", flush=True)
        for seq in [int(s) for s in args.seq.split(",")]:
            rows = max(1, args.tokens // seq)
            data = {m: mode_batches(m, dataset, tokenizer, seq, rows, args.warmup + args.steps) for m in MODES}
            torch.manual_seed(0)
            net = build_model(build_config(args.model, args.size, vocab_size=tokenizer.vocab_size, seq_length=seq))
            net.train()
            step = step_function(net, batch_keys(args.model))
            for mode in MODES:
                for batch in data[mode][0][:args.warmup]:
                    step(batch)
            rates = {m: [] for m in MODES}
            for repeat in range(args.repeats):
                for mode in MODES[repeat % len(MODES):] + MODES[:repeat % len(MODES)]:  # alternated
                    timed = data[mode][0][args.warmup:]
                    start = time.perf_counter()
                    for batch in timed:
                        step(batch)
                    elapsed = time.perf_counter() - start
                    rates[mode].append(sum(int((b["attention_mask"] != 0).sum()) for b in timed) / elapsed)
            median = {m: statistics.median(r) for m, r in rates.items()}
            for mode in MODES:
                _, batched, unbatched = data[mode]
                print(f"seq={seq} {mode:17s} packing efficiency {batched:.3f} (rows alone {unbatched:.3f}), "
                      f"{median[mode]:,.0f} real tok/s (repeats: {', '.join(f'{r:,.0f}' for r in rates[mode])})",
                      flush=True)
            print(f"RESULT packing model={args.model}-{args.size} seq={seq} "
                  f"ratio={median['packed_documents'] / median['doc_sentences']:.2f}", flush=True)


if __name__ == "__main__":
    main()
