"""tools/crossover.py's arithmetic and outputs on synthetic numbers (nothing is launched)."""
import json

import pytest

from data.errors import UserError
from tools.crossover import (assemble, bisection_order, committed_steps, crossover, main, markdown, nearest_validation, parse_ints,
                             tokens_at, write_outputs)


def rows(*points):
    return [{"step": s, "tokens": s * 4096, "diagnostics": {}, "mean": m, "std": d, "values": [m - d, m, m + d]}
            for s, m, d in points]


RANDOM = {"mean": 0.60, "std": 0.02, "values": [0.58, 0.60, 0.62]}


def test_crossover_is_the_first_step_clear_of_the_random_band():
    # bar = 0.62: step 200's 0.66 - 0.05 = 0.61 does not clear it; step 300's 0.70 - 0.03 = 0.67 does
    data = rows((100, 0.55, 0.01), (200, 0.66, 0.05), (300, 0.70, 0.03), (400, 0.75, 0.01))
    assert crossover(data, RANDOM) == 300
    assert crossover(list(reversed(data)), RANDOM) == 300  # step order, not list order


def test_crossover_not_reached_and_unknown():
    data = rows((100, 0.59, 0.01), (200, 0.63, 0.02))
    assert crossover(data, RANDOM) is None
    assert crossover(data, None) is None
    pending = data + [{"step": 300, "tokens": None, "diagnostics": {}, "mean": None, "std": None, "values": None}]
    assert crossover(pending, RANDOM) is None
    text = markdown(assemble(pending, RANDOM, metric="accuracy", seeds=[1, 2, 3]))
    assert "not reached" in text and "| 300 | ? |" in text and "pending" in text
    assert "not known yet" in markdown(assemble(data, None, metric="accuracy"))


def test_markdown_table_has_every_row_the_random_row_and_the_crossover():
    data = rows((100, 0.55, 0.01), (300, 0.70, 0.03))
    data[0]["diagnostics"] = {"valid_loss_rtd": 0.41, "valid_rtd_prior_loss": 0.42}
    text = markdown(assemble(data, RANDOM, metric="accuracy", seeds=[1, 2, 3], title="word order"))
    assert text.startswith("# word order")
    assert "| step | pretraining tokens | valid_loss_rtd | valid_rtd_prior_loss | accuracy mean +- std | per seed |" \
        in text
    assert "| 100 | 409.60K | 0.4100 | 0.4200 | 0.5500 +- 0.0100 | 0.5400, 0.5500, 0.5600 |" in text
    assert "| 300 | 1.23M |  |  | 0.7000 +- 0.0300 |" in text
    assert "| random init | 0 |  |  | 0.6000 +- 0.0200 | 0.5800, 0.6000, 0.6200 |" in text
    assert "**Crossover:** step 300" in text
    assert "valid_rtd_auc" not in text  # columns only for keys that exist


def test_outputs_are_written(tmp_path):
    result = assemble(rows((100, 0.55, 0.01), (300, 0.70, 0.03)), RANDOM, metric="accuracy", seeds=[1, 2, 3])
    write_outputs(result, tmp_path / "out")
    png = (tmp_path / "out" / "crossover.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert json.loads((tmp_path / "out" / "crossover.json").read_text())["crossover"] == 300
    assert "**Crossover:** step 300" in (tmp_path / "out" / "crossover.md").read_text()
    assert (tmp_path / "out" / ".gitignore").read_text() == "work/\n"


def test_bisection_order_takes_the_ends_first():
    assert bisection_order([300, 100, 600, 200, 500, 400]) == [600, 100, 300, 200, 400, 500]
    assert bisection_order([7]) == [7] and bisection_order([1, 2]) == [2, 1]


def test_metrics_lookups():
    records = [{"step": 10, "consumed_tokens": 100}, {"step": 20, "consumed_tokens": 200},
               {"step": 20, "valid_loss_rtd": 0.5}, {"step": 40, "consumed_tokens": 400},
               {"step": 40, "valid_loss_rtd": 0.4}]
    assert tokens_at(records, 20) == 200 and tokens_at(records, 30) == 200 and tokens_at(records, 5) is None
    assert nearest_validation(records, 20)["valid_loss_rtd"] == 0.5
    assert nearest_validation(records, 35)["valid_loss_rtd"] == 0.4
    assert nearest_validation(records[:2], 20) == {}


def test_user_errors(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="no committed checkpoint"):
        committed_steps(tmp_path / "run")
    with pytest.raises(UserError, match="does not exist"):
        main(["--run", str(tmp_path / "run"), "--finetune-config", str(tmp_path / "none.yaml"),
              "--output", str(tmp_path / "out")])
    with pytest.raises(UserError, match="comma-separated"):
        parse_ints("1,x", "--seeds")
