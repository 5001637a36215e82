"""Models by (name, size): config class, builder, sizes and the Hugging Face key maps.

Adding an architecture (deberta, electra) is one more `ModelSpec` in `MODELS` (an RTD backbone
also needs its towers in `RTD_TOWERS`); callers only use `build_config`, `build_model` and
`get_spec(name)`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from data.errors import UserError
from models import deberta, deberta_v3, electra, roberta, rtd
from models.config import DebertaConfig, RobertaConfig, RTDConfig, pad_vocab_size
from models.parallel import ParallelLayers
from models.rtd import ReplacedTokenDetection


def _roberta_positions(seq_length: int, pad_token_id: int) -> int:
    """HF RoBERTa layout: positions start after pad_token_id, which is itself a row."""
    return seq_length + pad_token_id + 1


def _deberta_positions(seq_length: int, pad_token_id: int) -> int:
    """Positions 0..T-1; at least 512 rows, as every released DeBERTa (and HF's default)."""
    return max(seq_length, 512)


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

    max_position_embeddings: Callable[[int, int], int] = _roberta_positions
    """(seq_length, pad_token_id) -> rows of the absolute position table build_config sets."""

    config_builder: Callable[..., Any] | None = None
    """For nested configs (RTD: a generator and a discriminator tower): (size fields, overrides,
    vocab_size=, padded_vocab_size=, seq_length=) -> config, checking the overrides itself.
    None: config_class is one flat dataclass and build_config fills it."""


def _layout(layers: int, hidden: int, heads: int, ffn: int) -> dict[str, int]:
    return {"num_layers": layers, "hidden_size": hidden, "num_heads": heads, "intermediate_size": ffn}


ROBERTA_SIZES = {
    "debug": _layout(2, 64, 4, 128),  # unit tests and CPU smoke runs
    "xsmall": _layout(12, 384, 6, 1536),  # DeBERTa-v3-xsmall's shape, 4x FFN
    "small": _layout(6, 768, 12, 3072),  # base width, half the depth (DeBERTa-v3-small)
    "base": _layout(12, 768, 12, 3072),  # RoBERTa-base
    "large": _layout(24, 1024, 16, 4096),  # RoBERTa-large
}

# DeBERTaV3 shapes (He et al., 2021); the DeBERTaV3 attention defaults (256 log buckets over 512
# distances, shared keys, normalised relative table, no absolute input positions, EMD) are
# DebertaConfig's defaults.
DEBERTA_SIZES = {
    "debug": _layout(2, 64, 4, 128),  # unit tests and CPU smoke runs
    "xsmall": _layout(12, 384, 6, 1536),  # DeBERTa-v3-xsmall
    "small": _layout(6, 768, 12, 3072),  # DeBERTa-v3-small
    "base": _layout(12, 768, 12, 3072),  # DeBERTa-v3-base
    "large": _layout(24, 1024, 16, 4096),  # DeBERTa-v3-large
}

# ELECTRA (Clark et al., 2020, Table 6): generator and discriminator towers. The generator keeps
# the depth and the embedding width and scales hidden size, heads and FFN by the paper's
# "generator size" (1/4 small, 1/3 base, 1/4 large) so it shares the discriminator's tables.
ELECTRA_SIZES = {
    "debug": {  # unit tests and CPU smoke runs; E != H on both towers exercises the projection
        "discriminator": {**_layout(2, 64, 4, 128), "embedding_size": 32},
        "generator": {**_layout(2, 32, 2, 64), "embedding_size": 32},
    },
    "small": {  # ELECTRA-Small: 14M parameters
        "discriminator": {**_layout(12, 256, 4, 1024), "embedding_size": 128},
        "generator": {**_layout(12, 64, 1, 256), "embedding_size": 128},
    },
    "base": {  # ELECTRA-Base: 110M parameters
        "discriminator": {**_layout(12, 768, 12, 3072), "embedding_size": 768},
        "generator": {**_layout(12, 256, 4, 1024), "embedding_size": 768},
    },
    "large": {  # ELECTRA-Large: 335M parameters
        "discriminator": {**_layout(24, 1024, 16, 4096), "embedding_size": 1024},
        "generator": {**_layout(24, 256, 4, 1024), "embedding_size": 1024},
    },
}

# DeBERTaV3 (He et al., 2021, arXiv 2111.09543; microsoft/DeBERTa's rtd configs): the
# discriminator has the DeBERTa-v3 shape, the generator the same width at half the depth, so they
# share the word table. Attention defaults (256 log buckets over 512 distances, shared keys,
# normalised relative table, c2p + p2c, no absolute input positions) are DebertaConfig's; the
# generator keeps its EMD, the discriminator has none (rtd.RTD_DEFAULTS, also GDES).
DEBERTA_V3_SIZES = {
    "debug": {  # unit tests and CPU smoke runs
        "discriminator": _layout(2, 64, 4, 128),
        "generator": _layout(1, 64, 4, 128),
    },
    "xsmall": {"discriminator": _layout(12, 384, 6, 1536), "generator": _layout(6, 384, 6, 1536)},
    "small": {"discriminator": _layout(6, 768, 12, 3072), "generator": _layout(3, 768, 12, 3072)},
    "base": {"discriminator": _layout(12, 768, 12, 3072), "generator": _layout(6, 768, 12, 3072)},
    "large": {"discriminator": _layout(24, 1024, 16, 4096), "generator": _layout(12, 1024, 16, 4096)},
}

# RTDConfig.backbone -> (generator, discriminator) builders.
RTD_TOWERS = {
    "electra": (electra.ElectraGenerator, electra.ElectraDiscriminator),
    "deberta": (deberta.DebertaForMaskedLM, deberta_v3.deberta_v3_discriminator),  # DeBERTaV3
}


def build_rtd(config: RTDConfig, layers: ParallelLayers) -> ReplacedTokenDetection:
    """The RTD model of `config` (generator drawn first, then the discriminator, from the torch RNG)."""
    make_generator, make_discriminator = RTD_TOWERS[config.backbone]
    generator = make_generator(config.generator, layers)
    discriminator = make_discriminator(config.discriminator, layers)
    return ReplacedTokenDetection(generator, discriminator, config)


MODELS: dict[str, ModelSpec] = {
    "roberta": ModelSpec(
        config_class=RobertaConfig,
        builder=roberta.RobertaForMaskedLM,
        sizes=ROBERTA_SIZES,
        hf_config=roberta.hf_config,
        to_hf_state_dict=roberta.to_hf_state_dict,
        from_hf_state_dict=roberta.from_hf_state_dict,
    ),
    "deberta": ModelSpec(
        config_class=DebertaConfig,
        builder=deberta.DebertaForMaskedLM,
        sizes=DEBERTA_SIZES,
        hf_config=deberta.hf_config,
        to_hf_state_dict=deberta.to_hf_state_dict,
        from_hf_state_dict=deberta.from_hf_state_dict,
        max_position_embeddings=_deberta_positions,
    ),
    "electra": ModelSpec(  # the HF functions export one tower (component=, the discriminator by default)
        config_class=RTDConfig,
        builder=build_rtd,
        sizes=ELECTRA_SIZES,
        hf_config=electra.hf_config,
        to_hf_state_dict=electra.to_hf_state_dict,
        from_hf_state_dict=electra.from_hf_state_dict,  # takes {"generator": ..., "discriminator": ...}
        config_builder=rtd.build_rtd_config,
    ),
    # RTDConfig as electra: build_model's first RTDConfig match is electra's, and build_rtd picks
    # the towers by config.backbone ("deberta" here), so one builder serves both.
    "deberta_v3": ModelSpec(  # HF: one tower by component=; the RTD head via deberta_v3_rtd_head_state_dict
        config_class=RTDConfig,
        builder=build_rtd,
        sizes=DEBERTA_V3_SIZES,
        hf_config=deberta_v3.deberta_v3_hf_config,
        to_hf_state_dict=deberta_v3.deberta_v3_to_hf_state_dict,
        from_hf_state_dict=deberta_v3.deberta_v3_from_hf_state_dict,  # generator, discriminator, rtd_head
        config_builder=functools.partial(rtd.build_rtd_config, backbone="deberta"),
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
    if spec.config_builder is not None:  # nested towers: the builder checks its own overrides
        padded = pad_vocab_size(vocab_size, vocab_pad_multiple, tp_size)
        return spec.config_builder(spec.sizes[size], overrides, vocab_size=vocab_size,
                                   padded_vocab_size=padded, seq_length=seq_length)
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
        max_position_embeddings=spec.max_position_embeddings(seq_length, pad_token_id),
        **fields,
    )


def build_model(config, layers: ParallelLayers | None = None) -> nn.Module:
    """The pretraining model for `config` (its architecture found by config class)."""
    for spec in MODELS.values():
        if type(config) is spec.config_class:
            return spec.builder(config, layers or ParallelLayers(1))
    raise TypeError(f"no registered model takes a {type(config).__name__}")
