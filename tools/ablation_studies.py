"""The studies tools/ablate.py runs: their arms, the scales, each model's recipe at those scales, and the
papers' findings beside which the results are read. Data only; tools/ablate.py runs them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

VERSION = 1  # of the study layout and recipes: a DIR from another version is refused
SEEDS = (1, 2, 3)
RANDOM_INIT = "random-init"


# ----------------------------------------------------------------------------------- what a study is
@dataclass(frozen=True)
class Scale:
    seq_length: int
    steps: int
    samples_per_step: int  # x seq_length = tokens per step (a token budget)
    micro_batch: int
    ranks: int
    corpus_mb: float
    vocab_size: int
    finetune_epochs: int
    task_train: int
    task_validation: int
    probe_examples: int
    log_every: int
    eval_samples: int


SCALES = {
    # a smoke run of the whole path in CI time: nothing is learned
    "tiny": Scale(seq_length=64, steps=6, samples_per_step=8, micro_batch=8, ranks=1, corpus_mb=0.3,
                  vocab_size=1000, finetune_epochs=1, task_train=96, task_validation=64, probe_examples=96,
                  log_every=2, eval_samples=16),
    # the demo's models and data (make demo): a few minutes per arm on 2 CPU cores
    "small": Scale(seq_length=128, steps=400, samples_per_step=32, micro_batch=16, ranks=2, corpus_mb=8.0,
                   vocab_size=8000, finetune_epochs=3, task_train=4000, task_validation=1000, probe_examples=2000,
                   log_every=10, eval_samples=128),
}

# Each model's recipe at these scales (the demo's, tuned in docs/pretraining_pays.md); the scale sets the
# lengths, steps and batches.
RECIPES = {
    "roberta": {"model": {"name": "roberta", "size": "debug"},
                "optim": {"lr": 5.0e-3}},
    "electra": {"model": {"name": "electra", "size": "debug"},
                "data": {"mask_token_prob": 1.0, "random_token_prob": 0.0},
                "optim": {"lr": 1.0e-3, "generator_lr": None}},
    "deberta_v3": {"model": {"name": "deberta_v3", "size": "debug",
                             "overrides": {"hidden_dropout": 0.0, "attention_dropout": 0.0}},
                   "data": {"mask_token_prob": 1.0, "random_token_prob": 0.0},
                   "optim": {"lr": 1.0e-3, "generator_lr": 1.0e-3}},
}
TOKENIZER_OF = {"roberta": "bpe", "electra": "bpe", "deberta_v3": "spm"}
STATIC_COPIES = 10  # BERT's dupe factor


@dataclass(frozen=True)
class Arm:
    name: str
    model: str
    settings: Dict = field(default_factory=dict)
    """Deep-merged into the model's recipe."""


@dataclass(frozen=True)
class Study:
    name: str
    arms: Tuple[Arm, ...]
    varies: Tuple[str, ...]
    """Dotted keys (or prefixes) the arms set: refused as overrides for all arms."""
    paper: str
    equal_flops: bool = False
    static_masks: bool = False

    @property
    def models(self) -> List[str]:
        return list(dict.fromkeys(a.model for a in self.arms))


def _gen(hidden: int, heads: int, ffn: int) -> Dict:
    return {"hidden_size": hidden, "num_heads": heads, "intermediate_size": ffn}


SAME_SIZE_GENERATOR = _gen(64, 4, 128)  # ELECTRA debug's discriminator shape (2 x 64, FFN 128)

