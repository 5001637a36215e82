"""Average pairwise cosine similarity of the generator's and the discriminator's word embeddings.

The DeBERTaV3 paper's diagnostic for embedding sharing (its Table 1 / Figure): under ES one table
serves both tasks; under NES the discriminator's table is its own; under GDES the discriminator's
effective table is E_G + E_Delta. MLM pulls similar tokens together, RTD pushes them apart, and the
average cosine similarity shows which way a table went.

    python tools/embedding_stats.py --checkpoint runs/NAME/checkpoints [--tag global_stepN] [--sample 4096]

Reads the checkpoint with conversion's reader (trainer/convert/export.py: ZeRO 0-3, TP merged, the fp32 masters;
`latest` by default), and ignores vocabulary padding and special tokens.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from data.errors import UserError

GENERATOR = "generator.embeddings.word.weight"
DELTA_SUFFIX = "embeddings.word.gdes_delta.weight"
OWN_SUFFIX = "embeddings.word.weight"


def load_module_state(checkpoints: Path, tag: Optional[str]) -> tuple[Dict[str, torch.Tensor], dict]:
    """The full fp32 weights and the model config of a checkpoint, through conversion's reader
    (trainer/export.read_checkpoint: every layout the trainer writes, ZeRO 0-3, TP merged, bf16 masters)."""
    import dataclasses

    from trainer.core.checkpoint import resume_order
    from trainer.convert.export import read_checkpoint

    if not checkpoints.is_dir():
        raise UserError(f"--checkpoint {checkpoints} is not a directory")
    if tag is None:
        candidates = resume_order(checkpoints)
        if not candidates:
            raise UserError(f"{checkpoints} holds no committed checkpoint; pass --tag global_stepN")
        tag_dir = candidates[0]
    else:
        tag_dir = checkpoints / tag
        if not tag_dir.is_dir():
            raise UserError(f"{tag_dir} does not exist")
    native = read_checkpoint(tag_dir)
    return native.state_dict, dataclasses.asdict(native.config)


def average_cosine(table: torch.Tensor, sample: int, seed: int = 0) -> float:
    """Mean cosine similarity over distinct pairs of (a sample of) rows."""
    table = table.float()
    if table.shape[0] > sample:
        rows = torch.randperm(table.shape[0], generator=torch.Generator().manual_seed(seed))[:sample]
        table = table[rows]
    unit = torch.nn.functional.normalize(table, dim=-1)
    n = unit.shape[0]
    total = unit.sum(0).pow(2).sum() - n  # sum over i != j of cos(i, j)
    return float(total / (n * (n - 1)))


def embedding_stats(module: Dict[str, torch.Tensor], model_config: dict, sample: int = 4096) -> Dict[str, object]:
    if GENERATOR not in module:
        raise UserError("the checkpoint has no generator word embeddings: it is not an RTD model "
                        "(model.name electra or deberta_v3)")
    tower = model_config.get("generator") or model_config  # RTD configs nest the towers' configs
    vocab = tower.get("vocab_size") or module[GENERATOR].shape[0]  # padding rows excluded
    skip = 5  # special tokens sit at the start of both the BPE and the SentencePiece vocabularies
    generator = module[GENERATOR][skip:vocab]
    delta = next((v for k, v in module.items() if k.endswith(DELTA_SUFFIX)), None)
    own = next((v for k, v in module.items() if k.startswith("discriminator") and k.endswith(OWN_SUFFIX)), None)
    if model_config.get("embedding_sharing") == "all":  # one backbone: both names hold the same table
        sharing, discriminator = "all", generator
    elif delta is not None:
        sharing, discriminator = "gdes", generator + delta[skip:vocab]
    elif own is not None:
        sharing, discriminator = "none", own[skip:vocab]
    else:
        sharing, discriminator = "es", generator
    return {"embedding_sharing": sharing, "rows": int(generator.shape[0]),
            "generator_avg_cosine": average_cosine(generator, sample),
            "discriminator_avg_cosine": average_cosine(discriminator, sample)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="a run's checkpoints directory")
    parser.add_argument("--tag", help="global_stepN (default: the latest)")
    parser.add_argument("--sample", type=int, default=4096, help="rows sampled for the pairwise average")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # libraries' import-time lines: stdout is the result's
        module, model_config = load_module_state(args.checkpoint, args.tag)
        stats = embedding_stats(module, model_config, args.sample)
    if args.json:
        print(json.dumps(stats))
    else:
        print(f"embedding sharing: {stats['embedding_sharing']} ({stats['rows']} word rows)")
        print(f"generator     average cosine similarity: {stats['generator_avg_cosine']:.4f}")
        print(f"discriminator average cosine similarity: {stats['discriminator_avg_cosine']:.4f}")
    return 0


if __name__ == "__main__":
    from trainer.core.cli import run_cli
    run_cli(main)
