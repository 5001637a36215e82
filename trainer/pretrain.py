"""Pretraining entry point.

    python -m trainer.pretrain --config configs/pretrain/roberta_demo.yaml [key.sub=value ...]
    deepspeed --num_gpus N --module trainer.pretrain --config FILE [key=value ...]
    torchrun --nproc_per_node N -m trainer.pretrain --config FILE [key=value ...]
"""
from __future__ import annotations

import argparse
import logging
import time
from typing import Optional, Sequence

import torch

from data.errors import UserError
from trainer.config import PretrainConfig, load_config, trainer_clips_gradients
from trainer.run import RunDirectory, build_model_for, setup_logging

logger = logging.getLogger("trainer.pretrain")


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (configs/pretrain/*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; the LOCAL_RANK environment variable is used")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of any config field")
    return parser.parse_args(argv)


def train(cfg: PretrainConfig) -> dict:
    from trainer.checkpoint import CheckpointManager, TrainState
    from trainer.engine import build_engine
    from trainer.inputs import build_inputs, resolve_tokenizer
    from trainer.metrics import MetricsWriter
    from trainer.parallel import init_parallel
    from trainer.step import dropout_seed, evaluate, reduce_window, train_step
    from data.loader import validation_batches

    ctx = init_parallel(cfg.parallel.tensor)
    setup_logging(ctx.is_main)
    cfg.check_batch(ctx.dp_size)
    tokenizer = resolve_tokenizer(cfg)
    run = RunDirectory.prepare(cfg, ctx, tokenizer)
    inputs = build_inputs(cfg, ctx, tokenizer)
    model, model_config = build_model_for(cfg, tokenizer.vocab_size, ctx)
    engine = build_engine(cfg, model, ctx)
    checkpoints = CheckpointManager(run.checkpoints, cfg.checkpoint, ctx.is_main)
    state = checkpoints.resume(engine) or TrainState()
    inputs.loader.load_state_dict({"consumed_samples": state.consumed_samples})
    metrics = MetricsWriter(run.path, enabled=ctx.is_main)
    extra = {"config": cfg.to_dict(), "model_config": model_config, "tokenizer_fingerprint": tokenizer.fingerprint()}
    logger.info("model %s/%s: %.2fM parameters (this rank); world %d = tp %d x dp %d; steps %d..%d",
                cfg.model.name, cfg.model.size, sum(p.numel() for p in model.parameters()) / 1e6,
                ctx.world_size, ctx.tp_size, ctx.dp_size, state.step + 1, cfg.train.steps)

    clip = cfg.train.grad_clip if trainer_clips_gradients(cfg) else None
    window = {"loss_sum": 0.0, "predicted": 0.0, "tokens": 0.0, "steps": 0, "start": time.perf_counter()}
    unsynced_tokens = 0.0
    for step in range(state.step + 1, cfg.train.steps + 1):
        batches = inputs.loader.next_step()
        torch.manual_seed(dropout_seed(cfg.train.seed, step, ctx.dp_rank))
        out = train_step(engine, batches, ctx, clip)
        state.step, state.consumed_samples = step, inputs.loader.consumed_samples
        unsynced_tokens = unsynced_tokens + out["tokens"]  # device tensor: no host sync per step
        state.data = inputs.loader.state_dict()
        for key in ("loss_sum", "predicted", "tokens"):
            window[key] = window[key] + out[key]
        window["steps"] += 1

        if step == 1 or step % cfg.log.every_steps == 0 or step == cfg.train.steps:
            state.consumed_tokens, unsynced_tokens = state.consumed_tokens + int(unsynced_tokens), 0.0
            elapsed = time.perf_counter() - window["start"]
            grad_norm = out["grad_norm"] if clip is not None else engine.get_global_grad_norm()
            record = {
                "consumed_samples": state.consumed_samples, "consumed_tokens": state.consumed_tokens,
                "loss": reduce_window(window["loss_sum"], window["predicted"], ctx),
                "lr": engine.get_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_sec": float(window["tokens"]) / elapsed,
                "samples_per_sec": window["steps"] * cfg.train.global_batch_size / elapsed,
                "data_parallel_size": ctx.dp_size,
            }
            metrics.log(step, record)
            logger.info("step %d/%d loss %.4f lr %.3g grad_norm %s %.0f tok/s", step, cfg.train.steps,
                        record["loss"], record["lr"], f"{record['grad_norm']:.3f}" if grad_norm is not None else "-",
                        record["tokens_per_sec"])
            window = {"loss_sum": 0.0, "predicted": 0.0, "tokens": 0.0, "steps": 0, "start": time.perf_counter()}

        if inputs.valid is not None and cfg.eval.every_steps and (
                step % cfg.eval.every_steps == 0 or step == cfg.train.steps):
            batches = validation_batches(inputs.valid, cfg.eval.samples, cfg.train.micro_batch_size,
                                         ctx.dp_rank, ctx.dp_size)
            valid_loss = evaluate(engine, batches, ctx)
            metrics.log(step, {"valid_loss": valid_loss})
            logger.info("step %d validation loss %.4f", step, valid_loss)

        if checkpoints.should_save(step, cfg.train.steps):
            state.consumed_tokens, unsynced_tokens = state.consumed_tokens + int(unsynced_tokens), 0.0
            checkpoints.save(engine, state, extra)

    metrics.close()
    return run.summary()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    if summary:
        print(summary["text"], flush=True)
    return 0


if __name__ == "__main__":
    from tools._cli import run_cli
    run_cli(main)
