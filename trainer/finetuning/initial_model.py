"""Where fine-tuning starts: a native model file or a Hugging Face directory, its tokenizer, and the classifier built on it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import torch

from data.errors import UserError
from data.tokenizer import Tokenizer, load_tokenizer
from models.classification import SequenceClassifier
from trainer.finetuning.config import FinetuneConfig


@dataclass
class InitialModel:
    """Where fine-tuning starts: a backbone (and maybe a classifier head) in our layout."""
    family: str
    config: object  # the backbone tower's config
    backbone: Dict[str, torch.Tensor]
    head: Dict[str, torch.Tensor]
    source: str  # "native" or "hf"
    tokenizer_dirs: Tuple[Path, ...]  # where a tokenizer may lie beside the weights


def load_initial_model(init: str) -> InitialModel:
    """model.init: a native model file/directory (models/native.py) or a Hugging Face directory."""
    from models import native
    from models.classification import backbone_from_native

    path = Path(init)
    if path.is_file() or (path / native.FILENAME).is_file():
        nm = native.load_native(path)
        family, config, backbone = backbone_from_native(nm.name, nm.config, nm.state_dict)
        folder = path.parent if path.is_file() else path
        return InitialModel(family, config, backbone, {}, "native",
                            (folder, folder / "tokenizer", folder.parent / "tokenizer"))
    if (path / "config.json").is_file():
        return _load_hf(path)
    raise UserError(f"model.init={init}: neither a native model file (model.pt, from tools/convert_checkpoint.py "
                    f"--format native) nor a Hugging Face directory with config.json")


def _load_hf(path: Path) -> InitialModel:
    from models.classification import config_from_hf, from_hf_state_dict
    from trainer.convert.hf_import import read_hf_dir, transformers_config

    raw, state = read_hf_dir(path)  # config.json (file:line errors) and every weight, sharded too
    family, config = config_from_hf(transformers_config(raw, path))
    try:
        backbone, head = from_hf_state_dict(state, family, config)
    except (KeyError, ValueError) as err:
        raise UserError(f"model.init={path}: {err.args[0]}") from None
    return InitialModel(family, config, backbone, head, "hf", (path,))


def resolve_tokenizer(cfg: FinetuneConfig, init: InitialModel) -> Tokenizer:
    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    for folder in init.tokenizer_dirs:
        if (folder / "tokenizer_meta.json").is_file():
            return load_tokenizer(folder)
    raise UserError(f"no tokenizer beside model.init={cfg.model.init}; set data.tokenizer=DIR "
                    f"(the pretraining run's tokenizer/ directory)")


def build_classifier(cfg: FinetuneConfig, init: InitialModel, num_labels: int, seed: int) -> SequenceClassifier:
    """The classifier with the backbone's weights; the head is fresh (drawn from `seed`) unless
    model.init is a classifier with the same number of outputs. With model.random_init every weight
    is fresh, drawn from `seed` by the backbone's own initialisation."""
    config = dataclasses.replace(init.config, **cfg.model.overrides)
    torch.manual_seed(seed)
    model = SequenceClassifier(init.family, config, num_labels, cfg.model.classifier_dropout, cfg.model.pooling)
    if cfg.model.random_init:
        return model
    missing, unexpected = model.backbone.load_state_dict(init.backbone, strict=False)
    if missing or unexpected:
        raise UserError(f"model.init={cfg.model.init}: weights do not fit the {init.family} backbone "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    head_shapes = {k: v.shape for k, v in model.head.state_dict().items()}
    if init.head and {k: v.shape for k, v in init.head.items()} == head_shapes:
        model.head.load_state_dict(init.head)
    return model


