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
from models import deberta, deberta_v3, electra, roberta, rtd
from models.config import DebertaConfig, ElectraConfig, RobertaConfig, pad_vocab_size
from models.parallel import ParallelLayers

FAMILIES = {"roberta": RobertaConfig, "deberta": DebertaConfig, "electra": ElectraConfig}
HF_CLASSES = {"roberta": "RobertaForSequenceClassification", "deberta": "DebertaV2ForSequenceClassification",
              "electra": "ElectraForSequenceClassification"}
POOLINGS = ("cls", "mean")
HF_BACKBONE_PREFIX = {"roberta": "roberta.", "deberta": "deberta.", "electra": "electra."}


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


def build_backbone(family: str, config, layers: ParallelLayers | None = None) -> nn.Module:
    """The encoder without any pretraining head; each has `encode(ids, mask)` and `embeddings.norm`."""
    layers = layers or ParallelLayers(1)
    if family == "roberta":
        model = roberta.RobertaForMaskedLM(config, layers)
        del model.lm_head  # the MLM head is no part of a classifier (it would get no gradient)
        return model
    if family == "deberta":  # no EMD: its position table is built only for a position-biased input
        return deberta.DebertaModel(config, layers)
    if family == "electra":
        return electra.ElectraBackbone(config, layers)
    raise UserError(f"no classifier for model family {family!r}; use one of {', '.join(FAMILIES)}")


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
        if family not in FAMILIES or not isinstance(config, FAMILIES[family]):
            raise UserError(f"a {family} classifier needs a {FAMILIES.get(family, object).__name__}, "
                            f"got {type(config).__name__}")
        if pooling not in POOLINGS:
            raise UserError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        self.family, self.config, self.num_labels, self.pooling = family, config, num_labels, pooling
        self.backbone = build_backbone(family, config)
        dropout = config.hidden_dropout if classifier_dropout is None else classifier_dropout
        self.classifier_dropout = dropout
        std = config.initializer_range
        if family == "deberta":
            self.head = PoolerHead(config.hidden_size, num_labels, dropout, std)
        else:
            self.head = ClassificationHead(config.hidden_size, num_labels, dropout,
                                           "tanh" if family == "roberta" else "gelu", std)

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
    heads = ("lm_head.", "nsp_head.")  # pretraining heads (NSP: models/nsp.py) are no part of a classifier
    if name == "roberta":
        return "roberta", _without_nsp(config), {k: v for k, v in state_dict.items() if not k.startswith(heads)}
    if name == "deberta":
        keep = {k: v for k, v in state_dict.items() if not k.startswith(heads)}
        if not config.position_biased_input:
            keep.pop("embeddings.position.weight", None)  # the EMD's table: no EMD in a classifier
        return "deberta", _without_nsp(_without_emd(config)), keep
    if name == "electra":
        shared = () if config.embedding_sharing == "none" else rtd.SHARED_TABLES
        _, disc = rtd.split_state_dict(state_dict, shared, config.embedding_sharing)
        return "electra", config.discriminator, {k: v for k, v in disc.items() if not k.startswith("head.")}
    if name == "deberta_v3":
        _, backbone, _ = deberta_v3.deberta_v3_split_state_dict(state_dict, config)
        return "deberta", _without_emd(config.discriminator), backbone
    raise UserError(f"cannot fine-tune model {name!r}; one of roberta, deberta, electra, deberta_v3")


def _without_emd(config: DebertaConfig) -> DebertaConfig:
    return dataclasses.replace(config, enhanced_mask_decoder=False)


def _without_nsp(config):
    return dataclasses.replace(config, next_sentence_head=False)


# ------------------------------------------------------------------------------- Hugging Face
def hf_config(model: SequenceClassifier, label_names=None, regression: bool = False):
    """transformers config of the matching XForSequenceClassification."""
    if model.pooling != "cls":
        raise UserError(f"a classifier with pooling {model.pooling!r} has no Hugging Face equivalent "
                        f"(transformers' sequence classifiers read the first token)")
    cfg = model.config
    if model.family == "roberta":
        hf = roberta.hf_config(cfg)
        hf.classifier_dropout = model.classifier_dropout
    elif model.family == "electra":
        hf = electra.tower_hf_config(cfg, "discriminator")
        hf.classifier_dropout = model.classifier_dropout
    else:
        hf = deberta.hf_config(cfg, "backbone")
        hf.pooler_hidden_size, hf.pooler_dropout, hf.pooler_hidden_act = cfg.hidden_size, 0.0, "gelu"
        hf.cls_dropout = model.classifier_dropout
    hf.architectures = [HF_CLASSES[model.family]]
    hf.num_labels = model.num_labels
    hf.problem_type = "regression" if regression else "single_label_classification"
    if label_names:
        hf.id2label = {i: str(n) for i, n in enumerate(label_names)}
        hf.label2id = {str(n): i for i, n in enumerate(label_names)}
    return hf


_HEAD_TO_HF = {
    "roberta": {"head.dense": "classifier.dense", "head.out_proj": "classifier.out_proj"},
    "electra": {"head.dense": "classifier.dense", "head.out_proj": "classifier.out_proj"},
    "deberta": {"head.pooler": "pooler.dense", "head.classifier": "classifier"},
}


