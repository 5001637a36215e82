"""The pretraining run's configuration: its sections (model, data, train, optim, eval, probe, debug)
beside the shared ones (trainer/core/config.py), loaded from YAML plus `key.sub=value` overrides."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from models.registry import MODELS, get_spec
from data.errors import UserError
from data.tasks import TaskFormat
from trainer.core.config import AdamWSection, CheckpointSection, LogSection, RunConfig, _choice, get_key
from trainer.core.config import load_config as _load_config
from trainer.core.schedule import LRCurve

PACKINGS = ("full_sentences", "doc_sentences", "packed_documents", "segment_pair", "sentence_pair")
PAIR_PACKINGS = ("segment_pair", "sentence_pair")  # sentence pairs with next-sentence prediction


@dataclass
class ModelSection:
    name: str = "roberta"
    """Architecture name in the model registry (`roberta`)."""
    size: str = "debug"
    """Size in the registry: debug, xsmall, small, base, large."""
    vocab_pad_multiple: int = 128
    """The embedding rows are padded to a multiple of lcm(this, `parallel.tensor`): the same at any TP <= it."""
    overrides: Dict[str, Any] = field(default_factory=dict)
    """Any field of the architecture's config, e.g. {hidden_dropout: 0.0}; checked by the registry."""
    init: Optional[str] = None
    """Start from this native model file (tools/convert_checkpoint.py --format native, or --from-hf):
    its config and weights, so `size` and `overrides` do not apply. Ignored when the run resumes."""
    activation_checkpointing: bool = False
    """Recompute each encoder layer's activations in backward instead of keeping them (both towers of
    an RTD model): activation memory of about one layer, for about one more forward pass of compute."""
    compile: bool = False
    """torch.compile each encoder layer (not the whole model: its predicted positions vary per batch).
    The first steps of every new batch shape pay the compilation."""


