"""Fine-tuning entry point: sequence classification / regression with optional SiFT, under DeepSpeed.

    python -m trainer.finetune --config configs/finetune/debug.yaml [key.sub=value ...]
    deepspeed --num_gpus N --module trainer.finetune --config FILE model.init=hf/ sift.enabled=true

One command runs every seed of `train.seeds` one after the other. Each seed lives in
{run.dir}/{run.name}/seed{S}/ (metrics.jsonl, tb/, best/ the best DeepSpeed checkpoint by
eval.metric, hf/ its Hugging Face export, result.json once finished, last/ while preempted);
{run.dir}/{run.name}/ holds config.yaml, tokenizer/ and summary.json (the best metric of every seed,
their mean and standard deviation). Running the same command again skips finished seeds and
continues a preempted one (checkpoint.resume). Exit statuses as pretraining: 0 done, 2 user error
(one line), 3 too many consecutive non-finite losses, 75 preempted (SIGTERM/SIGUSR1: the current
seed saved; run the same command again), 76 that save did not finish in time.

The data order of a seed is a permutation per epoch drawn from (seed, epoch); a global batch of
`train.global_batch_size` examples is split over the data-parallel ranks and micro-batches, and
its loss is the mean over its examples whatever the split (each micro-batch's sum is scaled by
D / G before `engine.backward(scale_wrt_gas=False)`, DeepSpeed averaging over the D ranks).
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from data.errors import UserError
from data.tasks import collate
from data.tokenizer import Tokenizer
from models.classification import SequenceClassifier
from trainer.core.checkpoint import CheckpointManager, TrainState
from trainer.core.config import CheckpointSection
from trainer.core.deepspeed_json import deepspeed_config, trainer_clip
from trainer.core.engine import initialize, warmup_linear_decay
from trainer.core.cli import parse_run_args
from trainer.core.loop import StepLoop, run_guarded
from trainer.core.metrics import MetricsWriter, write_atomic
from trainer.core.parallel import from_rank0, init_parallel
from trainer.core.preemption import EXIT_PREEMPTED, PreemptionHandler, StepFlags
from trainer.core.run_dir import RunDirectory, setup_logging
from trainer.core.schedule import uses_weight_decay
from trainer.finetuning.config import FinetuneConfig, load_finetune_config
from trainer.finetuning.sift import SiFT
from trainer.finetuning.initial_model import InitialModel, build_classifier, load_initial_model, resolve_tokenizer
from trainer.finetuning.task import Task, load_task, predict, step_micro_batches, task_loss_sum
from trainer.finetuning.task_metrics import task_metrics

logger = logging.getLogger("trainer.finetune")
SEED_CONFIG = "seed_config.json"  # what the seed was trained with (resume only under the same one)
SEED_RESULT = "result.json"  # the seed's best validation metrics, written when it finishes
FRESH_SEED = {"best": None, "bad_in_a_row": 0, "sift_skipped": 0}  # a seed's own checkpoint state, at its start

# ----------------------------------------------------------------------------- optimisation
def layer_decay_groups(model: SequenceClassifier, weight_decay: float, lr: float, layer_decay: float) -> List[Dict]:
    """Layer-wise LR decay (ELECTRA, DeBERTaV3 fine-tuning): depth d (0 embeddings, 1..L layers, L + 1
    the head) trains at lr x layer_decay^(L + 1 - d), so the layers nearest the input, the most
    general, move least. decay 1 gives two groups (weight decay or not), as pretraining."""
    top = model.num_layers() + 1
    groups: Dict[tuple, Dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        depth = model.layer_of(name) if layer_decay != 1.0 else top
        decays = uses_weight_decay(name, param)
        if (depth, decays) not in groups:
            groups[(depth, decays)] = {"params": [], "weight_decay": weight_decay if decays else 0.0,
                                       "lr": lr * layer_decay ** (top - depth)}
        groups[(depth, decays)]["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def task_forward(sift, regression: bool):
    """The fine-tuning step's forward for the shared step loop: the task loss summed over the
    micro-batch (and SiFT's adversarial term), each normalised by the global number of examples."""
    def forward(engine, batch: Dict[str, torch.Tensor]) -> Dict:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logits = engine(**inputs)
        sums = {"task": task_loss_sum(logits, batch["labels"], regression)}
        if sift is not None:
            # The perturbed passes call the module itself: DeepSpeed's engine forward hooks its outputs so that any
            # backward through them runs its gradient reduction, which the ascent's autograd.grad must not trigger.
            adversarial = sift.adversarial_loss(lambda: engine.module(**inputs), logits, regression)
            sums["sift"] = adversarial if adversarial is not None else torch.zeros((), device=logits.device)
        return {"loss_sums": sums, "loss_weights": {k: 1.0 for k in sums}, "normalizers": {k: "samples" for k in sums}}
    return forward


# ----------------------------------------------------------------------------- one seed
def seed_identity(cfg: FinetuneConfig) -> Dict:
    """What a seed's training depends on: the config without the list of seeds and the resume switches."""
    plain = cfg.to_dict()
    plain["train"] = {k: v for k, v in plain["train"].items() if k not in ("seeds", "collective_timeout_s")}
    plain["checkpoint"] = {k: v for k, v in plain["checkpoint"].items() if k not in ("resume", "preemption_timeout_s")}
    return plain


def _earlier_attempt(cfg: FinetuneConfig, seed_dir: Path, is_main: bool) -> Optional[Dict]:
    """Global rank 0 looks at seed_dir: {"result": ...} for a finished seed, {} for one to continue from
    its last/ checkpoint, None to start over (no attempt, resume off, or another config)."""
    found = None
    if is_main and cfg.checkpoint.resume and (seed_dir / SEED_CONFIG).is_file():
        if json.loads((seed_dir / SEED_CONFIG).read_text()) != seed_identity(cfg):
            logger.warning("%s was trained with another config: it starts over", seed_dir.name)
        elif (seed_dir / SEED_RESULT).is_file():
            found = {"result": json.loads((seed_dir / SEED_RESULT).read_text())}
        else:
            found = {}
    return from_rank0(found)


def finetune_seed(cfg: FinetuneConfig, seed: int, ctx, task: Task, init: InitialModel, tokenizer: Tokenizer,
                  run_path: Path, preemption=None) -> Dict:
    """Trains one seed; returns its best validation metrics (every rank gets the same dict).

    A seed finished by an earlier run of the same config returns its recorded result; one that was
    preempted continues from its last/ checkpoint. Steps are deterministic in (seed, step) (data
    order, dropout, SiFT noise), so a continued seed is the uninterrupted one. On a stop request
    (`preemption.requested` on any rank) the seed saves last/ and raises Preempted.
    """
    seed_dir = run_path / f"seed{seed}"
    earlier = _earlier_attempt(cfg, seed_dir, ctx.is_main)
    if earlier and "result" in earlier:
        logger.info("seed %d: finished by an earlier run, best %s %.4f (%s)", seed, cfg.best_metric,
                    earlier["result"][cfg.best_metric], seed_dir / SEED_RESULT)
        return earlier["result"]
    last_dir = CheckpointManager(seed_dir / "last", CheckpointSection(every_steps=0, keep_last=1), ctx.rank)
    resume_tag = last_dir.find_resume() if earlier is not None else None
    if resume_tag is None:
        _start_seed_dir(cfg, seed_dir, ctx.is_main)
    G = cfg.train.global_batch_size
    steps_per_epoch, total = _steps(cfg, task)
    model = build_classifier(cfg, init, task.num_labels, seed).to(ctx.device)
    sift = SiFT(model.embedding_norm, cfg.sift.noise_std, cfg.sift.step_size, cfg.sift.weight) if cfg.sift.enabled else None
    engine, warmup = _seed_engine(cfg, model, total, ctx)
    best = SeedBest(cfg, seed, model, task, tokenizer, seed_dir, ctx)
    state = last_dir.load(engine, resume_tag) if resume_tag is not None else TrainState(data=dict(FRESH_SEED))
    if resume_tag is not None:
        logger.info("seed %d: continuing from %s at step %d", seed, resume_tag, state.step + 1)
    best.best = state.data["best"] or best.best
    if sift is not None:
        sift.skipped = state.data["sift_skipped"]
    metrics = MetricsWriter(seed_dir, enabled=ctx.is_main, resume_step=state.step)
    loop = StepLoop(engine, ctx, seed=seed, clip=trainer_clip(cfg),
                    max_bad_steps=cfg.train.max_bad_steps, log_every=cfg.log.every_steps, metrics=metrics,
                    preemption=preemption, forward=task_forward(sift, task.regression), lr_group=-1,
                    where=f"seed {seed} ", skipped=state.skipped_steps, bad_in_a_row=state.data["bad_in_a_row"])
    logger.info("seed %d: %d examples, %d steps (%d per epoch, %d warmup), SiFT %s, best by %s", seed,
                len(task.train), total, steps_per_epoch, warmup, "on" if sift else "off", cfg.best_metric)
    micro_batches = lambda step: [
        collate(task.train, indices, tokenizer.pad_id)
        for indices in step_micro_batches(task.train, seed, step, steps_per_epoch, G, cfg.train.micro_batch_size,
                                          ctx.dp_rank, ctx.dp_size)]
    first = state.step + 1
    for step in loop.steps(first, total, micro_batches):
        if loop.log_due(step, first_logged=first):
            loop.log(step, {"epoch": round(step / steps_per_epoch, 4),
                            **({"sift_skipped": sift.skipped} if sift is not None else {})})
        if step % (cfg.eval.every_steps or steps_per_epoch) == 0 or step == total:
            best.evaluate(engine, step, metrics)
        if loop.stop and step < total:
            metrics.close()
            state = TrainState(step=step, consumed_samples=step * G, skipped_steps=loop.skipped,
                               data={"best": best.best, "bad_in_a_row": loop.guard.in_a_row,
                                     "sift_skipped": sift.skipped if sift is not None else 0})
            _save_and_stop(cfg, ctx, engine, last_dir, state, seed, total, preemption)
    metrics.close()
    if sift is not None:
        sift.remove()
    _finish_seed(seed_dir, best.best, ctx.is_main)
    del engine, loop
    gc.collect()
    return best.best



def _save_and_stop(cfg: FinetuneConfig, ctx, engine, last_dir: CheckpointManager, state: TrainState, seed: int,
                   total: int, preemption) -> None:
    """A stop request: the seed's state goes to last/, and Preempted ends the run (exit 75)."""
    last_dir.save(engine, state, {"config": cfg.to_dict()},
                  {"world_size": ctx.world_size, "zero_stage": cfg.zero.stage, "seed": seed})
    raise Preempted(f"{preemption.signal_name or 'stop request'} received: seed {seed} saved at step {state.step} "
                    f"of {total} in {last_dir.directory}; run the same command again to continue")


def _steps(cfg: FinetuneConfig, task: Task) -> Tuple[int, int]:
    """(steps per epoch, total steps) of a seed: whole global batches per epoch, train.epochs of them."""
    steps_per_epoch = len(task.train) // cfg.train.global_batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{cfg.data.train} has {len(task.train)} examples, fewer than "
                        f"train.global_batch_size={cfg.train.global_batch_size}")
    return steps_per_epoch, max(1, math.ceil(cfg.train.epochs * steps_per_epoch))


