"""Token-budget steps (DOC-SENTENCES + blending) with a real DeepSpeed engine on 2 gloo ranks.

One 2-process spawn does two things:
1. ZeRO-1 and ZeRO-2 engines take token-budget steps whose micro-batch count varies from step to step
   (the trainer drives DeepSpeed's accumulation boundary); their loss and weights equal a plain
   PyTorch model trained on each whole global step with the loss Σ token losses / predicted tokens;
2. `trainer.pretrain.train` runs 4 token-budget steps; its metrics.jsonl must agree, step by step, with
   the samples and tokens that the step planner says each step takes.
"""
import copy
import os
import shutil

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from data.masking import IGNORE_INDEX
from data.preprocess import preprocess

SEQ, BUDGET, LR = 64, 600, 2e-3



@pytest.fixture(scope="module")
def corpora(demo_corpus, bpe_tokenizer, tmp_path_factory):
    """Two prefixes of the demo corpus: the whole corpus, and a copy (blending needs two)."""
    root = tmp_path_factory.mktemp("budget")
    preprocess([demo_corpus.path], bpe_tokenizer.path, root / "a", workers=1)
    for ext in ("bin", "idx", "json"):
        shutil.copy(root / f"a.{ext}", root / f"b.{ext}")
    return root


def overrides(root, **extra):
    values = {
        "data.prefix": "", "data.blend": f"[[0.7, {root / 'a'}], [0.3, {root / 'b'}]]",
        "data.packing": "doc_sentences", "data.seq_length": SEQ, "data.valid_fraction": 0.02, "data.test_fraction": 0.02,
        "data.whole_word_mask": "true", "data.cache_dir": root / "cache",
        "model.name": "roberta", "model.size": "debug",
        "model.overrides": "{hidden_dropout: 0.0, attention_dropout: 0.0}",
        "run.dir": root / "runs", "run.name": "budget",
        "train.steps": 4, "train.micro_batch_size": 3, "train.global_batch_size": 6, "train.seed": 5,
        "train.tokens_per_step": BUDGET, "train.grad_clip": 0.0,
        "optim.lr": LR, "optim.min_lr": LR, "optim.warmup_steps": 0, "optim.weight_decay": 0.01,
        "log.every_steps": 1, "checkpoint.every_steps": 0, "eval.every_steps": 0, "zero.stage": 2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _engine_matches_plain_model(cfg, ctx, tokenizer, stage):
    from trainer.core.engine import build_engine, parameter_groups
    from trainer.pretraining.inputs import build_inputs
    from trainer.pretraining.model import build_model_for
    from trainer.core.step import train_step
    from data.loader import PretrainLoader

    cfg.zero.stage = stage
    inputs = build_inputs(cfg, ctx, tokenizer)
    model, _ = build_model_for(cfg, tokenizer, ctx)
    reference = copy.deepcopy(model)
    engine = build_engine(cfg, model, ctx)
    optimizer = torch.optim.AdamW(parameter_groups(reference, cfg.optim.weight_decay), lr=LR,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps)
    # every rank's loader, to rebuild the whole global step for the plain model
    peers = [PretrainLoader(inputs.train, cfg.train.global_batch_size, cfg.train.micro_batch_size, r, ctx.dp_size,
                            tokens_per_step=BUDGET) for r in range(ctx.dp_size)]
    micro_counts = []
    for step in range(3):
        batches = inputs.loader.next_step()
        everyone = [b for peer in peers for b in peer.next_step()]
        micro_counts.append(len(batches))
        out = train_step(engine, [{k: v for k, v in b.items() if k != "sample_index"} for b in batches], ctx)
        loss = out["acc"].reduce(ctx)["loss"]
        predicted = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in everyone)
        ref_loss = sum(reference(**{k: v for k, v in b.items() if k != "sample_index"})["loss_sum"]
                       for b in everyone) / predicted
        optimizer.zero_grad()
        ref_loss.backward()
        optimizer.step()
        assert loss == pytest.approx(float(ref_loss), abs=1e-5), (stage, step)
    for (name, p), q in zip(engine.module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=2e-5, rtol=1e-4, msg=f"ZeRO-{stage} {name}")
    assert len(set(micro_counts)) > 1 or max(micro_counts) > 1, micro_counts
    return micro_counts


def _worker(rank, port, root, results):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from trainer.pretraining.config import load_config
    from trainer.pretraining.inputs import resolve_tokenizer
    from trainer.core.parallel import init_parallel
    from trainer.pretraining.train import train

    cfg = load_config(None, overrides(root))
    ctx = init_parallel(1)
    tokenizer = resolve_tokenizer(cfg)
    counts = {stage: _engine_matches_plain_model(load_config(None, overrides(root)), ctx, tokenizer, stage)
              for stage in (1, 2)}
    status, _ = train(cfg)
    results[rank] = {"counts": counts, "status": status}


def test_token_budget_steps_with_deepspeed(corpora, bpe_tokenizer):
    from tests.launch import free_port, train_records
    from trainer.pretraining.config import load_config
    from trainer.pretraining.inputs import build_inputs
    from trainer.core.parallel import ParallelContext

    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), corpora, results), nprocs=2, join=True)
    assert all(results[r]["status"] == 0 for r in (0, 1))
    assert results[0]["counts"] == results[1]["counts"], "both ranks ran as many micro-batches"

    # the trainer's log against the planner, computed here at DP=1
    cfg = load_config(None, overrides(corpora))
    ctx = ParallelContext(rank=0, world_size=1, local_rank=0, tp_size=1, tp_rank=0, dp_size=1, dp_rank=0,
                          device=torch.device("cpu"))
    inputs = build_inputs(cfg, ctx, bpe_tokenizer)
    assert inputs.cache.built == [], "the trainer's ranks cached every sample index"
    # train | validation | test by documents, in each blended corpus
    splits = [inputs.train, inputs.valid, inputs.test]
    for corpus in (0, 1):
        documents = [np.asarray(s.stream.corpora[corpus].document) for s in splits]
        assert documents[0].max() < documents[1].min() <= documents[1].max() < documents[2].min()
    records = train_records(corpora / "runs" / "budget")
    consumed, tokens = 0, 0
    for step in (1, 2, 3, 4):
        count = inputs.loader.planner.step_size(consumed)
        lengths = inputs.train.stream.lengths(np.arange(consumed, consumed + count))
        consumed, tokens = consumed + count, tokens + int(lengths.sum())
        assert BUDGET - SEQ < lengths.sum() <= BUDGET
        assert records[step]["consumed_samples"] == consumed, step
        assert records[step]["consumed_tokens"] == tokens, step
        assert records[step]["data_parallel_size"] == 2
    assert records[4]["loss"] < records[1]["loss"]
