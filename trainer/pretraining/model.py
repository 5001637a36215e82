"""The pretraining model: the registry's architecture sized from the tokenizer, sharded for tensor parallelism."""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import torch

from data.tokenizer import Tokenizer
from trainer.core.parallel import ParallelContext
from trainer.core.quiet import quiet_megatron_import
from trainer.pretraining.config import PAIR_PACKINGS, PretrainConfig


def build_model_for(cfg: PretrainConfig, tokenizer: Tokenizer, ctx: ParallelContext) -> Tuple[torch.nn.Module, Dict]:
    """The registry's model, sized from the tokenizer (padded so TP divides it), with TP layers if TP > 1.

    The initial weights do not depend on the TP degree: every rank draws the full TP=1 weights from
    `train.seed` and keeps its own shard, so a TP=2 run starts exactly where a TP=1 run does.
    """
    from models.parallel import ParallelLayers, partition_dims, shard_state_dict
    from models.registry import build_config, build_model

    # the pair formats train next-sentence prediction: the NSP head is on unless the overrides say otherwise
    nsp = {"next_sentence_head": True} if cfg.data.packing in PAIR_PACKINGS else {}
    overrides = {"pad_token_id": tokenizer.pad_id, **nsp, **cfg.model.overrides}  # the tokenizer's, unless overridden
    model_config = build_config(cfg.model.name, cfg.model.size, vocab_size=tokenizer.vocab_size,
                                seq_length=cfg.data.seq_length, tp_size=ctx.tp_size,
                                vocab_pad_multiple=cfg.model.vocab_pad_multiple, **overrides)
    torch.manual_seed(cfg.train.seed)
    if cfg.model.init:  # a native file's config and weights (continued pretraining, imported models)
        from trainer.convert.hf_import import initial_model
        model_config, init_sd = initial_model(cfg.model.init, cfg.model.name, tokenizer.vocab_size, ctx.tp_size,
                                              cfg.data.seq_length)
        if hasattr(model_config, "next_sentence_head") and model_config.next_sentence_head != bool(nsp):
            # the NSP head follows data.packing: a fresh one, or the file's left out (it would get no gradient)
            model_config = dataclasses.replace(model_config, next_sentence_head=bool(nsp))
            init_sd = {k: v for k, v in init_sd.items() if not k.startswith("nsp_head.")}
    model = build_model(model_config, ParallelLayers(tp_size=1), sampling_seed=cfg.train.seed)
    if cfg.model.init:
        fresh_nsp = {k: v for k, v in model.state_dict().items() if k.startswith("nsp_head.")}
        model.load_state_dict({**fresh_nsp, **init_sd})
    if ctx.tp_size > 1:
        full = model.state_dict()
        with quiet_megatron_import():
            model = build_model(model_config, ParallelLayers.from_parallel_state(), sampling_seed=cfg.train.seed)
        model.load_state_dict(shard_state_dict(full, partition_dims(model), ctx.tp_rank, ctx.tp_size))
    from models.layers import compile_layers, enable_activation_checkpointing

    if cfg.model.activation_checkpointing:  # after the TP rebuild: flags live on the final modules
        enable_activation_checkpointing(model)
    model = model.to(ctx.device)
    if cfg.model.compile:
        compile_layers(model)
    return model, {"name": cfg.model.name, **dataclasses.asdict(model_config)}

