"""The DeepSpeed JSON, generated from what a run's typed config says (never kept by hand beside it):
the batch sizes, gradient clipping, AdamW's fields, ZeRO and precision, passed one by one so that
pretraining and fine-tuning call it with their own sections."""
from __future__ import annotations

from typing import Any, Dict, Optional

from trainer.core.config import AdamWSection, ZeroSection


def trainer_clips_gradients(zero_stage: int, precision: str) -> bool:
    """Whether the trainer clips (trainer/core/step.py) rather than DeepSpeed: ZeRO 0 in fp32, the one path
    where DeepSpeed computes the gradient norm and throws it away."""
    return zero_stage == 0 and precision == "fp32"


def trainer_clip(cfg) -> Optional[float]:
    """The norm the trainer clips to itself (0: only measures it), or None where DeepSpeed clips."""
    return cfg.train.grad_clip if trainer_clips_gradients(cfg.zero.stage, cfg.precision) else None


def deepspeed_json(*, global_batch_size: int, micro_batch_size: int, accumulation: int, grad_clip: float,
                   optim: AdamWSection, zero: ZeroSection, precision: str, use_fused_adam: bool) -> Dict[str, Any]:
    """The DeepSpeed JSON of one engine. accumulation: micro-batches per optimizer step per rank (a run
    config's `check_batch`). The optimizer is DeepSpeed's AdamW: FusedAdam on GPUs; `torch_adam` on CPU,
    where FusedAdam would JIT-compile a CPU kernel on the first launch."""
    return {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        # so that every run logs its gradient norm (see trainer_clips_gradients)
        "gradient_clipping": 0.0 if trainer_clips_gradients(zero.stage, precision) else grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                       "weight_decay": optim.weight_decay, "torch_adam": not use_fused_adam},
        },
        "zero_optimization": {"stage": zero.stage, **({"stage3_param_persistence_threshold":
                                                       zero.param_persistence_threshold} if zero.stage == 3 else {})},
        # check_grad_overflow: ZeRO-1/2 then skip a bf16 step with a non-finite gradient norm, as they
        # do in fp32 and as the loss scaler does in fp16 (the trainer counts and limits such steps)
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 2**31 - 1,  # we log ourselves (metrics.jsonl, TensorBoard)
        "wall_clock_breakdown": False,
    }


def deepspeed_config(cfg, data_parallel_size: int, use_fused_adam: bool) -> Dict[str, Any]:
    """`deepspeed_json` of a run config (trainer/core/config.py RunConfig: pretraining's or fine-tuning's)."""
    return deepspeed_json(
        global_batch_size=cfg.train.global_batch_size, micro_batch_size=cfg.train.micro_batch_size,
        accumulation=cfg.check_batch(data_parallel_size), grad_clip=cfg.train.grad_clip, optim=cfg.optim,
        zero=cfg.zero, precision=cfg.precision, use_fused_adam=use_fused_adam)
