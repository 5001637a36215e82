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

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.errors import UserError
from data.jsonio import read_json_object
from data.tasks import EncodedTask, collate, encode, label_ids, label_names, read_examples
from data.tokenizer import Tokenizer, load_tokenizer
from models.classification import SequenceClassifier
from trainer.finetuning.config import FinetuneConfig, load_finetune_config
from trainer.core.parallel import from_rank0
from trainer.core.safe_load import WEIGHTS_ONLY, safe_torch_load
from trainer.core.schedule import uses_weight_decay

logger = logging.getLogger("trainer.finetune")
EPOCH_STREAM = 0x46544E45  # "FTNE": keeps the fine-tuning data order apart from other random streams
SEED_CONFIG = "seed_config.json"  # what the seed was trained with (resume only under the same one)
SEED_RESULT = "result.json"  # the seed's best validation metrics, written when it finishes


# ----------------------------------------------------------------------------- the starting model
@dataclass
class InitialModel:
    """Where fine-tuning starts: a backbone (and maybe a classifier head) in our layout."""
    family: str
    config: object  # the backbone tower's config
    backbone: Dict[str, torch.Tensor]
    head: Dict[str, torch.Tensor]
    source: str  # "native" or "hf"
    tokenizer_dirs: Tuple[Path, ...]  # where a tokenizer may lie beside the weights


def load_initial_model(init: str) -> InitialModel:
    """model.init: a native model file/directory (models/native.py) or a Hugging Face directory."""
    from models import native
    from models.classification import backbone_from_native

    path = Path(init)
    if path.is_file() or (path / native.FILENAME).is_file():
        nm = native.load_native(path)
        family, config, backbone = backbone_from_native(nm.name, nm.config, nm.state_dict)
        folder = path.parent if path.is_file() else path
        return InitialModel(family, config, backbone, {}, "native",
                            (folder, folder / "tokenizer", folder.parent / "tokenizer"))
    if (path / "config.json").is_file():
        return _load_hf(path)
    raise UserError(f"model.init={init}: neither a native model file (model.pt, from tools/convert_checkpoint.py "
                    f"--format native) nor a Hugging Face directory with config.json")


def _load_hf(path: Path) -> InitialModel:
    import transformers
    from models.classification import config_from_hf, from_hf_state_dict

    read_json_object(path / "config.json", "fix the file or download the model again")  # file:line, not transformers' OSError
    hf_config = transformers.AutoConfig.from_pretrained(path)
    family, config = config_from_hf(hf_config)
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file
        state = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        state = safe_torch_load(path / "pytorch_model.bin", allowed=WEIGHTS_ONLY)
    else:
        raise UserError(f"model.init={path}: no model.safetensors or pytorch_model.bin (sharded checkpoints: "
                        f"save them as one file first)")
    try:
        backbone, head = from_hf_state_dict(state, family, config)
    except (KeyError, ValueError) as err:
        raise UserError(f"model.init={path}: {err.args[0]}") from None
    return InitialModel(family, config, backbone, head, "hf", (path,))


def resolve_tokenizer(cfg: FinetuneConfig, init: InitialModel) -> Tokenizer:
    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    for folder in init.tokenizer_dirs:
        if (folder / "tokenizer_meta.json").is_file():
            return load_tokenizer(folder)
    raise UserError(f"no tokenizer beside model.init={cfg.model.init}; set data.tokenizer=DIR "
                    f"(the pretraining run's tokenizer/ directory)")


