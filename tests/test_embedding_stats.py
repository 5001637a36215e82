"""tools/embedding_stats.py on synthetic tables whose answers are known."""
import pytest
import torch

from data.errors import UserError
from tools.embedding_stats import GENERATOR, average_cosine, embedding_stats, main


def test_average_cosine_known_values():
    assert average_cosine(torch.ones(5, 3), 100) == pytest.approx(1.0)
    assert average_cosine(torch.eye(4), 100) == pytest.approx(0.0)
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert average_cosine(opposite, 100) == pytest.approx(-1.0)
    table = torch.randn(50, 8)
    unit = torch.nn.functional.normalize(table, dim=-1)
    cos = unit @ unit.T
    assert average_cosine(table, 100) == pytest.approx(float((cos.sum() - 50) / (50 * 49)), abs=1e-6)


def test_sharing_modes_and_effective_tables():
    config = {"generator": {"vocab_size": 9}}
    g = torch.randn(12, 4)
    g[9:] = 0  # vocabulary padding must be ignored
    delta = torch.zeros(12, 4)
    delta[5:9] = -g[5:9] + torch.tensor([1.0, 0, 0, 0])  # E_G + E_Delta: identical rows -> cosine 1
    gdes = embedding_stats({GENERATOR: g, "discriminator.backbone.embeddings.word.gdes_delta.weight": delta},
                           config)
    assert gdes["embedding_sharing"] == "gdes" and gdes["rows"] == 4
    assert gdes["discriminator_avg_cosine"] == pytest.approx(1.0)
    es = embedding_stats({GENERATOR: g}, config)
    assert es["embedding_sharing"] == "es" and es["discriminator_avg_cosine"] == es["generator_avg_cosine"]
    none = embedding_stats({GENERATOR: g, "discriminator.backbone.embeddings.word.weight": torch.eye(12)[:, :12]},
                           config)
    assert none["embedding_sharing"] == "none" and none["discriminator_avg_cosine"] == pytest.approx(0.0)
    # ELECTRA's full sharing: the state holds the one backbone under both towers' names
    shared = embedding_stats({GENERATOR: g, "discriminator.embeddings.word.weight": g},
                             {**config, "embedding_sharing": "all"})
    assert shared["embedding_sharing"] == "all"
    assert shared["discriminator_avg_cosine"] == shared["generator_avg_cosine"]
    with pytest.raises(UserError, match="not an RTD model"):
        embedding_stats({"embeddings.word.weight": g}, config)


def test_cli_errors(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        main(["--checkpoint", str(tmp_path / "nope")])
    with pytest.raises(UserError, match="holds no committed checkpoint; pass --tag global_stepN"):
        main(["--checkpoint", str(tmp_path)])
    with pytest.raises(UserError, match="global_step9 does not exist"):
        main(["--checkpoint", str(tmp_path), "--tag", "global_step9"])
