"""Pretraining entry point.

    python -m trainer.pretrain --config configs/pretrain/roberta_demo.yaml [key.sub=value ...]
    deepspeed --num_gpus N --module trainer.pretrain --config FILE [key=value ...]
    torchrun --nproc_per_node N -m trainer.pretrain --config FILE [key=value ...]
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from data.loader import validation_batches
from data.tokenizer import Tokenizer
from models.parallel import partition_dims
from models.registry import batch_keys
from trainer.core import schedule
from trainer.core.checkpoint import LOADED_FROM, CheckpointManager, TrainState
from trainer.core.deepspeed_json import trainer_clip
from trainer.core.diagnostics import PlateauWatch
from trainer.core.elastic import prepare_resume
from trainer.core.engine import build_engine
from trainer.core.cli import parse_run_args
from trainer.core.loop import StepLoop, run_guarded
from trainer.core.metrics import MetricsWriter, read_metrics
from trainer.core.parallel import ParallelContext, init_parallel
from trainer.core.preemption import EXIT_PREEMPTED, PreemptionHandler
from trainer.core.run_dir import RunDirectory, setup_logging
from trainer.core.step import evaluate
from trainer.pretraining.config import PretrainConfig, load_config
from trainer.pretraining.inputs import PretrainInputs, build_inputs, check_corpora, resolve_tokenizer
from trainer.pretraining.model import build_model_for
from trainer.pretraining.probe import Probe, build_probe

logger = logging.getLogger("trainer.pretrain")


@dataclass
class Pretraining:
    """Everything a pretraining run builds before its first step."""
    cfg: PretrainConfig
    ctx: ParallelContext
    tokenizer: Tokenizer
    run: RunDirectory
    inputs: PretrainInputs
    probe: Optional[Probe]
    model: torch.nn.Module
    engine: object
    checkpoints: CheckpointManager
    state: TrainState
    metrics: MetricsWriter
    extra: dict  # what every checkpoint carries beside the engine's states
    meta: dict
    two_stage_n: int  # RTD two_stage: the generator's steps (0: joint)


def prepare(cfg: PretrainConfig) -> Pretraining:
    """Parallel groups, inputs checked before anything is written, the run directory, the model and its
    engine, and the state of the checkpoint to resume from (if any)."""
    ctx = init_parallel(cfg.parallel.tensor, cfg.train.collective_timeout_s)
    setup_logging(ctx.is_main)
    cfg.check_batch(ctx.dp_size)
    tokenizer = resolve_tokenizer(cfg)
    check_corpora(cfg, ctx, tokenizer)  # every .bin/.idx/.json, before anything is written
    probe = build_probe(cfg, tokenizer)  # None when off; reads and checks its task files now
    run = RunDirectory.prepare(cfg, ctx, tokenizer)
    inputs = build_inputs(cfg, ctx, tokenizer)
    model, model_config = build_model_for(cfg, tokenizer, ctx)
    checkpoints = CheckpointManager(run.checkpoints, cfg.checkpoint, ctx.rank)
    resume = prepare_resume(checkpoints.find_resume(), cfg, ctx, run.checkpoints)  # may convert (universal)
    two_stage_n = schedule.generator_steps(cfg.train.rtd_schedule, cfg.train.generator_steps, cfg.train.steps)
    schedule.check_schedule(model, cfg.train.rtd_schedule, two_stage_n, cfg.train.steps)
    engine = build_engine(cfg, model, ctx, load_universal=resume is not None and resume.universal)
    state = checkpoints.load(engine, resume.path, resume.universal) if resume else TrainState()
    inputs.loader.load_state_dict({**state.data, "consumed_samples": state.consumed_samples, "step": state.step})
    metrics = MetricsWriter(run.path, enabled=ctx.is_main, resume_step=state.step)
    extra, meta = checkpoint_context(cfg, ctx, model, model_config, tokenizer)
    meta[LOADED_FROM] = checkpoints.loaded_from  # a relaunch with the same checkpoint.load resumes our own
    logger.info("model %s/%s: %.2fM parameters (this rank); world %d = tp %d x dp %d; steps %d..%d",
                cfg.model.name, cfg.model.size, sum(p.numel() for p in model.parameters()) / 1e6,
                ctx.world_size, ctx.tp_size, ctx.dp_size, state.step + 1, cfg.train.steps)
    return Pretraining(cfg, ctx, tokenizer, run, inputs, probe, model, engine, checkpoints, state, metrics, extra,
                       meta, two_stage_n)


def train(cfg: PretrainConfig) -> Tuple[int, dict]:
    """Runs (or resumes) pretraining; returns (exit status, summary)."""
    p = prepare(cfg)
    ctx, engine, state, inputs, checkpoints, metrics = p.ctx, p.engine, p.state, p.inputs, p.checkpoints, p.metrics
    keys = set(batch_keys(cfg.model.name))  # e.g. sample_index: RTD models only
    only_keys = lambda batches: [{k: v for k, v in b.items() if k in keys} for b in batches]
    preemption = PreemptionHandler(cfg.checkpoint.preemption_timeout_s).install()
    loop = StepLoop(engine, ctx, seed=cfg.train.seed, clip=trainer_clip(cfg),
                    max_bad_steps=cfg.train.max_bad_steps, log_every=cfg.log.every_steps, metrics=metrics,
                    preemption=preemption, vocab_size=p.tokenizer.vocab_size, mask_id=p.tokenizer.mask_id,
                    skipped=state.skipped_steps)
    enter_stage = (lambda step: schedule.enter_step(engine, step, p.two_stage_n)) if p.two_stage_n else None
    plateau = PlateauWatch()  # warns when validation sits at the prior / context-free baselines
    if ctx.is_main and state.step:
        plateau.replay(read_metrics(p.run.path))  # the streaks so far (metrics.jsonl is cut at the resume)
    status, efficiency = 0, []  # real tokens / row tokens of the steps since the last log
    for step in loop.steps(state.step + 1, cfg.train.steps, lambda step: only_keys(inputs.loader.next_step()),
                           before_step=enter_stage, save_due=checkpoints.time_due, inject_nan=cfg.debug.nan_loss_steps):
        state.step, state.consumed_samples, state.skipped_steps = step, inputs.loader.consumed_samples, loop.skipped
        engine.global_samples = state.consumed_samples  # DeepSpeed would count nominal batches (token budgets)
        state.data = inputs.loader.state_dict()
        efficiency.append(inputs.loader.last_step_packing_efficiency)

        if loop.log_due(step, first_logged=1):
            state.consumed_tokens += loop.take_tokens()
            loop.log(step, {"consumed_samples": state.consumed_samples, "consumed_tokens": state.consumed_tokens,
                            "packing_efficiency": sum(efficiency) / len(efficiency), "data_parallel_size": ctx.dp_size})
            efficiency.clear()

        if inputs.valid is not None and cfg.eval.every_steps and (
                step % cfg.eval.every_steps == 0 or step == cfg.train.steps):
            batches = validation_batches(inputs.valid, cfg.eval.samples, cfg.train.micro_batch_size,
                                         ctx.dp_rank, ctx.dp_size)
            valid = evaluate(engine, only_keys(batches), ctx, vocab_size=p.tokenizer.vocab_size,
                             mask_id=p.tokenizer.mask_id)
            metrics.log(step, valid)
            plateau.report(step, valid, ctx.is_main)

        if p.probe is not None and p.probe.due(step, cfg.train.steps):
            metrics.log(step, p.probe.run(engine, ctx, step))  # every rank extracts features; rank 0 fits

        if checkpoints.due(step, cfg.train.steps) or loop.save_due or loop.stop:
            state.consumed_tokens += loop.take_tokens()
            if step == cfg.debug.crash_in_save_step:
                checkpoints.crash_before_commit = True
            checkpoints.save(engine, state, p.extra, p.meta)
        if loop.stop:
            logger.warning("%s received: stopped after step %d with a checkpoint; exit status %d (run the same "
                           "command again to resume)", preemption.signal_name or "signal", step, EXIT_PREEMPTED)
            status = EXIT_PREEMPTED
            break

    preemption.uninstall()
    metrics.close()
    return status, p.run.summary()



def checkpoint_context(cfg: PretrainConfig, ctx, model: torch.nn.Module, model_config: dict, tokenizer):
    """What every checkpoint of the run carries beside the engine's states: (extra, meta)."""
    extra = {"config": cfg.to_dict(), "model_config": model_config, "tokenizer_fingerprint": tokenizer.fingerprint(),
             "universal_checkpoint_info": universal_checkpoint_info(model)}
    meta = {"world_size": ctx.world_size, "dp_size": ctx.dp_size, "tp_size": ctx.tp_size, "zero_stage": cfg.zero.stage,
            "precision": cfg.precision, "global_batch_size": cfg.train.global_batch_size}
    return extra, meta


def universal_checkpoint_info(model: torch.nn.Module) -> dict:
    """What DeepSpeed's ds_to_universal needs to merge tensor-parallel shards of each parameter."""
    dims = partition_dims(model)
    names = [name for name, _ in model.named_parameters()]
    exact = lambda items: [rf"^{re.escape(n)}$" for n in items]
    return {
        "universal_checkpoint_version": 0.2,
        "tp_replicated_parameter_patterns": exact(n for n in names if n not in dims),
        "parameter_with_row_parallelism_patterns": exact(n for n, d in dims.items() if d == 1),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_run_args(__doc__, "configs/pretrain/*.yaml", argv)
    cfg = load_config(args.config, args.overrides)
    status, summary = run_guarded(lambda: train(cfg), cfg.train.collective_timeout_s, "training")
    if summary:
        print(summary["text"], flush=True)
    return status


if __name__ == "__main__":
    from trainer.core.cli import run_cli
    run_cli(main)
