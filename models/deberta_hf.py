"""DeBERTa-v2/v3 and Hugging Face transformers: the map to DebertaV2ForMaskedLM / DebertaV2Model (config and
state dict, both ways), and the registry adapter (models/README.md) of models/deberta.py's model."""

from __future__ import annotations

import dataclasses
import warnings

import torch

from models.config import DebertaConfig, hf_encoder_kwargs
from models.deberta import DebertaModel
from models.layers import encoder_fields_from_hf, repad_vocab_rows, without_pretraining_heads
from models.nsp import drop_for_export
from models.parallel import ParallelLayers


# --------------------------------------------------------------------------------- Hugging Face
# Exported as DebertaV2ForMaskedLM with `legacy=False`: its head `lm_predictions.lm_head.*` is
# microsoft/DeBERTa's layout (the released checkpoints load into it) and decodes with the word
# embedding itself. The legacy `cls.predictions.*` head is accepted on import.
_HF_TOP = {  # our module names -> DebertaV2Model's (without ".weight"/".bias")
    "embeddings.word": "embeddings.word_embeddings",
    "embeddings.position": "embeddings.position_embeddings",
    "embeddings.token_type": "embeddings.token_type_embeddings",
    "embeddings.norm": "embeddings.LayerNorm",
    "encoder.relative_embeddings": "encoder.rel_embeddings",
    "encoder.relative_norm": "encoder.LayerNorm",
}
_HF_LAYER = {  # under encoder.layers.{i}. / encoder.layer.{i}.
    "attention.query": "attention.self.query_proj",
    "attention.key": "attention.self.key_proj",
    "attention.value": "attention.self.value_proj",
    "attention.pos_key": "attention.self.pos_key_proj",
    "attention.pos_query": "attention.self.pos_query_proj",
    "attention.output": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "ffn.up": "intermediate.dense",
    "ffn.down": "output.dense",
    "ffn_norm": "output.LayerNorm",
}
_HF_HEAD = {  # ours -> DebertaV2ForMaskedLM(legacy=False)'s
    "lm_head.dense": "lm_predictions.lm_head.dense",
    "lm_head.norm": "lm_predictions.lm_head.LayerNorm",
    "lm_head": "lm_predictions.lm_head",  # lm_head.bias
}
_HF_LEGACY_HEAD = {  # DebertaV2ForMaskedLM(legacy=True)'s -> ours
    "cls.predictions.transform.dense": "lm_head.dense",
    "cls.predictions.transform.LayerNorm": "lm_head.norm",
    "cls.predictions": "lm_head",
}
# Tied copies (the word embedding, the head's bias) and index buffers: nothing of ours.
_HF_IGNORED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
               "embeddings.position_ids")
BACKBONE_PREFIX = "deberta."
_VOCAB_ROWS = ("embeddings.word.weight", "lm_head.bias")
COMPONENTS = ("mlm", "backbone")  # DebertaV2ForMaskedLM, DebertaV2Model


class DroppedOnExportWarning(UserWarning):
    """Weights of ours that the Hugging Face model has no place for were left out of an export."""


def unexported_keys(cfg: DebertaConfig) -> list[str]:
    """Our state-dict keys that Hugging Face's DebertaV2 has no counterpart for.

    The EMD's absolute position table: Hugging Face builds no position table when
    position_biased_input is false, and has no enhanced mask decoder to use it.
    """
    if cfg.absolute_positions and not cfg.position_biased_input:
        return ["embeddings.position.weight"]
    return []


