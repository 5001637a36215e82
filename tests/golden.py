"""Golden curves and expected outputs: what tests/test_golden.py compares with tests/assets/.

    .venv/bin/python -m tests.golden --write             # regenerate tests/assets/golden_*.json
    .venv/bin/python -m tests.golden --curves OUT.json   # train every family, write the curves only

1. Curves: every recipe family (RoBERTa MLM, DeBERTa MLM with the enhanced mask decoder, ELECTRA,
   DeBERTaV3 with embedding_sharing none / es / gdes) trains STEPS steps of its configs/pretrain/
   *_debug.yaml recipe, in one process (fp32, TP 1, ZeRO 0), on a corpus that depends on nothing
   installed: a byte-level BPE with no merges (5 specials + 256 bytes: the same 261 ids whatever
   text trains it) and token ids drawn by an integer LCG from a Zipf-like table. Dropout is off:
   CPU dropout draws through MKL where torch has it and through mt19937 where it has not, so its
   masks are not the same on every machine. Per step: loss (and its terms), grad norm, lr.
2. Outputs: the parts no Hugging Face class implements, built with torch.manual_seed(0) at the
   debug size on a fixed input: the enhanced mask decoder's states and MLM logits
   (models/deberta.py), the DeBERTaV3 RTD head's logits (models/deberta_v3.py), GDES's effective
   table E_D = sg(E_G) + E_Delta with a non-zero E_Delta (models/rtd.py SharedEmbedding).

A change that moves them on purpose regenerates them in the same commit and says why.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "tests" / "assets"
CURVES_FILE = ASSETS / "golden_curves.json"
OUTPUTS_FILE = ASSETS / "golden_outputs.json"

STEPS = 10
DOCUMENTS = 160
VOCAB = 261  # train_bpe's 5 specials + 256 byte symbols, no merges
FIRST_WORD_ID = 5  # ids 0..4 are <s> <pad> </s> <unk> <mask>
CORPUS_SEED = 20240611

_NO_DROPOUT = "hidden_dropout: 0.0, attention_dropout: 0.0"
# family -> (recipe, overrides on top of the common ones)
FAMILIES = {
    "roberta": ("configs/pretrain/roberta_debug.yaml", {}),
    # no DeBERTa MLM recipe of its own: RoBERTa's debug recipe with the DeBERTa model (EMD on by default)
    "deberta": ("configs/pretrain/roberta_debug.yaml", {"model.name": "deberta"}),
    "electra": ("configs/pretrain/electra_debug.yaml", {}),
    **{f"deberta_v3_{mode}": ("configs/pretrain/deberta_v3_debug.yaml",
                              {"model.overrides": f"{{embedding_sharing: {mode}, {_NO_DROPOUT}}}"})
       for mode in ("none", "es", "gdes")},
}
RECORDED = ("loss", "loss_mlm", "loss_rtd", "grad_norm", "lr")


# ------------------------------------------------------------------------------------ the corpus
def _lcg(state: int):
    """Knuth's MMIX LCG, top 31 bits: the same integers on every machine and numpy version."""
    while True:
        state = (6364136223846793005 * state + 1442695040888963407) % (1 << 64)
        yield state >> 33