def _finish_seed(seed_dir: Path, best: Dict, is_main: bool) -> None:
    """result.json replaces the seed's last/ checkpoint: a later run skips the seed."""
    if is_main:
        write_atomic(seed_dir / SEED_RESULT, json.dumps(best, indent=1) + "\n")
        shutil.rmtree(seed_dir / "last", ignore_errors=True)
    _barrier()


def _start_seed_dir(cfg: FinetuneConfig, seed_dir: Path, is_main: bool) -> None:
    """A fresh seed directory: no stale best checkpoint, export or metrics; what the seed is trained with."""
    if is_main:
        if seed_dir.exists():
            shutil.rmtree(seed_dir)
        seed_dir.mkdir(parents=True)
        write_atomic(seed_dir / SEED_CONFIG, json.dumps(seed_identity(cfg), indent=1) + "\n")
    _barrier()


def _seed_engine(cfg: FinetuneConfig, model: SequenceClassifier, total: int, ctx) -> Tuple[object, int]:
    """The DeepSpeed engine of one seed (layer-wise LR decay groups, warmup and linear decay over
    `total` steps) and its number of warmup steps."""
    warmup = round(cfg.optim.warmup_ratio * total)
    multiplier = warmup_linear_decay(warmup, total, cfg.optim.min_lr / cfg.optim.lr)
    groups = layer_decay_groups(model, cfg.optim.weight_decay, cfg.optim.lr, cfg.optim.layer_decay)
    engine = initialize(model, groups, multiplier, deepspeed_config(cfg, ctx.dp_size,
                                                                    use_fused_adam=ctx.device.type == "cuda"), ctx)
    return engine, warmup


