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

LR curves (`optim.schedule`; `LRCurve`), as multipliers of the peak LR for optimizer step s (from 1), with
W = warmup steps, T = train.steps, m = min_lr / lr; every curve warms up linearly (s / W for s <= W):
- `linear` (default): then linear decay to m at step T (`warmup_linear_decay`, unchanged).
- `cosine`: then m + (1 - m) (1 + cos(pi x)) / 2 with x = (s - W) / (T - W).
- `wsd` (warmup-stable-decay, MiniCPM, ModernBERT): then 1.0 up to the decay start S, then
  m + (1 - m) f(x) with x = (s - S) / (T - S) over steps S+1..T, f by `optim.decay_shape`: linear 1 - x,
  cosine (1 + cos(pi x)) / 2, sqrt sqrt(1 - x) (holds high, falls late), 1-sqrt 1 - sqrt(x) (falls early;
  Hägele et al. 2024, ModernBERT). S is `optim.decay_start_step` when set, else T - `optim.decay_steps`
  (decay_steps 0: no decay, a stable run to continue later).
Each is a function of the step alone, so a resumed run follows the formula of the config it resumes
with: a stable-phase checkpoint resumed with `optim.decay_start_step` = its step (and any train.steps)
decays from there (the scheduler's saved state is the step count; its functions come from the config).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from data.errors import UserError
from models.registry import MODELS

logger = logging.getLogger(__name__)

TOWERS = ("generator", "shared", "discriminator")
RTD_SCHEDULES = ("joint", "two_stage")
LR_SCHEDULES = ("linear", "cosine", "wsd")
DECAY_SHAPES = ("linear", "cosine", "sqrt", "1-sqrt")


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


DECAY = {  # x in [0, 1] through the decay -> the fraction of (peak - min) still left
    "linear": lambda x: 1.0 - x,
    "cosine": lambda x: 0.5 * (1.0 + math.cos(math.pi * x)),
    "sqrt": lambda x: math.sqrt(1.0 - x),
    "1-sqrt": lambda x: 1.0 - math.sqrt(x),
}


def warmup_cosine_decay(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """As `warmup_linear_decay`, with a cosine from 1 at step W to `min_ratio` at step T."""
    def multiplier(i: int) -> float:
        s = i + 1
        if s <= warmup_steps:
            return s / warmup_steps
        x = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * DECAY["cosine"](x)
    return multiplier


def warmup_stable_decay(warmup_steps: int, decay_start: int, total_steps: int, min_ratio: float,
                        shape: str = "linear") -> Callable[[int], float]:
    """Warmup to step W, 1.0 to step `decay_start` S, then the `shape` decay to `min_ratio` at step T
    (and after it); S >= T: no decay."""
    decay = DECAY[shape]

    def multiplier(i: int) -> float:
        s = i + 1
        if s <= warmup_steps:
            return s / warmup_steps
        if s <= decay_start or decay_start >= total_steps:
            return 1.0
        x = min(1.0, (s - decay_start) / max(1, total_steps - decay_start))
        return min_ratio + (1.0 - min_ratio) * decay(x)
    return multiplier


@dataclass(frozen=True)
class LRCurve:
    """`optim.schedule` and its keys: the multiplier of a run (or a two_stage stage) of any length."""
    kind: str = "linear"
    decay_steps: int = 0
    """wsd: length of the decay, which ends at the last step."""
    decay_start_step: int = 0
    """wsd: the last step at full LR (the decay takes the steps after it); 0: total - decay_steps."""
    decay_shape: str = "linear"

    def decay_start(self, total_steps: int) -> int:
        return self.decay_start_step or total_steps - self.decay_steps

    def multiplier(self, warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
        if self.kind == "linear":
            return warmup_linear_decay(warmup_steps, total_steps, min_ratio)
        if self.kind == "cosine":
            return warmup_cosine_decay(warmup_steps, total_steps, min_ratio)
        if self.kind == "wsd":
            return warmup_stable_decay(warmup_steps, self.decay_start(total_steps), total_steps, min_ratio,
                                       self.decay_shape)
        raise ValueError(f"unknown LR schedule {self.kind!r}")

    def check(self, warmup_steps: int, total_steps: int) -> None:
        """The one-line errors of optim.schedule / decay_* against optim.warmup_steps and train.steps."""
        if self.kind not in LR_SCHEDULES:
            raise UserError(f"optim.schedule={self.kind!r} is not one of {', '.join(LR_SCHEDULES)}")
        if self.decay_shape not in DECAY_SHAPES:
            raise UserError(f"optim.decay_shape={self.decay_shape!r} is not one of {', '.join(DECAY_SHAPES)}")
        if self.kind != "wsd":
            for key, value, default in (("decay_steps", self.decay_steps, 0),
                                        ("decay_start_step", self.decay_start_step, 0),
                                        ("decay_shape", self.decay_shape, "linear")):
                if value != default:
                    raise UserError(f"optim.{key}={value} applies to optim.schedule=wsd only, not {self.kind}")
            return
        if self.decay_steps < 0 or self.decay_start_step < 0:
            key, value = (("decay_steps", self.decay_steps) if self.decay_steps < 0
                          else ("decay_start_step", self.decay_start_step))
            raise UserError(f"optim.{key}={value} must not be negative")
        if self.decay_steps and self.decay_start_step and self.decay_start_step + self.decay_steps != total_steps:
            raise UserError(f"optim.decay_start_step={self.decay_start_step} + optim.decay_steps={self.decay_steps} "
                            f"must equal train.steps={total_steps} (the decay ends at the last step); set one of them")
        if self.decay_start_step and self.decay_start_step >= total_steps:
            raise UserError(f"optim.decay_start_step={self.decay_start_step} leaves no step to decay: it must be "
                            f"below train.steps={total_steps}")
        if self.decay_start_step and self.decay_start_step < warmup_steps:
            raise UserError(f"optim.decay_start_step={self.decay_start_step} falls inside the warmup: it must be at "
                            f"least optim.warmup_steps={warmup_steps}")
        if warmup_steps + self.decay_steps > total_steps:
            raise UserError(f"optim.decay_steps={self.decay_steps} is longer than the run: optim.warmup_steps="
                            f"{warmup_steps} + optim.decay_steps must not exceed train.steps={total_steps}")


def configured_base_lrs(engine) -> Optional[List[float]]:
    """The peak LR of every parameter group as this run's config built them (read before a checkpoint load,
    whose LambdaLR state brings the saving run's); None without a LambdaLR."""
    scheduler = getattr(engine, "lr_scheduler", None)
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return None
    return list(scheduler.base_lrs)


def restore_scheduled_lr(engine, base_lrs: Optional[List[float]] = None) -> None:
    """After a checkpoint load: every group's LR becomes its schedule's for the next step (the loaded step
    count), not the LR the optimizer state saved, which the saving run's schedule set (another one when
    optim.schedule / decay_* / train.steps changed) and which ZeRO's loads may not restore at all. The same
    product LambdaLR.step computes, so an unchanged schedule resumes bitwise as before.

    base_lrs (`configured_base_lrs` before the load): the peaks of the config resumed with, which replace the
    saved ones, so that a changed optim.lr (or generator_lr, ...) applies from the next step; logged when
    they differ."""
    scheduler = getattr(engine, "lr_scheduler", None)
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return
    if base_lrs is not None and len(base_lrs) == len(scheduler.base_lrs):
        if list(base_lrs) != list(scheduler.base_lrs):
            logger.info("optim.lr changed since the checkpoint: the schedule goes on with peak LRs %s "
                        "(the checkpoint's: %s)", [f"{lr:.3g}" for lr in base_lrs],
                        [f"{lr:.3g}" for lr in scheduler.base_lrs])
        scheduler.base_lrs = list(base_lrs)
    lrs = [base_lr * lmbda(scheduler.last_epoch) for lmbda, base_lr in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


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
                   min_ratio: float, curve: LRCurve = LRCurve()) -> List[Callable[[int], float]]:
    """One LambdaLR multiplier per group. two_stage: warmup (capped at each stage's length) and decay
    (`curve`: linear or cosine) within each stage; the shared tables follow whichever tower is training."""
    if schedule == "joint":
        return [curve.multiplier(warmup_steps, total_steps, min_ratio)] * len(towers)
    first = _window(curve.multiplier(min(warmup_steps, n), n, min_ratio), 1, n)
    second = _window(curve.multiplier(min(warmup_steps, total_steps - n), total_steps - n, min_ratio),
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