def build_classifier(cfg: FinetuneConfig, init: InitialModel, num_labels: int, seed: int) -> SequenceClassifier:
    """The classifier with the backbone's weights; the head is fresh (drawn from `seed`) unless
    model.init is a classifier with the same number of outputs. With model.random_init every weight
    is fresh, drawn from `seed` by the backbone's own initialisation."""
    config = dataclasses.replace(init.config, **cfg.model.overrides)
    torch.manual_seed(seed)
    model = SequenceClassifier(init.family, config, num_labels, cfg.model.classifier_dropout, cfg.model.pooling)
    if cfg.model.random_init:
        return model
    missing, unexpected = model.backbone.load_state_dict(init.backbone, strict=False)
    if missing or unexpected:
        raise UserError(f"model.init={cfg.model.init}: weights do not fit the {init.family} backbone "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    head_shapes = {k: v.shape for k, v in model.head.state_dict().items()}
    if init.head and {k: v.shape for k, v in init.head.items()} == head_shapes:
        model.head.load_state_dict(init.head)
    return model


# ----------------------------------------------------------------------------- task data
@dataclass
class Task:
    train: EncodedTask
    validation: EncodedTask
    labels: List[str]  # class names in id order (empty for regression)
    num_labels: int
    regression: bool


def max_input_length(family: str, config) -> Optional[int]:
    if family == "roberta":
        return config.max_seq_length
    if family == "electra" or config.position_biased_input:
        return config.max_position_embeddings
    return None  # relative positions only


def load_task(cfg: FinetuneConfig, tokenizer: Tokenizer, init: InitialModel) -> Task:
    if tokenizer.vocab_size != init.config.vocab_size:
        raise UserError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but model.init has a "
                        f"vocabulary of {init.config.vocab_size}; use the tokenizer the model was trained with")
    limit = max_input_length(init.family, init.config)
    if limit is not None and cfg.data.max_length > limit:
        raise UserError(f"data.max_length={cfg.data.max_length} exceeds the model's {limit} positions")
    fmt = cfg.data  # a TaskFormat
    train, valid = read_examples(cfg.data.train, fmt), read_examples(cfg.data.validation, fmt)
    if len(train[0].texts) != len(valid[0].texts):
        raise UserError(f"{cfg.data.train} has {len(train[0].texts)} text columns but {cfg.data.validation} "
                        f"has {len(valid[0].texts)}")
    names = label_names(train, fmt)
    regression = cfg.data.kind == "regression"
    if not regression and len(names) < 2:
        raise UserError(f"{cfg.data.train}: only one class ({', '.join(names)}); a classifier needs two or more")
    separators = 2 if init.family == "roberta" else 1
    encoded = [encode(examples, label_ids(examples, fmt, names), tokenizer, cfg.data.max_length, separators)
               for examples in (train, valid)]
    return Task(encoded[0], encoded[1], names, 1 if regression else len(names), regression)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, EPOCH_STREAM])).permutation(n)


def step_micro_batches(task: EncodedTask, seed: int, step: int, steps_per_epoch: int, global_batch: int,
                       micro_batch: int, dp_rank: int, dp_size: int) -> List[List[int]]:
    """This rank's micro-batches (example indices) of optimizer step `step` (from 1)."""
    epoch, position = divmod(step - 1, steps_per_epoch)
    batch = epoch_order(seed, epoch, len(task))[position * global_batch:(position + 1) * global_batch]
    per_rank = global_batch // dp_size
    mine = batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    return [mine[i:i + micro_batch].tolist() for i in range(0, per_rank, micro_batch)]


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


