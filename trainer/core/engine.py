"""The DeepSpeed engine: optimizer parameter groups, the LR schedule, and `deepspeed.initialize`."""
from __future__ import annotations

import os
from typing import Dict, List

import torch

from trainer.core import schedule
from trainer.pretraining.config import PretrainConfig
from trainer.core.deepspeed_json import deepspeed_json
from trainer.core.parallel import MegatronMPU, ParallelContext
from trainer.core.safe_load import install_checkpoint_engine


warmup_linear_decay = schedule.warmup_linear_decay


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> List[Dict]:
    """Decay / no-decay groups (RTD models: per tower as well); see trainer/core/schedule.py."""
    return schedule.parameter_groups(model, weight_decay)[0]


def _default_cuda_arch() -> None:
    """DeepSpeed JIT-builds FusedAdam on first use. Without TORCH_CUDA_ARCH_LIST it parses torch's own
    arch list, and entries such as `9.0a` or `10.0a` (CUDA 12.8+ builds) crash that parser; building
    for the GPU at hand is also all a training node needs."""
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"


def initialize(model: torch.nn.Module, groups: List[Dict], multipliers, ds_config: Dict, ctx: ParallelContext):
    """`deepspeed.initialize` as every run here does it (pretraining and fine-tuning): the parameter
    groups, a LambdaLR of `multipliers` (one function, or one per group), megatron-core's mpu, and the
    weights-only checkpoint engine."""
    import deepspeed

    if ctx.device.type == "cuda":
        _default_cuda_arch()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, multipliers),
        mpu=MegatronMPU(),
        config=ds_config,
    )
    install_checkpoint_engine(engine)  # resume reads model and optimizer states as data, never code
    return engine


def lr_curve(cfg: PretrainConfig) -> schedule.LRCurve:
    """optim.schedule and its WSD keys (checked by PretrainConfig.validate)."""
    o = cfg.optim
    return schedule.LRCurve(o.schedule, o.decay_steps, o.decay_start_step, o.decay_shape)


def build_engine(cfg: PretrainConfig, model: torch.nn.Module, ctx: ParallelContext, load_universal: bool = False):
    ds_config = deepspeed_json(global_batch_size=cfg.train.global_batch_size,
                               micro_batch_size=cfg.train.micro_batch_size, accumulation=cfg.check_batch(ctx.dp_size),
                               grad_clip=cfg.train.grad_clip, optim=cfg.optim, zero=cfg.zero, precision=cfg.precision,
                               use_fused_adam=ctx.device.type == "cuda")
    if load_universal:  # resuming under another DP/TP layout or ZeRO stage (trainer/core/elastic.py)
        ds_config["checkpoint"] = {"load_universal": True}
    groups, towers = schedule.parameter_groups(model, cfg.optim.weight_decay, lr=cfg.optim.lr,
                                               generator_lr=cfg.optim.generator_lr)
    n = schedule.generator_steps(cfg.train.rtd_schedule, cfg.train.generator_steps, cfg.train.steps)
    multipliers = schedule.lr_multipliers(towers, cfg.train.rtd_schedule, n, cfg.optim.warmup_steps,
                                          cfg.train.steps, cfg.optim.min_lr / cfg.optim.lr, lr_curve(cfg))
    return initialize(model, groups, multipliers, ds_config, ctx)
