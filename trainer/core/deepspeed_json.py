"""The DeepSpeed JSON, generated from a run's typed config (pretraining's or fine-tuning's: both carry
`train`, `optim`, `zero`, `precision` and `check_batch`), never kept by hand beside it."""
from __future__ import annotations

from typing import Any, Dict


def trainer_clips_gradients(cfg) -> bool:
    return cfg.zero.stage == 0 and cfg.precision == "fp32"


def deepspeed_config(cfg, data_parallel_size: int, use_fused_adam: bool) -> Dict[str, Any]:
    """The DeepSpeed JSON, generated from the typed config (never edited by hand).

    The optimizer is DeepSpeed's AdamW: FusedAdam on GPUs; `torch_adam` on CPU, where FusedAdam would
    JIT-compile a CPU kernel on the first launch.
    """
    accumulation = cfg.check_batch(data_parallel_size)
    ds: Dict[str, Any] = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        # In the one path where DeepSpeed computes the gradient norm and throws it away (ZeRO 0, fp32),
        # the trainer clips itself (trainer/core/step.py) so that every run logs its gradient norm.
        "gradient_clipping": 0.0 if trainer_clips_gradients(cfg) else cfg.train.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
                "weight_decay": cfg.optim.weight_decay, "torch_adam": not use_fused_adam,
            },
        },
        "zero_optimization": {"stage": cfg.zero.stage, **({"stage3_param_persistence_threshold":
                                                            cfg.zero.param_persistence_threshold}
                                                           if cfg.zero.stage == 3 else {})},
        # check_grad_overflow: ZeRO-1/2 then skip a bf16 step with a non-finite gradient norm, as they
        # do in fp32 and as the loss scaler does in fp16 (the trainer counts and limits such steps)
        "bf16": {"enabled": cfg.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 2**31 - 1,  # we log ourselves (metrics.jsonl, TensorBoard)
        "wall_clock_breakdown": False,
    }
    return ds

