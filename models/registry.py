"""Models by (name, size): config class, builder, sizes and the Hugging Face key maps.

Adding an architecture (deberta, electra) is one more `ModelSpec` in `MODELS`; callers only use
`build_config`, `build_model` and `get_spec(name)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from data.errors import UserError
from models import roberta
from models.config import RobertaConfig, pad_vocab_size
from models.parallel import ParallelLayers


@dataclass(frozen=True)
class ModelSpec:
    """Everything the trainer and the checkpoint converter need to know about one architecture."""

    config_class: type
    """Dataclass of the architecture's hyperparameters."""

    builder: Callable[[Any, ParallelLayers], nn.Module]
    """(config, layers) -> the pretraining model."""

    sizes: dict[str, dict[str, Any]]
    """Size name -> config fields (everything but the vocabulary and sequence length)."""

    hf_config: Callable[[Any], Any]
    """config -> the transformers config of the exported model."""

    to_hf_state_dict: Callable[[dict, Any], dict]
    """(full state dict, config) -> Hugging Face state dict."""

    from_hf_state_dict: Callable[[dict, Any], dict]
    """(Hugging Face state dict, config) -> full state dict of ours."""


def _layout(layers: int, hidden: int, heads: int, ffn: int) -> dict[str, int]:
    return {"num_layers": layers, "hidden_size": hidden, "num_heads": heads, "intermediate_size": ffn}


ROBERTA_SIZES = {
    "debug": _layout(2, 64, 4, 128),  # unit tests and CPU smoke runs
    "xsmall": _layout(12, 384, 6, 1536),  # DeBERTa-v3-xsmall's shape, 4x FFN
    "small": _layout(6, 768, 12, 3072),  # base width, half the depth (DeBERTa-v3-small)
    "base": _layout(12, 768, 12, 3072),  # RoBERTa-base
    "large": _layout(24, 1024, 16, 4096),  # RoBERTa-large
}

MODELS: dict[str, ModelSpec] = {
    "roberta": ModelSpec(
        config_class=RobertaConfig,
        builder=roberta.RobertaForMaskedLM,
        sizes=ROBERTA_SIZES,
        hf_config=roberta.hf_config,
        to_hf_state_dict=roberta.to_hf_state_dict,
        from_hf_state_dict=roberta.from_hf_state_dict,
    ),
}
MODEL_SIZES: dict[str, dict[str, dict[str, Any]]] = {name: spec.sizes for name, spec in MODELS.items()}

# Set by build_config from the tokenizer and TP size, never by an override.
_DERIVED_FIELDS = ("vocab_size", "padded_vocab_size", "max_position_embeddings")


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise UserError(f"model.name {name!r} is unknown; use one of: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def build_config(
    name: str,
    size: str,
    vocab_size: int,
    seq_length: int,
    tp_size: int = 1,
    vocab_pad_multiple: int = 128,
    **overrides: Any,
):
    """The config of model `name` at `size` for a tokenizer of `vocab_size` and inputs of seq_length.

    The vocabulary is padded to a multiple of vocab_pad_multiple * tp_size; positions hold
    seq_length tokens after the pad offset (HF layout). `overrides` set any other config field.
    """
    spec = get_spec(name)
    if size not in spec.sizes:
        raise UserError(
            f"model.size {size!r} is unknown for {name}; use one of: {', '.join(spec.sizes)}"
        )
    settable = [f.name for f in dataclasses.fields(spec.config_class) if f.name not in _DERIVED_FIELDS]
    unknown = sorted(set(overrides) - set(settable))
    if unknown:
        raise UserError(
            f"model override {unknown[0]!r} is not a {name} config field; valid: {', '.join(settable)}"
        )
    if seq_length < 1:
        raise UserError(f"data.seq_length must be >= 1, got {seq_length}")
    fields = dict(spec.sizes[size])
    fields.update(overrides)
    pad_token_id = fields.get("pad_token_id", 1)
    return spec.config_class(
        vocab_size=vocab_size,
        padded_vocab_size=pad_vocab_size(vocab_size, vocab_pad_multiple, tp_size),
        max_position_embeddings=seq_length + pad_token_id + 1,
        **fields,
    )


def build_model(config, layers: ParallelLayers | None = None) -> nn.Module:
    """The pretraining model for `config` (its architecture found by config class)."""
    for spec in MODELS.values():
        if type(config) is spec.config_class:
            return spec.builder(config, layers or ParallelLayers(1))
    raise TypeError(f"no registered model takes a {type(config).__name__}")