class SeedBest:
    """A seed's best validation result by `eval.metric`: evaluates, and on a new best writes the HF
    export (now, so that a preempted seed has it too) and the best DeepSpeed checkpoint."""

    def __init__(self, cfg: FinetuneConfig, seed: int, model: SequenceClassifier, task: Task, tokenizer: Tokenizer,
                 seed_dir: Path, ctx):
        self.cfg, self.seed, self.model, self.task, self.tokenizer, self.seed_dir, self.ctx = (
            cfg, seed, model, task, tokenizer, seed_dir, ctx)
        self.best: Dict = {"seed": seed, cfg.best_metric: -math.inf}
        self.checkpoints = CheckpointManager(seed_dir / "best", CheckpointSection(every_steps=0, keep_last=1), ctx.rank)

    def evaluate(self, engine, step: int, metrics: MetricsWriter) -> None:
        cfg, ctx, task = self.cfg, self.ctx, self.task
        logits, labels = predict(engine, task.validation, cfg.eval.batch_size, self.tokenizer.pad_id, ctx)
        scores = task_metrics(cfg.data.kind, task.num_labels, logits, labels)
        metrics.log(step, {f"valid_{k}": v for k, v in scores.items()})
        logger.info("seed %d step %d validation %s", self.seed, step, " ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if scores[cfg.best_metric] <= self.best[cfg.best_metric]:
            return
        self.best = {"seed": self.seed, "step": step, **scores}
        if cfg.checkpoint.export != "none":
            state = _gathered_state(engine, cfg.zero.stage)
            if ctx.is_main:
                export_hf(self.model, state, task, self.tokenizer, self.seed_dir / "hf")
            del state
        if cfg.checkpoint.keep_best:
            extra = {"config": cfg.to_dict(), "classifier": self.model.describe(), "labels": task.labels,
                     "validation": scores}
            self.checkpoints.save(engine, TrainState(step=step, consumed_samples=step * cfg.train.global_batch_size),
                                  extra, {"world_size": ctx.world_size, "zero_stage": cfg.zero.stage, "seed": self.seed})


def _gathered_state(engine, zero_stage: int) -> Optional[Dict[str, torch.Tensor]]:
    """fp32 CPU copy of the full module weights on global rank 0 (ZeRO-3 gathers them first)."""
    module = engine.module
    if zero_stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    else:
        state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return state if dist.get_rank() == 0 else None


def export_hf(model: SequenceClassifier, state: Dict[str, torch.Tensor], task: Task, tokenizer: Tokenizer,
              dest: Path) -> Path:
    """The best weights as a Hugging Face XForSequenceClassification directory (+ the tokenizer), atomically."""
    from safetensors.torch import save_file

    from models.classification import hf_config, to_hf_state_dict

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        hf_config(model, task.labels, task.regression).save_pretrained(tmp)
        save_file(to_hf_state_dict(state, model.family, model.config), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        tokenizer.save_copy(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class Preempted(Exception):
    """SIGTERM/SIGUSR1: the current seed saved its state; exit EXIT_PREEMPTED (75)."""


# ----------------------------------------------------------------------------- all seeds
def summarize(results: List[Dict], metric: str) -> Dict:
    values = np.asarray([r[metric] for r in results], dtype=np.float64)
    return {"metric": metric, "seeds": [r["seed"] for r in results], "values": values.tolist(),
            "mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "min": float(values.min()), "max": float(values.max()), "per_seed": results}


def finetune(cfg: FinetuneConfig) -> Tuple[int, Dict]:
    ctx = init_parallel(1, cfg.train.collective_timeout_s)
    setup_logging(ctx.is_main)
    cfg.check_batch(ctx.dp_size)
    init = load_initial_model(cfg.model.init)
    tokenizer = resolve_tokenizer(cfg, init)
    task = load_task(cfg, tokenizer, init)
    run_path = RunDirectory.prepare(cfg, ctx, tokenizer).path
    logger.info("fine-tuning a %s (%s) on %s: %d train / %d validation examples, %s%s", init.family,
                "random init" if cfg.model.random_init else init.source,
                cfg.data.train, len(task.train), len(task.validation), cfg.data.kind,
                f" over {task.num_labels} classes" if not task.regression else "")
    preemption = PreemptionHandler(cfg.checkpoint.preemption_timeout_s).install()
    results = []
    try:
        for seed in cfg.train.seeds:
            # a signal during the previous seed's last step: stop before the next one (all ranks agree)
            if StepFlags(ctx.device).exchange(preemption.requested, torch.zeros(()), False)[0]:
                raise Preempted(f"{preemption.signal_name or 'stop request'} received before seed {seed}; run the "
                                f"same command again to continue")
            results.append(finetune_seed(cfg, seed, ctx, task, init, tokenizer, run_path, preemption))
    finally:
        preemption.uninstall()
    summary = summarize(results, cfg.best_metric)
    if ctx.is_main:
        (run_path / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0, summary


def summary_text(summary: Dict, run_path: Path) -> str:
    lines = [f"run directory: {run_path}"]
    for r in summary["per_seed"]:
        lines.append(f"seed {r['seed']}: best {summary['metric']} {r[summary['metric']]:.4f} at step {r.get('step')}")
    spread = f" ± {summary['std']:.4f} (min {summary['min']:.4f}, max {summary['max']:.4f})" \
        if len(summary["values"]) > 1 else ""
    lines.append(f"validation {summary['metric']}: {summary['mean']:.4f}{spread} over {len(summary['values'])} seed(s)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_run_args(__doc__, "configs/finetune/*.yaml", argv)
    cfg = load_finetune_config(args.config, args.overrides)
    try:
        status, summary = run_guarded(lambda: finetune(cfg), cfg.train.collective_timeout_s, "fine-tuning")
    except Preempted as err:
        logger.warning("%s (exit %d)", err, EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    if summary and dist.get_rank() == 0:
        print(summary_text(summary, Path(cfg.run.dir) / cfg.run.name), flush=True)
    return status


if __name__ == "__main__":
    from trainer.core.cli import run_cli
    run_cli(main)
