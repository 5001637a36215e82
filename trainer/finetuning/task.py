"""The fine-tuning task: its examples encoded, the data order of each step, the loss, and predictions over the validation split."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.seeding import derive_rng
from data.errors import UserError
from data.tasks import EncodedTask, collate, encode, label_ids, label_names, read_examples
from data.tokenizer import Tokenizer
from models.registry import get_family
from trainer.finetuning.config import FinetuneConfig
from trainer.finetuning.initial_model import InitialModel

EPOCH_STREAM = 0x46544E45  # "FTNE": keeps the fine-tuning data order apart from other random streams


@dataclass
class Task:
    train: EncodedTask
    validation: EncodedTask
    labels: List[str]  # class names in id order (empty for regression)
    num_labels: int
    regression: bool


def load_task(cfg: FinetuneConfig, tokenizer: Tokenizer, init: InitialModel) -> Task:
    if tokenizer.vocab_size != init.config.vocab_size:
        raise UserError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but model.init has a "
                        f"vocabulary of {init.config.vocab_size}; use the tokenizer the model was trained with")
    family = get_family(init.family)
    limit = family.max_input_length(init.config)
    if limit is not None and cfg.data.max_length > limit:
        raise UserError(f"data.max_length={cfg.data.max_length} exceeds the model's {limit} positions")
    fmt = cfg.data  # a TaskFormat
    train, valid = read_examples(cfg.data.train, fmt), read_examples(cfg.data.validation, fmt)
    if len(train[0].texts) != len(valid[0].texts):
        raise UserError(f"{cfg.data.train} has {len(train[0].texts)} text columns but {cfg.data.validation} "
                        f"has {len(valid[0].texts)}")
    names = label_names(train, fmt)
    regression = cfg.data.kind == "regression"
    if not regression and len(names) < 2:
        raise UserError(f"{cfg.data.train}: only one class ({', '.join(names)}); a classifier needs two or more")
    encoded = [encode(examples, label_ids(examples, fmt, names), tokenizer, cfg.data.max_length, family.pair_separators)
               for examples in (train, valid)]
    return Task(encoded[0], encoded[1], names, 1 if regression else len(names), regression)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return derive_rng(seed, epoch, EPOCH_STREAM).permutation(n)


def step_micro_batches(task: EncodedTask, seed: int, step: int, steps_per_epoch: int, global_batch: int,
                       micro_batch: int, dp_rank: int, dp_size: int) -> List[List[int]]:
    """This rank's micro-batches (example indices) of optimizer step `step` (from 1)."""
    epoch, position = divmod(step - 1, steps_per_epoch)
    batch = epoch_order(seed, epoch, len(task))[position * global_batch:(position + 1) * global_batch]
    per_rank = global_batch // dp_size
    mine = batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    return [mine[i:i + micro_batch].tolist() for i in range(0, per_rank, micro_batch)]


def task_loss_sum(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Summed over the micro-batch: cross-entropy, or squared error of the one output."""
    if regression:
        return ((logits.float().squeeze(-1) - labels.float()) ** 2).sum()
    return F.cross_entropy(logits.float(), labels, reduction="sum")


@torch.no_grad()
def predict(engine, task: EncodedTask, batch_size: int, pad_id: int, ctx) -> Tuple[np.ndarray, np.ndarray]:
    """Logits of every validation example (this rank's stride, gathered): (N, C) and labels (N,)."""
    engine.eval()
    mine = list(range(ctx.dp_rank, len(task), ctx.dp_size))
    # every rank runs the same number of forwards (ZeRO-3 gathers weights collectively in each one);
    # a rank with fewer examples repeats one and drops the result
    passes = math.ceil(math.ceil(len(task) / ctx.dp_size) / batch_size)
    outputs = []
    for i in range(0, passes * batch_size, batch_size):
        indices = mine[i:i + batch_size]
        batch = collate(task, indices or [0], pad_id)
        logits = engine(input_ids=batch["input_ids"].to(ctx.device), attention_mask=batch["attention_mask"].to(ctx.device))
        if indices:
            outputs.append(logits.float().cpu().numpy())
    engine.train()
    local = (mine, np.concatenate(outputs) if outputs else np.zeros((0, 1), np.float32))
    parts = [local]
    if ctx.dp_size > 1:
        parts = [None] * ctx.dp_size
        dist.all_gather_object(parts, local, group=ctx.dp_group)
    order = np.concatenate([np.asarray(p[0], dtype=np.int64) for p in parts])
    logits = np.concatenate([p[1] for p in parts if len(p[0])])
    result = np.empty_like(logits)
    result[order] = logits
    return result, task.labels


