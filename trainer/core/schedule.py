"""Optimizer parameter groups and learning-rate schedules, including the RTD training schedules.

Every model gets decay / no-decay groups (weights decay; biases and LayerNorm parameters do not).
Replaced-token-detection models (ELECTRA, DeBERTaV3) are further split by tower, so the generator
and the discriminator can have their own learning rates and their own schedules:

- `generator`: parameters only the generator's MLM loss trains (under `gdes` this includes E_G);
- `shared`: tables both losses train (`es`: the one word/position table; `all`: the whole backbone,
  named `generator.` once, every parameter of the generator but its MLM head);
- `discriminator`: everything else (under `gdes` this includes E_Delta).

microsoft/DeBERTa trains G and D with two optimizers. Adam's update is per parameter, so one AdamW
with per-tower groups (own LR, own schedule) is the same update, with one difference: the gradient
clip. DeepSpeed clips the global norm over all groups; since the RTD loss carries lambda = 50 and
dominates that norm, a clip mostly scales the discriminator's step and takes the generator's along
with it. With separate optimizers each tower is clipped on its own. Joint clipping is the default
here (ELECTRA's own implementation trains both towers with one optimizer and one clip).

Schedules (`train.rtd_schedule`):
- `joint` (default): both towers from step 1, one warmup/decay schedule.
- `two_stage` (the ELECTRA paper's ablation): steps 1..n train the generator alone (MLM loss only,
  the discriminator's LR is 0); before step n+1 the discriminator is initialised from the generator
  wherever their parameters have the same name and shape (with towers of different widths only the
  shared embeddings carry over); steps n+1..T train the discriminator alone (RTD loss only, the
  generator's LR is 0, so it is frozen: AdamW's weight decay is scaled by the LR too). Each stage has
  its own warmup and linear decay. The discriminator's Adam moments are still zero at step n+1 (its
  gradients were zero), but Adam's bias correction then counts n steps already taken, so its first
  updates are smaller than a fresh optimizer's, an implicit extra warmup on top of the stage's own.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch

from data.errors import UserError
from models.registry import MODELS

TOWERS = ("generator", "shared", "discriminator")
RTD_SCHEDULES = ("joint", "two_stage")


def uses_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Weights decay; biases and LayerNorm parameters (all 1-D) do not (BERT/RoBERTa recipe)."""
    shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 partitions leave param.shape empty
    return len(shape) >= 2 and "norm" not in name.lower()


def is_rtd(model: torch.nn.Module) -> bool:
    return hasattr(model, "generator") and hasattr(model, "discriminator") and hasattr(model, "shared_tables")


def tower_of(model: torch.nn.Module, name: str) -> str:
    """Which tower trains parameter `name` of an RTD model (see the module docstring)."""
    if not name.startswith("generator."):
        return "discriminator"
    if model.config.embedding_sharing == "es":
        shared = {f"generator.embeddings.{table}.weight" for table in model.shared_tables}
        if name in shared:
            return "shared"
    if model.config.embedding_sharing == "all":  # the generator's backbone modules are the discriminator's
        param = model.get_parameter(name)
        if any(param is p for p in model.discriminator.parameters()):
            return "shared"
    return "generator"


