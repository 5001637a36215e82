"""The DeepSpeed engine: optimizer parameter groups, the LR schedule, and `deepspeed.initialize`."""
from __future__ import annotations

import os
from typing import Dict, List

import torch

from trainer.config import PretrainConfig, deepspeed_config
from trainer.parallel import MegatronMPU, ParallelContext


def uses_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Weights decay; biases and LayerNorm parameters (all 1-D) do not (BERT/RoBERTa recipe)."""
    return param.ndim >= 2 and "norm" not in name.lower()


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if uses_weight_decay(name, param) else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_linear_decay(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier for optimizer step s = i + 1 (LambdaLR passes i, the steps already taken).

    Linear warmup: step s <= W uses s / W, so step 1 already learns; then linear decay to `min_ratio`
    at step T. DeepSpeed's WarmupDecayLR would give step 1 a zero LR and warms up logarithmically
    unless told otherwise.
    """
    def multiplier(i: int) -> float:
        s = i + 1
        if s <= warmup_steps:
            return s / warmup_steps
        remaining = max(0, total_steps - s) / max(1, total_steps - warmup_steps)
        return min_ratio + (1.0 - min_ratio) * remaining
    return multiplier


def _default_cuda_arch() -> None:
    """DeepSpeed JIT-builds FusedAdam on first use. Without TORCH_CUDA_ARCH_LIST it parses torch's own
    arch list, and entries such as `9.0a` or `10.0a` (CUDA 12.8+ builds) crash that parser; building
    for the GPU at hand is also all a training node needs."""
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"


def build_engine(cfg: PretrainConfig, model: torch.nn.Module, ctx: ParallelContext, load_universal: bool = False):
    import deepspeed

    if ctx.device.type == "cuda":
        _default_cuda_arch()

    ds_config = deepspeed_config(cfg, ctx.dp_size, use_fused_adam=ctx.device.type == "cuda")
    if load_universal:  # resuming under another DP/TP layout or ZeRO stage (trainer/elastic.py)
        ds_config["checkpoint"] = {"load_universal": True}
    multiplier = warmup_linear_decay(cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr / cfg.optim.lr)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, cfg.optim.weight_decay),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier),
        mpu=MegatronMPU(),
        config=ds_config,
    )
    return engine
