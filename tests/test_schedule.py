import pytest
import torch

from trainer.core.engine import parameter_groups
from trainer.core.schedule import warmup_linear_decay


def test_linear_warmup_then_linear_decay():
    f = warmup_linear_decay(warmup_steps=4, total_steps=12, min_ratio=0.0)
    lrs = [f(i) for i in range(12)]  # multipliers of steps 1..12
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:] == pytest.approx([7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0])
    g = warmup_linear_decay(0, 10, 0.1)
    assert g(0) == pytest.approx(0.1 + 0.9 * 0.9) and g(9) == pytest.approx(0.1)


def test_no_weight_decay_on_biases_and_layernorm():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Embedding(5, 4))
    model.norm_like = torch.nn.LayerNorm(4)
    decay, no_decay = parameter_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert len(no_decay["params"]) == 5


def _rtd(name, sharing):
    from models.registry import build_config, build_model
    return build_model(build_config(name, "debug", vocab_size=300, seq_length=32, embedding_sharing=sharing))


@pytest.mark.parametrize("name,sharing", [("deberta_v3", "gdes"), ("deberta_v3", "es"), ("electra", "es"),
                                          ("electra", "none")])
def test_rtd_parameter_groups_split_by_tower(name, sharing):
    from trainer.core.schedule import parameter_groups as tower_groups
    model = _rtd(name, sharing)
    groups, towers = tower_groups(model, 0.01, lr=1e-3, generator_lr=4e-4)
    by_id = {id(p): n for n, p in model.named_parameters()}
    members = {t: set() for t in towers}
    for group, tower in zip(groups, towers):
        members[tower] |= {by_id[id(p)] for p in group["params"]}
        assert group["lr"] == (4e-4 if tower == "generator" else 1e-3)
    assert sum(len(m) for m in members.values()) == len(by_id)  # every parameter in exactly one group
    assert all(n.startswith("generator.") for n in members["generator"])
    assert all(n.startswith("discriminator.") for n in members["discriminator"])
    shared = members.get("shared", set())
    if sharing == "es":
        assert shared == {n for n in by_id.values() if n.startswith("generator.embeddings.") and n.split(".")[2] in
                          model.shared_tables}
    else:
        assert not shared
    if sharing == "gdes":  # E_G: the MLM loss's (generator); E_Delta: the RTD loss's (discriminator)
        assert "generator.embeddings.word.weight" in members["generator"]
        assert any("gdes_delta" in n for n in members["discriminator"])


def test_two_stage_multipliers_switch_towers_at_n():
    from trainer.core.schedule import lr_multipliers
    gen, shared, disc = lr_multipliers(["generator", "shared", "discriminator"], "two_stage", n=4,
                                       warmup_steps=2, total_steps=10, min_ratio=0.0)
    steps = range(10)  # LambdaLR's i = step - 1
    assert [gen(i) for i in steps] == pytest.approx([0.5, 1.0, 0.5, 0.0, 0, 0, 0, 0, 0, 0])
    assert [disc(i) for i in steps] == pytest.approx([0, 0, 0, 0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0])
    assert [shared(i) for i in steps] == pytest.approx([gen(i) + disc(i) for i in steps])
    joint = lr_multipliers(["generator", "discriminator"], "joint", 0, 2, 10, 0.0)
    assert joint[0] is joint[1] and joint[0](0) == pytest.approx(0.5)


def test_discriminator_takes_over_generator_weights_of_equal_shape():
    from trainer.core.schedule import discriminator_from_generator
    model = _rtd("deberta_v3", "gdes")  # debug: a 1-layer generator, a 2-layer discriminator, one width
    pairs = dict(discriminator_from_generator(model))
    assert pairs["discriminator.backbone.encoder.layers.0.attention.query.weight"] == \
        "generator.encoder.layers.0.attention.query.weight"
    assert not any(".layers.1." in k for k in pairs)  # the generator has no second layer
    params = dict(model.named_parameters())
    assert all(params[d].shape == params[g].shape for d, g in pairs.items())
    narrow = _rtd("electra", "es")  # ELECTRA debug: a narrower generator shares only its embeddings
    assert not any(".layers." in k for k in dict(discriminator_from_generator(narrow)))


def test_two_stage_is_checked():
    from data.errors import UserError
    from trainer.core.schedule import check_schedule
    roberta = torch.nn.Linear(2, 2)
    with pytest.raises(UserError, match="replaced-token-detection"):
        check_schedule(roberta, "two_stage", 2, 4)
    with pytest.raises(UserError, match="generator_steps"):
        check_schedule(_rtd("electra", "es"), "two_stage", 4, 4)