STUDIES: Dict[str, Study] = {s.name: s for s in (
    Study("input-formats", tuple(Arm(n, "roberta", {"data": {"packing": p}}) for n, p in (
        ("segment_pair+nsp", "segment_pair"), ("sentence_pair+nsp", "sentence_pair"),
        ("full_sentences", "full_sentences"), ("doc_sentences", "doc_sentences"))),
          varies=("data.packing",),
          paper="RoBERTa (Liu et al. 2019, Table 2; BERT-base, SQuAD 1.1/2.0, MNLI-m, SST-2, RACE): "
                "SEGMENT-PAIR+NSP 90.4/78.7/84.0/92.9/64.2, SENTENCE-PAIR+NSP 88.7/76.2/82.9/92.1/63.0, "
                "FULL-SENTENCES 90.4/79.1/84.7/92.5/64.8, DOC-SENTENCES 90.6/79.7/84.7/92.7/65.6: single "
                "sentences hurt (no long-range context), dropping NSP matches or helps, DOC >= FULL."),
    Study("static-masking", (Arm("static_x10", "roberta", {"data": {"masking": "static"}}),
                             Arm("dynamic", "roberta", {"data": {"masking": "dynamic"}})),
          varies=("data.masking",), static_masks=True,
          paper="RoBERTa (Table 1; BERT-base, SQuAD 2.0 F1 / MNLI-m / SST-2): static 78.3/84.3/92.5, dynamic "
                "78.7/84.0/92.9: dynamic masking is comparable or slightly better, and cheaper to store."),
    Study("rtd-vs-mlm", (Arm("electra_rtd", "electra", {"model": {"overrides": {
                             "discriminator": {"embedding_size": 64}, "generator": {"embedding_size": 64}}}}),
                         Arm("mlm", "roberta")),
          varies=("model.name", "model.overrides"), equal_flops=True,
          paper="ELECTRA (Clark et al. 2020, Table 1/8): at comparable compute ELECTRA-Small 79.9 vs "
                "BERT-Small 75.1 GLUE; ELECTRA-Base 85.1 vs BERT-Base 82.2: learning from all tokens beats "
                "learning from the 15% masked."),
    Study("embedding-sharing", tuple(Arm(m, "deberta_v3", {"model": {"overrides": {"embedding_sharing": m}}})
                                     for m in ("none", "es", "gdes")),
          varies=("model.overrides.embedding_sharing",),
          paper="DeBERTaV3 (He et al. 2021, section 3 and its embedding-sharing tables): GDES fine-tunes best; "
                "NES loses the benefit of sharing; under ES the MLM and RTD gradients pull one table in "
                "opposite directions (a tug-of-war), which the average cosine similarity of the word "
                "embeddings shows: RTD pushes similar tokens apart, MLM pulls them together."),
    Study("generator-size", tuple(Arm(n, "electra", {"model": {"overrides": {"generator": g}}}) for n, g in (
        ("gen_1/4", _gen(16, 1, 32)), ("gen_1/2", _gen(32, 2, 64)), ("gen_1", SAME_SIZE_GENERATOR))),
          varies=("model.overrides.generator",), equal_flops=True,
          paper="ELECTRA (Figure 3 left; base discriminator, GLUE): generators 1/4-1/2 of the discriminator "
                "are best; a generator as large as the discriminator is worse (too strong a task, and twice "
                "the compute per step)."),
    Study("schedule", (Arm("joint", "electra", {"train": {"rtd_schedule": "joint"}}),
                       Arm("two_stage", "electra", {"train": {"rtd_schedule": "two_stage"}})),
          varies=("train.rtd_schedule", "train.generator_steps"),
          paper="ELECTRA (Figure 3 right; GLUE against FLOPs): joint training beats two-stage training "
                "(generator alone, then the discriminator initialised from it with the generator frozen); "
                "adversarial training is worse than both."),
    Study("weight-sharing", tuple(Arm(n, "electra", {"model": {"overrides": {
        "embedding_sharing": m, "generator": SAME_SIZE_GENERATOR}}}) for n, m in (
            ("none", "none"), ("embeddings", "es"), ("all", "all"))),
          varies=("model.overrides.embedding_sharing",),
          paper="ELECTRA (section 3.2; same-size generator and discriminator, 500k steps, GLUE): no sharing "
                "83.6, shared embeddings 84.3, all weights shared 84.4: embeddings gain most (the generator's "
                "softmax updates every token's embedding), sharing all adds little."),
)}

# Keys that set an arm's compute: never overridden for one arm only.
COMPUTE_KEYS = ("train.steps", "train.tokens_per_step", "train.global_batch_size", "data.seq_length",
                "model.name", "model.size", "model.overrides.generator", "model.overrides.discriminator",
                "model.overrides.num_layers", "model.overrides.hidden_size", "model.overrides.intermediate_size",
                "model.overrides.num_heads", "model.overrides.embedding_size", "train.rtd_schedule",
                "train.generator_steps")