@dataclass
class DataSection:
    prefix: str = ""
    """PREFIX of the preprocessed PREFIX.bin/.idx/.json (tools/preprocess_data.py). Required unless `blend`."""
    blend: List[Tuple[float, str]] = field(default_factory=list)
    """Several corpora with weights, [[weight, PREFIX], ...]; replaces `prefix` (which must then be empty or
    one of them). Weights are normalised; each corpus is split into train/validation/test by its documents."""
    tokenizer: Optional[str] = None
    """Tokenizer directory; by default the one recorded by preprocessing in PREFIX.json."""
    seq_length: int = 512
    """Tokens per sample including <s> and </s>."""
    packing: str = "full_sentences"
    """full_sentences: contiguous text that may cross documents, </s> between documents;
    doc_sentences: samples never cross a document, short documents give short samples
    (use with train.tokens_per_step, as RoBERTa does, to keep tokens per step about constant);
    packed_documents: rows filled with whole documents (best-fit, longest first, within windows of 1000
    documents; longer ones cut into pieces), each framed `<s> ... </s>` as doc_sentences frames it, and
    `attention_mask` numbering the row's documents 1..k (0 = padding) so models attend within each one;
    segment_pair / sentence_pair: BERT's pairs of multi-sentence segments / of single sentences, B the
    continuation of A or (half the time) from another document, trained with next-sentence prediction
    (the model's NSP head is turned on; roberta and deberta only; data/pairs.py)."""
    pad_to_multiple_of: int = 8
    """A micro-batch is padded to its longest sample rounded up to this multiple (at most seq_length), so
    doc_sentences' short samples cost short rows; 0 pads every batch to seq_length (fixed shapes)."""
    mask_prob: float = 0.15
    """Fraction of non-special tokens selected for prediction (RoBERTa/BERT: 15%); validation always uses it."""
    mask_prob_schedule: List[Tuple[int, float]] = field(default_factory=list)
    """Masking-rate curriculum (MLM and the RTD generator), [[0, p0], [n1, p1], ...]: steps after n_k (up to the
    next point) mask p_k of the tokens, e.g. mmBERT's [[0, 0.3], [n1, 0.15], [n2, 0.05]]; empty: `mask_prob`
    throughout. Dynamic masking only; the rate follows the optimizer step that consumes the sample."""
    seq_length_schedule: List[Tuple[int, int]] = field(default_factory=list)
    """Sequence-length curriculum, [[0, L0], [n1, L1], ...]: the steps after n_k (up to the next point) train on
    rows of L_k tokens packed at that length (data.packing as configured), e.g. BERT's [[0, 128], [0.9 x steps,
    512]]; each phase reads its own sample stream from its start. With train.tokens_per_step the token budget
    keeps tokens per step constant (shorter rows, more of them); without it every step takes
    train.global_batch_size rows of its phase's length (BERT's recipe: tokens per step grow with the length).
    Every L_k <= data.seq_length, which sizes the model's positions and the validation rows. Empty:
    data.seq_length throughout."""
    mask_token_prob: float = 0.8
    """Of the selected tokens: this fraction becomes <mask> ..."""
    random_token_prob: float = 0.1
    """... this fraction a random token, and the rest stay unchanged (80/10/10)."""
    whole_word_mask: bool = False
    """Mask whole words (word starts: 'Ġ' for byte-level BPE, '▁' for SentencePiece) instead of tokens."""
    max_span: int = 1
    """n-gram masking: masked spans of 1..max_span units (words with whole_word_mask), p(n) ∝ 1/n; 1 = off."""
    masking: str = "dynamic"
    """dynamic: a new mask per presentation (RoBERTa); static: the masks drawn at preprocessing
    (tools/preprocess_data.py --static-masks N, BERT's 10 copies), copy e mod N in epoch e of the corpus,
    copy 0 for validation. The mask_* keys above must then equal those it recorded (data/static_masks.py)."""
    valid_fraction: float = 0.01
    """Fraction of documents (the last ones, before the test ones) held out for validation; at least one when > 0."""
    test_fraction: float = 0.0
    """Fraction of documents (the very last ones) held out as a test split; at least one when > 0."""
    cache_dir: Optional[str] = None
    """Where sample indices are cached (built once per node, reused while their parameters hold);
    default: `index-cache/` beside the (first) prefix."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""

    def corpora(self) -> List[Tuple[float, str]]:
        """(weight, prefix) of every corpus: `blend`, or `prefix` alone with weight 1."""
        return [(float(w), str(p)) for w, p in self.blend] if self.blend else [(1.0, self.prefix)]


@dataclass
class TrainSection:
    steps: int = 100
    """Optimizer steps to train, counted from 1."""
    micro_batch_size: int = 8
    """Sequences per rank per forward/backward."""
    global_batch_size: int = 8
    """Sequences per optimizer step = micro_batch_size x accumulation steps x data-parallel size."""
    seed: int = 1234
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 turns clipping off."""
    max_bad_steps: int = 10
    """A step whose loss is NaN/Inf is skipped (no update); this many in a row stop the run (exit 3)."""
    tokens_per_step: int = 0
    """Token budget per optimizer step over all ranks (<s>/</s> included, padding not): a step takes as many
    samples as fit, in micro-batches of at most micro_batch_size, and the trainer drives gradient accumulation;
    0 = fixed global_batch_size samples (global_batch_size then only sizes DeepSpeed's nominal batch)."""
    batch_warmup_steps: int = 0
    """Batch-size warmup (ModernBERT) over the first N steps, with tokens_per_step: step s <= N takes a budget of
    a + (tokens_per_step - a) x (s - 1) // N tokens, a = round(batch_warmup_start x tokens_per_step), and the
    steps after N take tokens_per_step. 0 = off."""
    batch_warmup_start: float = 0.25
    """The first warmup step's share of tokens_per_step, in (0, 1] (ModernBERT: 768 / 4608 sequences = 1/6)."""
    rtd_schedule: str = "joint"
    """RTD models: "joint" trains generator and discriminator together; "two_stage" (the ELECTRA
    ablation) trains the generator alone for `generator_steps`, initialises the discriminator from it
    where shapes match, then trains the discriminator alone with the generator frozen
    (trainer/core/schedule.py)."""
    generator_steps: int = 0
    """two_stage: steps of the generator-only stage; 0 means half of `steps`."""
    collective_timeout_s: float = 1800.0
    """A collective (all-reduce, broadcast, barrier) that waits longer than this for a peer rank fails, and
    the run exits non-zero naming it: a hung or stopped rank then ends the job instead of blocking it forever.
    Raise it if a step, an evaluation or a checkpoint save on rank 0 can take longer."""


