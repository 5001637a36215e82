"""ELECTRA's full weight sharing (embedding_sharing all, Clark et al. 2020 section 3.2): generator and
discriminator of one size are one backbone with two heads. In-process; the ZeRO-3 and TP=2 runs are
in tests/test_rtd_distributed.py."""

import pytest
import torch
import transformers

from data.errors import UserError
from models import electra
from models.classification import backbone_from_native
from models.config import ElectraConfig, RTDConfig, pad_vocab_size
from models.electra import ElectraDiscriminator, ElectraGenerator
from models.native import load_native, save_native
from models.parallel import ParallelLayers, merge_state_dicts, partition_dims, shard_state_dict
from models.registry import build_config, build_rtd
from models.rtd import total_loss
from trainer.core import schedule
from trainer.convert.export import _unpartitioned_fp32

SEQ, VOCAB, MASK_ID = 16, 99, 4
LAYER = "layers.1.attention.query.weight"  # a shared weight deep in the backbone


def tower(**overrides) -> ElectraConfig:
    fields = dict(vocab_size=VOCAB, padded_vocab_size=pad_vocab_size(VOCAB, 128), hidden_size=32, num_layers=2,
                  num_heads=4, intermediate_size=36, max_position_embeddings=SEQ, embedding_size=24,
                  hidden_dropout=0.0, attention_dropout=0.0)  # E != H: the projection is shared too
    fields.update(overrides)
    return ElectraConfig(**fields)


def model_of(sharing: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_rtd(RTDConfig(tower(), tower(), embedding_sharing=sharing), ParallelLayers(1))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial biases and norms, vocabulary padding kept zero (as trained)
        for name, param in model.named_parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
            if param.shape[:1] == (128,):
                param[VOCAB:].zero_()
    return model


def batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    original = torch.randint(5, VOCAB, (3, SEQ), generator=gen)
    attention_mask = torch.ones_like(original)
    attention_mask[1, 11:] = attention_mask[2, 4:] = 0
    original[attention_mask == 0] = 0
    selected = (torch.rand(original.shape, generator=gen) < 0.3) & attention_mask.bool()
    selected[:, 0] = True
    return {"input_ids": original.masked_fill(selected, MASK_ID),
            "labels": original.masked_fill(~selected, -100),
            "attention_mask": attention_mask, "sample_index": torch.arange(100, 103)}


def test_the_towers_are_one_backbone_counted_once():
    model = model_of("all")
    gen, disc = model.generator, model.discriminator
    for name in ("embeddings", "project", "layers"):
        assert getattr(gen, name) is getattr(disc, name), name
    assert gen.embeddings.word.weight is disc.embeddings.word.weight  # the MLM decoder is tied to it too
    assert gen.lm_head is not None and disc.head is not None
    assert model.shared_tables == ("word", "position")
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if n.startswith("discriminator.") and not n.startswith("discriminator.head.")]
    count = lambda module: sum(p.numel() for p in module.parameters())
    # the discriminator's parameters (its head included) + the generator's MLM head, nothing else
    assert model.num_parameters() == count(model) == count(disc) + count(gen.lm_head)
    separate = model_of("none")
    backbone = count(separate.discriminator) - count(separate.discriminator.head)
    assert model.num_parameters() == separate.num_parameters() - backbone