def parameter_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None,
                     generator_lr: float | None = None) -> Tuple[List[Dict], List[str]]:
    """Optimizer groups and, for each, its tower ("all" for non-RTD models). Empty groups are left out.

    With `lr` given every group carries its own "lr": the generator's is `generator_lr` (or `lr`).
    """
    rtd = is_rtd(model)
    buckets: Dict[Tuple[str, bool], List[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            tower = tower_of(model, name) if rtd else "all"
            buckets.setdefault((tower, uses_weight_decay(name, param)), []).append(param)
    groups, towers = [], []
    for tower in (TOWERS if rtd else ("all",)):
        for decay in (True, False):
            params = buckets.get((tower, decay))
            if not params:
                continue
            group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
            if lr is not None:
                group["lr"] = generator_lr if (tower == "generator" and generator_lr is not None) else lr
            groups.append(group)
            towers.append(tower)
    return groups, towers


def warmup_linear_decay(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
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


def _window(inner: Callable[[int], float], first: int, last: int) -> Callable[[int], float]:
    """`inner` run over steps first..last (its step 1 is `first`); 0 outside them."""
    def multiplier(i: int) -> float:
        s = i + 1
        return inner(s - first) if first <= s <= last else 0.0
    return multiplier


def generator_steps(schedule: str, generator_steps_cfg: int, total_steps: int) -> int:
    """n of two_stage: the configured value, or half the run."""
    if schedule != "two_stage":
        return 0
    return generator_steps_cfg or total_steps // 2


def lr_multipliers(towers: List[str], schedule: str, n: int, warmup_steps: int, total_steps: int,
                   min_ratio: float) -> List[Callable[[int], float]]:
    """One LambdaLR multiplier per group. two_stage: warmup (capped at each stage's length) and decay
    within each stage; the shared tables follow whichever tower is training."""
    if schedule == "joint":
        return [warmup_linear_decay(warmup_steps, total_steps, min_ratio)] * len(towers)
    first = _window(warmup_linear_decay(min(warmup_steps, n), n, min_ratio), 1, n)
    second = _window(warmup_linear_decay(min(warmup_steps, total_steps - n), total_steps - n, min_ratio),
                     n + 1, total_steps)
    both = lambda i: first(i) + second(i)  # the windows do not overlap
    return [{"generator": first, "discriminator": second, "shared": both}[t] for t in towers]


def stage_loss_weights(schedule: str, step: int, n: int, rtd_weight: float) -> Dict[str, float]:
    """The loss weights of optimizer step `step`: joint uses both terms throughout."""
    if schedule == "two_stage":
        return {"mlm": 1.0, "rtd": 0.0} if step <= n else {"mlm": 0.0, "rtd": rtd_weight}
    return {"mlm": 1.0, "rtd": rtd_weight}


def check_schedule(model: torch.nn.Module, schedule: str, n: int, total_steps: int) -> None:
    if schedule not in RTD_SCHEDULES:
        raise UserError(f"train.rtd_schedule={schedule!r} is not one of {', '.join(RTD_SCHEDULES)}")
    if schedule == "two_stage":
        if not is_rtd(model):
            rtd = " or ".join(name for name, spec in MODELS.items() if "sample_index" in spec.batch_keys)
            raise UserError(f"train.rtd_schedule=two_stage needs a replaced-token-detection model (model.name {rtd})")
        if model.config.embedding_sharing == "all":
            raise UserError("train.rtd_schedule=two_stage needs towers of their own: under model embedding_sharing "
                            "all the discriminator's training moves the generator's backbone, which two_stage "
                            "freezes; use embedding_sharing none (equal sizes: D starts from G) or es")
        if not 1 <= n < total_steps:
            raise UserError(f"train.generator_steps={n} must leave steps for both stages: use 1..{total_steps - 1} "
                            f"(0: half of train.steps)")


def discriminator_from_generator(model: torch.nn.Module) -> List[Tuple[str, str]]:
    """(discriminator name, generator name) pairs of parameters the discriminator takes over:
    same name below the tower (the DeBERTaV3 discriminator's `backbone.` prefix dropped) and shape."""
    params = dict(model.named_parameters())
    shape = lambda p: tuple(getattr(p, "ds_shape", p.shape))
    pairs = []
    for name, param in params.items():
        if not name.startswith("discriminator."):
            continue
        rest = name[len("discriminator."):]
        rest = rest[len("backbone."):] if rest.startswith("backbone.") else rest
        source = "generator." + rest
        if source in params and params[source] is not param and shape(params[source]) == shape(param):
            pairs.append((name, source))
    return pairs


def copy_generator_into_discriminator(engine) -> int:
    """two_stage's hand-over, inside a DeepSpeed engine at any ZeRO stage: copies the matching
    generator parameters into the discriminator's (gathering ZeRO-3 partitions), then refreshes the
    optimizer's fp32 master copy from the module's weights. Returns the number of tensors copied."""
    import deepspeed

    module = engine.module
    pairs = discriminator_from_generator(module)
    params = dict(module.named_parameters())
    involved = [params[n] for pair in pairs for n in pair]
    zero3 = engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(involved, modifier_rank=0, enabled=zero3), torch.no_grad():
        for target, source in pairs:
            params[target].copy_(params[source])
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if refresh is not None:  # ZeRO 1-3 and bf16/fp16 keep an fp32 master copy apart from the module
        refresh()
    return len(pairs)


def enter_step(engine, step: int, n: int) -> None:
    """two_stage, before optimizer step `step`: the hand-over at n+1, and the stage's loss weights."""
    import logging

    module = engine.module
    if step == n + 1:
        copied = copy_generator_into_discriminator(engine)
        logging.getLogger(__name__).info(
            "two_stage: generator stage done after step %d; discriminator initialised from %d generator "
            "tensors of the same name and shape; generator frozen from step %d", n, copied, step)
    module.loss_weights = stage_loss_weights("two_stage", step, n, module.config.rtd_weight)