def corpus_documents() -> list[np.ndarray]:
    """DOCUMENTS documents of 10..99 word ids; id FIRST_WORD_ID + r - 1 has weight 4096 // r (Zipf, s=1)."""
    table = np.concatenate([np.full(4096 // r, FIRST_WORD_ID + r - 1) for r in range(1, VOCAB - FIRST_WORD_ID + 1)])
    draws = _lcg(CORPUS_SEED)
    documents = []
    for _ in range(DOCUMENTS):
        length = 10 + next(draws) % 90
        documents.append(np.array([table[next(draws) % len(table)] for _ in range(length)], dtype=np.int64))
    return documents


def corpus_digest(documents: list[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.astype("<u2").tobytes() + b"\xff\xff")
    return digest.hexdigest()


def write_corpus(root: Path) -> Path:
    """The tokenizer and PREFIX.bin/.idx/.json under root; returns the prefix."""
    from data.indexed import IndexedWriter
    from data.tokenizer_train import train_bpe

    tok = train_bpe(iter(["golden"]), VOCAB, root / "tokenizer")
    assert tok.vocab_size == VOCAB and tok.special_ids == list(range(FIRST_WORD_ID)), tok
    prefix = root / "corpus"
    with IndexedWriter(prefix, tok.vocab_size) as writer:
        for doc in corpus_documents():
            writer.add_document(doc)
        writer.sidecar = {"tokenizer": {"path": str(tok.path), "fingerprint": tok.fingerprint(),
                                        "type": tok.type, "vocab_size": tok.vocab_size},
                          "tool": "tests/golden.py"}
    return prefix


# -------------------------------------------------------------------------------------- the curves
def family_overrides(name: str, prefix: Path, runs: Path) -> list[str]:
    values = {
        "data.prefix": prefix, "data.cache_dir": runs / "index-cache", "data.valid_fraction": 0.0,
        "run.dir": runs, "run.name": name,
        "model.overrides": f"{{{_NO_DROPOUT}}}",
        "train.steps": STEPS, "log.every_steps": 1, "eval.every_steps": 0,
        "checkpoint.every_steps": 0, "checkpoint.resume": "false", "precision": "fp32",
        **FAMILIES[name][1],
    }
    return [f"{k}={v}" for k, v in values.items()]


def train_curves(root: Path, names=tuple(FAMILIES)) -> dict:
    """{family: {metric: [value per step]}}, every family trained in this process, one after the other."""
    from tests.launch import train_records
    from trainer.pretraining.config import load_config
    from trainer.pretraining.train import train

    prefix = write_corpus(root)
    curves = {}
    for name in names:
        cfg = load_config(str(ROOT / FAMILIES[name][0]), family_overrides(name, prefix, root / "runs"))
        status, _ = train(cfg)
        assert status == 0, (name, status)
        records = train_records(root / "runs" / name)
        assert sorted(records) == list(range(1, STEPS + 1)), (name, sorted(records))
        curves[name] = {key: [records[s][key] for s in sorted(records)] for key in RECORDED if key in records[1]}
    return curves


# ------------------------------------------------------------------------------------- the outputs
SLICE_SEQ = 12


def _fixed_input(vocab: int = VOCAB):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(FIRST_WORD_ID, vocab, (2, SLICE_SEQ), generator=gen)
    ids[:, 0], ids[1, 8:] = 0, 1  # <s> first; row 1 has 8 real tokens then <pad>
    mask = (ids != 1).long()
    return ids, mask


def _deberta_debug(**overrides):
    from models.registry import build_config, build_model

    torch.manual_seed(0)
    cfg = build_config("deberta", "debug", vocab_size=VOCAB, seq_length=SLICE_SEQ, pad_token_id=1,
                       hidden_dropout=0.0, attention_dropout=0.0, **overrides)
    return build_model(cfg).eval()


def _deberta_v3_debug(sharing: str):
    from models.registry import build_config, build_model

    torch.manual_seed(0)
    cfg = build_config("deberta_v3", "debug", vocab_size=VOCAB, seq_length=SLICE_SEQ, pad_token_id=1,
                       hidden_dropout=0.0, attention_dropout=0.0, embedding_sharing=sharing)
    return build_model(cfg).eval()


def _grad_or_zeros(param: torch.nn.Parameter) -> torch.Tensor:
    return param.grad if param.grad is not None else torch.zeros_like(param)


def emd_outputs() -> dict:
    """DeBERTa's enhanced mask decoder: its states and the MLM logits over them."""
    ids, mask = _fixed_input()
    with torch.no_grad():
        mlm = _deberta_debug()
        assert mlm.config.enhanced_mask_decoder
        hidden = mlm.mlm_hidden(ids, mask)  # (B, T, H)
        return {"emd_hidden[0,:3,:3]": hidden[0, :3, :3], "emd_hidden[1,5:8,-3:]": hidden[1, 5:8, -3:],
                "emd_mlm_logits[0,:3,5:8]": mlm.logits(ids, mask)[0, :3, 5:8]}


def rtd_outputs() -> dict:
    """DeBERTaV3's RTD head, and GDES's effective table E_D = sg(E_G) + E_Delta with E_Delta != 0."""
    ids, mask = _fixed_input()
    out = {}
    rtd = _deberta_v3_debug("gdes")
    table = rtd.discriminator.embeddings.word
    with torch.no_grad():
        out["rtd_head_logits[:,:6]"] = rtd.discriminator.rtd_logits(ids, mask)[:, :6]  # E_Delta = 0 here
        gen = torch.Generator().manual_seed(2)  # a trained E_Delta is non-zero: give it fixed values
        table.gdes_delta.weight.copy_(0.02 * torch.randn(table.gdes_delta.weight.shape, generator=gen))
        out["gdes_effective_table[5:8,:4]"] = table.weight[5:8, :4]
        out["gdes_lookup[0,1:3,:4]"] = table(ids)[0, 1:3, :4]
    logits = rtd.discriminator.rtd_logits(ids, mask)  # (B, T)
    out["gdes_rtd_head_logits[:,:6]"] = logits.detach()[:, :6]
    # the stop-gradient: the RTD head's gradient reaches E_Delta, never E_G
    logits.sum().backward()
    rows = ids[0, 1:3]
    out["gdes_rtd_grad_delta[ids[0,1:3],:4]"] = table.gdes_delta.weight.grad[rows, :4]
    out["gdes_rtd_grad_generator[ids[0,1:3],:4]"] = _grad_or_zeros(table.source.weight)[rows, :4]
    return out


def module_outputs() -> dict:
    """{name: nested list}: slices of the outputs no Hugging Face class computes (see the docstring)."""
    return {key: value.tolist() for key, value in {**emd_outputs(), **rtd_outputs()}.items()}


# -------------------------------------------------------------------------------------- command line
def _dump(path: Path, content: dict) -> None:
    """JSON with every list of numbers on one line (a curve, a row of a slice): diffs read per step."""
    text = json.dumps(content, indent=1)
    text = re.sub(r"\[\s+([-+0-9.eE,\s]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")


def main(argv=None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="regenerate tests/assets/golden_curves.json and "
                                                             "golden_outputs.json")
    parser.add_argument("--curves", type=Path, help="write the trained curves to this file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the test uses 1)")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    args = parser.parse_args(argv)
    if not (args.write or args.curves):
        parser.error("give --write or --curves OUT.json")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
        curves = train_curves(Path(tmp), args.families)
    curves = {"corpus_sha256": corpus_digest(corpus_documents()), "steps": STEPS, "families": curves}
    if args.curves:
        _dump(args.curves, curves)
    if args.write:
        _dump(CURVES_FILE, curves)
        _dump(OUTPUTS_FILE, module_outputs())
        print(f"wrote {CURVES_FILE.relative_to(ROOT)} and {OUTPUTS_FILE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
