"""Document ids in attention_mask (0 = padding, 1..k = the row's k-th document): every registered
model run on one packed row gives each document what it gives the document alone (encode, logits,
forward's loss sums and their gradients), and a 0/1 mask keeps the padding-only path bit for bit."""

import pytest
import torch

from models import deberta, deberta_v3, electra, layers, roberta
from models.layers import IGNORE_INDEX, document_offsets, document_starts, same_document
from models.registry import MODELS, build_config, build_model

VOCAB, T = 99, 32
DOC_LENGTHS = (7, 13, 5)  # packed from index 0, then T - 25 = 7 padding tokens
NO_DROPOUT = {"hidden_dropout": 0.0, "attention_dropout": 0.0}
CASES = {  # every registered architecture, plus DeBERTa with absolute positions in its input
    **{name: (name, {}) for name in MODELS},
    "deberta_position_biased": ("deberta", {"position_biased_input": True, "enhanced_mask_decoder": False}),
}
TOL = dict(rtol=0.0, atol=1e-5)


def test_every_registered_architecture_is_covered():
    assert set(MODELS) <= {name for name, _ in CASES.values()}


def make_model(case: str, **extra):
    name, overrides = CASES[case]
    # RTD: a temperature so low that the sample is the generator's argmax whatever its noise (which is
    # keyed per row), so a packed document and the document alone get the same replacements.
    rtd = {"temperature": 1e-9} if "sample_index" in MODELS[name].batch_keys else {}
    cfg = build_config(name, "debug", vocab_size=VOCAB, seq_length=T, **NO_DROPOUT, **rtd, **overrides, **extra)
    torch.manual_seed(0)
    return build_model(cfg).eval()


def pad_id(model) -> int:
    return getattr(model, "generator", model).config.pad_token_id


def documents(seed: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, VOCAB, (n,), generator=gen) for n in DOC_LENGTHS]


def labelled(ids: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every third token (from `offset`) predicted: (input with id 4 there, labels)."""
    labels = torch.full_like(ids, IGNORE_INDEX)
    picked = torch.arange(offset % 3, ids.numel(), 3)
    labels[picked] = ids[picked]
    return ids.clone().index_fill_(0, picked, 4), labels


def packed_row(docs: list[torch.Tensor], pad: int, per_doc=None):
    """One row holding the documents in order, then padding: (ids, document ids, spans); per_doc(d, ids)
    -> (ids, labels) replaces each document's ids and gives its labels."""
    ids, mask, labels = torch.full((1, T), pad), torch.zeros(1, T, dtype=torch.long), torch.full((1, T), IGNORE_INDEX)
    spans, start = [], 0
    for d, doc in enumerate(docs):
        end = start + doc.numel()
        doc_ids, doc_labels = per_doc(d, doc) if per_doc else (doc, labels[0, start:end])
        ids[0, start:end], labels[0, start:end], mask[0, start:end] = doc_ids, doc_labels, d + 1
        spans.append((start, end))
        start = end
    return ids, mask, labels, spans


def outputs(model, ids, mask) -> dict[str, torch.Tensor]:
    """Every per-token output a model has: its encoder states and logits (both RTD towers')."""
    with torch.no_grad():
        if hasattr(model, "discriminator"):
            return {"encode": model.encode(ids, mask), "generator encode": model.generator.encode(ids, mask),
                    "generator logits": model.generator.logits(ids, mask),
                    "rtd logits": model.discriminator.rtd_logits(ids, mask)}
        return {"encode": model.encode(ids, mask), "logits": model.logits(ids, mask)}


def loss_and_grads(model, ids, mask, labels):
    """forward's loss sums (and metrics) and the gradients of their sum."""
    model.zero_grad(set_to_none=True)
    if hasattr(model, "discriminator"):
        out = model(ids, mask, labels, torch.arange(ids.shape[0]))
        sums = {**out["loss_sums"], **{k: v for k, v in out["metrics"].items() if v.dim() == 0}}
        total = out["loss_sums"]["mlm"] + out["loss_sums"]["rtd"]
    else:
        out = model(ids, mask, labels)
        sums = {"loss_sum": out["loss_sum"], "num_predicted": out["num_predicted"], **out["metrics"]}
        total = out["loss_sum"]
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in sums.items()}, grads


# ------------------------------------------------------------------------------------- helpers
def test_document_helpers_on_a_packed_row():
    mask = torch.tensor([[1, 1, 2, 2, 2, 3, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 2, 2, 0, 0]])
    assert document_starts(mask).tolist() == [[0, 0, 2, 2, 2, 5, 5, 5], [0] * 8, [0, 0, 0, 0, 4, 4, 4, 4]]
    assert document_offsets(mask)[0].tolist() == [0, 1, 0, 1, 2, 0, 1, 2]
    allowed = same_document(mask)
    assert allowed.shape == (3, 1, 8, 8)
    assert allowed[0, 0, 3].tolist() == [False, False, True, True, True, False, False, False]
    assert allowed[0, 0, 6].tolist() == [True] * 6 + [False] * 2  # padding queries see every real key
    # a 0/1 mask: the key-padding mask broadcast over the queries, exactly
    assert torch.equal(allowed[1], (mask[1] != 0).expand(1, 8, 8))
    # RoBERTa's positions restart after the pad offset; padding keeps the pad position
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 1, 1]])
    assert roberta.position_ids(ids, 1, mask[:1]).tolist() == [[2, 3, 2, 3, 4, 2, 1, 1]]
    assert roberta.position_ids(ids, 1, mask[1:2]).tolist() == roberta.position_ids(ids, 1).tolist()


