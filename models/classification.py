"""Sequence classification (and regression) over our backbones, laid out as Hugging Face's heads.

    family    backbone                          head (Hugging Face's)                    exported as
    roberta   RoBERTa encoder                   RobertaClassificationHead: <s> -> drop ->  RobertaForSequenceClassification
                                                dense -> tanh -> drop -> out_proj
    electra   ELECTRA discriminator tower       ElectraClassificationHead: the same with   ElectraForSequenceClassification
                                                GELU in place of tanh
    deberta   DeBERTa(-v2/v3) backbone, no EMD  ContextPooler ([CLS] -> dense -> GELU) ->  DebertaV2ForSequenceClassification
                                                drop -> classifier

A native RTD checkpoint (electra, deberta_v3) fine-tunes its discriminator: for DeBERTaV3 under
GDES that is E_D = E_G + E_Delta, which the registry's split functions merge. Hugging Face key
maps are the registry's backbone maps plus the head's few keys, so an export loads into the
transformers class with no missing or unexpected weights. Tensor parallelism is not used here: a
classifier is fine-tuned data-parallel (TP=1 layers).

Shapes: B batch, T sequence, H hidden, C num_labels (1 for regression).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from data.errors import UserError
from models.registry import get_family, get_spec

POOLINGS = ("cls", "mean")


class ClassificationHead(nn.Module):
    """RoBERTa's / ELECTRA's head over the first token: dropout, dense, activation, dropout, out_proj."""

    def __init__(self, hidden: int, num_labels: int, dropout: float, activation: str, std: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, num_labels)
        self.dropout = nn.Dropout(dropout)
        self.activation = torch.tanh if activation == "tanh" else F.gelu
        for linear in (self.dense, self.out_proj):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        x = self.dropout(summary)  # (B, H): <s> / [CLS], or the mean of the tokens
        x = self.dropout(self.activation(self.dense(x)))
        return self.out_proj(x)  # (B, C)


class PoolerHead(nn.Module):
    """DeBERTa's ContextPooler (dense + GELU over [CLS]; pooler dropout 0) and classifier (dropout first)."""

    def __init__(self, hidden: int, num_labels: int, dropout: float, std: float):
        super().__init__()
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_labels)
        self.dropout = nn.Dropout(dropout)
        for linear in (self.pooler, self.classifier):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        pooled = F.gelu(self.pooler(summary))  # (B, H)
        return self.classifier(self.dropout(pooled))  # (B, C)


def build_backbone(family: str, config, layers=None) -> nn.Module:
    """The encoder without any pretraining head; each has `encode(ids, mask)` and `embeddings.norm`."""
    from models.parallel import ParallelLayers

    return get_family(family).backbone(config, layers or ParallelLayers(1))


def summarize(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, H) last hidden states -> (B, H): the first token's ([CLS] / <s>, what every Hugging Face
    sequence classifier reads), or the mean over the real tokens (attention_mask nonzero)."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = (attention_mask != 0).to(hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class SequenceClassifier(nn.Module):
    """backbone -> summary of the sequence (pooling) -> head -> logits (B, C); C = 1 for regression.

    pooling "cls" is the papers' and Hugging Face's classifier; "mean" feeds the same head the mean of
    the last layer over real tokens. A small RTD discriminator early in pretraining keeps what it
    learned in the tokens' states, not in [CLS] (which pretraining only ever labels "original"):
    docs/pretraining_pays.md measures linear probes and fine-tuning both ways.
    """

    def __init__(self, family: str, config, num_labels: int, classifier_dropout: float | None = None,
                 pooling: str = "cls"):
        super().__init__()
        spec = get_family(family)
        if not isinstance(config, spec.config_class):
            raise UserError(f"a {family} classifier needs a {spec.config_class.__name__}, "
                            f"got {type(config).__name__}")
        if pooling not in POOLINGS:
            raise UserError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        self.family, self.config, self.num_labels, self.pooling = family, config, num_labels, pooling
        self.backbone = build_backbone(family, config)
        dropout = config.hidden_dropout if classifier_dropout is None else classifier_dropout
        self.classifier_dropout = dropout
        std = config.initializer_range
        if spec.classifier_head == "pooler":
            self.head = PoolerHead(config.hidden_size, num_labels, dropout, std)
        else:
            self.head = ClassificationHead(config.hidden_size, num_labels, dropout, spec.classifier_head, std)

    @property
    def embedding_norm(self) -> nn.LayerNorm:
        """The embedding LayerNorm: SiFT perturbs its (normalised) input."""
        return self.backbone.embeddings.norm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.encode(input_ids, attention_mask)
        return self.head(summarize(hidden, attention_mask, self.pooling))

    def num_layers(self) -> int:
        return self.config.num_layers

    def layer_of(self, name: str) -> int:
        """Depth of a parameter for layer-wise LR decay: 0 embeddings (and DeBERTa's shared relative
        table), 1..L the transformer layers, L + 1 the head."""
        if name.startswith("head."):
            return self.num_layers() + 1
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part == "layers" and parts[i + 1].isdigit():
                return int(parts[i + 1]) + 1
        return 0

    def describe(self) -> Dict[str, Any]:
        """What rebuilds this classifier (saved with checkpoints)."""
        return {"family": self.family, "num_labels": self.num_labels, "classifier_dropout": self.classifier_dropout,
                "pooling": self.pooling, "config": dataclasses.asdict(self.config)}