@dataclass
class OptimSection(AdamWSection):
    """AdamW's lr, betas, eps, weight_decay (RoBERTa's defaults), then the schedule."""
    warmup_steps: int = 10
    """Linear warmup from 0 to `lr` (step s <= W uses s / W), then the `schedule`'s decay."""
    min_lr: float = 0.0
    """The LR the decay ends at, at `train.steps`."""
    schedule: str = "linear"
    """linear: linear decay to `min_lr` at train.steps; cosine: cosine decay to it; wsd (warmup-stable-decay):
    `lr` until the decay, then a `decay_shape` decay to `min_lr` at train.steps (trainer/core/schedule.py)."""
    decay_steps: int = 0
    """wsd: steps of the decay, the last ones of the run (0 and no decay_start_step: no decay)."""
    decay_start_step: int = 0
    """wsd: the last step at full LR, the decay taking steps decay_start_step+1..train.steps (0: train.steps -
    decay_steps). Resuming a stable-phase checkpoint of step S with decay_start_step=S (and any train.steps)
    continues it into a fresh decay."""
    decay_shape: str = "linear"
    """wsd: the decay's shape over x = its fraction done: linear 1-x, cosine, sqrt sqrt(1-x), 1-sqrt 1-sqrt(x)."""
    generator_lr: Optional[float] = None
    """RTD models: peak LR of the generator's own parameters (its own optimizer group; tables shared
    under `es` follow `lr`). None: `lr`. Clipping stays global over both towers (trainer/core/schedule.py)."""


@dataclass
class EvalSection:
    every_steps: int = 0
    """Evaluate the held-out split every N steps (and at the end); 0 turns evaluation off."""
    samples: int = 256
    """Held-out samples per evaluation, with fixed masks so the loss is comparable over the run."""


@dataclass
class ProbeSection(TaskFormat):
    """A linear probe (trainer/pretraining/probe.py): multinomial logistic regression on frozen pooled features of
    the model being pretrained (an RTD model's discriminator, an MLM model's encoder), trained on
    `train` and scored on `validation` (fine-tuning's task formats; `kind` must be classification),
    logged as probe_accuracy. From TaskFormat: kind, format, columns, text_columns, label_column, labels."""
    every_steps: int = 0
    """Probe every N optimizer steps (and at the last step); 0 turns the probe off."""
    train: str = ""
    """Training file of the probe: .tsv, .csv or .jsonl with named columns (GLUE's layout works as is)."""
    validation: str = ""
    """Validation file, same layout: probe_accuracy is the accuracy on it."""
    max_length: Optional[int] = None
    """Tokens per example, special tokens included, cut longest-text-first; None: data.seq_length."""
    max_examples: int = 2000
    """At most this many examples of each file (a fixed random subset, the same in every run): the cost."""
    pooling: str = "mean"
    """mean: the last hidden layer averaged over real tokens; cls: its first token ([CLS] / <s>)."""
    l2: float = 1e-3
    """L2 penalty on the probe's weights (its features are standardised), added to the mean cross-entropy."""

    def validate(self, seq_length: int) -> None:
        """The files themselves are read (and their mistakes reported) when the run starts."""
        _choice("probe.pooling", self.pooling, ("mean", "cls"))
        if self.every_steps < 0:
            raise UserError(f"probe.every_steps={self.every_steps} must not be negative (0: off)")
        if not self.every_steps:
            return
        if not self.train or not self.validation:
            raise UserError("probe.every_steps is set but probe.train or probe.validation is not: "
                            "name the probe's task files (TSV/CSV/JSONL)")
        if self.kind != "classification":
            raise UserError(f"probe.kind={self.kind!r}: a linear probe needs a classification task")
        if self.max_length is not None and not 3 <= self.max_length <= seq_length:
            raise UserError(f"probe.max_length={self.max_length} must be in [3, data.seq_length={seq_length}]")
        if self.max_examples < 2:
            raise UserError(f"probe.max_examples={self.max_examples} must be at least 2")
        if self.l2 < 0:
            raise UserError(f"probe.l2={self.l2} must not be negative")