# ------------------------------------------------------------------------ packed == documents alone
@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_row_gives_each_document_what_it_gets_alone(case):
    model = make_model(case)
    pad, docs = pad_id(model), documents()
    ids, mask, _, spans = packed_row(docs, pad)
    packed = outputs(model, ids, mask)
    for doc, (start, end) in zip(docs, spans):
        alone = outputs(model, doc[None], torch.ones(1, doc.numel(), dtype=torch.long))
        for what, value in alone.items():
            torch.testing.assert_close(packed[what][:, start:end], value, **TOL, msg=f"{case} {what}")

    # forward: the loss sums, metrics and gradients of the packed row are the documents' sums
    ids, mask, labels, _ = packed_row(docs, pad, per_doc=lambda d, doc: labelled(doc, d))
    got, got_grads = loss_and_grads(model, ids, mask, labels)
    want, want_grads = {}, {}
    for d, doc in enumerate(docs):
        doc_ids, doc_labels = labelled(doc, d)
        sums, grads = loss_and_grads(model, doc_ids[None], torch.ones_like(doc_ids)[None], doc_labels[None])
        for key, value in sums.items():
            want[key] = want.get(key, 0) + value
        for key, value in grads.items():
            want_grads[key] = want_grads.get(key, 0) + value
    assert got["num_predicted" if "num_predicted" in got else "mlm_predicted"] > 0
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-5, msg=f"{case} {key}")
    assert sorted(got_grads) == sorted(want_grads)
    for key in want_grads:
        torch.testing.assert_close(got_grads[key], want_grads[key], rtol=1e-4, atol=1e-5, msg=f"{case} grad {key}")


@pytest.mark.parametrize("kernel", ["fused", "sdpa"])
def test_both_disentangled_attention_kernels_keep_documents_apart(kernel):
    """Either kernel in a forward without a graph (the test above: sdpa there, fused with autograd);
    DeBERTaV3 has both DeBERTa towers: the MLM one with the EMD, the backbone with the RTD head."""
    case = "deberta_v3"
    model = make_model(case)
    for module in model.modules():
        if isinstance(module, deberta.DisentangledSelfAttention):
            module.kernel = kernel
    docs = documents(seed=5)
    ids, mask, _, spans = packed_row(docs, pad_id(model))
    packed = outputs(model, ids, mask)
    for doc, (start, end) in zip(docs, spans):
        alone = outputs(model, doc[None], torch.ones(1, doc.numel(), dtype=torch.long))
        for what, value in alone.items():
            torch.testing.assert_close(packed[what][:, start:end], value, **TOL, msg=f"{case} {kernel} {what}")


# ---------------------------------------------------------------------- 0/1 masks: today's path
def padding_only_path(monkeypatch):
    """The code before document ids: a (B, 1, 1, T) key-padding mask and positions that never
    restart (`document_starts` all zeros: RoBERTa's count from the row's start, arange elsewhere)."""
    for module in (layers, roberta, electra, deberta, deberta_v3):
        if hasattr(module, "same_document"):
            monkeypatch.setattr(module, "same_document", lambda mask: (mask != 0)[:, None, None, :])
        if hasattr(module, "document_starts"):
            monkeypatch.setattr(module, "document_starts", lambda mask: torch.zeros_like(mask, dtype=torch.long))


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_0_1_mask_gives_the_padding_path_bit_for_bit(case, monkeypatch):
    model = make_model(case)
    pad = pad_id(model)
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(5, VOCAB, (4, T), generator=gen)
    mask = torch.ones(4, T, dtype=torch.long)
    for row, length in enumerate((T, 20, 9, 0)):  # the last row is all padding
        ids[row, length:], mask[row, length:] = pad, 0
    labels = torch.where((torch.arange(T) % 4 == 1) & (mask == 1), ids, IGNORE_INDEX)
    inputs = torch.where(labels != IGNORE_INDEX, 4, ids)

    def run():
        out = outputs(model, ids, mask)
        sums, grads = loss_and_grads(model, inputs, mask, labels)
        return {**out, **sums, **{f"grad {name}": grad for name, grad in grads.items()}}

    now = run()
    with monkeypatch.context() as patch:
        padding_only_path(patch)
        before = run()
    assert sorted(now) == sorted(before)
    for key in now:
        assert torch.equal(now[key], before[key]), f"{case} {key}"


def test_the_step_counts_real_tokens_not_the_sum_of_document_ids():
    """The RTD loss is normalised by the global count of real tokens: nonzero ids, not their sum."""
    import types

    from trainer.core.step import _counts

    batch = {"labels": torch.tensor([[5, IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]),
             "attention_mask": torch.tensor([[1, 1, 2, 2, 3, 0]])}
    counts = _counts([batch, batch], types.SimpleNamespace(device=torch.device("cpu"), dp_size=1))
    assert counts["tokens"].item() == 10 and counts["predicted"].item() == 4 and counts["samples"].item() == 2
