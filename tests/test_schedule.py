import pytest
import torch

from trainer.engine import parameter_groups, warmup_linear_decay


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
