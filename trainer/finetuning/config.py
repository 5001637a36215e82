"""The fine-tuning run's configuration: typed dataclasses, YAML + `key.sub=value` overrides.

Built with the shared machinery (trainer/core/config.py: RunConfig, load_config, strict keys and types)
and sharing pretraining's sections where they mean the same (run, zero, parallel, log).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from data.errors import UserError
from data.tasks import FORMATS, KINDS, TaskFormat
from models.classification import POOLINGS
from trainer.core.config import AdamWSection, LogSection, RunConfig, RunSection, _choice, get_key
from trainer.core.config import load_config as _load_config

EXPORTS = ("none", "hf")


@dataclass
class FinetuneModelSection:
    init: str = ""
    """Where the weights come from: a native model file or directory (models/native.py, written by
    tools/convert_checkpoint.py --format native) or a Hugging Face directory (RoBERTa, DeBERTa-v2/v3,
    ELECTRA; an exported classifier keeps its head). Required."""
    random_init: bool = False
    """The random-init baseline: keep model.init's architecture, sizes and tokenizer, but draw every
    weight afresh from the seed (the backbone's own initialisation) instead of loading it. Run the same
    recipe with and without it to see what pretraining is worth on the task."""
    classifier_dropout: Optional[float] = None
    """Dropout of the classification head; None uses the backbone's hidden dropout (Hugging Face's rule)."""
    pooling: str = "cls"
    """What the classification head reads: cls, the first token's last hidden state (the papers' and
    Hugging Face's classifiers); mean, the mean over the real tokens, for small or briefly pretrained
    RTD models whose [CLS] state carries little (docs/pretraining_pays.md). mean has no Hugging Face
    class: it needs checkpoint.export=none."""
    overrides: Dict[str, Any] = field(default_factory=dict)
    """Dropout fields of the backbone config to change for fine-tuning: hidden_dropout, attention_dropout."""


@dataclass
class FinetuneDataSection(TaskFormat):
    """The task files and, from TaskFormat, how to read them (kind, format, columns, text_columns,
    label_column, labels)."""
    train: str = ""
    """Training file: .tsv, .csv or .jsonl with named columns (GLUE's layout works as is). Required."""
    validation: str = ""
    """Validation file, same layout. Required: it chooses the best checkpoint."""
    tokenizer: Optional[str] = None
    """Tokenizer directory (tools/train_tokenizer.py). Default: model.init's directory if it holds
    one, else a `tokenizer/` directory beside a native file (a run directory has one)."""
    max_length: int = 128
    """Tokens per example, special tokens included; longer inputs are cut longest-text-first."""


# Same shape as pretraining's TrainSection (documented batch, clip and timeout fields), but not one base
# class: a base's fields would come first and change config.yaml's key order, which resumes compare.
@dataclass
class FinetuneTrainSection:
    epochs: float = 3.0
    """Passes over the training set (fractions allowed); the step count follows from the batch size."""
    micro_batch_size: int = 32
    """Examples per rank per forward/backward."""
    global_batch_size: int = 32
    """Examples per optimizer step = micro_batch_size x accumulation x data-parallel size."""
    seeds: List[int] = field(default_factory=lambda: [1234])
    """One fine-tuning run per seed, one after another in this command; the summary reports the
    mean and standard deviation of the best validation metric over them (small tasks are noisy)."""
    grad_clip: float = 1.0
    max_bad_steps: int = 10
    """A step whose loss is NaN/Inf is skipped; this many in a row stop the run (exit 3)."""
    collective_timeout_s: float = 1800.0
    """A collective that waits longer than this for a peer rank fails and the run exits non-zero naming
    it (a hung or stopped rank ends the job instead of blocking it forever)."""


@dataclass
class FinetuneOptimSection(AdamWSection):
    """AdamW's lr, betas, eps, weight_decay, then the schedule and layer-wise decay."""
    lr: float = 2e-5
    betas: Tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.1
    """Linear warmup over this fraction of the steps, then linear decay to 0."""
    layer_decay: float = 1.0
    """Layer-wise LR decay: depth d (0 embeddings, 1..L layers, L+1 head) trains at lr x decay^(L+1-d); 1 is off."""
    min_lr: float = 0.0


@dataclass
class FinetuneEvalSection:
    every_steps: int = 0
    """Evaluate every N optimizer steps; 0 evaluates at the end of every epoch. The last step always evaluates."""
    metric: str = ""
    """The metric that chooses the best checkpoint (higher is better): accuracy, f1, mcc, pearson,
    spearman, pearson_spearman. Default: accuracy (classification), pearson_spearman (regression)."""
    batch_size: int = 64


@dataclass
class FinetuneCheckpointSection:
    keep_best: bool = True
    """Keep the best checkpoint by eval.metric (a DeepSpeed checkpoint under seedS/best/)."""
    export: str = "hf"
    """hf: also write the best model as a Hugging Face XForSequenceClassification directory (seedS/hf/); none."""
    resume: bool = True
    """Running the same command again (same run directory and config) skips the seeds already finished
    (seedS/result.json) and continues a preempted seed from its checkpoint (seedS/last/); false starts
    every seed over."""
    preemption_timeout_s: float = 600.0
    """After SIGTERM/SIGUSR1, exit with status 76 if the step and checkpoint take longer than this."""


@dataclass
class SiftSection:
    enabled: bool = False
    """Scale-invariant fine-tuning (DeBERTa): adversarial perturbation of the normalised embeddings."""
    noise_std: float = 1e-2
    """Std of the initial Gaussian perturbation, clamped to +-2 std (microsoft/DeBERTa: vat_init_perturbation)."""
    step_size: float = 1e-4
    """Size of the one ascent step, per token max-normalised (vat_learning_rate)."""
    weight: float = 1.0
    """lambda: weight of the consistency loss added to the task loss (vat_lambda; their MNLI recipes: 3)."""


@dataclass
class FinetuneConfig(RunConfig):
    """The sections in config.yaml's order: model, run, data, train, optim, zero, precision, parallel
    (RunConfig's places), then eval, checkpoint, log, sift. (The same shape as PretrainConfig's list
    by design: each redeclares RunConfig's `Any` sections with its own section types.)"""
    model: FinetuneModelSection = field(default_factory=FinetuneModelSection)
    run: RunSection = field(default_factory=lambda: RunSection(name="finetune"))
    data: FinetuneDataSection = field(default_factory=FinetuneDataSection)
    train: FinetuneTrainSection = field(default_factory=FinetuneTrainSection)
    optim: FinetuneOptimSection = field(default_factory=FinetuneOptimSection)
    eval: FinetuneEvalSection = field(default_factory=FinetuneEvalSection)
    checkpoint: FinetuneCheckpointSection = field(default_factory=FinetuneCheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    sift: SiftSection = field(default_factory=SiftSection)

    def validate(self) -> None:
        super().validate()
        _choice("data.kind", self.data.kind, KINDS)
        _choice("data.format", self.data.format, ("auto",) + FORMATS)
        _choice("checkpoint.export", self.checkpoint.export, EXPORTS)
        _choice("model.pooling", self.model.pooling, POOLINGS)
        if self.model.pooling != "cls" and self.checkpoint.export == "hf":
            raise UserError(f"model.pooling={self.model.pooling} has no Hugging Face classifier to export to "
                            f"(they read the first token): set checkpoint.export=none, or model.pooling=cls")
        if self.model.random_init and not self.model.init:
            raise UserError("model.random_init=true needs model.init (whose architecture, sizes and tokenizer it "
                            "keeps): pass model.init=PATH")
        for key in ("model.init", "data.train", "data.validation"):
            if not get_key(self, key):
                raise UserError(f"{key} is not set: pass {key}=PATH")
        if self.parallel.tensor != 1:
            raise UserError(f"parallel.tensor={self.parallel.tensor}: fine-tuning runs data-parallel only; "
                            f"set parallel.tensor=1")
        self.require_positive("train.micro_batch_size", "train.global_batch_size", "train.epochs", "data.max_length",
                              "eval.batch_size", "log.every_steps", "optim.lr", "optim.layer_decay",
                              "train.collective_timeout_s")
        if self.data.max_length < 8:
            raise UserError(f"data.max_length={self.data.max_length} is too short; use at least 8")
        if not 0.0 <= self.optim.warmup_ratio <= 1.0:
            raise UserError(f"optim.warmup_ratio={self.optim.warmup_ratio} must be between 0 and 1")
        if not self.train.seeds:
            raise UserError("train.seeds is empty; give at least one seed, e.g. train.seeds=[1]")
        if len(set(self.train.seeds)) != len(self.train.seeds):
            raise UserError(f"train.seeds={self.train.seeds} repeats a seed")
        self.require_not_negative("sift.noise_std", "sift.step_size", "sift.weight", "eval.every_steps",
                                  "train.max_bad_steps")
        unknown = sorted(set(self.model.overrides) - {"hidden_dropout", "attention_dropout"})
        if unknown:
            raise UserError(f"model.overrides.{unknown[0]}: only hidden_dropout and attention_dropout can be "
                            f"changed when fine-tuning")
        if self.eval.metric and self.eval.metric not in self.metric_choices():
            raise UserError(f"eval.metric={self.eval.metric!r} is not one of {', '.join(self.metric_choices())} "
                            f"for data.kind={self.data.kind}")

    def metric_choices(self) -> Tuple[str, ...]:
        if self.data.kind == "regression":
            return ("pearson_spearman", "pearson", "spearman")
        return ("accuracy", "f1", "mcc")

    @property
    def best_metric(self) -> str:
        return self.eval.metric or self.metric_choices()[0]


def load_finetune_config(path: Optional[str], overrides=()) -> FinetuneConfig:
    return _load_config(path, overrides, cls=FinetuneConfig)
