"""A linear probe during pretraining: how well a labelled task is linearly separable in the features
of the model being trained (an RTD model's discriminator, an MLM model's encoder).

Every `probe.every_steps` steps (and at the last step) every rank runs the frozen model, in eval mode
and without gradients, over the probe's examples (its share of them: batches are dealt round-robin
over the data-parallel ranks, tensor-parallel peers take the same ones, and every rank makes the same
number of forward calls, as ZeRO-3's parameter gathering needs); the pooled features are summed over
the data-parallel group (each row is nonzero on one rank only, so the sum is exact), and global rank 0
fits a multinomial logistic regression on the training features and scores it on the validation ones.
The fit is deterministic: standardised float64 features, zero initial weights, L2 penalty, full-batch
L-BFGS for a fixed iteration budget, so the same features give the same accuracy bit for bit.

The task files are read, checked and tokenized once when the run starts (`build_probe`), in the
fine-tuning formats (data/tasks.py): a mistake in them stops the run before step 1 with a UserError.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.registry import get_family, get_spec
from data.seeding import derive_rng
from data.errors import UserError
from data.tasks import EncodedTask, collate, encode, label_ids, label_names, read_examples
from trainer.pretraining.config import PretrainConfig, ProbeSection
from trainer.core.parallel import ParallelContext

logger = logging.getLogger("trainer.probe")
SUBSET_STREAM = 0x50524F42  # "PROB": the fixed subset of a file longer than probe.max_examples
LBFGS_ITERATIONS = 100  # enough to converge on standardised features; fixed, so the fit is repeatable


# ----------------------------------------------------------------------------- the task
@dataclass
class ProbeTask:
    train: EncodedTask
    validation: EncodedTask
    labels: List[str]  # class names in id order


def _probe_keys(err: UserError) -> UserError:
    """data/tasks.py's messages name fine-tuning's keys (data.text_columns, ...); here they are probe.*.
    Only whole keys are renamed: not a file name such as runs/data.train.tsv."""
    keys = r"(?<![\w/.-])data\.(train|validation|kind|format|columns|text_columns|label_column|labels)(?=[\s=,;)]|$)"
    return UserError(re.sub(keys, r"probe.\1", str(err)))


def _subset(examples: list, limit: int) -> list:
    if len(examples) <= limit:
        return examples
    rng = derive_rng(SUBSET_STREAM, len(examples))
    return [examples[i] for i in np.sort(rng.choice(len(examples), limit, replace=False))]


def load_probe_task(probe: ProbeSection, tokenizer, max_length: int, pair_separators: int = 1) -> ProbeTask:
    """Reads, checks and tokenizes the probe's files (at most `probe.max_examples` of each)."""
    try:
        train, valid = read_examples(probe.train, probe), read_examples(probe.validation, probe)
        if len(train[0].texts) != len(valid[0].texts):
            raise UserError(f"{probe.train} has {len(train[0].texts)} text columns but {probe.validation} "
                            f"has {len(valid[0].texts)}")
        names = label_names(train, probe)  # from the whole file: a subset may miss a rare class
        if len(names) < 2:
            raise UserError(f"{probe.train}: only one class ({', '.join(names)}); a linear probe needs two or more")
        train, valid = _subset(train, probe.max_examples), _subset(valid, probe.max_examples)
        labels = [label_ids(examples, probe, names) for examples in (train, valid)]  # checks before tokenizing
        encoded = [encode(examples, ids, tokenizer, max_length, pair_separators)
                   for examples, ids in zip((train, valid), labels)]
    except UserError as err:
        raise _probe_keys(err) from None
    return ProbeTask(encoded[0], encoded[1], names)


