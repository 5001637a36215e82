"""One optimizer step and one evaluation, with every loss term normalised over the global batch.

A model's forward returns either one MLM term (`loss_sum`, RoBERTa and DeBERTa) or several
(`loss_sums`, `loss_weights`, `normalizers`: replaced token detection), each a SUM over the
micro-batch. The step's loss is Σ_k weight_k × (sum of term k over the global batch) / (global count
of its normaliser: predicted tokens for MLM, input tokens for RTD, samples for NSP), whatever the micro-batching and
data-parallel size. Each micro-batch's part is scaled by D / N_global before
`engine.backward(scale_wrt_gas=False)`, because DeepSpeed averages gradients over the D data-parallel
ranks; the N_global counts are known on the host before any forward and cost one small all-reduce.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist

from data.seeding import derive_seed
from data.masking import IGNORE_INDEX
from trainer.core.diagnostics import (binary_entropy, context_free_accuracy, context_free_counts, histogram_auc,
                                      target_counts, unigram_accuracy)
from trainer.core.parallel import ParallelContext

Terms = Dict[str, Tuple[torch.Tensor, float, str]]  # name -> (sum, weight, normaliser)
Forward = Callable[[object, Dict[str, torch.Tensor]], Dict]  # (engine, device batch) -> the loss sums, as a model's forward


def dropout_seed(seed: int, step: int, dp_rank: int) -> int:
    """Dropout differs per step and data-parallel rank, and agrees between tensor-parallel peers."""
    return derive_seed(seed, step, dp_rank, 0x44524F50)


def loss_terms(out: Dict) -> Terms:
    if "loss_sums" in out:
        return {k: (v, float(out["loss_weights"][k]), out["normalizers"][k]) for k, v in out["loss_sums"].items()}
    return {"mlm": (out["loss_sum"], 1.0, "predicted")}


def _all_reduce_dp(tensor: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    if ctx.dp_size > 1:
        dist.all_reduce(tensor, group=ctx.dp_group)
    return tensor


def _counts(batches: Iterable[Dict[str, torch.Tensor]], ctx: ParallelContext) -> Dict[str, torch.Tensor]:
    """Global numbers of predicted and input tokens and of samples (rows: NSP), from host tensors (no device sync)."""
    batches = list(batches)
    counts = torch.tensor([sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches),
                           sum(int((b["attention_mask"] != 0).sum()) for b in batches),  # ids 1..k: real
                           sum(b["attention_mask"].shape[0] for b in batches)],
                          dtype=torch.float64, device=ctx.device)
    _all_reduce_dp(counts, ctx)
    return {"predicted": counts[0], "tokens": counts[1], "samples": counts[2]}


class Accumulator:
    """Device-side sums of loss terms and metrics (no host sync until `reduce`). A metric is a scalar
    or a fixed-length vector (the RTD logit histograms; the target counts, a host tensor)."""

    def __init__(self):
        self.terms: Dict[str, torch.Tensor] = {}
        self.weights: Dict[str, float] = {}
        self.normalizers: Dict[str, str] = {}
        self.metrics: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, torch.Tensor] = {}

    def add(self, out: Dict, counts: Optional[Dict[str, torch.Tensor]] = None) -> None:
        for name, (value, weight, normalizer) in loss_terms(out).items():
            self.terms[name] = self.terms.get(name, 0.0) + value.detach().double()
            self.weights[name], self.normalizers[name] = weight, normalizer
        for name, value in out.get("metrics", {}).items():
            self.metrics[name] = self.metrics.get(name, 0.0) + value.detach().double()
        for name, value in (counts or {}).items():
            self.counts[name] = self.counts.get(name, 0.0) + value

    def add_targets(self, batches: List[Dict[str, torch.Tensor]], vocab_size: Optional[int],
                    mask_id: Optional[int] = None) -> None:
        """Counts the target ids of host batches, for the unigram accuracy (nothing if vocab_size is None),
        and with `mask_id` those at [MASK] inputs, those the input hides and the copyable ones, for the
        context-free and hidden-position baselines (trainer/core/diagnostics.py `context_free_counts`)."""
        if vocab_size:
            batches = list(batches)  # read twice below
            counts = target_counts(batches, vocab_size)
            self.metrics["target_counts"] = self.metrics.get("target_counts", 0.0) + counts
            if mask_id is not None:
                for name, value in context_free_counts(batches, vocab_size, mask_id).items():
                    self.metrics[name] = self.metrics.get(name, 0.0) + value

    def merge(self, other: "Accumulator") -> None:
        for name, value in other.terms.items():
            self.terms[name] = self.terms.get(name, 0.0) + value
        self.weights.update(other.weights)
        self.normalizers.update(other.normalizers)
        for name, value in other.metrics.items():
            self.metrics[name] = self.metrics.get(name, 0.0) + value
        for name, value in other.counts.items():
            self.counts[name] = self.counts.get(name, 0.0) + value

    def total(self) -> torch.Tensor:
        """This rank's share of the weighted loss (finite check for the step flag)."""
        return sum((v * self.weights[k] for k, v in self.terms.items()), torch.zeros((), dtype=torch.float64))

    def reduce(self, ctx: ParallelContext, reduce_counts: bool = False, prefix: str = "") -> Dict[str, float]:
        """Per-token losses and derived metrics over all data-parallel ranks (one all-reduce)."""
        if not self.terms:
            return {}
        names, metric_names = sorted(self.terms), sorted(self.metrics)
        count_names = sorted(self.counts)
        sums = [self.terms[n] for n in names] + [self.metrics[n] for n in metric_names]  # DP-reduced here
        rows = [torch.as_tensor(v, dtype=torch.float64).to(ctx.device).reshape(-1)
                for v in sums + [self.counts[n] for n in count_names]]
        head, tail = torch.cat(rows[: len(sums)]), rows[len(sums):]
        if reduce_counts:
            flat = _all_reduce_dp(torch.cat([head, *tail]), ctx)
        else:  # counts are already global; reduce the rest
            flat = torch.cat([_all_reduce_dp(head, ctx), *tail])
        pieces = np.split(flat.cpu().numpy(), np.cumsum([r.numel() for r in rows])[:-1])
        vector = [torch.is_tensor(v) and v.dim() > 0 for v in sums] + [False] * len(tail)
        values = [v if is_vector else float(v[0]) for v, is_vector in zip(pieces, vector)]
        terms = dict(zip(names, values[: len(names)]))
        metrics = dict(zip(metric_names, values[len(names): len(sums)]))
        counts = dict(zip(count_names, values[len(sums):]))
        record: Dict[str, float] = {}
        total, per_token = 0.0, {}
        for name in names:
            per_token[name] = terms[name] / max(counts[self.normalizers[name]], 1.0)
            total += self.weights[name] * per_token[name]
            if len(names) > 1:
                record[f"{prefix}loss_{name}"] = per_token[name]
        record[f"{prefix}loss"] = total
        derived = derived_metrics(metrics)
        if derived.get("rtd_prior_loss") and "rtd" in per_token:  # loss_rtd: per real token, without rtd_weight
            derived["rtd_loss_vs_prior"] = per_token["rtd"] / derived["rtd_prior_loss"]
        record.update({f"{prefix}{k}": v for k, v in derived.items()})
        return record