# ------------------------------------------------------------------------- from our native files
def backbone_from_native(name: str, config, state_dict: Dict[str, torch.Tensor]) -> Tuple[str, Any, Dict]:
    """A registry model (name, config, full state dict) -> (family, tower config, backbone state dict).

    RTD models give their discriminator, its shared tables merged (E_D = E_G + E_Delta under GDES).
    """
    spec = get_spec(name)
    tower, backbone = spec.backbone_of(config, state_dict)
    return spec.family, tower, backbone


# ------------------------------------------------------------------------------- Hugging Face
def hf_config(model: SequenceClassifier, label_names=None, regression: bool = False):
    """transformers config of the matching XForSequenceClassification."""
    if model.pooling != "cls":
        raise UserError(f"a classifier with pooling {model.pooling!r} has no Hugging Face equivalent "
                        f"(transformers' sequence classifiers read the first token)")
    family = get_family(model.family)
    hf = family.hf_config(model.config)
    family.classifier_hf_config(hf, model.classifier_dropout)
    hf.architectures = [family.classifier_hf_class]
    hf.num_labels = model.num_labels
    hf.problem_type = "regression" if regression else "single_label_classification"
    if label_names:
        hf.id2label = {i: str(n) for i, n in enumerate(label_names)}
        hf.label2id = {str(n): i for i, n in enumerate(label_names)}
    return hf


def to_hf_state_dict(model_sd: Dict[str, torch.Tensor], family: str, config) -> Dict[str, torch.Tensor]:
    """Our classifier's state dict -> the XForSequenceClassification's (vocabulary padding trimmed)."""
    spec = get_family(family)
    backbone = {k[len("backbone."):]: v for k, v in model_sd.items() if k.startswith("backbone.")}
    hf = spec.backbone_to_hf(backbone, config)
    for key, value in model_sd.items():
        if key.startswith("head."):
            module, param = key.rsplit(".", 1)
            hf[f"{spec.classifier_hf_names[module]}.{param}"] = value
    return {k: v.detach().clone().contiguous() for k, v in hf.items()}


def config_from_hf(hf) -> Tuple[str, Any]:
    """A transformers config (of any FAMILIES' model_type) -> (family, our tower config)."""
    from models.registry import family_of_hf

    family = family_of_hf(hf.model_type)
    spec = get_family(family)
    return family, spec.config_class(**spec.fields_from_hf(hf))


def from_hf_state_dict(hf_sd: Dict[str, torch.Tensor], family: str, config) -> Tuple[Dict, Dict]:
    """A Hugging Face state dict (XForMaskedLM / XForPreTraining / XModel / XForSequenceClassification)
    -> (our backbone state dict, the head's state dict (keys of `SequenceClassifier.head`) if it is a
    classifier of this family, else {})."""
    spec = get_family(family)
    prefix = spec.hf_prefix
    heads = {hf: ours for ours, hf in spec.classifier_hf_names.items()}
    outside = spec.hf_head_prefixes + (prefix,)
    backbone_hf, head = {}, {}
    for key, value in hf_sd.items():
        module, param = key.rsplit(".", 1)
        if module in heads:
            head[f"{heads[module].removeprefix('head.')}.{param}"] = value  # keys of SequenceClassifier.head
        elif key.startswith(prefix) or not key.startswith(outside):
            backbone_hf[key if key.startswith(prefix) else prefix + key] = value
    ours = spec.backbone_from_hf(backbone_hf, config)
    # MLM / RTD heads of a pretraining checkpoint are no part of the classifier
    ours = {k: v for k, v in ours.items() if not k.startswith(("lm_head.", "head."))}
    return ours, head
