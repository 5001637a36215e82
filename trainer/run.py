"""The run directory {run.dir}/{run.name}/ and the pieces a run builds once: logging and the model.

    config.yaml     the resolved config (also inside every checkpoint)
    metrics.jsonl   one JSON object per logged step (global rank 0)
    tb/             TensorBoard events
    checkpoints/    DeepSpeed checkpoints, `latest` names the newest
    tokenizer/      a copy of the tokenizer the run was trained with
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

from data.errors import UserError
from data.tokenizer import Tokenizer, load_tokenizer
from trainer.config import PretrainConfig, save_config
from trainer.metrics import first_and_last, read_metrics
from trainer.parallel import ParallelContext, from_rank0
from trainer.quiet import quiet_libraries, quiet_megatron_import


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    quiet_libraries(is_main)


@dataclass
class RunDirectory:
    path: Path
    is_main: bool

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @classmethod
    def prepare(cls, cfg, ctx: ParallelContext, tokenizer: Tokenizer) -> "RunDirectory":
        """Global rank 0 creates the directory, saves the config (pretraining or fine-tuning) and copies
        the tokenizer; others wait."""
        path = Path(cfg.run.dir) / cfg.run.name
        error = ""
        if ctx.is_main:
            try:
                path.mkdir(parents=True, exist_ok=True)
                save_config(cfg, path / "config.yaml")
                _copy_tokenizer(tokenizer, path / "tokenizer")
            except OSError as err:
                error = f"cannot write run directory {path}: {err.strerror or err}; check run.dir"
            except UserError as err:
                error = str(err)
        error = from_rank0(error)
        if error:
            raise UserError(error)
        return cls(path=path, is_main=ctx.is_main)

    def summary(self) -> Dict[str, Any]:
        if not self.is_main:
            return {}
        records = read_metrics(self.path)
        first, last = first_and_last(records, "loss")
        _, valid = first_and_last(records, "valid_loss")
        lines = [f"run directory: {self.path}", f"tensorboard:   tensorboard --logdir {self.path / 'tb'}",
                 f"checkpoints:   {self.checkpoints}"]
        if first is not None:
            rtd = any("loss_rtd" in r for r in records)
            label = "loss (MLM + RTD):" if rtd else "MLM loss:     "
            lines.append(f"{label} first {first:.4f} -> last {last:.4f}")
            if rtd:
                _, mlm = first_and_last(records, "loss_mlm")
                _, rtd_loss = first_and_last(records, "loss_rtd")
                lines.append(f"last generator MLM loss {mlm:.4f}, RTD loss {rtd_loss:.4f}")
        if valid is not None:
            lines.append(f"valid loss:    {valid:.4f}")
        lines += _baseline_lines(records)
        return {"text": "\n".join(lines), "first_loss": first, "last_loss": last, "valid_loss": valid}


def _baseline_lines(records: list) -> list:
    """The last validation (else training) diagnostics beside their baselines (trainer/diagnostics.py)."""
    where = "valid_" if any("valid_loss" in r for r in records) else ""
    last = lambda key: first_and_last(records, where + key)[1]
    label, lines = ("validation" if where else "training"), []
    loss, prior, auc = last("loss_rtd"), last("rtd_prior_loss"), last("rtd_auc")
    if loss is not None and prior is not None:
        auc_text = f", ROC AUC {auc:.3f}" if auc is not None else ""
        lines.append(f"last {label} RTD loss {loss:.4f} vs prior loss {prior:.4f}"
                     f" (always predicting the replaced share){auc_text}")
    unigram = last("unigram_accuracy")
    for key, name in (("generator_accuracy", "generator accuracy"), ("mlm_accuracy", "MLM accuracy")):
        accuracy = last(key)
        if accuracy is not None and unigram is not None:
            lines.append(f"last {label} {name} {accuracy:.4f} vs unigram accuracy {unigram:.4f}")
    return lines


def _copy_tokenizer(tokenizer: Tokenizer, dest: Path) -> None:
    """Copy once; on resume the copy must be the same tokenizer."""
    if dest.exists():
        if load_tokenizer(dest).fingerprint() != tokenizer.fingerprint():
            raise UserError(f"{dest} holds a different tokenizer than {tokenizer.path}; "
                            f"use a new run.name or the run's own tokenizer")
        return
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=dest.parent))
    try:
        tokenizer.save_copy(tmp)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_model_for(cfg: PretrainConfig, tokenizer: Tokenizer, ctx: ParallelContext) -> Tuple[torch.nn.Module, Dict]:
    """The registry's model, sized from the tokenizer (padded so TP divides it), with TP layers if TP > 1.

    The initial weights do not depend on the TP degree: every rank draws the full TP=1 weights from
    `train.seed` and keeps its own shard, so a TP=2 run starts exactly where a TP=1 run does.
    """
    from models.parallel import ParallelLayers, partition_dims, shard_state_dict
    from models.registry import build_config, build_model

    overrides = {"pad_token_id": tokenizer.pad_id, **cfg.model.overrides}  # the tokenizer's, unless overridden
    model_config = build_config(cfg.model.name, cfg.model.size, vocab_size=tokenizer.vocab_size,
                                seq_length=cfg.data.seq_length, tp_size=ctx.tp_size,
                                vocab_pad_multiple=cfg.model.vocab_pad_multiple, **overrides)
    torch.manual_seed(cfg.train.seed)
    if cfg.model.init:  # a native file's config and weights (continued pretraining, imported models)
        from trainer.hf_import import initial_model
        model_config, init_sd = initial_model(cfg.model.init, cfg.model.name, tokenizer.vocab_size, ctx.tp_size,
                                              cfg.data.seq_length)
    model = build_model(model_config, ParallelLayers(tp_size=1))
    if cfg.model.init:
        model.load_state_dict(init_sd)
    if ctx.tp_size > 1:
        full = model.state_dict()
        with quiet_megatron_import():
            model = build_model(model_config, ParallelLayers.from_parallel_state())
        model.load_state_dict(shard_state_dict(full, partition_dims(model), ctx.tp_rank, ctx.tp_size))
    if hasattr(model, "sampling_seed"):  # RTD: replacements keyed by (seed, global sample index)
        model.sampling_seed = cfg.train.seed
    from models.layers import compile_layers, enable_activation_checkpointing

    if cfg.model.activation_checkpointing:  # after the TP rebuild: flags live on the final modules
        enable_activation_checkpointing(model)
    model = model.to(ctx.device)
    if cfg.model.compile:
        compile_layers(model)
    return model, {"name": cfg.model.name, **dataclasses.asdict(model_config)}