@dataclass
class DebugSection:
    """Fault injection for the fault-tolerance tests; leave empty in real runs."""
    nan_loss_steps: List[int] = field(default_factory=list)
    """Steps whose loss is replaced by NaN (exercises the skip path)."""
    crash_in_save_step: int = 0
    """Kill every rank after its checkpoint files are written but before the commit, at this step."""


@dataclass
class PretrainConfig(RunConfig):
    """The sections in config.yaml's order: model, run, data, train, optim, zero, precision, parallel
    (RunConfig's places), then checkpoint, log, eval, probe, debug."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    eval: EvalSection = field(default_factory=EvalSection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    debug: DebugSection = field(default_factory=DebugSection)

    def validate(self) -> None:
        """Checks that need no process group; `check_batch` needs the data-parallel size."""
        super().validate()
        _choice("data.masking", self.data.masking, ("dynamic", "static"))
        if self.data.masking == "static" and self.data.packing in ("segment_pair", "sentence_pair"):
            raise UserError(f"data.masking=static does not support data.packing={self.data.packing}; "
                            f"use data.masking=dynamic or another data.packing")
        _choice("data.packing", self.data.packing, PACKINGS)
        if self.data.packing in PAIR_PACKINGS and "next_sentence_label" not in get_spec(self.model.name).batch_keys:
            with_head = " / ".join(name for name, spec in MODELS.items() if "next_sentence_label" in spec.batch_keys)
            raise UserError(f"data.packing={self.data.packing} trains next-sentence prediction, which model "
                            f"{self.model.name} has no head for; use data.packing=full_sentences or doc_sentences "
                            f"(or model.name={with_head})")
        if self.model.overrides.get("next_sentence_head") is True and self.data.packing not in PAIR_PACKINGS:
            raise UserError(f"model.overrides next_sentence_head=true needs the NSP labels of data.packing="
                            f"segment_pair or sentence_pair, not {self.data.packing}")
        if not self.data.prefix and not self.data.blend:
            raise UserError("data.prefix is not set: pass data.prefix=PATH/PREFIX (from tools/preprocess_data.py)")
        if self.data.blend and self.data.prefix and self.data.prefix not in [p for _, p in self.data.blend]:
            raise UserError(f"data.prefix={self.data.prefix} is not one of data.blend's prefixes; "
                            f"set data.prefix= (empty) or drop data.blend")
        if self.data.blend and (any(w < 0 for w, _ in self.data.blend) or sum(w for w, _ in self.data.blend) <= 0):
            raise UserError(f"data.blend weights must be non-negative and not all zero: {self.data.blend}")
        if self.data.max_span < 1:
            raise UserError(f"data.max_span={self.data.max_span} must be >= 1")
        if self.data.pad_to_multiple_of < 0:
            raise UserError(f"data.pad_to_multiple_of={self.data.pad_to_multiple_of} must be 0 (pad to seq_length) "
                            f"or positive")
        if self.train.tokens_per_step < 0 or 0 < self.train.tokens_per_step < self.data.seq_length:
            raise UserError(f"train.tokens_per_step={self.train.tokens_per_step} must be 0 (off) or at least "
                            f"data.seq_length={self.data.seq_length}")
        self.require_positive("data.seq_length", "train.steps", "train.micro_batch_size", "train.global_batch_size",
                              "parallel.tensor", "model.vocab_pad_multiple", "log.every_steps",
                              "train.collective_timeout_s")
        if self.data.seq_length < 8:
            raise UserError(f"data.seq_length={self.data.seq_length} is too short; use at least 8")
        for key in ("data.mask_prob", "data.mask_token_prob", "data.random_token_prob", "data.valid_fraction",
                    "data.test_fraction"):
            value = get_key(self, key)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{key}={value} must be between 0 and 1")
        if self.data.mask_token_prob + self.data.random_token_prob > 1.0:
            raise UserError("data.mask_token_prob + data.random_token_prob must not exceed 1")
        self._check_mask_prob_schedule()
        self._check_length_and_batch_curricula()
        if self.optim.lr <= 0 or self.optim.min_lr < 0 or self.optim.min_lr > self.optim.lr:
            raise UserError(f"optim.lr={self.optim.lr} must be > 0 and optim.min_lr={self.optim.min_lr} in [0, lr]")
        if self.optim.generator_lr is not None and self.optim.generator_lr <= 0:
            raise UserError(f"optim.generator_lr={self.optim.generator_lr} must be > 0 (or null: optim.lr)")
        _choice("train.rtd_schedule", self.train.rtd_schedule, ("joint", "two_stage"))
        if self.train.generator_steps < 0 or (self.train.rtd_schedule == "two_stage"
                                              and self.train.generator_steps >= self.train.steps):
            raise UserError(f"train.generator_steps={self.train.generator_steps} must be in [0, train.steps) "
                            f"(0: half of train.steps)")
        if not 0 <= self.optim.warmup_steps <= self.train.steps:
            raise UserError(f"optim.warmup_steps={self.optim.warmup_steps} must be in [0, train.steps={self.train.steps}]")
        LRCurve(self.optim.schedule, self.optim.decay_steps, self.optim.decay_start_step,
                self.optim.decay_shape).check(self.optim.warmup_steps, self.train.steps)
        if self.train.rtd_schedule == "two_stage" and self.optim.schedule == "wsd":
            raise UserError("optim.schedule=wsd does not combine with train.rtd_schedule=two_stage (each stage has "
                            "its own warmup and decay): use optim.schedule=linear or cosine")
        self.probe.validate(self.data.seq_length)
        self.require_not_negative("checkpoint.every_steps", "checkpoint.keep_last", "checkpoint.keep_every",
                                  "checkpoint.every_minutes", "eval.every_steps", "eval.samples", "train.max_bad_steps")

    def _check_step_points(self, points, key: str, form: str) -> None:
        """A curriculum's [step, value] points: from step 0, steps increasing, all inside the run."""
        steps = [step for step, _ in points]
        if steps[0] != 0:
            raise UserError(f"{key} must start at step 0 (its first point is [{steps[0]}, ...]): {form}")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise UserError(f"{key} steps must increase: {steps}")
        if steps[-1] >= self.train.steps:
            raise UserError(f"{key} point at step {steps[-1]} is beyond the run: its steps must be below "
                            f"train.steps={self.train.steps}")

    def _check_mask_prob_schedule(self) -> None:
        points, key = self.data.mask_prob_schedule, "data.mask_prob_schedule"
        if not points:
            return
        if self.data.masking == "static":
            raise UserError(f"{key} needs data.masking=dynamic: static masks were drawn at one rate at preprocessing")
        self._check_step_points(points, key, "[[0, p0], [n1, p1], ...]")
        for step, rate in points:
            if not 0.0 < rate < 1.0:
                raise UserError(f"{key} rate {rate} (at step {step}) must be in (0, 1)")

    def _check_length_and_batch_curricula(self) -> None:
        points, key = self.data.seq_length_schedule, "data.seq_length_schedule"
        if points:
            self._check_step_points(points, key, "[[0, L0], [n1, L1], ...]")
            for step, length in points:
                if not 8 <= length <= self.data.seq_length:
                    raise UserError(f"{key} length {length} (at step {step}) must be in [8, data.seq_length="
                                    f"{self.data.seq_length}]: data.seq_length sizes the model's positions "
                                    f"(max_position_embeddings), so raise it to the longest phase")
            if self.data.packing in PAIR_PACKINGS or self.data.masking == "static":
                raise UserError(f"{key} supports data.packing=full_sentences, doc_sentences or packed_documents "
                                f"with data.masking=dynamic")
        warmup = self.train.batch_warmup_steps
        if warmup < 0 or warmup >= self.train.steps:
            raise UserError(f"train.batch_warmup_steps={warmup} must be in [0, train.steps={self.train.steps}) "
                            f"(0: off)")
        if warmup and not self.train.tokens_per_step:
            raise UserError("train.batch_warmup_steps needs train.tokens_per_step (the budget it warms up); "
                            "set train.tokens_per_step")
        if warmup and not 0.0 < self.train.batch_warmup_start <= 1.0:
            raise UserError(f"train.batch_warmup_start={self.train.batch_warmup_start} must be in (0, 1]")

    def length_at(self, step: int) -> int:
        """The row length of optimizer step `step` (data.seq_length_schedule, else data.seq_length)."""
        length = self.data.seq_length
        for start, value in self.data.seq_length_schedule:
            if step > start:
                length = int(value)
        return length

    def check_batch(self, data_parallel_size: int) -> int:
        """RunConfig's, after the checks of a token budget per step (the first warmup budget and every phase's)."""
        budget = self.train.tokens_per_step
        if budget and budget < self.data.seq_length * data_parallel_size:
            raise UserError(f"train.tokens_per_step={budget} must be at least data.seq_length x data-parallel size "
                            f"= {self.data.seq_length * data_parallel_size}, so that every rank gets a sample")
        if budget and self.train.batch_warmup_steps:
            from data.loader import batch_budget  # data/ knows nothing of the config; the formula lives there
            starts = [0] + [n for n, _ in self.data.seq_length_schedule if n < self.train.batch_warmup_steps]
            for n in starts:  # the budget rises and the length is constant within a phase: its first step is tightest
                least = batch_budget(budget, self.train.batch_warmup_steps, self.train.batch_warmup_start, n + 1)
                if least < self.length_at(n + 1) * data_parallel_size:
                    raise UserError(f"train.batch_warmup_start={self.train.batch_warmup_start} gives step {n + 1} "
                                    f"a budget of {least} tokens, below its row length {self.length_at(n + 1)} x "
                                    f"data-parallel size {data_parallel_size}; raise it")
        if budget and data_parallel_size > 1 and self.train.micro_batch_size < 2:
            raise UserError("train.micro_batch_size must be at least 2 with train.tokens_per_step and data "
                            "parallelism (rank shares differ by one sample and must split into as many micro-batches)")
        return super().check_batch(data_parallel_size)


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> PretrainConfig:
    """YAML file (optional) + overrides -> a validated PretrainConfig."""
    return _load_config(path, overrides, PretrainConfig)


def load_run_config(config: Optional[str], overrides: Sequence[str], run_dir: Optional[str],
                    run_flag: str = "--run-dir") -> PretrainConfig:
    """The config as training loads it: the recipe `config`, else the run's own config.yaml (for the tools
    that read a run: tools/show_batch.py, tools/evaluate_checkpoint.py; `run_flag` names their option)."""
    if config is None:
        if run_dir is None:
            raise UserError(f"give --config RECIPE (or {run_flag} RUN to use its config.yaml)")
        config = str(Path(run_dir) / "config.yaml")
        if not Path(config).is_file():
            raise UserError(f"{config} does not exist: {run_flag} takes a run directory ({{run.dir}}/{{run.name}}); "
                            f"or give --config")
    return load_config(config, overrides)
