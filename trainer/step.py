"""One optimizer step and one evaluation, with every loss term normalised over the global batch.

A model's forward returns either one MLM term (`loss_sum`, RoBERTa and DeBERTa) or several
(`loss_sums`, `loss_weights`, `normalizers`: replaced token detection), each a SUM over the
micro-batch. The step's loss is Σ_k weight_k × (sum of term k over the global batch) / (global count
of its normaliser: predicted tokens for MLM, input tokens for RTD), whatever the micro-batching and
data-parallel size. Each micro-batch's part is scaled by D / N_global before
`engine.backward(scale_wrt_gas=False)`, because DeepSpeed averages gradients over the D data-parallel
ranks; the N_global counts are known on the host before any forward and cost one small all-reduce.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.utils import clip_grad_norm_

from data.masking import IGNORE_INDEX
from trainer.parallel import ParallelContext

Terms = Dict[str, Tuple[torch.Tensor, float, str]]  # name -> (sum, weight, normaliser)


def dropout_seed(seed: int, step: int, dp_rank: int) -> int:
    """Dropout differs per step and data-parallel rank, and agrees between tensor-parallel peers."""
    return int(np.random.SeedSequence([seed, step, dp_rank, 0x44524F50]).generate_state(1)[0])


def loss_terms(out: Dict) -> Terms:
    if "loss_sums" in out:
        return {k: (v, float(out["loss_weights"][k]), out["normalizers"][k]) for k, v in out["loss_sums"].items()}
    return {"mlm": (out["loss_sum"], 1.0, "predicted")}


def _all_reduce_dp(tensor: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    if ctx.dp_size > 1:
        dist.all_reduce(tensor, group=ctx.dp_group)
    return tensor


def _counts(batches: Iterable[Dict[str, torch.Tensor]], ctx: ParallelContext) -> Dict[str, torch.Tensor]:
    """Global numbers of predicted and input tokens, from host tensors (no device sync)."""
    batches = list(batches)
    counts = torch.tensor([sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches),
                           sum(int(b["attention_mask"].sum()) for b in batches)],
                          dtype=torch.float64, device=ctx.device)
    _all_reduce_dp(counts, ctx)
    return {"predicted": counts[0], "tokens": counts[1]}


class Accumulator:
    """Device-side sums of loss terms and metrics (no host sync until `reduce`)."""

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
        flat = torch.stack([torch.as_tensor(self.terms[n], dtype=torch.float64, device=ctx.device) for n in names]
                           + [torch.as_tensor(self.metrics[n], dtype=torch.float64, device=ctx.device)
                              for n in metric_names]
                           + [torch.as_tensor(self.counts[n], dtype=torch.float64, device=ctx.device)
                              for n in count_names])
        if reduce_counts:
            _all_reduce_dp(flat, ctx)
        else:  # counts are already global; reduce the rest
            head = flat[: len(names) + len(metric_names)]
            _all_reduce_dp(head, ctx)
            flat = torch.cat([head, flat[len(names) + len(metric_names):]])
        values = flat.tolist()
        terms = dict(zip(names, values[: len(names)]))
        metrics = dict(zip(metric_names, values[len(names): len(names) + len(metric_names)]))
        counts = dict(zip(count_names, values[len(names) + len(metric_names):]))
        record: Dict[str, float] = {}
        total = 0.0
        for name in names:
            per_token = terms[name] / max(counts[self.normalizers[name]], 1.0)
            total += self.weights[name] * per_token
            if len(names) > 1:
                record[f"{prefix}loss_{name}"] = per_token
        record[f"{prefix}loss"] = total
        record.update({f"{prefix}{k}": v for k, v in derived_metrics(metrics).items()})
        return record


def derived_metrics(sums: Dict[str, float]) -> Dict[str, float]:
    """RTD diagnostics from summed counts (generator accuracy, RTD accuracy/precision/recall...)."""
    ratio = lambda a, b: sums[a] / sums[b] if sums.get(b) else None
    out = {}
    if "mlm_correct" in sums:
        out["generator_accuracy"] = ratio("mlm_correct", "mlm_predicted")
    if "rtd_correct" in sums:
        out["rtd_accuracy"] = ratio("rtd_correct", "rtd_tokens")
        out["rtd_precision"] = ratio("rtd_true_positives", "rtd_predicted_positives")
        out["rtd_recall"] = ratio("rtd_true_positives", "rtd_actual_positives")
        out["replaced_ratio"] = ratio("rtd_actual_positives", "mlm_predicted")
    return {k: v for k, v in out.items() if v is not None}


def train_step(engine, micro_batches: List[Dict[str, torch.Tensor]], ctx: ParallelContext,
               clip: Optional[float] = None, inject_nan: bool = False) -> Dict:
    """Forward/backward over the step's micro-batches and one optimizer step.

    Returns an Accumulator of device tensors (no host sync), the global token counts, and the
    gradient norm when `clip` is given (the trainer clips: 0 measures only).
    """
    counts = _counts(micro_batches, ctx)
    acc = Accumulator()
    grad_norm = None
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
        # The trainer owns the accumulation boundary: with token budgets a step has a varying number of
        # micro-batches (the same on every rank), so DeepSpeed's fixed gradient_accumulation_steps cannot tell.
        engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
        out = engine(**batch)
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
            grad_norm = clip_grad_norm_(engine.module.parameters(), clip if clip > 0 else math.inf, mpu=engine.mpu)
            if not math.isfinite(float(grad_norm)):
                # Skip the update as DeepSpeed's ZeRO/bf16/fp16 paths do: an optimizer leaves
                # parameters without a gradient untouched (no Adam moments, no weight decay).
                for p in engine.module.parameters():
                    p.grad = None
        engine.step()
        acc.add(out)
    acc.counts = dict(counts)
    return {"acc": acc, "tokens": counts["tokens"], "grad_norm": grad_norm}


@torch.no_grad()
def evaluate(engine, batches, ctx: ParallelContext) -> Dict[str, float]:
    """Validation losses and metrics over this rank's share of the held-out samples, all ranks reduced."""
    engine.eval()
    acc = Accumulator()
    for batch in batches:
        counts = {"predicted": (batch["labels"] != IGNORE_INDEX).sum().double().to(ctx.device),
                  "tokens": batch["attention_mask"].sum().double().to(ctx.device)}
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        acc.add(engine(**batch), counts)
    engine.train()
    return acc.reduce(ctx, reduce_counts=True, prefix="valid_")
