"""The model card written with every export (trainer/convert/model_card.py): recipe, data, diagnostics up to the step."""
from __future__ import annotations

import dataclasses
import json

import yaml

from models.registry import build_config
from trainer.pretraining.config import PretrainConfig
from trainer.convert.model_card import model_card, write_model_card

STEP = 20


def recipe() -> tuple[dict, dict, dict]:
    """(conversion.json, resolved config, model config) of a DeBERTaV3 run exported at STEP."""
    cfg = PretrainConfig()
    cfg.model.name, cfg.run.name, cfg.data.prefix = "deberta_v3", "v3_demo", "bin/corpus"
    cfg.data.blend = [(0.7, "bin/wiki"), (0.3, "bin/code")]
    cfg.optim.lr, cfg.optim.generator_lr, cfg.train.steps = 3e-4, 1e-4, 40
    model_config = {"name": "deberta_v3", **dataclasses.asdict(build_config("deberta_v3", "debug", 1000, 32))}
    conversion = {"model": "deberta_v3", "component": "discriminator",
                  "source": "runs/v3_demo/checkpoints/global_step20", "step": STEP, "precision": "bf16", "zero_stage": 1, "tp_size": 2, "dp_size": 1,
                  "consumed_samples": 640, "consumed_tokens": 20480, "tokenizer_fingerprint": "ab12cd34"}
    return conversion, cfg.to_dict(), model_config


RECORDS = [
    {"step": 10, "loss": 9.5, "loss_rtd": 0.61, "rtd_auc": 0.55, "lr": 3e-4},
    {"step": 10, "valid_loss": 9.9, "valid_rtd_auc": 0.52},
    {"step": 20, "loss": 7.25, "loss_rtd": 0.43, "rtd_auc": 0.71, "generator_accuracy": 0.125, "lr": 1.5e-4},
    {"step": 20, "probe_accuracy": 0.625},
    {"step": 30, "loss": 1.0, "rtd_auc": 0.99, "valid_loss": 1.5},  # after the export: not its history
]


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def rows(card: str) -> dict[str, list[str]]:
    return {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in card.splitlines() if line.startswith("| "))}


def test_card_holds_the_recipe_and_the_metrics_up_to_the_exported_step():
    conversion, config, model_config = recipe()
    card = model_card(conversion, config, model_config, RECORDS, hf_class="DebertaV2Model",
                      notes=["Hugging Face DebertaV2 has no enhanced mask decoder: dropped x"])
    assert front_matter(card) == {"library_name": "transformers", "tags": ["deberta-v3", "replaced-token-detection"],
                                  "pipeline_tag": "feature-extraction"}
    assert "step 20 of run `v3_demo`" in card and "the discriminator tower" in card
    assert "lr 0.0003, generator_lr 0.0001" in card and "gdes" in card and "bf16" in card
    assert "`bin/corpus`" in card and "weight 0.7 `bin/wiki`" in card and "`ab12cd34`" in card
    assert "640 samples, 20,480 tokens" in card
    assert "rtd_head.safetensors" in card and "no enhanced mask decoder" in card
    table = rows(card)
    assert table["loss"] == ["7.2500", "9.9000"]  # training at step 20, validation at step 10
    assert table["rtd_auc"] == ["0.7100", "0.5200"]  # step 30's 0.99 comes after the export
    assert table["generator_accuracy"] == ["0.1250", ""] and table["probe_accuracy"] == ["0.6250", ""]
    assert "0.99" not in card and "1.5000" not in card
    assert list(table)[1:] == ["loss", "loss_rtd", "rtd_auc", "generator_accuracy", "probe_accuracy"]  # stable order
    # the MLM generator of the same run: a fill-mask card
    generator = model_card({**conversion, "component": "generator"}, config, model_config, RECORDS,
                           hf_class="DebertaV2ForMaskedLM")
    assert front_matter(generator)["pipeline_tag"] == "fill-mask" and "rtd_head" not in generator


def test_missing_or_malformed_metrics_give_a_card_without_diagnostics(tmp_path):
    conversion, config, model_config = recipe()
    run_dir = tmp_path / "runs" / "v3_demo"
    (run_dir / "checkpoints" / "global_step20").mkdir(parents=True)
    conversion["source"] = str(run_dir / "checkpoints" / "global_step20")
    warnings = []
    for content in (None, '{"step": 10, "loss": 9.5}\n{"step": 20, "lo', "[1, 2]\n"):
        if content is not None:
            (run_dir / "metrics.jsonl").write_text(content)
        out = tmp_path / "export"
        out.mkdir(exist_ok=True)
        card = write_model_card(out, conversion, config, model_config, warnings.append, hf_class="DebertaV2Model")
        text = card.read_text()
        assert "metrics not found" in text and "| metric |" not in text and "step 20" in text
        assert [p.name for p in out.iterdir()] == ["README.md"]  # no temp file left
    assert len(warnings) == 3 and all("no diagnostics" in w for w in warnings)
    # a good file is read from the run directory (the checkpoints directory's parent)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    text = write_model_card(out, conversion, config, model_config, warnings.append,
                            hf_class="DebertaV2Model").read_text()
    assert rows(text)["rtd_auc"] == ["0.7100", "0.5200"] and len(warnings) == 3