def test_both_losses_update_the_shared_backbone():
    """Against two separate towers holding the same weights: the same losses, and the shared weight's
    gradient is the sum of the generator's and the discriminator's; one SGD step moves both towers."""
    shared, separate = model_of("all"), model_of("none", seed=7)
    separate.load_state_dict(shared.state_dict(), strict=True)  # same keys: both towers whole
    counts = {"predicted": 10, "tokens": 31}
    out, ref = shared(**batch()), separate(**batch())
    for key in ("mlm", "rtd"):
        torch.testing.assert_close(out["loss_sums"][key], ref["loss_sums"][key], atol=1e-6, rtol=1e-6)
    assert out["metrics"]["rtd_actual_positives"] == ref["metrics"]["rtd_actual_positives"] > 0
    total_loss(out, counts).backward()
    total_loss(ref, counts).backward()
    weight = shared.get_parameter(f"generator.{LAYER}")
    from_mlm = separate.get_parameter(f"generator.{LAYER}").grad
    from_rtd = separate.get_parameter(f"discriminator.{LAYER}").grad
    assert from_mlm.abs().max() > 0 and from_rtd.abs().max() > 0
    torch.testing.assert_close(weight.grad, from_mlm + from_rtd, atol=1e-6, rtol=1e-5)
    for name in ("generator.lm_head.dense.weight", "discriminator.head.dense.weight"):  # heads: their own loss
        torch.testing.assert_close(shared.get_parameter(name).grad, separate.get_parameter(name).grad)

    before = weight.detach().clone()
    torch.optim.SGD(shared.parameters(), lr=0.1).step()
    torch.testing.assert_close(weight.detach(), before - 0.1 * (from_mlm + from_rtd), atol=1e-6, rtol=1e-5)
    sd = shared.state_dict()
    assert torch.equal(sd[f"generator.{LAYER}"], sd[f"discriminator.{LAYER}"])


def test_config_refuses_what_cannot_share_every_weight():
    with pytest.raises(UserError, match=r"embedding_sharing 'all' needs generator.hidden_size \(32\) = "
                                        r"discriminator.hidden_size \(64\)"):
        build_config("electra", "debug", vocab_size=300, seq_length=32, embedding_sharing="all")
    with pytest.raises(UserError, match=r"needs generator.hidden_dropout \(0.2\) = discriminator.hidden_dropout"):
        RTDConfig(tower(hidden_dropout=0.2), tower(), embedding_sharing="all")  # the first differing field
    with pytest.raises(UserError, match="embedding_sharing 'all' is for backbone electra, not 'deberta'"):
        build_config("deberta_v3", "debug", vocab_size=300, seq_length=32, embedding_sharing="all")
    # what the study runner sets: the debug generator at the discriminator's size
    cfg = build_config("electra", "debug", vocab_size=300, seq_length=32, embedding_sharing="all",
                       generator={"hidden_size": 64, "num_heads": 4, "intermediate_size": 128})
    assert cfg.generator == cfg.discriminator and cfg.embedding_sharing == "all"

    model = model_of("all")
    with pytest.raises(UserError, match="two_stage needs towers of their own.*embedding_sharing all"):
        schedule.check_schedule(model, "two_stage", 2, 4)
    schedule.check_schedule(model, "joint", 0, 4)


def test_optimizer_groups_see_the_backbone_once_as_shared():
    model = model_of("all")
    groups, towers = schedule.parameter_groups(model, 0.01)
    params = [p for g in groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    tower = {id(p): t for g, t in zip(groups, towers) for p in g["params"]}
    assert tower[id(model.get_parameter(f"generator.{LAYER}"))] == "shared"
    assert tower[id(model.generator.embeddings.word.weight)] == "shared"
    assert {tower[id(p)] for p in model.generator.lm_head.parameters()} == {"generator"}
    assert {tower[id(p)] for p in model.discriminator.head.parameters()} == {"discriminator"}


def test_state_dict_split_join_and_native_file_round_trip(tmp_path):
    model = model_of("all")
    sd = model.state_dict()
    gen_sd, disc_sd = model.split_state_dict(sd)
    cfg = tower()
    assert gen_sd.keys() == ElectraGenerator(cfg, ParallelLayers(1)).state_dict().keys()
    assert disc_sd.keys() == ElectraDiscriminator(cfg, ParallelLayers(1)).state_dict().keys()
    assert torch.equal(gen_sd[LAYER], disc_sd[LAYER]) and torch.equal(gen_sd["project.weight"], sd["discriminator.project.weight"])
    back = model.join_state_dicts(gen_sd, disc_sd)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)

    other = dict(disc_sd, **{"embeddings.norm.bias": disc_sd["embeddings.norm.bias"] + 1e-3})
    with pytest.raises(UserError, match="generator's embeddings.norm.bias differs from the discriminator's"):
        model.join_state_dicts(gen_sd, other)

    path = save_native(tmp_path / "native", "electra", model.config, sd)
    native = load_native(path)
    rebuilt = native.build()
    assert rebuilt.generator.layers is rebuilt.discriminator.layers
    assert all(torch.equal(v, sd[k]) for k, v in rebuilt.state_dict().items())
    family, tower_cfg, backbone = backbone_from_native("electra", native.config, native.state_dict)
    assert family == "electra" and tower_cfg == model.config.discriminator
    assert backbone.keys() == {k for k in disc_sd if not k.startswith("head.")}
    assert all(torch.equal(backbone[k], disc_sd[k]) for k in backbone)