def derived_metrics(sums: Dict[str, Union[float, np.ndarray]]) -> Dict[str, float]:
    """Metrics from summed counts (trainer/core/diagnostics.py says what each baseline means):
    generator_accuracy (RTD) or mlm_accuracy (MLM models) beside unigram_accuracy and context_free_accuracy,
    generator_hidden_accuracy or mlm_hidden_accuracy beside hidden_unigram_accuracy; RTD accuracy, precision,
    recall, replaced_ratio (replaced / predicted positions), rtd_prior_loss, rtd_auc; nsp_accuracy with the
    NSP head."""
    ratio = lambda a, b: sums[a] / sums[b] if sums.get(b) else None
    rtd = "rtd_correct" in sums
    out = {}
    if "mlm_correct" in sums:
        out["generator_accuracy" if rtd else "mlm_accuracy"] = ratio("mlm_correct", "mlm_predicted")
    if "mlm_hidden_correct" in sums:
        out["generator_hidden_accuracy" if rtd else "mlm_hidden_accuracy"] = ratio("mlm_hidden_correct",
                                                                                 "mlm_hidden_predicted")
    if "target_counts" in sums:
        out["unigram_accuracy"] = unigram_accuracy(sums["target_counts"])
        if "hidden_target_counts" in sums:
            out["hidden_unigram_accuracy"] = unigram_accuracy(sums["hidden_target_counts"])
        if "masked_target_counts" in sums:
            out["context_free_accuracy"] = context_free_accuracy(
                sums["masked_target_counts"], sums["copied_targets"], np.asarray(sums["target_counts"]).sum())
    if "nsp_correct" in sums:  # next-sentence prediction (pair formats); chance is about 0.5
        out["nsp_accuracy"] = ratio("nsp_correct", "nsp_samples")
    if rtd:
        out["rtd_accuracy"] = ratio("rtd_correct", "rtd_tokens")
        out["rtd_precision"] = ratio("rtd_true_positives", "rtd_predicted_positives")
        out["rtd_recall"] = ratio("rtd_true_positives", "rtd_actual_positives")
        out["replaced_ratio"] = ratio("rtd_actual_positives", "mlm_predicted")
        out["rtd_prior_loss"] = binary_entropy(sums["rtd_actual_positives"], sums["rtd_tokens"])
        if "rtd_replaced_histogram" in sums:
            out["rtd_auc"] = histogram_auc(sums["rtd_replaced_histogram"], sums["rtd_original_histogram"])
    return {k: v for k, v in out.items() if v is not None}


