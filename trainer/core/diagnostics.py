"""Is pretraining learning? Each diagnostic beside the baseline that a model learning nothing scores.

- `rtd_auc`: ROC AUC of the discriminator's logits, replaced (positive) vs original real tokens,
  from two summed fixed-bin histograms (models/rtd.py `logit_histogram`): P(replaced scores higher)
  + 0.5 P(same bin). 0.5 is chance.
- `rtd_prior_loss`: the binary cross-entropy of always predicting the replaced share p (replaced /
  real tokens over the window), -(p ln p + (1-p) ln(1-p)): what `loss_rtd` (per real token,
  without rtd_weight) is worth when the discriminator learns nothing but p.
- `unigram_accuracy`: the accuracy of always predicting the window's most frequent target token.
- `hidden_unigram_accuracy`: the same over the selected positions whose input is not the target ([MASK]
  or a random token), the baseline of `generator_hidden_accuracy` / `mlm_hidden_accuracy`, the model's
  accuracy there: only context can beat it, so it is the direct test of whether an MLM learned any.
- `context_free_accuracy`: what a model that reads no context scores, the baseline of
  `generator_accuracy` (RTD) and `mlm_accuracy` (RoBERTa, DeBERTa): at a selected position whose input
  is still a real token (BERT's 10% kept and 10% random) it predicts that input, at a [MASK] the
  window's most frequent target there. Copying the visible input is right wherever the token was
  kept, so with 80/10/10 masking this is about 0.8 x unigram + 0.1 and an accuracy between the unigram
  accuracy and it is no evidence of context; with every selected token masked
  (`data.mask_token_prob: 1.0`) it equals the unigram accuracy.
- `PlateauWatch`: a one-line warning when validation sits at those baselines for several evaluations.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from data.masking import IGNORE_INDEX

logger = logging.getLogger(__name__)


def histogram_auc(positive: np.ndarray, negative: np.ndarray) -> Optional[float]:
    """ROC AUC from two histograms over the same ordered bins (counts of positive / negative
    scores): P(positive > negative) + 0.5 P(same bin); None when either class is empty."""
    positive, negative = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    n_pos, n_neg = positive.sum(), negative.sum()
    if n_pos <= 0 or n_neg <= 0:
        return None
    below = np.cumsum(negative) - negative  # negatives in lower bins
    return float((positive * (below + 0.5 * negative)).sum() / (n_pos * n_neg))


def binary_entropy(positives: float, total: float) -> Optional[float]:
    """-(p ln p + (1-p) ln(1-p)), p = positives / total (nats, as the BCE loss); None if total is 0."""
    if not total:
        return None
    p = positives / total
    return -sum(q * math.log(q) for q in (p, 1.0 - p) if q > 0)


def target_counts(batches, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) float64 counts of the target ids (labels != IGNORE_INDEX) of host batches."""
    targets = [b["labels"][b["labels"] != IGNORE_INDEX].flatten() for b in batches]
    ids = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    return torch.bincount(ids.long(), minlength=vocab_size).double()


def context_free_counts(batches, vocab_size: int, mask_id: int) -> Dict[str, torch.Tensor]:
    """Over host batches (input_ids, labels), float64: `masked_target_counts` (vocab_size,) of the targets
    whose input is `mask_id`, `hidden_target_counts` (vocab_size,) of those whose input is not the target
    ([MASK] or a random token), and `copied_targets` (scalar), of those whose input is the target."""
    masked, hidden, copied = [], [], torch.zeros((), dtype=torch.float64)
    for batch in batches:
        labels, inputs = batch["labels"], batch["input_ids"]
        selected = labels != IGNORE_INDEX
        masked.append(labels[selected & (inputs == mask_id)].flatten())
        hidden.append(labels[selected & (inputs != labels)].flatten())
        copied += (selected & (inputs == labels)).sum().double()
    count = lambda ids: torch.bincount(torch.cat(ids).long() if ids else torch.zeros(0, dtype=torch.long),
                                       minlength=vocab_size).double()
    return {"masked_target_counts": count(masked), "hidden_target_counts": count(hidden), "copied_targets": copied}


def context_free_accuracy(masked_counts: np.ndarray, copied: float, total: float) -> Optional[float]:
    """(copied + the most frequent masked target's count) / total selected targets; None if there are none."""
    masked_counts = np.asarray(masked_counts, dtype=np.float64)
    best = masked_counts.max() if masked_counts.size else 0.0
    return float((float(copied) + best) / total) if total > 0 else None


