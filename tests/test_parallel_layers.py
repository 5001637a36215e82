"""Tensor-parallel layers at TP=2 (two gloo processes on CPU) against their TP=1 reference."""


import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from models.parallel import ParallelLayers, merge_state_dicts, partition_dims, shard_state_dict
from models.registry import build_config, build_model
from tests.launch import free_port, tensor_parallel_group
from tests.parity import merged_grads

TP = 2
ATOL = RTOL = 1e-6



class _Toy(torch.nn.Module):
    """column -> GELU -> row MLP, plus a vocab-parallel embedding."""

    def __init__(self, layers: ParallelLayers):
        super().__init__()
        self.up = layers.column_linear(8, 16)
        self.down = layers.row_linear(16, 8)
        self.embedding = layers.vocab_embedding(32, 8)

    def forward(self, x, ids):
        return self.down(F.gelu(self.up(x))), self.embedding(ids)


def _grads(model) -> dict:
    return {name: p.grad for name, p in model.named_parameters()}


def _assert_tp_matches_reference(make, inputs, loss_fn, rank):
    """Build `make(layers)` at TP=1 and TP=2 from one seed; compare init, outputs and gradients."""
    torch.manual_seed(0)
    reference = make(ParallelLayers(1))
    torch.manual_seed(0)
    parallel = make(ParallelLayers.from_parallel_state())
    dims = partition_dims(reference)
    assert partition_dims(parallel) == dims

    # Same seed -> the TP=2 init is this rank's shard of the TP=1 init.
    full = reference.state_dict()
    shard = shard_state_dict(full, dims, rank, TP)
    assert parallel.state_dict().keys() == shard.keys()  # no megatron `_extra_state`
    for key, value in parallel.state_dict().items():
        torch.testing.assert_close(value, shard[key], atol=0, rtol=0, msg=key)
    parallel.load_state_dict(shard, strict=True)

    # Separate leaf copies of float inputs, so each side's input gradient can be compared.
    ref_inputs = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    tp_inputs = [t.detach().clone().requires_grad_() if t.is_floating_point() else t for t in inputs]
    ref_outputs = reference(*ref_inputs)
    tp_outputs = parallel(*tp_inputs)
    torch.testing.assert_close(tp_outputs, ref_outputs, atol=ATOL, rtol=RTOL)
    loss_fn(ref_outputs).backward()
    loss_fn(tp_outputs).backward()
    merged = merged_grads(parallel, dims, TP)
    for name, grad in _grads(reference).items():
        torch.testing.assert_close(merged[name], grad, atol=ATOL, rtol=RTOL, msg=name)
    for ref_input, tp_input in zip(ref_inputs, tp_inputs):
        if ref_input.is_floating_point():  # the column layer all-reduces the input gradient
            torch.testing.assert_close(tp_input.grad, ref_input.grad, atol=ATOL, rtol=RTOL)
    return ref_outputs, tp_outputs


def _worker(rank: int, port: int):
    with tensor_parallel_group(rank, port, TP):
        layers = ParallelLayers.from_parallel_state()
        assert (layers.tp_size, layers.tp_rank) == (TP, rank)

        # Layers: x and ids are the same on both ranks (same seed), as TP peers see the same batch.
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(3, 5, 8, generator=gen)
        ids = torch.randint(0, 32, (3, 5), generator=gen)
        weights = torch.randn(3, 5, 8, generator=gen)
        _assert_tp_matches_reference(
            _Toy, (x, ids), lambda outs: (outs[0] * weights).sum() + (outs[1] ** 2).sum(), rank
        )

        # The whole model: attention heads, FFN, vocab-parallel tied decoder and loss at TP=2.
        cfg = build_config(
            "roberta", "debug", vocab_size=99, seq_length=12, tp_size=TP, vocab_pad_multiple=32,
            hidden_dropout=0.0, attention_dropout=0.0,
        )
        assert cfg.padded_vocab_size == 128
        input_ids = torch.randint(3, 99, (3, 12), generator=gen)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, 7:] = 0
        attention_mask[2, :] = 0  # a fully padded row
        input_ids[attention_mask == 0] = cfg.pad_token_id
        labels = torch.full_like(input_ids, -100)
        labels[0, [1, 4, 9]] = torch.tensor([5, 98, 3])
        labels[1, [0, 6]] = torch.tensor([97, 50])
        ref_out, tp_out = _assert_tp_matches_reference(
            lambda parallel_layers: build_model(cfg, parallel_layers),
            (input_ids, attention_mask, labels),
            lambda out: out["loss_sum"],
            rank,
        )
        assert int(tp_out["num_predicted"]) == 5
        assert torch.isfinite(tp_out["loss_sum"])
        torch.manual_seed(0)
        reference = build_model(cfg, ParallelLayers(1))
        torch.manual_seed(0)
        parallel = build_model(cfg, layers)
        torch.testing.assert_close(
            parallel.logits(input_ids, attention_mask),
            reference.logits(input_ids, attention_mask),
            atol=ATOL, rtol=RTOL,
        )
        assert parallel.num_parameters() == reference.num_parameters()


def test_tp2_matches_tp1():
    mp.spawn(_worker, args=(free_port(),), nprocs=TP, join=True)


def test_shard_merge_round_trip():
    torch.manual_seed(0)
    model = build_model(build_config("roberta", "debug", vocab_size=99, seq_length=8, tp_size=2))
    dims = partition_dims(model)
    # Column weights/biases and the vocabulary split rows; row weights split columns; norms don't.
    assert dims["layers.0.attention.query.weight"] == 0
    assert dims["layers.0.ffn.up.bias"] == 0
    assert dims["layers.1.ffn.down.weight"] == 1
    assert dims["embeddings.word.weight"] == 0 and dims["lm_head.bias"] == 0
    assert "layers.0.ffn.down.bias" not in dims and "embeddings.norm.weight" not in dims
    full = model.state_dict()
    shards = [shard_state_dict(full, dims, rank, 2) for rank in range(2)]
    assert shards[1]["layers.1.ffn.down.weight"].shape == (64, 64)
    assert full["embeddings.word.weight"].shape == (128, 64)  # 99 padded to a multiple of lcm(128, 2)
    assert torch.equal(shards[1]["embeddings.word.weight"], full["embeddings.word.weight"][64:])
    merged = merge_state_dicts(shards, dims)
    assert merged.keys() == full.keys()
    for key in full:
        assert torch.equal(merged[key], full[key]), key
    with pytest.raises(ValueError, match="not divisible"):
        shard_state_dict(full, dims, 0, 3)