def clip_or_skip(engine, clip: float) -> torch.Tensor:
    """Clips the reduced gradients to global norm `clip` (0: only measures it) and returns the norm; a
    non-finite norm drops every gradient, so the optimizer step leaves the parameters untouched (no Adam
    moments, no weight decay), as DeepSpeed's ZeRO/bf16/fp16 overflow skip does."""
    # imported on first use, as everywhere in the trainer: a config error exits before DeepSpeed loads
    from deepspeed.runtime.utils import clip_grad_norm_

    grad_norm = clip_grad_norm_(engine.module.parameters(), clip if clip > 0 else math.inf, mpu=engine.mpu)
    if not math.isfinite(float(grad_norm)):
        for p in engine.module.parameters():
            p.grad = None
    return grad_norm


def train_step(engine, micro_batches: List[Dict[str, torch.Tensor]], ctx: ParallelContext,
               clip: Optional[float] = None, inject_nan: bool = False, vocab_size: Optional[int] = None,
               forward: Optional[Forward] = None, mask_id: Optional[int] = None) -> Dict:
    """Forward/backward over the step's micro-batches and one optimizer step.

    Returns an Accumulator of device tensors (no host sync), the global token and sample counts, and
    the gradient norm when `clip` is given (the trainer clips: 0 measures only). With `vocab_size` the
    Accumulator also counts the target ids (host labels), for `unigram_accuracy`, and with `mask_id` for
    `context_free_accuracy` and `hidden_unigram_accuracy`. `forward(engine, batch)` returns the loss sums
    (default: the model's own, `engine(**batch)`).
    """
    counts = _counts(micro_batches, ctx)
    acc = Accumulator()
    acc.add_targets(micro_batches, vocab_size, mask_id)
    grad_norm = None
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
        # The trainer owns the accumulation boundary: with token budgets a step has a varying number of
        # micro-batches (the same on every rank), so DeepSpeed's fixed gradient_accumulation_steps cannot tell.
        engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
        out = forward(engine, batch) if forward is not None else engine(**batch)
        terms = loss_terms(out)
        loss = sum(weight * value.float() * (ctx.dp_size / counts[normalizer].clamp(min=1.0)).float()
                   for value, weight, normalizer in terms.values())
        if inject_nan:
            loss = loss * float("nan")
            out = {**out, "loss_sums": {k: v * float("nan") for k, (v, _, _) in terms.items()},
                   "loss_weights": {k: w for k, (_, w, _) in terms.items()},
                   "normalizers": {k: n for k, (_, _, n) in terms.items()}}
        engine.backward(loss, scale_wrt_gas=False)
        if clip is not None and i == len(micro_batches) - 1:  # gradients are reduced: clip before the step
            grad_norm = clip_or_skip(engine, clip)
        engine.step()
        acc.add(out)
    acc.counts = dict(counts)
    return {"acc": acc, "tokens": counts["tokens"], "samples": counts["samples"], "grad_norm": grad_norm}


@torch.no_grad()
def evaluate(engine, batches, ctx: ParallelContext, vocab_size: Optional[int] = None,
             mask_id: Optional[int] = None) -> Dict[str, float]:
    """Validation losses and metrics over this rank's share of the held-out samples, all ranks reduced."""
    engine.eval()
    acc = Accumulator()
    for batch in batches:
        counts = {"predicted": (batch["labels"] != IGNORE_INDEX).sum().double().to(ctx.device),
                  "tokens": (batch["attention_mask"] != 0).sum().double().to(ctx.device),
                  "samples": torch.tensor(float(batch["attention_mask"].shape[0]), dtype=torch.float64,
                                          device=ctx.device)}
        acc.add_targets([batch], vocab_size, mask_id)
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        acc.add(engine(**batch), counts)
    engine.train()
    return acc.reduce(ctx, reduce_counts=True, prefix="valid_")