def unigram_accuracy(counts: np.ndarray) -> Optional[float]:
    """Accuracy of always predicting the most frequent target: max / sum of the target counts."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    return float(counts.max() / total) if total > 0 else None


def baseline_accuracy(record: Dict[str, Any], prefix: str = "") -> Tuple[str, Optional[float]]:
    """(name, value) of the accuracy a context-blind model scores in `record`: the context-free accuracy,
    or the unigram accuracy in the records of runs from before it was logged."""
    if record.get(prefix + "context_free_accuracy") is not None:
        return "context-free accuracy", record[prefix + "context_free_accuracy"]
    return "unigram accuracy", record.get(prefix + "unigram_accuracy")


def context_test(record: Dict[str, Any], prefix: str = "") -> Tuple[Optional[float], str, Optional[float]]:
    """(accuracy, baseline name, baseline) for "does the MLM / generator use context?": the accuracy where
    the input hides the target against the unigram accuracy there when logged, else the whole accuracy
    against `baseline_accuracy`."""
    rtd = record.get(prefix + "generator_accuracy") is not None
    model = "generator" if rtd else "mlm"
    hidden = record.get(f"{prefix}{model}_hidden_accuracy")
    if hidden is not None and record.get(prefix + "hidden_unigram_accuracy") is not None:
        return hidden, "unigram accuracy there", record[prefix + "hidden_unigram_accuracy"]
    return (record.get(f"{prefix}{model}_accuracy"), *baseline_accuracy(record, prefix))


class PlateauWatch:
    """Watches validation records for `patience` evaluations in a row at a baseline:
    - the discriminator: `valid_loss_rtd` no lower than 1% (`loss_margin`) below `valid_rtd_prior_loss`;
    - the generator / MLM: its accuracy where the input hides the target no higher than 1 point
      (`accuracy_margin`, absolute) above `valid_hidden_unigram_accuracy` (`context_test`; in records of
      older runs, which lack those, the whole accuracy against the context-free or unigram accuracy).
    `update` returns one-line warnings, each once per streak (at its `patience`-th evaluation); an
    evaluation away from the baseline, or without the metrics, resets the streak.
    """

    def __init__(self, patience: int = 3, loss_margin: float = 0.01, accuracy_margin: float = 0.01):
        self.patience, self.loss_margin, self.accuracy_margin = patience, loss_margin, accuracy_margin
        self.streaks = {"rtd": 0, "accuracy": 0}

    def update(self, step: int, valid: Dict[str, Optional[float]]) -> List[str]:
        messages = []
        loss, prior = valid.get("valid_loss_rtd"), valid.get("valid_rtd_prior_loss")
        rtd_flat = loss is not None and prior is not None and loss >= (1.0 - self.loss_margin) * prior
        if self._count("rtd", rtd_flat):
            messages.append(
                f"step {step}: the discriminator is not learning: validation RTD loss {loss:.4f} within "
                f"{self.loss_margin:.0%} of the prior loss {prior:.4f} (always predicting the replaced share) for "
                f"{self.patience} evaluations; lower optim.lr (small post-LayerNorm discriminators stay at the prior "
                f"from about 3e-3 up: docs/pretraining_pays.md), lower optim.generator_lr or the generator's size "
                f"(model.overrides generator) if the generator is far above the unigram accuracy, or train longer "
                f"(train.steps)")
        rtd_model = "valid_generator_accuracy" in valid
        accuracy, baseline_name, baseline = context_test(valid, "valid_")
        where = " where the input hides the target" if baseline_name.endswith("there") else ""
        accuracy_flat = accuracy is not None and baseline is not None and accuracy <= baseline + self.accuracy_margin
        if self._count("accuracy", accuracy_flat):
            if not rtd_model:
                what, remedy = "MLM", ("check optim.lr and its warmup (small models with learned absolute positions "
                                       "stay here for millions of tokens where relative-position attention does "
                                       "not: docs/pretraining_pays.md)")
            elif loss is not None and prior is not None and not rtd_flat:
                # The discriminator learns from the context around easy, near-unigram replacements; that
                # lasts only so long (docs/pretraining_pays.md): not an error yet.
                what, remedy = "generator", (f"the discriminator still learns (RTD loss {loss:.4f} against "
                                             f"{prior:.4f}), but for a longer run raise optim.generator_lr or "
                                             f"the generator's size (model.overrides generator)")
            else:
                what, remedy = "generator", "raise optim.generator_lr or the generator's size (model.overrides generator)"
            messages.append(
                f"step {step}: the {what} does not use the context: validation accuracy{where} {accuracy:.4f} "
                f"within {self.accuracy_margin * 100:.0f} point of the {baseline_name} {baseline:.4f} for "
                f"{self.patience} evaluations; {remedy}, or train longer (train.steps)")
        return messages

    def replay(self, records: List[Dict[str, Any]]) -> None:
        """A resumed run's streaks: the validation records of metrics.jsonl (cut at the resumed step) fed
        through `update` silently, so a streak across the resume warns at its patience-th evaluation and
        one that warned before it does not warn again."""
        for record in records:
            if "valid_loss" in record:
                self.update(record["step"], record)

    def report(self, step: int, valid: Dict[str, Optional[float]], is_main: bool) -> None:
        """Logs the validation loss (global rank 0) and `update`'s warnings."""
        if is_main:
            logger.info("step %d validation loss %.4f", step, valid["valid_loss"])
            for message in self.update(step, valid):
                logger.warning(message)

    def _count(self, name: str, flat: bool) -> bool:
        """Counts the streak; True when it reaches `patience` (once per streak)."""
        self.streaks[name] = self.streaks[name] + 1 if flat else 0
        return self.streaks[name] == self.patience
