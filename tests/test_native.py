"""The consolidated native model file (models/native.py)."""
import pytest
import torch

from data.errors import UserError
from models.native import load_native, save_native
from models.registry import build_config, build_model


@pytest.mark.parametrize("name", ["roberta", "deberta_v3"])
def test_native_file_round_trip(tmp_path, name):
    config = build_config(name, "debug", vocab_size=300, seq_length=32)
    model = build_model(config)
    path = save_native(tmp_path / "not" / "yet" / "model.pt", name, config, model.state_dict(), {"step": 7})
    native = load_native(path)
    assert native.name == name and native.config == config and native.meta == {"step": 7}
    rebuilt = native.build()
    for (key, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), key
    assert load_native(path.parent).config == config  # a directory holding model.pt works too


def test_not_a_native_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no native model file"):
        load_native(tmp_path)
    torch.save({"state_dict": {}}, tmp_path / "model.pt")
    with pytest.raises(UserError, match="is not a native model file"):
        load_native(tmp_path / "model.pt")