def hf_config(cfg: DebertaConfig, component: str = "mlm"):
    """The transformers.DebertaV2Config describing the same model (vocabulary padding trimmed)."""
    import transformers

    _check_component(component)
    return transformers.DebertaV2Config(
        **hf_encoder_kwargs(cfg),
        relative_attention=cfg.relative_attention,
        max_relative_positions=cfg.max_relative_positions,
        position_buckets=cfg.position_buckets,
        pos_att_type=list(cfg.pos_att_type),
        norm_rel_ebd=cfg.norm_rel_ebd if cfg.relative_attention else "none",  # HF builds it anyway
        share_att_key=cfg.share_att_key,
        position_biased_input=cfg.position_biased_input,
        pad_token_id=cfg.pad_token_id,
        legacy=False,
        architectures=["DebertaV2ForMaskedLM" if component == "mlm" else "DebertaV2Model"],
    )


def _check_component(component: str) -> None:
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {', '.join(COMPONENTS)}, got {component!r}")


def _to_hf_key(key: str) -> str:
    module, param = key.rsplit(".", 1)
    if module.startswith("encoder.layers."):
        _, _, index, rest = module.split(".", 3)
        return f"{BACKBONE_PREFIX}encoder.layer.{index}.{_HF_LAYER[rest]}.{param}"
    if module in _HF_HEAD:
        return f"{_HF_HEAD[module]}.{param}"
    return f"{BACKBONE_PREFIX}{_HF_TOP[module]}.{param}"


def _from_hf_key(key: str) -> str:
    """A DebertaV2ForMaskedLM key, or a DebertaV2Model one (no "deberta." prefix), -> ours."""
    module, param = key.rsplit(".", 1)
    head = {hf: ours for ours, hf in _HF_HEAD.items()} | _HF_LEGACY_HEAD
    if module in head:
        return f"{head[module]}.{param}"
    module = module.removeprefix(BACKBONE_PREFIX)
    if module.startswith("encoder.layer."):
        _, _, index, rest = module.split(".", 3)
        ours = {hf: our for our, hf in _HF_LAYER.items()}[rest]
        return f"encoder.layers.{index}.{ours}.{param}"
    ours = {hf: our for our, hf in _HF_TOP.items()}[module]
    return f"{ours}.{param}"


def to_hf_state_dict(
    our_sd: dict[str, torch.Tensor], cfg: DebertaConfig, component: str = "mlm"
) -> dict[str, torch.Tensor]:
    """A full (TP-merged) state dict of ours -> DebertaV2ForMaskedLM's ("mlm", legacy=False head)
    or DebertaV2Model's ("backbone": no head, no "deberta." prefix), vocabulary padding trimmed.

    Keys with no Hugging Face counterpart (`unexported_keys`: the EMD's position table) are left
    out with a DroppedOnExportWarning: the exported model predicts from the encoder output without
    the enhanced mask decoder, so its MLM logits differ from ours.
    """
    _check_component(component)
    our_sd = drop_for_export(our_sd, "DebertaV2ForMaskedLM")
    dropped = [key for key in our_sd if key in unexported_keys(cfg)]
    if dropped:
        warnings.warn(
            f"Hugging Face DebertaV2 has no enhanced mask decoder: dropped {', '.join(dropped)}; "
            "the exported model's MLM logits skip the EMD passes",
            DroppedOnExportWarning,
            stacklevel=2,
        )
    hf_sd = {}
    for key, value in our_sd.items():
        if key in dropped or (component == "backbone" and key.startswith("lm_head.")):
            continue
        try:
            hf_key = _to_hf_key(key)
        except KeyError:
            raise KeyError(f"to_hf_state_dict: no Hugging Face name for {key!r}") from None
        if key in _VOCAB_ROWS:
            value = value[: cfg.vocab_size].clone()  # drop the vocabulary padding
        if component == "backbone":
            hf_key = hf_key.removeprefix(BACKBONE_PREFIX)
        hf_sd[hf_key] = value
    return hf_sd


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], cfg: DebertaConfig) -> dict[str, torch.Tensor]:
    """DebertaV2ForMaskedLM's (either head layout) or DebertaV2Model's state dict -> ours (full,
    vocabulary re-padded with zeros).

    What Hugging Face does not hold is absent from the result: the head for a DebertaV2Model, the
    EMD's position table unless the checkpoint carries one (microsoft's releases do). Load such a
    result with strict=False over a freshly initialised model.
    """
    our_sd = {}
    for key, value in hf_sd.items():
        bare = key.removeprefix(BACKBONE_PREFIX)
        if key in _HF_IGNORED or bare in _HF_IGNORED:
            continue
        try:
            our_key = _from_hf_key(key)
        except (KeyError, ValueError):
            raise KeyError(f"from_hf_state_dict: unexpected Hugging Face key {key!r}") from None
        if our_key == "embeddings.position.weight" and not cfg.absolute_positions:
            continue  # Hugging Face also ignores a position table its config does not use
        if our_key in _VOCAB_ROWS:
            value = repad_vocab_rows(key, value, cfg)
        our_sd[our_key] = value
    return our_sd