def task_loss_sum(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Summed over the micro-batch: cross-entropy, or squared error of the one output."""
    if regression:
        return ((logits.float().squeeze(-1) - labels.float()) ** 2).sum()
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def forward_backward(engine, batch: Dict[str, torch.Tensor], sift, regression: bool, scale: float) -> torch.Tensor:
    """One micro-batch: the task loss (+ SiFT's term), backward with `scale`; returns the summed
    (task, sift) losses as a (2,) tensor without gradient."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = engine(**inputs)
    task = task_loss_sum(logits, batch["labels"], regression)
    # The perturbed passes call the module itself: DeepSpeed's engine forward hooks its outputs so that any
    # backward through them runs its gradient reduction, which the ascent's autograd.grad must not trigger.
    adversarial = (sift.adversarial_loss(lambda: engine.module(**inputs), logits, regression)
                   if sift is not None else None)
    total = task if adversarial is None else task + adversarial
    engine.backward(total * scale, scale_wrt_gas=False)
    zero = torch.zeros((), device=task.device)
    return torch.stack([task.detach(), adversarial.detach() if adversarial is not None else zero])


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(engine, task: EncodedTask, batch_size: int, pad_id: int, ctx) -> Tuple[np.ndarray, np.ndarray]:
    """Logits of every validation example (this rank's stride, gathered): (N, C) and labels (N,)."""
    engine.eval()
    mine = list(range(ctx.dp_rank, len(task), ctx.dp_size))
    # every rank runs the same number of forwards (ZeRO-3 gathers weights collectively in each one);
    # a rank with fewer examples repeats one and drops the result
    passes = math.ceil(math.ceil(len(task) / ctx.dp_size) / batch_size)
    outputs = []
    for i in range(0, passes * batch_size, batch_size):
        indices = mine[i:i + batch_size]
        batch = collate(task, indices or [0], pad_id)
        logits = engine(input_ids=batch["input_ids"].to(ctx.device), attention_mask=batch["attention_mask"].to(ctx.device))
        if indices:
            outputs.append(logits.float().cpu().numpy())
    engine.train()
    local = (mine, np.concatenate(outputs) if outputs else np.zeros((0, 1), np.float32))
    parts = [local]
    if ctx.dp_size > 1:
        parts = [None] * ctx.dp_size
        dist.all_gather_object(parts, local, group=ctx.dp_group)
    order = np.concatenate([np.asarray(p[0], dtype=np.int64) for p in parts])
    logits = np.concatenate([p[1] for p in parts if len(p[0])])
    result = np.empty_like(logits)
    result[order] = logits
    return result, task.labels


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
    from trainer.core.checkpoint import CheckpointManager, TrainState
    from trainer.core.metrics import write_atomic
    from trainer.core.config import CheckpointSection
    from trainer.core.deepspeed_json import deepspeed_config, trainer_clips_gradients
    from trainer.core.engine import initialize, warmup_linear_decay
    from trainer.finetuning.task_metrics import task_metrics
    from trainer.core.metrics import MetricsWriter
    from trainer.core.preemption import StepFlags
    from trainer.finetuning.sift import SiFT
    from trainer.core.step import clip_or_skip, dropout_seed

    seed_dir = run_path / f"seed{seed}"
    earlier = _earlier_attempt(cfg, seed_dir, ctx.is_main)
    if earlier and "result" in earlier:
        logger.info("seed %d: finished by an earlier run, best %s %.4f (%s)", seed, cfg.best_metric,
                    earlier["result"][cfg.best_metric], seed_dir / SEED_RESULT)
        return earlier["result"]
    last_dir = CheckpointManager(seed_dir / "last", CheckpointSection(every_steps=0, keep_last=1), ctx.rank)
    resume_tag = last_dir.find_resume() if earlier is not None else None
    if resume_tag is None:
        if ctx.is_main:
            if seed_dir.exists():
                shutil.rmtree(seed_dir)  # no stale best checkpoint, export or metrics
            seed_dir.mkdir(parents=True)
            write_atomic(seed_dir / SEED_CONFIG, json.dumps(seed_identity(cfg), indent=1) + "\n")
        _barrier()
    G, D = cfg.train.global_batch_size, ctx.dp_size
    steps_per_epoch = len(task.train) // G
    if steps_per_epoch == 0:
        raise UserError(f"{cfg.data.train} has {len(task.train)} examples, fewer than train.global_batch_size={G}")
    total = max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=total))
    eval_every = cfg.eval.every_steps or steps_per_epoch

    model = build_classifier(cfg, init, task.num_labels, seed).to(ctx.device)
    sift = SiFT(model.embedding_norm, cfg.sift.noise_std, cfg.sift.step_size, cfg.sift.weight) if cfg.sift.enabled else None
    warmup = round(cfg.optim.warmup_ratio * total)
    multiplier = warmup_linear_decay(warmup, total, cfg.optim.min_lr / cfg.optim.lr)
    engine = initialize(model, layer_decay_groups(model, cfg.optim.weight_decay, cfg.optim.lr, cfg.optim.layer_decay),
                        multiplier, deepspeed_config(run_cfg, D, use_fused_adam=ctx.device.type == "cuda"), ctx)
    best_dir = CheckpointManager(seed_dir / "best", CheckpointSection(every_steps=0, keep_last=1), ctx.rank)
    best: Dict = {"seed": seed, cfg.best_metric: -math.inf}
    first_step, skipped, bad_in_a_row = 1, 0, 0
    if resume_tag is not None:
        state = last_dir.load(engine, resume_tag)
        first_step, skipped = state.step + 1, state.skipped_steps
        best, bad_in_a_row = state.data["best"], state.data["bad_in_a_row"]
        if sift is not None:
            sift.skipped = state.data["sift_skipped"]
        logger.info("seed %d: continuing from %s at step %d", seed, resume_tag, first_step)
    metrics = MetricsWriter(seed_dir, enabled=ctx.is_main, resume_step=first_step - 1)
    flags = StepFlags(ctx.device)
    clip = cfg.train.grad_clip if trainer_clips_gradients(run_cfg) else None
    metric_name = cfg.best_metric
    logger.info("seed %d: %d examples, %d steps (%d per epoch, %d warmup), SiFT %s, best by %s", seed,
                len(task.train), total, steps_per_epoch, warmup, "on" if sift else "off", metric_name)

    window = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    window_steps, window_all, start = 0, 0, time.perf_counter()
    for step in range(first_step, total + 1):
        torch.manual_seed(dropout_seed(seed, step, ctx.dp_rank))  # dropout and SiFT's noise
        losses = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        micro = step_micro_batches(task.train, seed, step, steps_per_epoch, G, cfg.train.micro_batch_size,
                                   ctx.dp_rank, D)
        for i, indices in enumerate(micro):
            batch = {k: v.to(ctx.device) for k, v in collate(task.train, indices, tokenizer.pad_id).items()}
            losses += forward_backward(engine, batch, sift, task.regression, D / G).double()
            if clip is not None and i == len(micro) - 1:
                clip_or_skip(engine, clip)
            engine.step()
        stop, bad, _ = flags.exchange(preemption is not None and preemption.requested, losses.sum(), False)
        window_all += 1
        if bad:
            skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
            logger.warning("seed %d step %d: non-finite loss, update skipped (%d in a row)", seed, step, bad_in_a_row)
            if bad_in_a_row >= cfg.train.max_bad_steps:
                raise TrainingDiverged(f"{bad_in_a_row} consecutive steps with a NaN/Inf loss (seed {seed}, step "
                                       f"{step}); lower optim.lr or check the data")
        else:
            bad_in_a_row = 0
            window += losses
            window_steps += 1

        if step == first_step or step % cfg.log.every_steps == 0 or step == total:
            if D > 1:
                dist.all_reduce(window, group=ctx.dp_group)
            task_loss, sift_loss = (window / max(window_steps * G, 1)).tolist()
            record = {"epoch": round(step / steps_per_epoch, 4), "loss": task_loss + sift_loss, "loss_task": task_loss,
                      "lr": engine.get_lr()[-1], "samples_per_sec": window_all * G / (time.perf_counter() - start),
                      "skipped_steps": skipped}
            if sift is not None:
                record["loss_sift"] = sift_loss
                record["sift_skipped"] = sift.skipped
            metrics.log(step, record)
            logger.info("seed %d step %d/%d loss %.4f lr %.3g", seed, step, total, record["loss"], record["lr"])
            window.zero_()
            window_steps, window_all, start = 0, 0, time.perf_counter()

        if step % eval_every == 0 or step == total:
            logits, labels = predict(engine, task.validation, cfg.eval.batch_size, tokenizer.pad_id, ctx)
            scores = task_metrics(cfg.data.kind, task.num_labels, logits, labels)
            metrics.log(step, {f"valid_{k}": v for k, v in scores.items()})
            logger.info("seed %d step %d validation %s", seed, step,
                        " ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            if scores[metric_name] > best[metric_name]:
                best = {"seed": seed, "step": step, **scores}
                if cfg.checkpoint.export != "none":  # written now, so that a preempted seed has it too
                    best_state = _gathered_state(engine, cfg.zero.stage)
                    if ctx.is_main:
                        export_hf(model, best_state, task, tokenizer, seed_dir / "hf")
                    del best_state
                if cfg.checkpoint.keep_best:
                    extra = {"config": cfg.to_dict(), "classifier": model.describe(), "labels": task.labels,
                             "validation": scores}
                    best_dir.save(engine, TrainState(step=step, consumed_samples=step * G), extra,
                                  {"world_size": ctx.world_size, "zero_stage": cfg.zero.stage, "seed": seed})

        if stop and step < total:
            state = TrainState(step=step, consumed_samples=step * G, skipped_steps=skipped,
                               data={"best": best, "bad_in_a_row": bad_in_a_row,
                                     "sift_skipped": sift.skipped if sift is not None else 0})
            last_dir.save(engine, state, {"config": cfg.to_dict()},
                          {"world_size": ctx.world_size, "zero_stage": cfg.zero.stage, "seed": seed})
            metrics.close()
            raise Preempted(f"{preemption.signal_name or 'stop request'} received: seed {seed} saved at step {step} "
                            f"of {total} in {last_dir.directory}; run the same command again to continue")

    metrics.close()
    if sift is not None:
        sift.remove()
    if ctx.is_main:
        write_atomic(seed_dir / SEED_RESULT, json.dumps(best, indent=1) + "\n")
        shutil.rmtree(seed_dir / "last", ignore_errors=True)  # finished: result.json replaces it
    _barrier()
    del engine
    gc.collect()
    return best


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


class TrainingDiverged(Exception):
    """Too many consecutive non-finite losses: exit status 3."""


class Preempted(Exception):
    """SIGTERM/SIGUSR1: the current seed saved its state; exit EXIT_PREEMPTED (75)."""


# ----------------------------------------------------------------------------- all seeds
def summarize(results: List[Dict], metric: str) -> Dict:
    values = np.asarray([r[metric] for r in results], dtype=np.float64)
    return {"metric": metric, "seeds": [r["seed"] for r in results], "values": values.tolist(),
            "mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "min": float(values.min()), "max": float(values.max()), "per_seed": results}


def finetune(cfg: FinetuneConfig) -> Tuple[int, Dict]:
    from trainer.core.parallel import init_parallel
    from trainer.core.run_dir import RunDirectory, setup_logging

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
    from trainer.core.preemption import PreemptionHandler

    from trainer.core.preemption import StepFlags

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


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (configs/finetune/*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; the LOCAL_RANK environment variable is used")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of any config field")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from trainer.core.preemption import EXIT_DIVERGED, EXIT_PREEMPTED

    args = parse_args(argv)
    cfg = load_finetune_config(args.config, args.overrides)
    from trainer.core.parallel import exit_if_a_peer_hangs
    try:
        with exit_if_a_peer_hangs(cfg.train.collective_timeout_s):
            status, summary = finetune(cfg)
    except TrainingDiverged as err:
        logger.error("fine-tuning stopped: %s", err)
        print(f"error: fine-tuning stopped: {err}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except Preempted as err:
        logger.warning("%s (exit %d)", err, EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    if dist.get_rank() == 0:
        print(summary_text(summary, Path(cfg.run.dir) / cfg.run.name), flush=True)
    return status


if __name__ == "__main__":
    from trainer.core.cli import run_cli
    run_cli(main)
