"""Pretraining entry point.

    python -m trainer.pretrain --config configs/pretrain/roberta_demo.yaml [key.sub=value ...]
    deepspeed --num_gpus N --module trainer.pretrain --config FILE [key=value ...]
    torchrun --nproc_per_node N -m trainer.pretrain --config FILE [key=value ...]
"""
from __future__ import annotations

import argparse
import inspect
import logging
import re
import sys
import time
from typing import Optional, Sequence, Tuple

import torch

from trainer.pretraining.config import PretrainConfig, load_config
from trainer.core.deepspeed_json import trainer_clips_gradients
from trainer.core.run_dir import RunDirectory, setup_logging
from trainer.pretraining.model import build_model_for

logger = logging.getLogger("trainer.pretrain")


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (configs/pretrain/*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; the LOCAL_RANK environment variable is used")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of any config field")
    return parser.parse_args(argv)


def train(cfg: PretrainConfig) -> Tuple[int, dict]:
    """Runs (or resumes) pretraining; returns (exit status, summary)."""
    from trainer.core.checkpoint import CheckpointManager, TrainState
    from trainer.core.diagnostics import PlateauWatch
    from trainer.core.elastic import prepare_resume
    from trainer.core import schedule
    from trainer.core.engine import build_engine
    from trainer.pretraining.inputs import build_inputs, check_corpora, resolve_tokenizer
    from trainer.core.metrics import MetricsWriter
    from trainer.core.parallel import init_parallel
    from trainer.core.preemption import EXIT_PREEMPTED, PreemptionHandler, StepFlags
    from trainer.pretraining.probe import build_probe
    from trainer.core.step import dropout_seed, evaluate, train_step
    from data.loader import validation_batches

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
    resume = prepare_resume(checkpoints.find_resume(), cfg, ctx)  # may convert to a universal checkpoint
    two_stage_n = schedule.generator_steps(cfg.train.rtd_schedule, cfg.train.generator_steps, cfg.train.steps)
    schedule.check_schedule(model, cfg.train.rtd_schedule, two_stage_n, cfg.train.steps)
    engine = build_engine(cfg, model, ctx, load_universal=resume is not None and resume.universal)
    state = checkpoints.load(engine, resume.path, resume.universal) if resume else TrainState()
    inputs.loader.load_state_dict({"consumed_samples": state.consumed_samples})
    metrics = MetricsWriter(run.path, enabled=ctx.is_main, resume_step=state.step)
    extra = {"config": cfg.to_dict(), "model_config": model_config, "tokenizer_fingerprint": tokenizer.fingerprint(),
             "universal_checkpoint_info": universal_checkpoint_info(model)}
    meta = {"world_size": ctx.world_size, "dp_size": ctx.dp_size, "tp_size": ctx.tp_size, "zero_stage": cfg.zero.stage,
            "precision": cfg.precision, "global_batch_size": cfg.train.global_batch_size}
    logger.info("model %s/%s: %.2fM parameters (this rank); world %d = tp %d x dp %d; steps %d..%d",
                cfg.model.name, cfg.model.size, sum(p.numel() for p in model.parameters()) / 1e6,
                ctx.world_size, ctx.tp_size, ctx.dp_size, state.step + 1, cfg.train.steps)

    accepted = set(inspect.signature(model.forward).parameters)  # e.g. sample_index: RTD models only
    preemption = PreemptionHandler(cfg.checkpoint.preemption_timeout_s).install()
    flags = StepFlags(ctx.device)
    clip = cfg.train.grad_clip if trainer_clips_gradients(cfg) else None
    window = _new_window()
    plateau = PlateauWatch()  # warns when validation sits at the prior / unigram baselines
    unsynced_tokens, bad_in_a_row, status = 0.0, 0, 0
    for step in range(state.step + 1, cfg.train.steps + 1):
        batches = [{k: v for k, v in b.items() if k in accepted} for b in inputs.loader.next_step()]
        torch.manual_seed(dropout_seed(cfg.train.seed, step, ctx.dp_rank))
        if two_stage_n:
            schedule.enter_step(engine, step, two_stage_n)
        out = train_step(engine, batches, ctx, clip, inject_nan=step in cfg.debug.nan_loss_steps,
                         vocab_size=tokenizer.vocab_size)
        stop, bad, save_due = flags.exchange(preemption.requested, out["acc"].total(),
                                             ctx.is_main and checkpoints.time_due())
        state.step, state.consumed_samples = step, inputs.loader.consumed_samples
        engine.global_samples = state.consumed_samples  # DeepSpeed would count nominal batches (token budgets)
        state.data = inputs.loader.state_dict()
        unsynced_tokens = unsynced_tokens + out["tokens"]  # device tensor: no host sync per step
        if bad:
            state.skipped_steps += 1
            bad_in_a_row += 1
            logger.warning("step %d: non-finite loss, update skipped (%d in a row)", step, bad_in_a_row)
            if bad_in_a_row >= cfg.train.max_bad_steps:
                raise TrainingDiverged(f"{bad_in_a_row} consecutive steps with a NaN/Inf loss, the last at step {step}; "
                                       f"lower optim.lr, check the data, or resume from an earlier checkpoint")
        else:
            bad_in_a_row = 0
            window["acc"].merge(out["acc"])
            window["steps"] += 1
        window["tokens"] = window["tokens"] + out["tokens"]
        window["all_steps"] += 1
        window["samples"] += inputs.loader.last_step_samples

        if step == 1 or step % cfg.log.every_steps == 0 or step == cfg.train.steps or stop:
            state.consumed_tokens, unsynced_tokens = state.consumed_tokens + int(unsynced_tokens), 0.0
            elapsed = time.perf_counter() - window["start"]
            grad_norm = out["grad_norm"] if clip is not None else engine.get_global_grad_norm()
            losses = window["acc"].reduce(ctx) if window["steps"] else {"loss": None}
            record = {
                "consumed_samples": state.consumed_samples, "consumed_tokens": state.consumed_tokens,
                **losses,
                "lr": engine.get_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_sec": float(window["tokens"]) / elapsed,
                "samples_per_sec": window["samples"] / elapsed,
                "skipped_steps": state.skipped_steps,
                "data_parallel_size": ctx.dp_size,
            }
            metrics.log(step, record)
            logger.info("step %d/%d loss %s lr %.3g grad_norm %s %.0f tok/s", step, cfg.train.steps,
                        f"{record['loss']:.4f}" if record["loss"] is not None else "-", record["lr"],
                        f"{record['grad_norm']:.3f}" if record["grad_norm"] is not None else "-",
                        record["tokens_per_sec"])
            window = _new_window()

        if inputs.valid is not None and cfg.eval.every_steps and (
                step % cfg.eval.every_steps == 0 or step == cfg.train.steps):
            batches = validation_batches(inputs.valid, cfg.eval.samples, cfg.train.micro_batch_size,
                                         ctx.dp_rank, ctx.dp_size)
            valid = evaluate(engine, [{k: v for k, v in b.items() if k in accepted} for b in batches], ctx,
                             vocab_size=tokenizer.vocab_size)
            metrics.log(step, valid)
            logger.info("step %d validation loss %.4f", step, valid["valid_loss"])
            for message in plateau.update(step, valid) if ctx.is_main else ():
                logger.warning(message)

        if probe is not None and probe.due(step, cfg.train.steps):
            metrics.log(step, probe.run(engine, ctx, step))  # every rank extracts features; rank 0 fits

        if checkpoints.due(step, cfg.train.steps) or save_due or stop:
            state.consumed_tokens, unsynced_tokens = state.consumed_tokens + int(unsynced_tokens), 0.0
            if step == cfg.debug.crash_in_save_step:
                checkpoints.crash_before_commit = True
            checkpoints.save(engine, state, extra, meta)
        if stop:
            logger.warning("%s received: stopped after step %d with a checkpoint; exit status %d "
                           "(run the same command again to resume)", preemption.signal_name or "signal", step,
                           EXIT_PREEMPTED)
            status = EXIT_PREEMPTED
            break

    preemption.uninstall()
    metrics.close()
    return status, run.summary()


class TrainingDiverged(Exception):
    """Too many consecutive non-finite losses: the run stops with EXIT_DIVERGED."""


def _new_window() -> dict:
    from trainer.core.step import Accumulator
    return {"acc": Accumulator(), "tokens": 0.0, "steps": 0, "all_steps": 0, "samples": 0, "start": time.perf_counter()}


def universal_checkpoint_info(model: torch.nn.Module) -> dict:
    """What DeepSpeed's ds_to_universal needs to merge tensor-parallel shards of each parameter."""
    from models.parallel import partition_dims

    dims = partition_dims(model)
    names = [name for name, _ in model.named_parameters()]
    exact = lambda items: [rf"^{re.escape(n)}$" for n in items]
    return {
        "universal_checkpoint_version": 0.2,
        "tp_replicated_parameter_patterns": exact(n for n in names if n not in dims),
        "parameter_with_row_parallelism_patterns": exact(n for n, d in dims.items() if d == 1),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    from trainer.core.parallel import exit_if_a_peer_hangs
    from trainer.core.preemption import EXIT_DIVERGED
    try:
        with exit_if_a_peer_hangs(cfg.train.collective_timeout_s):
            status, summary = train(cfg)
    except TrainingDiverged as err:
        logger.error("training stopped: %s", err)
        print(f"error: training stopped: {err}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    if summary:
        print(summary["text"], flush=True)
    return status


if __name__ == "__main__":
    from trainer.core.cli import run_cli
    run_cli(main)