# ----------------------------------------------------------------------- adapter (models/README.md)
def backbone(config: DebertaConfig, layers: ParallelLayers) -> DebertaModel:
    """The encoder without head; no EMD, so no position table unless the input is position-biased."""
    return DebertaModel(config, layers)


def without_emd(config: DebertaConfig) -> DebertaConfig:
    return dataclasses.replace(config, enhanced_mask_decoder=False)


def backbone_of(config: DebertaConfig, sd: dict) -> tuple[DebertaConfig, dict]:
    """A pretraining model (config, full state dict) -> (classifier backbone config, its state dict)."""
    keep = without_pretraining_heads(sd)
    if not config.position_biased_input:
        keep.pop("embeddings.position.weight", None)  # the EMD's table: no EMD in a classifier
    return dataclasses.replace(without_emd(config), next_sentence_head=False), keep


def fields_from_hf(hf) -> dict:
    """A transformers DebertaV2Config -> DebertaConfig fields (HF has no EMD: none here)."""
    pos_att = hf.pos_att_type or []
    if isinstance(pos_att, str):  # older configs: "p2c|c2p"
        pos_att = [p.strip() for p in pos_att.lower().split("|") if p.strip()]
    return dict(encoder_fields_from_hf(hf), relative_attention=bool(hf.relative_attention),
                pos_att_type=list(pos_att), position_buckets=getattr(hf, "position_buckets", -1),
                max_relative_positions=getattr(hf, "max_relative_positions", -1),
                norm_rel_ebd="layer_norm" if "layer_norm" in str(getattr(hf, "norm_rel_ebd", "none")) else "none",
                share_att_key=bool(getattr(hf, "share_att_key", False)),
                position_biased_input=bool(getattr(hf, "position_biased_input", True)),
                enhanced_mask_decoder=False)


def backbone_hf_config(cfg: DebertaConfig):
    return hf_config(cfg, "backbone")


def backbone_to_hf(sd: dict[str, torch.Tensor], cfg: DebertaConfig) -> dict[str, torch.Tensor]:
    """A backbone's state dict -> DebertaV2Model's keys under "deberta." (padding trimmed)."""
    return {BACKBONE_PREFIX + k: v for k, v in to_hf_state_dict(sd, cfg, component="backbone").items()}


def classifier_hf_config(hf, dropout: float) -> None:
    hf.pooler_hidden_size, hf.pooler_dropout, hf.pooler_hidden_act = hf.hidden_size, 0.0, "gelu"
    hf.cls_dropout = dropout


def max_input_length(cfg: DebertaConfig) -> int | None:
    """Rows of the absolute position table the input reads; None: relative positions only."""
    return cfg.max_position_embeddings if cfg.position_biased_input else None


def verify_pairs(model, out, ids, mask, component=None, extras=None) -> dict:
    """What an export must reproduce: DebertaV2ForMaskedLM's logits; with an EMD (which HF lacks)
    the encoder's last hidden states."""
    if model.config.enhanced_mask_decoder:
        return {"hidden states": (model.encode(ids, mask), out.hidden_states[-1])}
    return {"MLM logits": (model.logits(ids, mask), out.logits)}
