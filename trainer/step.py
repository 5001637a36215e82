"""One optimizer step and one evaluation, with losses normalised per predicted token.

The loss of a step is (sum of token losses over the global batch) / (number of predicted tokens in
the global batch), whatever the micro-batching and data-parallel size. Each micro-batch's loss sum is
scaled by D / N_global before `engine.backward(scale_wrt_gas=False)`, because DeepSpeed averages
gradients over the D data-parallel ranks; N_global is one small all-reduce per step of counts that
are known on the host before any forward.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from deepspeed.runtime.utils import clip_grad_norm_

from data.masking import IGNORE_INDEX
from trainer.parallel import ParallelContext


def dropout_seed(seed: int, step: int, dp_rank: int) -> int:
    """Dropout differs per step and data-parallel rank, and agrees between tensor-parallel peers."""
    return int(np.random.SeedSequence([seed, step, dp_rank, 0x44524F50]).generate_state(1)[0])


def _all_reduce_dp(tensor: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    if ctx.dp_size > 1:
        dist.all_reduce(tensor, group=ctx.dp_group)
    return tensor


def train_step(engine, micro_batches: List[Dict[str, torch.Tensor]], ctx: ParallelContext,
               clip: Optional[float] = None, inject_nan: bool = False) -> Dict[str, torch.Tensor]:
    """Forward/backward over the step's micro-batches and one optimizer step.

    Returns device tensors (no host sync): the local loss sum, the global counts of predicted and
    input tokens, and the gradient norm when `clip` is given (the trainer clips: 0 measures only).
    """
    counts = torch.tensor([sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches),
                           sum(int(b["attention_mask"].sum()) for b in micro_batches)],
                          dtype=torch.float64, device=ctx.device)
    _all_reduce_dp(counts, ctx)
    scale = ctx.dp_size / counts[0].clamp(min=1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    grad_norm = None
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
        out = engine(**batch)
        if inject_nan:
            out["loss_sum"] = out["loss_sum"] * float("nan")
        engine.backward(out["loss_sum"].float() * scale.float(), scale_wrt_gas=False)
        if clip is not None and i == len(micro_batches) - 1:  # gradients are reduced: clip before the step
            grad_norm = clip_grad_norm_(engine.module.parameters(), clip if clip > 0 else math.inf, mpu=engine.mpu)
            if not math.isfinite(float(grad_norm)):
                # Skip the update as DeepSpeed's ZeRO/bf16/fp16 paths do: an optimizer leaves
                # parameters without a gradient untouched (no Adam moments, no weight decay).
                for p in engine.module.parameters():
                    p.grad = None
        engine.step()
        loss_sum += out["loss_sum"].detach().double()
    return {"loss_sum": loss_sum, "predicted": counts[0], "tokens": counts[1], "grad_norm": grad_norm}


@torch.no_grad()
def evaluate(engine, batches, ctx: ParallelContext) -> float:
    """Mean loss per predicted token over this rank's share of the held-out samples, all ranks reduced."""
    engine.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for batch in batches:
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        out = engine(**batch)
        totals[0] += out["loss_sum"].double()
        totals[1] += out["num_predicted"].double()
    engine.train()
    _all_reduce_dp(totals, ctx)
    return float(totals[0] / totals[1].clamp(min=1.0))


def reduce_window(loss_sum: torch.Tensor, predicted: torch.Tensor, ctx: ParallelContext) -> float:
    """Mean loss per predicted token over a logging window (one all-reduce at logging time)."""
    total = _all_reduce_dp(loss_sum.clone(), ctx)
    return float(total / predicted.clamp(min=1.0))
