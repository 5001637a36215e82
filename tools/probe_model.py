"""Linear probes on a model's frozen features, beside the same architecture with random weights.

    python tools/probe_model.py --model runs/deberta_v3_demo/native --train demo/word_order/train.tsv \\
        --validation demo/word_order/validation.tsv [--max-length 64] [--pooling mean,cls] [--seeds 1,2,3]

What a pretrained model's features hold, and where: for each pooling (mean of the last layer over real
tokens; the first token, [CLS] / <s>, which every Hugging Face sequence classifier reads) it fits the
pretraining probe's logistic regression (trainer/pretraining/probe.py: deterministic, standardised features) on the
frozen features of the model (a native file: tools/convert_checkpoint.py --format native) and of the
same architecture drawn afresh from each seed, and prints the validation accuracies and the features'
average pairwise cosine similarity (near 1: every example looks alike to a classifier, the collapse a
model stuck at the RTD prior shows). A pooling where the model is ahead of random weights is one a
fine-tuned classifier can build on (fine-tuning's model.pooling).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from data.errors import UserError
from trainer.core.cli import run_cli

POOLINGS = ("mean", "cls")


def average_cosine(features: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct rows of (N, H) features."""
    unit = torch.nn.functional.normalize(features.double(), dim=-1)
    n = unit.shape[0]
    if n < 2:
        raise ValueError("average_cosine needs at least two rows")
    total = unit.sum(dim=0)
    return float((total @ total - n) / (n * (n - 1)))  # sum over i != j of u_i . u_j


def probe_model(model_path: str | Path, train: str | Path, validation: str | Path, max_length: int = 64,
                poolings: Sequence[str] = POOLINGS, seeds: Sequence[int] = (1, 2, 3),
                tokenizer_dir: Optional[str | Path] = None, max_examples: int = 2000,
                batch_size: int = 64) -> Dict[str, Dict]:
    """{pooling: {"pretrained": {"accuracy", "cosine"}, "random_init": [{"seed", "accuracy", "cosine"}, ...]}}."""
    from data.tokenizer import load_tokenizer
    from models.native import load_native
    from models.registry import build_model
    from trainer.pretraining.config import ProbeSection
    from trainer.pretraining.probe import extract_features, fit_linear_probe, load_probe_task

    for pooling in poolings:
        if pooling not in POOLINGS:
            raise UserError(f"--pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    native = load_native(model_path)
    folder = Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else folder / "tokenizer"
    if not (tokenizer_dir / "tokenizer_meta.json").is_file():
        raise UserError(f"no tokenizer in {tokenizer_dir}; pass --tokenizer DIR (the run's tokenizer/)")
    tokenizer = load_tokenizer(tokenizer_dir)
    section = ProbeSection(every_steps=1, train=str(train), validation=str(validation), max_length=max_length,
                           max_examples=max_examples)
    separators = 2 if native.name == "roberta" else 1
    task = load_probe_task(section, tokenizer, max_length, separators)
    ids = list(task.train.ids) + list(task.validation.ids)
    n = len(task.train)
    y_train, y_valid = torch.as_tensor(task.train.labels), torch.as_tensor(task.validation.labels)

    def measure(model: torch.nn.Module, pooling: str) -> Dict[str, float]:
        model.eval()
        features = extract_features(model.encode, ids, tokenizer.pad_id, batch_size, pooling, 0, 1,
                                    torch.device("cpu"))
        probe = fit_linear_probe(features[:n], y_train, len(task.labels), section.l2)
        return {"accuracy": probe.accuracy(features[n:], y_valid), "cosine": average_cosine(features[n:])}

    results = {}
    pretrained = native.build()
    for pooling in poolings:
        rows = []
        for seed in seeds:
            torch.manual_seed(seed)
            rows.append({"seed": seed, **measure(build_model(native.config), pooling)})
        results[pooling] = {"pretrained": measure(pretrained, pooling), "random_init": rows}
    results["majority_accuracy"] = float(np.bincount(task.validation.labels).max() / len(task.validation))
    return results


def format_results(results: Dict) -> List[str]:
    lines = ["| pooling | pretrained accuracy | random init accuracy (mean +- std) | pretrained cosine | "
             "random init cosine |", "|---|---|---|---|---|"]
    for pooling, r in results.items():
        if pooling == "majority_accuracy":
            continue
        acc = np.array([x["accuracy"] for x in r["random_init"]])
        cos = np.array([x["cosine"] for x in r["random_init"]])
        std = acc.std(ddof=1) if len(acc) > 1 else 0.0
        lines.append(f"| {pooling} | {r['pretrained']['accuracy']:.3f} | {acc.mean():.3f} +- {std:.3f} | "
                     f"{r['pretrained']['cosine']:.3f} | {cos.mean():.3f} |")
    lines.append(f"majority class: {results['majority_accuracy']:.3f}")
    return lines


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="native model file or directory (convert_checkpoint --format native)")
    p.add_argument("--train", required=True, help="probe training file (.tsv/.csv/.jsonl, label column 'label')")
    p.add_argument("--validation", required=True, help="probe validation file, same layout")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: tokenizer/ beside the model)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example, special tokens included")
    p.add_argument("--max-examples", type=int, default=2000, help="at most this many examples of each file")
    p.add_argument("--pooling", default="mean,cls", help="comma-separated: mean, cls")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds of the random-init baselines")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 1,2,3") from None
    if not seeds:
        raise UserError("--seeds is empty; give at least one seed")
    if args.max_length < 8:
        raise UserError(f"--max-length {args.max_length} is too short; use at least 8")
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    results = probe_model(args.model, args.train, args.validation, args.max_length,
                          [p.strip() for p in args.pooling.split(",") if p.strip()], seeds, args.tokenizer,
                          args.max_examples)
    print("\n".join(format_results(results)))
    return 0


if __name__ == "__main__":
    run_cli(main)