def to_hf_state_dict(model_sd: Dict[str, torch.Tensor], family: str, config) -> Dict[str, torch.Tensor]:
    """Our classifier's state dict -> the XForSequenceClassification's (vocabulary padding trimmed)."""
    backbone = {k[len("backbone."):]: v for k, v in model_sd.items() if k.startswith("backbone.")}
    if family == "roberta":
        # roberta's map writes the tied MLM decoder from lm_head.bias: give it one, then drop the head.
        placeholder = {"lm_head.bias": torch.zeros(config.padded_vocab_size)}
        hf = {k: v for k, v in roberta.to_hf_state_dict({**backbone, **placeholder}, config).items()
              if not k.startswith("lm_head.")}
    elif family == "deberta":
        hf = {HF_BACKBONE_PREFIX[family] + k: v
              for k, v in deberta.to_hf_state_dict(backbone, config, component="backbone").items()}
    else:
        hf = electra.tower_to_hf_state_dict(backbone, config, "discriminator")
    heads = _HEAD_TO_HF[family]
    for key, value in model_sd.items():
        if key.startswith("head."):
            module, param = key.rsplit(".", 1)
            hf[f"{heads[module]}.{param}"] = value
    return {k: v.detach().clone().contiguous() for k, v in hf.items()}


def config_from_hf(hf) -> Tuple[str, Any]:
    """A transformers config (RoBERTa, DeBERTa-v2/v3, ELECTRA) -> (family, our tower config)."""
    common = dict(
        vocab_size=hf.vocab_size, padded_vocab_size=pad_vocab_size(hf.vocab_size), hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads, intermediate_size=hf.intermediate_size,
        max_position_embeddings=hf.max_position_embeddings, hidden_dropout=float(hf.hidden_dropout_prob),
        attention_dropout=float(hf.attention_probs_dropout_prob), layer_norm_eps=float(hf.layer_norm_eps),
        pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0,
        initializer_range=float(hf.initializer_range), type_vocab_size=hf.type_vocab_size,
        activation=hf.hidden_act)
    if hf.model_type == "roberta":
        return "roberta", RobertaConfig(**common)
    if hf.model_type == "electra":
        return "electra", ElectraConfig(embedding_size=hf.embedding_size, **common)
    if hf.model_type == "deberta-v2":
        pos_att_type = hf.pos_att_type or []
        if isinstance(pos_att_type, str):  # older configs: "p2c|c2p"
            pos_att_type = [t for t in pos_att_type.lower().split("|") if t]
        return "deberta", DebertaConfig(
            **common, relative_attention=bool(hf.relative_attention), pos_att_type=list(pos_att_type),
            position_buckets=getattr(hf, "position_buckets", -1),
            max_relative_positions=getattr(hf, "max_relative_positions", -1),
            norm_rel_ebd="layer_norm" if "layer_norm" in str(getattr(hf, "norm_rel_ebd", "none")) else "none",
            share_att_key=bool(getattr(hf, "share_att_key", False)),
            position_biased_input=bool(getattr(hf, "position_biased_input", True)),
            enhanced_mask_decoder=False)
    raise UserError(f"Hugging Face model type {hf.model_type!r} is not supported; use roberta, deberta-v2 or electra")


def from_hf_state_dict(hf_sd: Dict[str, torch.Tensor], family: str, config) -> Tuple[Dict, Dict]:
    """A Hugging Face state dict (XForMaskedLM / XForPreTraining / XModel / XForSequenceClassification)
    -> (our backbone state dict, the head's state dict (keys of `SequenceClassifier.head`) if it is a
    classifier of this family, else {})."""
    prefix = HF_BACKBONE_PREFIX[family]
    heads = {hf: ours for ours, hf in _HEAD_TO_HF[family].items()}
    backbone_hf, head = {}, {}
    for key, value in hf_sd.items():
        module, param = key.rsplit(".", 1)
        if module in heads:
            head[f"{heads[module].removeprefix('head.')}.{param}"] = value  # keys of SequenceClassifier.head
        elif key.startswith(prefix) or not any(key.startswith(p) for p in _HF_HEAD_PREFIXES[family]):
            backbone_hf[key if key.startswith(prefix) else prefix + key] = value
    if family == "roberta":
        ours = roberta.from_hf_state_dict(backbone_hf, config)
    elif family == "deberta":
        ours = deberta.from_hf_state_dict(backbone_hf, config)
    else:
        ours = electra.tower_from_hf_state_dict(backbone_hf, config, "discriminator")
    # MLM / RTD heads of a pretraining checkpoint are no part of the classifier
    ours = {k: v for k, v in ours.items() if not k.startswith(("lm_head.", "head."))}
    return ours, head


# Hugging Face keys outside the backbone that a pretraining checkpoint may carry (dropped on import).
_HF_HEAD_PREFIXES = {
    "roberta": ("lm_head.", "classifier.", "roberta."),
    "deberta": ("lm_predictions.", "cls.", "mask_predictions.", "pooler.", "classifier.", "deberta."),
    "electra": ("generator_predictions.", "generator_lm_head.", "discriminator_predictions.", "classifier.",
                "electra."),
}
