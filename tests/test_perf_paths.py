"""The fast paths give the numbers of the plain ones: disentangled attention kernels against the
autograd reference, cached relative indices, MLM heads on the predicted positions only,
activation checkpointing and compiled layers, and their config options."""

import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models import deberta
from models.disentangled_attention import _FusedDisentangledAttention, disentangled_attention, flat_relative_indices
from models.layers import compile_layers, enable_activation_checkpointing, encoder_layers, predicted_positions
from models.registry import build_config, build_model

VOCAB = 99


def reference_attention(q, k, v, pos_key, pos_query, indices, key_padding, scale):
    """The attention as plain autograd ops (the code before the kernels)."""
    B, nh, T, _ = q.shape
    scores = (q * scale) @ k.transpose(-1, -2)
    scores = scores + torch.gather((q * scale) @ pos_key.transpose(-1, -2), -1, indices[0].expand(B, nh, T, T))
    p2c = k @ (pos_query * scale).transpose(-1, -2)
    scores = scores + torch.gather(p2c, -1, indices[1].expand(B, nh, T, T)).transpose(-1, -2)
    scores = scores.masked_fill(key_padding, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, -1) @ v


@pytest.fixture(scope="module")
def attention_inputs():
    gen = torch.Generator().manual_seed(0)
    B, nh, T, hs, span = 3, 2, 21, 8, 6
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    tensors = [make(B, nh, T, hs) for _ in range(3)] + [make(1, nh, 2 * span, hs) for _ in range(2)]
    buckets = deberta.relative_position_buckets(T, 2 * span, 12)
    indices = ((buckets + span).clamp(0, 2 * span - 1), (span - buckets).clamp(0, 2 * span - 1))
    key_padding = torch.zeros(B, 1, 1, T, dtype=torch.bool)
    key_padding[1, ..., 15:] = True
    key_padding[2] = True  # a sample that is all padding
    return tensors, indices, key_padding


def flat(indices):
    return (*flat_relative_indices(*indices, 12), indices[1])


