"""The per-architecture adapters of models/registry.py: every registered architecture maps to Hugging
Face and back losslessly, tells its batch keys, takes its sampling seed at construction, and
nothing in trainer/ needs to know an architecture by name."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch

from models.classification import SequenceClassifier, config_from_hf, from_hf_state_dict, hf_config, \
    to_hf_state_dict
from models.registry import FAMILIES, MODELS, batch_keys, build_config, build_model, get_family
from trainer.convert.hf_import import read_hf_dir, transformers_config

ROOT = Path(__file__).resolve().parents[1]
# Hugging Face has no enhanced mask decoder: a config with one cannot come back from HF
NO_EMD = {"deberta": {"enhanced_mask_decoder": False}, "deberta_v3": {"generator": {"enhanced_mask_decoder": False}}}


def _config(name: str):
    torch.manual_seed(0)
    return build_config(name, "debug", vocab_size=100, seq_length=16, pad_token_id=1 if name == "roberta" else 0,
                        **NO_EMD.get(name, {}))


def _towers(name: str, config) -> dict:
    spec = MODELS[name]
    return {None: config} if spec.components == ("model",) else {c: getattr(config, c) for c in spec.components}


@pytest.mark.parametrize("name", list(MODELS))
def test_config_round_trips_through_hugging_face(name):
    spec = MODELS[name]
    config = _config(name)
    family = get_family(spec.family)
    for component, tower in _towers(name, config).items():
        hf = spec.hf_config(config, *([component] if component else []))
        assert hf.model_type == family.hf_model_type
        back = family.config_class(**family.fields_from_hf(transformers_config(hf.to_dict(), Path("x"))))
        # a pretraining head's switch (NSP) has no place in Hugging Face's config
        ours, theirs = dataclasses.asdict(tower), dataclasses.asdict(back)
        ours.pop("next_sentence_head", None), theirs.pop("next_sentence_head", None)
        assert theirs == ours, (name, component)


@pytest.mark.parametrize("name", list(MODELS))
def test_state_dict_round_trips_through_hugging_face(name):
    spec = MODELS[name]
    config = _config(name)
    sd = build_model(config).state_dict()
    if spec.components == ("model",):
        back = spec.from_hf_state_dict(spec.to_hf_state_dict(sd, config), config)
    else:
        towers = {c: spec.to_hf_state_dict(sd, config, c) for c in spec.components}
        for component in spec.components:  # the files an export writes beside the model, by stem
            for file, tensors in spec.hf_extras(sd, config, component).items():
                towers[file.split(".")[0]] = tensors
        back = spec.from_hf_state_dict(towers, config)
    assert set(back) == set(sd), name
    for key, value in sd.items():  # GDES: E_Delta = (E_G + E_Delta) - E_G, exact up to rounding
        torch.testing.assert_close(back[key], value, rtol=0, atol=1e-6, msg=f"{name}: {key}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_classifier_round_trips_through_hugging_face(family):
    name = next(n for n, s in MODELS.items() if s.family == family)  # the first architecture on it
    native = _config(name)
    tower, _ = MODELS[name].backbone_of(native, build_model(native).state_dict())
    torch.manual_seed(0)
    model = SequenceClassifier(family, tower, num_labels=3)
    hf = hf_config(model, ["a", "b", "c"])
    assert hf.architectures == [get_family(family).classifier_hf_class]
    assert config_from_hf(hf) == (family, model.config)
    sd = model.state_dict()
    backbone, head = from_hf_state_dict(to_hf_state_dict(sd, family, model.config), family, model.config)
    assert set(head) == set(model.head.state_dict())
    assert set(backbone) == set(model.backbone.state_dict())
    for key, value in backbone.items():
        assert torch.equal(value, sd["backbone." + key]), key
    for key, value in head.items():
        assert torch.equal(value, sd["head." + key]), key


@pytest.mark.parametrize("name", list(MODELS))
def test_batch_keys_are_what_forward_takes_and_the_seed_is_passed(name):
    config = _config(name)
    model = build_model(config, sampling_seed=1234)
    takes = tuple(p for p in inspect.signature(model.forward).parameters)
    assert batch_keys(name) == takes
    if "sample_index" in takes:  # per-sample draws keyed by (seed, global index): the seed is given
        assert model.sampling_seed == 1234


def test_one_reader_reads_sharded_safetensors(tmp_path):
    import transformers

    spec = MODELS["roberta"]
    config = _config("roberta")
    sd = build_model(config).state_dict()
    hf_model = transformers.RobertaForMaskedLM(spec.hf_config(config))
    hf_model.load_state_dict(spec.to_hf_state_dict(sd, config), strict=False)
    hf_model.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    raw, tensors = read_hf_dir(tmp_path)
    family, ours = config_from_hf(transformers_config(raw, tmp_path))
    assert (family, ours) == ("roberta", dataclasses.replace(config, next_sentence_head=False))
    back, _ = from_hf_state_dict(tensors, family, ours)
    assert all(torch.equal(back[k], sd[k]) for k in back) and "embeddings.word.weight" in back


# Files under trainer/ that may name an architecture in code. A file not listed must stay clean.
STILL_NAMING = {
    "trainer/pretraining/config.py",  # the default model.name (a config default, not a branch)
}
NAMES = ("roberta", "deberta", "electra", "deberta_v3")


def _names_in_code(path: Path) -> list[str]:
    """String constants outside docstrings (of modules, functions, classes and fields) and comments
    that mention an architecture's name."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}" for name in NAMES
                      if name in node.value.lower()]
    return found


def test_no_architecture_names_in_trainer_code():
    found = [hit for path in sorted((ROOT / "trainer").rglob("*.py"))
             if str(path.relative_to(ROOT)) not in STILL_NAMING for hit in _names_in_code(path)]
    assert not found, "architecture names outside models/ (use the registry's adapter):\n" + "\n".join(found)
    assert all((ROOT / f).is_file() for f in STILL_NAMING)


def test_no_architecture_name_chains_in_classification():
    assert not _names_in_code(ROOT / "models" / "classification.py")
