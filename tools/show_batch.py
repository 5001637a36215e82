"""Print the training samples of an optimizer step as the model sees them: how to check masking.

    python tools/show_batch.py --config configs/pretrain/roberta_debug.yaml [key.sub=value ...] --n 4 [--step S]
    python tools/show_batch.py --run-dir runs/NAME [key.sub=value ...] --n 4     # the step after its checkpoint

Prints the first N samples of optimizer step S (default 1; a step with fewer than N samples continues into
the next steps), each as two lines after a `step S: ...` line per step:

    sample I: TEXT   the original tokens decoded, each maximal run of predicted tokens (labels != -100)
                     wrapped in [[ and ]]
    input I: TEXT    what the model is fed (input_ids decoded: mask tokens, random replacements). For RTD
                     models (ELECTRA, DeBERTaV3) this is the generator's input; the discriminator's is made
                     from the generator's samples during the step.

I is the sample's global index in the run's consumed-sample stream (`sample_index`). Special tokens show as
their text (<s> <mask> </s>, [CLS] [MASK] [SEP] ...), padding is left out, and with data.packing=packed_documents
` ‖ ` (U+2016) stands between the documents of a row (a row's documents are decoded one by one). Line breaks, tabs and
carriage returns show as \\n, \\t and \\r, so that each sample stays on one line.

Multi-byte characters: a row (one document of it) is decoded once, and brackets go at the character offsets
of token boundaries; where a run of predicted tokens starts or ends inside a character (its bytes are several
byte-level BPE tokens or SentencePiece byte pieces), the bracket is widened to that character's edge, so the
text stays readable and a bracketed character may hold unpredicted bytes as well. Spaces just inside a
bracket are moved outside it.

The batches come from the training code path: the config is loaded with its overrides as trainer/pretrain.py
loads it, and the loader of trainer/pretraining/inputs.py (data.packing, static masks, blends, the masking
rate curriculum data.mask_prob_schedule, length phases data.seq_length_schedule, batch warmup) is positioned
as training positions it after S - 1 steps (or at the run's latest checkpoint with --run-dir), with one
data-parallel rank: the samples of a step do not depend on the data-parallel size. No model, DeepSpeed engine
or process group is built.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from data.errors import UserError
from data.masking import IGNORE_INDEX
from data.tokenizer import Tokenizer
from trainer.pretraining.config import load_run_config
from trainer.pretraining.inputs import single_process_inputs

OPEN, CLOSE, DOCUMENT_SEPARATOR = "[[", "]]", " \u2016 "  # ‖: rarer in text than |
_VISIBLE = str.maketrans({"\n": "\\n", "\t": "\\t", "\r": "\\r"})


def visible(text: str) -> str:
    """`text` on one line: line breaks, tabs and carriage returns as \\n, \\t, \\r."""
    return text.translate(_VISIBLE)


# ----------------------------------------------------------------------------- rendering
def _char_offset(tokenizer: Tokenizer, ids: Sequence[int], text: str, k: int) -> Optional[int]:
    """The character offset in `text` (= decode(ids)) at which token k begins, or None when token k begins
    inside a character (the decode of ids[:k] then ends in a replacement character the text lacks)."""
    if k <= 0:
        return 0
    if k >= len(ids):
        return len(text)
    prefix = tokenizer.decode(ids[:k])
    return len(prefix) if text.startswith(prefix) else None


def _edge(tokenizer: Tokenizer, ids: Sequence[int], text: str, k: int, step: int) -> int:
    """The offset of the nearest token boundary at or beyond token k that is a character boundary (step -1:
    backwards, to the start of the character k is inside; +1: forwards, to its end)."""
    while True:
        offset = _char_offset(tokenizer, ids, text, k)
        if offset is not None:
            return offset
        k += step


def runs_of(selected: np.ndarray) -> List[Tuple[int, int]]:
    """The maximal runs [a, b) of True in a boolean vector."""
    edges = np.diff(np.concatenate([[0], selected.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def render_document(tokenizer: Tokenizer, ids: Sequence[int], selected: Optional[np.ndarray] = None) -> str:
    """`ids` decoded once, each maximal run of `selected` tokens in [[ ]] (widened to character edges)."""
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids)
    spans: List[List[int]] = []
    for a, b in runs_of(np.asarray(selected, dtype=bool)) if selected is not None else ():
        start, end = _edge(tokenizer, ids, text, a, -1), _edge(tokenizer, ids, text, b, +1)
        if spans and start <= spans[-1][1]:  # widening joined two runs inside one character
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
    out, at = [], 0
    for start, end in spans:
        inner = text[start:end]
        if inner.strip():  # spaces at a bracket's inside go outside it
            start, end = start + len(inner) - len(inner.lstrip()), end - (len(inner) - len(inner.rstrip()))
        out += [text[at:start], OPEN, text[start:end], CLOSE]
        at = end
    out.append(text[at:])
    return visible("".join(out))


def render_row(tokenizer: Tokenizer, ids: np.ndarray, documents: np.ndarray,
               selected: Optional[np.ndarray] = None) -> str:
    """A batch row without its padding (document id 0), its documents joined by ` ‖ `."""
    parts = []
    for doc in np.unique(documents[documents > 0]):
        where = documents == doc
        parts.append(render_document(tokenizer, ids[where], None if selected is None else selected[where]))
    return DOCUMENT_SEPARATOR.join(parts)


def sample_lines(tokenizer: Tokenizer, batch: Dict[str, torch.Tensor]) -> Iterator[str]:
    """`sample I: ...` and `input I: ...` for every row of a loader batch."""
    inputs, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    documents = batch["attention_mask"].numpy()
    for row, index in enumerate(batch["sample_index"].tolist()):
        predicted = labels[row] != IGNORE_INDEX
        original = np.where(predicted, labels[row], inputs[row])
        yield f"sample {index}: {render_row(tokenizer, original, documents[row], predicted)}"
        yield f"input {index}: {render_row(tokenizer, inputs[row], documents[row])}"


# ----------------------------------------------------------------------------- the training loader
def build_loader(cfg):
    """(tokenizer, PretrainLoader) through the functions training uses, for one data-parallel rank, no
    process group (trainer/pretraining/train.py's `prepare`, without the model and the engine)."""
    tokenizer, inputs = single_process_inputs(cfg)
    return tokenizer, inputs.loader


def position_at_step(loader, step: int) -> None:
    """Puts `loader` where training is before step `step`: the plans of steps 1..step-1 replayed (they depend
    on the consumed count and the step only), as a checkpoint after step - 1 would restore it."""
    loader.load_state_dict(loader.state_before_step(step))


def checkpoint_state(run_dir: str) -> Dict[str, object]:
    """The loader state training resumes from: the latest committed checkpoint of `run_dir` (the one a plain
    resume loads), as `prepare` hands it to `loader.load_state_dict`."""
    from trainer.core.checkpoint import read_meta, resume_order
    from trainer.core.safe_load import safe_torch_load

    checkpoints = Path(run_dir) / "checkpoints"
    candidates = resume_order(checkpoints)
    if not candidates:
        raise UserError(f"{checkpoints} holds no committed checkpoint; use --config and --step instead")
    tag_dir = candidates[0]
    stage = read_meta(tag_dir, ["zero_stage"])["zero_stage"]
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
    if not (tag_dir / name).is_file():
        raise UserError(f"{tag_dir / name} is missing; the checkpoint is incomplete")
    client = safe_torch_load(tag_dir / name)
    for key in ("step", "consumed_samples", "data"):
        if key not in client:
            raise UserError(f"{tag_dir / name} has no '{key}': not a checkpoint of trainer/pretrain.py")
    return {**client["data"], "consumed_samples": client["consumed_samples"], "step": client["step"]}


def show(cfg, n: int, step: Optional[int] = None, run_dir: Optional[str] = None,
         out=None) -> List[int]:
    """Prints the first `n` samples from step `step` on (or from the step after `run_dir`'s checkpoint);
    returns their global indices."""
    out = out or sys.stdout
    tokenizer, loader = build_loader(cfg)
    if run_dir is not None:
        state = checkpoint_state(run_dir)
        loader.load_state_dict(state)
        step = int(state["step"]) + 1
    else:
        position_at_step(loader, step)
    shown: List[int] = []
    while len(shown) < n:
        first = loader.consumed_samples
        batches = loader.next_step()
        print(f"step {step}: {loader.last_step_samples} samples, global indices {first}..{loader.consumed_samples - 1}",
              file=out)
        for batch in batches:
            take = min(len(batch["sample_index"]), n - len(shown))
            if take <= 0:
                break
            batch = {k: v[:take] for k, v in batch.items()}
            for line in sample_lines(tokenizer, batch):
                print(line, file=out)
            shown += batch["sample_index"].tolist()
        step += 1
    return shown


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="pretraining recipe (configs/pretrain/*.yaml); with --run-dir, "
                                         "default: the run's config.yaml")
    parser.add_argument("--n", type=int, default=4, help="samples to print (default 4)")
    parser.add_argument("--step", type=int, default=None,
                        help="optimizer step, from 1 (default 1): the samples that step trains on")
    parser.add_argument("--run-dir", default=None,
                        help="a run directory ({run.dir}/{run.name}): show the step after its latest committed "
                             "checkpoint (the step a resume trains next); not with --step")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of any config field, as in training")
    args = parser.parse_args(argv)
    if args.n < 1:
        raise UserError(f"--n {args.n}: give at least 1 sample")
    if args.step is not None and args.step < 1:
        raise UserError(f"--step {args.step}: steps count from 1")
    if args.step is not None and args.run_dir is not None:
        raise UserError("--step and --run-dir both name a step; give one of them")
    cfg = load_run_config(args.config, args.overrides, args.run_dir)
    show(cfg, args.n, args.step or 1, args.run_dir)
    return 0


if __name__ == "__main__":
    from trainer.core.cli import run_cli
    run_cli(main)