# ----------------------------------------------------------------------------- features
def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, H) hidden states, (B, T) mask -> (B, H) float32: mean over real tokens, or the first token."""
    from models.classification import summarize  # the same pooling fine-tuning's model.pooling uses
    return summarize(hidden.float(), attention_mask, pooling)


@torch.no_grad()
def extract_features(encode_fn: Callable, ids: List[np.ndarray], pad_id: int, batch_size: int, pooling: str,
                     dp_rank: int, dp_size: int, device: torch.device) -> torch.Tensor:
    """(N, H) float32 pooled features: this data-parallel rank's rows, zeros elsewhere (sum over the
    data-parallel group for all of them).

    Batches hold examples of similar length (less padding); batch k goes to data-parallel rank
    k mod D. A rank without a batch in the last round repeats one and discards it: under ZeRO-3 every
    rank must take part in every forward.
    """
    order = np.argsort([len(x) for x in ids], kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    task = EncodedTask(ids, np.zeros(len(ids), dtype=np.int64))
    features = None
    for r in range(math.ceil(len(batches) / dp_size)):
        k = r * dp_size + dp_rank
        rows = batches[min(k, len(batches) - 1)]
        batch = collate(task, rows, pad_id)
        mask = batch["attention_mask"].to(device)
        pooled = pool(encode_fn(batch["input_ids"].to(device), mask), mask, pooling)  # (B, H)
        if features is None:
            features = torch.zeros(len(ids), pooled.shape[-1], dtype=torch.float32, device=device)
        if k < len(batches):
            features[torch.as_tensor(rows, device=device)] = pooled
    return features


# ----------------------------------------------------------------------------- the linear probe
@dataclass
class LinearProbe:
    """Multinomial logistic regression on standardised features."""
    mean: torch.Tensor  # (H,) float64
    scale: torch.Tensor  # (H,)
    weight: torch.Tensor  # (H, C)
    bias: torch.Tensor  # (C,)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        z = (features.double() - self.mean) / self.scale
        return (z @ self.weight + self.bias).argmax(dim=-1)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.predict(features) == labels).double().mean())


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float,
                     iterations: int = LBFGS_ITERATIONS) -> LinearProbe:
    """Minimises mean cross-entropy + l2/2 ||W||^2 (bias unpenalised) by full-batch L-BFGS in float64,
    from zero weights: no randomness, so the same features give the same probe bit for bit."""
    x = features.detach().cpu().double()
    y = labels.detach().cpu().long()
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    scale = torch.where(std > 0, std, torch.ones_like(std))  # a constant feature stays 0
    z = (x - mean) / scale  # (N, H)
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=iterations, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight + bias, y) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearProbe(mean, scale, weight.detach(), bias.detach())


# ----------------------------------------------------------------------------- in the run
class Probe:
    """The probe of one run: the tokenized task, and `run` at the due steps."""

    def __init__(self, section: ProbeSection, task: ProbeTask, pad_id: int, batch_size: int):
        self.section = section
        self.task = task
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.ids = task.train.ids + task.validation.ids  # one feature pass over both files
        self.train_labels = torch.from_numpy(task.train.labels)
        self.valid_labels = torch.from_numpy(task.validation.labels)
        majority = np.bincount(task.train.labels, minlength=len(task.labels)).argmax()
        self.majority_accuracy = float((task.validation.labels == majority).mean())  # probe_accuracy's baseline

    def due(self, step: int, last_step: int) -> bool:
        every = self.section.every_steps
        return bool(every) and (step % every == 0 or step == last_step)

    def run(self, engine, ctx: ParallelContext, step: int) -> Dict[str, float]:
        """Features on every rank; the fit and the record on global rank 0 (other ranks: {})."""
        start = time.perf_counter()
        engine.eval()
        try:
            features = extract_features(engine.module.encode, self.ids, self.pad_id, self.batch_size,
                                        self.section.pooling, ctx.dp_rank, ctx.dp_size, ctx.device)
        finally:
            engine.train()
        if ctx.dp_size > 1:
            dist.all_reduce(features, group=ctx.dp_group)  # each row: one rank's value plus zeros, exact
        if not ctx.is_main:
            return {}
        features = features.cpu()
        n = len(self.task.train)
        probe = fit_linear_probe(features[:n], self.train_labels, len(self.task.labels), self.section.l2)
        record = {"probe_accuracy": probe.accuracy(features[n:], self.valid_labels),
                  "probe_train_accuracy": probe.accuracy(features[:n], self.train_labels),
                  "probe_majority_accuracy": self.majority_accuracy,
                  "probe_seconds": time.perf_counter() - start}
        logger.info("step %d probe accuracy %.4f (train %.4f, majority class %.4f; %d + %d examples, %.2f s)",
                    step, record["probe_accuracy"], record["probe_train_accuracy"], self.majority_accuracy,
                    n, len(self.task.validation), record["probe_seconds"])
        return record


def build_probe(cfg: PretrainConfig, tokenizer) -> Optional[Probe]:
    """The run's probe (None when probe.every_steps is 0); reads and tokenizes the task files now."""
    if not cfg.probe.every_steps:
        return None
    max_length = cfg.probe.max_length or cfg.data.seq_length
    separators = get_family(get_spec(cfg.model.name).family).pair_separators  # RoBERTa: <s> a </s></s> b </s>
    task = load_probe_task(cfg.probe, tokenizer, max_length, separators)
    return Probe(cfg.probe, task, tokenizer.pad_id, cfg.train.micro_batch_size)