def test_hugging_face_export_gives_each_tower_the_shared_backbone():
    model = model_of("all").eval()
    cfg, b = model.config, batch()
    ids, mask = b["input_ids"], b["attention_mask"]
    hf_sds = {}
    for component, hf_class in (("generator", transformers.ElectraForMaskedLM),
                                ("discriminator", transformers.ElectraForPreTraining)):
        hf_sds[component] = electra.to_hf_state_dict(model.state_dict(), cfg, component)
        hf = hf_class(electra.hf_config(cfg, component)).eval()
        result = hf.load_state_dict(hf_sds[component], strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        with torch.no_grad():
            theirs = hf(input_ids=ids, attention_mask=mask).logits
            ours = model.generator.logits(ids, mask) if component == "generator" else \
                model.discriminator.rtd_logits(ids, mask)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    key = "electra.encoder.layer.1.attention.self.query.weight"
    assert torch.equal(hf_sds["generator"][key], hf_sds["discriminator"][key])

    back = electra.from_hf_state_dict(hf_sds, cfg)  # import: both towers into one backbone
    sd = model.state_dict()
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    hf_sds["generator"] = dict(hf_sds["generator"], **{key: hf_sds["generator"][key] * 1.01})
    with pytest.raises(UserError, match="generator's layers.1.attention.query.weight differs"):
        electra.from_hf_state_dict(hf_sds, cfg)


def test_tensor_parallel_and_fp32_master_layouts_name_both_towers():
    """Every name the state dict has for a shared weight is split by TP, and gets the fp32 master
    when a ZeRO-0 bf16 checkpoint is read (trainer/convert/export.py)."""
    model = model_of("all")
    dims = partition_dims(model)
    assert dims[f"discriminator.{LAYER}"] == dims[f"generator.{LAYER}"] == 0
    assert dims["discriminator.embeddings.word.weight"] == 0
    sd = model.state_dict()
    shards = [shard_state_dict(sd, dims, rank, 2) for rank in range(2)]
    assert shards[1][f"discriminator.{LAYER}"].shape == (16, 32)
    merged = merge_state_dicts(shards, dims)
    assert all(torch.equal(merged[k], sd[k]) for k in sd)

    # ZeRO-0 bf16: the module holds bf16 copies under both names; the optimizer each fp32 master once
    groups, _ = schedule.parameter_groups(model, 0.01)
    masters = [[p.detach() + 1e-4 for p in g["params"]] for g in groups]
    name_of = {id(p): n for n, p in model.named_parameters()}
    rounded = {name_of[id(p)]: m.bfloat16() for g, ms in zip(groups, masters) for p, m in zip(g["params"], ms)}
    module = {k: rounded[k] if k in rounded else rounded["generator." + k.split(".", 1)[1]] for k in sd}
    read = _unpartitioned_fp32({"module": module, "optimizer": {"fp32_groups": masters}}, model)
    master = dict(zip((name_of[id(p)] for g in groups for p in g["params"]), (m for ms in masters for m in ms)))
    assert torch.equal(read[f"discriminator.{LAYER}"], master[f"generator.{LAYER}"])
    assert torch.equal(read["discriminator.project.weight"], master["generator.project.weight"])