def _run(fn, tensors, grad):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    (out * grad).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def test_fused_kernel_equals_autograd_reference_with_padding(attention_inputs):
    tensors, indices, key_padding = attention_inputs
    grad = torch.randn(tensors[0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = _run(lambda *t: reference_attention(*t, indices, key_padding, 0.3), tensors, grad)
    fused = _run(lambda *t: _FusedDisentangledAttention.apply(*t, *flat(indices), key_padding, 0.3, 0.0), tensors, grad)
    for name, a, b in zip(("out", "q", "k", "v", "pos_key", "pos_query"), fused, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_fused_dropout_matches_autograd_with_the_same_keep_mask(attention_inputs):
    tensors, indices, key_padding = attention_inputs
    grad = torch.randn(tensors[0].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def fused(*t):
        torch.manual_seed(7)
        return _FusedDisentangledAttention.apply(*t, *flat(indices), key_padding, 0.3, 0.5)

    def reference(q, k, v, pk, pq):
        eye = torch.eye(q.shape[-2], dtype=q.dtype).expand(*q.shape[:2], -1, -1)
        probs = reference_attention(q, k, eye, pk, pq, indices, key_padding, 0.3)  # probs @ I
        torch.manual_seed(7)  # the keep-mask drawn as the kernel draws it
        keep = torch.rand_like(probs) >= 0.5
        return (probs * keep * 2.0) @ v

    got, expected = _run(fused, tensors, grad), _run(reference, tensors, grad)
    for name, a, b in zip(("out", "q", "k", "v", "pos_key", "pos_query"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    no_dropout = _run(lambda *t: reference_attention(*t, indices, key_padding, 0.3), tensors, grad)
    assert not torch.allclose(got[0], no_dropout[0])


def test_sdpa_kernel_equals_fused_and_auto_picks_by_graph(attention_inputs):
    tensors, indices, key_padding = attention_inputs
    tensors = [t.float() for t in tensors]
    grad = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(2))
    grad[2] = 0.0  # SDPA adds q.k to finfo.min instead of replacing it: an all-padding sample's
    # gradient differs, but no loss ever reads such a sample's outputs
    fused = _run(lambda *t: disentangled_attention(*t, indices, key_padding, 0.3, kernel="fused"), tensors, grad)
    sdpa = _run(lambda *t: disentangled_attention(*t, indices, key_padding, 0.3, kernel="sdpa"), tensors, grad)
    for a, b in zip(sdpa, fused):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        no_graph = disentangled_attention(*tensors, indices, key_padding, 0.3)
    torch.testing.assert_close(no_graph, fused[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="attention kernel"):
        disentangled_attention(*tensors, indices, key_padding, 0.3, kernel="triton")


def tiny_deberta(**overrides):
    cfg = build_config("deberta", "debug", vocab_size=VOCAB, seq_length=16, hidden_dropout=0.0,
                       attention_dropout=0.0, **overrides)
    torch.manual_seed(0)
    return build_model(cfg)


def batch(cfg, seed=1, B=3, T=16):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 11:] = 0
    labels = torch.where(torch.rand(B, T, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
    labels[mask == 0] = -100
    return ids, mask, labels


def test_cached_relative_indices_equal_recomputed_and_are_reused():
    model = tiny_deberta(enhanced_mask_decoder=True)
    encoder = model.encoder
    ids, mask, labels = batch(model.config)
    model(ids, mask, labels)
    model(ids, mask, labels)
    assert list(encoder._index_cache) == [(16, torch.device("cpu"))]  # one entry, reused by the EMD too
    c2p, p2c, c2p_flat, p2c_flat = encoder.relative_indices(16, torch.device("cpu"))
    assert encoder.relative_indices(16, "cpu")[0] is c2p
    span, cfg = model.config.relative_span, model.config
    lo, hi = encoder.relative_window(16)
    assert (lo, hi) == (span - 15, span + 16)  # 16 tokens reach buckets -15..15: 31 of the 2k rows
    buckets = deberta.relative_position_buckets(16, cfg.position_buckets, cfg.max_relative_distance)
    assert torch.equal(c2p, (buckets + span).clamp(0, 2 * span - 1) - lo)
    assert torch.equal(p2c, (span - buckets).clamp(0, 2 * span - 1) - lo)
    i, j = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    assert torch.equal(c2p_flat, i * (hi - lo) + c2p[i, j])
    assert torch.equal(p2c_flat, j * (hi - lo) + p2c[j, i])


@pytest.mark.parametrize("length", [2, 16, 100, 129, 200, 255, 256, 300, 511, 512, 700])
def test_the_relative_window_holds_exactly_the_rows_a_length_reaches(length):
    """DeBERTa-v3's 256 buckets up to distance 512 (2k = 512 rows): the window is the range of the
    unshifted c2p/p2c indices, so no reachable row is cut and none is carried for nothing."""
    span = 256
    buckets = deberta.relative_position_buckets(length, 256, 512)
    used = torch.cat([(buckets + span).clamp(0, 2 * span - 1).flatten(),
                      (span - buckets).clamp(0, 2 * span - 1).flatten()])
    assert deberta.reachable_window(length, 256, 512, span) == (int(used.min()), int(used.max()) + 1)


@pytest.mark.parametrize("kernel", ["fused", "sdpa"])
def test_the_windowed_table_gives_the_whole_tables_outputs_and_gradients(kernel):
    """A layer fed the rows [lo, hi) and the shifted indices (what the encoder passes) against the same layer
    fed the whole 2k table and unshifted indices: outputs and every gradient agree."""
    torch.manual_seed(0)
    model = tiny_deberta(enhanced_mask_decoder=False)
    encoder, T = model.encoder, 12
    layer = encoder.layers[0]
    layer.attention.kernel = kernel
    layer.eval()
    span, cfg = model.config.relative_span, model.config
    lo, hi = encoder.relative_window(T)
    assert hi - lo < 2 * span, "the test needs a window narrower than the table"
    buckets = deberta.relative_position_buckets(T, cfg.position_buckets, cfg.max_relative_distance)
    whole = ((buckets + span).clamp(0, 2 * span - 1), (span - buckets).clamp(0, 2 * span - 1))
    x = torch.randn(2, T, model.config.hidden_size)
    padding = torch.zeros(2, 1, 1, T, dtype=torch.bool)
    padding[1, ..., -3:] = True

    def run(windowed):
        layer.zero_grad()
        encoder.relative_embeddings.weight.grad = None
        if windowed:
            table, indices = encoder.relative_inputs(T, x.device)
        else:
            table = encoder.relative_embeddings.weight
            table = encoder.relative_norm(table) if encoder.relative_norm is not None else table
            indices = whole
        out = layer(x, padding, table, indices)
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        return out.detach(), grads, encoder.relative_embeddings.weight.grad.clone()

    out_w, grads_w, rel_w = run(True)
    out_f, grads_f, rel_f = run(False)
    torch.testing.assert_close(out_w, out_f, atol=1e-5, rtol=1e-5)
    assert grads_w.keys() == grads_f.keys() and grads_w
    for name in grads_w:
        torch.testing.assert_close(grads_w[name], grads_f[name], atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(rel_w, rel_f, atol=1e-5, rtol=1e-5)
    assert rel_f[:lo].abs().sum() == 0 and rel_f[hi:].abs().sum() == 0  # the rows outside are never read


def test_relative_index_cache_keeps_the_most_recent_lengths():
    """Batches padded to their longest sample come in many lengths: the cache stays bounded."""
    encoder = tiny_deberta().encoder
    for length in range(2, 2 + deberta.RELATIVE_CACHE_SIZE + 3):
        encoder.relative_indices(length, "cpu")
    encoder.relative_indices(5, "cpu")  # a hit moves 5 to the most recent end
    encoder.relative_indices(100, "cpu")
    lengths = [length for length, _ in encoder._index_cache]
    assert len(lengths) == deberta.RELATIVE_CACHE_SIZE and lengths[-2:] == [5, 100]
    assert lengths[:-2] == list(range(7, 13))


@pytest.mark.parametrize("name", ["deberta", "roberta"])
def test_predicted_positions_head_equals_full_logits_there(name):
    cfg = build_config(name, "debug", vocab_size=VOCAB, seq_length=16, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ids, mask, labels = batch(cfg)
    predicted = labels != -100
    with torch.no_grad():
        full = model.logits(ids, mask)  # (B, T, V)
        loss = model(ids, mask, labels)["loss_sum"]
    expected = torch.nn.functional.cross_entropy(full[predicted], labels[predicted], reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    if name == "deberta":
        with torch.no_grad():
            head = model.predicted_logits(ids, mask, predicted_positions(labels))[:, :VOCAB]
        torch.testing.assert_close(head, full[predicted], rtol=1e-5, atol=1e-5)


def test_deberta_kernels_give_the_same_model_outputs_and_grads():
    model = tiny_deberta(enhanced_mask_decoder=True)
    ids, mask, labels = batch(model.config)
    results = {}
    for kernel in ("fused", "sdpa"):
        for layer in encoder_layers(model):
            layer.attention.kernel = kernel
        model.zero_grad()
        model(ids, mask, labels)["loss_sum"].backward()
        results[kernel] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert results["fused"].keys() == results["sdpa"].keys()
    for name in results["fused"]:
        torch.testing.assert_close(results["sdpa"][name], results["fused"][name], rtol=1e-4, atol=1e-5, msg=name)


def _grads(model, args, seed=11):
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(*args)
    loss = out["loss_sum"] if "loss_sum" in out else sum(out["loss_sums"].values())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["roberta", "deberta_v3"])
def test_activation_checkpointing_gives_identical_loss_and_grads_with_dropout(name):
    cfg = build_config(name, "debug", vocab_size=VOCAB, seq_length=16)  # dropout 0.1 on
    torch.manual_seed(0)
    model = build_model(cfg).train()
    ids, mask, labels = batch(cfg)
    args = (ids, mask, labels) if name == "roberta" else (ids, mask, labels, torch.arange(3))
    if name == "deberta_v3":
        model.sampling_seed = 5
    plain_loss, plain = _grads(model, args)
    assert enable_activation_checkpointing(model) == (2 if name == "roberta" else 3)
    ckpt_loss, ckpt = _grads(model, args)
    assert torch.equal(plain_loss, ckpt_loss)
    assert plain.keys() == ckpt.keys()
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], rtol=0, atol=0, msg=key)
    # dropout is on, so the equality above needed the recomputation to redraw the same masks
    other_loss, _ = _grads(model, args, seed=12)
    assert not torch.equal(other_loss, plain_loss)


def test_config_options_are_wired_in_build_model_for():
    from trainer.pretraining.config import load_config
    from trainer.pretraining.model import build_model_for

    cfg = load_config(None, ["data.prefix=x", "data.seq_length=16", "model.name=deberta",
                             "model.activation_checkpointing=true", "model.compile=true"])
    assert cfg.model.activation_checkpointing and cfg.model.compile
    tokenizer = types.SimpleNamespace(vocab_size=VOCAB, pad_id=0)
    ctx = types.SimpleNamespace(tp_size=1, tp_rank=0, device=torch.device("cpu"))
    model, _ = build_model_for(cfg, tokenizer, ctx)
    layers = encoder_layers(model)
    assert len(layers) == 2 and all(layer.checkpoint for layer in layers)
    assert all(layer._compiled_call_impl is not None for layer in layers)
    plain = load_config(None, ["data.prefix=x", "data.seq_length=16", "model.name=deberta"])
    model, _ = build_model_for(plain, tokenizer, ctx)
    assert not any(layer.checkpoint or layer._compiled_call_impl for layer in encoder_layers(model))


def test_compiled_layers_compute_the_same():
    model = tiny_deberta().eval()
    ids, mask, _ = batch(model.config)
    with torch.no_grad():
        expected = model.logits(ids, mask)
        assert compile_layers(model, backend="eager") == 2
        torch.testing.assert_close(model.logits(ids, mask), expected)


# --------------------------------------------------------------------------------- host syncs
class _OpLog(TorchDispatchMode):
    """The aten ops a forward and backward run, in order."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                   for i in (args[1] if len(args) > 1 else ())):
            name = "index(bool)"  # boolean indexing: a nonzero inside
        self.ops.append(name)
        return func(*args, **kwargs)


# Ops whose output size or value the host must read: on a GPU each waits for all queued work.
SYNCING = {"nonzero", "_local_scalar_dense", "masked_select", "index(bool)", "is_nonzero", "unique",
           "_unique2", "equal"}
MATMULS = {"mm", "addmm", "bmm", "matmul", "linear"}


@pytest.mark.parametrize("name", ["roberta", "deberta", "electra", "deberta_v3"])
def test_host_syncs_come_before_the_first_layer(name):
    """A training forward and backward read device values on the host only before the first matmul,
    where the device queue holds only the batch's copy (no bubble). A `tolist()` does not pass
    through the dispatcher on the CPU, so the RTD sampler's host reads are checked by the code's
    order, not here."""
    extra = {"enhanced_mask_decoder": True} if name == "deberta" else {}
    cfg = build_config(name, "debug", vocab_size=VOCAB, seq_length=16, **extra)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    ids, mask, labels = batch(cfg)
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if name in ("electra", "deberta_v3"):
        inputs["sample_index"] = torch.arange(3)
    log = _OpLog()
    with log:
        out = model(**inputs)
        loss = sum(out["loss_sums"].values()) if "loss_sums" in out else out["loss_sum"]
        loss.backward()
    first_matmul = min(i for i, op in enumerate(log.ops) if op in MATMULS)
    late = [(i, op) for i, op in enumerate(log.ops) if op in SYNCING and i > first_matmul]
    assert not late, f"host syncs after the first matmul (op {first_matmul}): {late[:5]}"
    assert any(op in SYNCING for op in log.ops[:first_matmul]), "the positions' count is read up front"
