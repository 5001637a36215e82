"""Models by (name, size): config class, builder, sizes and the adapter to the outside world.

Every architecture is one `ModelSpec` in `MODELS`; its encoder tower, as fine-tuning and Hugging
Face see it, is one `FamilySpec` in `FAMILIES` (an RTD backbone also needs its towers in
`RTD_TOWERS`). Callers use `build_config`, `build_model`, `get_spec(name)`, `get_family(name)`,
`batch_keys(name)` and `hf_candidates(model_type)`, never an architecture's name: models/README.md
lists what an adapter provides and the steps to add one.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from data.errors import UserError
from models import deberta, deberta_hf, deberta_v3, electra, roberta, rtd
from models.config import DebertaConfig, ElectraConfig, RobertaConfig, RTDConfig, pad_vocab_size
from models.layers import encoder_fields_from_hf
from models.parallel import ParallelLayers
from models.rtd import ReplacedTokenDetection


def _roberta_positions(seq_length: int, pad_token_id: int) -> int:
    """HF RoBERTa layout: positions start after pad_token_id, which is itself a row."""
    return seq_length + pad_token_id + 1


def _deberta_positions(seq_length: int, pad_token_id: int) -> int:
    """Positions 0..T-1; at least 512 rows, as every released DeBERTa (and HF's default)."""
    return max(seq_length, 512)


MLM_BATCH_KEYS = ("input_ids", "attention_mask", "labels", "next_sentence_label")
RTD_BATCH_KEYS = ("input_ids", "attention_mask", "labels", "sample_index")


@dataclass(frozen=True)
class FamilySpec:
    """One encoder tower as a classifier's backbone, and as Hugging Face names it."""

    config_class: type
    """Dataclass of the tower's hyperparameters."""

    backbone: Callable[[Any, ParallelLayers], nn.Module]
    """(config, layers) -> the encoder without pretraining heads: `encode(ids, mask)`, `embeddings.norm`."""

    hf_model_type: str
    """`model_type` of the transformers config (config.json) this tower reads and writes."""

    fields_from_hf: Callable[[Any], dict]
    """transformers config -> our config's fields (the inverse of hf_config)."""

    hf_config: Callable[[Any], Any]
    """config -> the transformers config of the bare backbone."""

    backbone_to_hf: Callable[[dict, Any], dict]
    """(backbone state dict, config) -> Hugging Face keys (under hf_prefix), vocabulary padding trimmed."""

    backbone_from_hf: Callable[[dict, Any], dict]
    """(Hugging Face state dict, keys under hf_prefix, config) -> ours, vocabulary re-padded."""

    hf_prefix: str
    """The backbone's key prefix in Hugging Face's task models ("roberta.")."""

    hf_head_prefixes: tuple[str, ...]
    """Hugging Face keys outside the bare backbone that a checkpoint may carry (dropped on import)."""

    classifier_head: str
    """The sequence classifier's head: "pooler" (DeBERTa's ContextPooler) or the activation ("tanh",
    "gelu") of RoBERTa's / ELECTRA's dense head."""

    classifier_hf_class: str
    """transformers class of the exported classifier."""

    classifier_hf_names: dict[str, str]
    """Our classifier head's modules -> Hugging Face's."""

    classifier_hf_config: Callable[[Any, float], None]
    """(transformers config, classifier dropout) -> sets the classifier's fields on it."""

    pair_separators: int
    """Separator tokens between a pair's two texts (2: RoBERTa's </s></s>)."""

    position_rows: Callable[[Any], int]
    """config -> the longest input its absolute position table holds."""

    max_input_length: Callable[[Any], int | None]
    """config -> the longest input it takes (None: relative positions only, no limit)."""


@dataclass(frozen=True)
class RTDImport:
    """How a Hugging Face discriminator directory becomes a two-tower RTD model."""

    discriminator: Callable[[dict], tuple[dict, dict, bool]]
    """HF state dict -> (the discriminator tower's HF state dict, extras for from_hf_state_dict such
    as {"rtd_head": ...}, whether an MLM head was left out); ValueError for the wrong kind of tower."""

    fresh_generator: Callable[[dict], dict]
    """discriminator fields -> the fields of the generator built when none is given."""

    config: Callable[[dict, dict, Any], Any]
    """(generator fields, discriminator fields, embedding sharing or None for the default) -> config."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything the trainer and the checkpoint converter need to know about one architecture:
    models/README.md lists the fields an adapter provides."""

    config_class: type
    """Dataclass of the architecture's hyperparameters."""

    builder: Callable[..., nn.Module]
    """(config, layers) -> the pretraining model (RTD: also sampling_seed=)."""

    sizes: dict[str, dict[str, Any]]
    """Size name -> config fields (everything but the vocabulary and sequence length)."""

    family: str
    """The FAMILIES entry of its (discriminator) tower: what fine-tuning and Hugging Face see."""

    hf_config: Callable[..., Any]
    """(config[, component]) -> the transformers config of the exported model."""

    to_hf_state_dict: Callable[..., dict]
    """(full state dict, config[, component]) -> Hugging Face state dict."""

    from_hf_state_dict: Callable[[dict, Any], dict]
    """(Hugging Face state dict, or {tower: state dict} for RTD models, config) -> full state dict of ours."""

    backbone_of: Callable[[Any, dict], tuple[Any, dict]]
    """(config, full state dict) -> (tower config, backbone state dict) a classifier starts from."""

    verify_pairs: Callable[..., dict]
    """(our model, HF outputs (hidden states on), ids, mask, component, extras) -> {what: (ours, theirs)}
    that an export must reproduce."""

    title: str = ""
    """How the papers write its name (model cards: "DeBERTaV3")."""

    components: tuple[str, ...] = ("model",)
    """Towers an export picks from (the first is the default); ("model",): one tower, no choice."""

    batch_keys: tuple[str, ...] = MLM_BATCH_KEYS
    """Batch keys the pretraining model's forward takes; "sample_index" also means the builder takes
    sampling_seed= (per-sample random draws keyed by (seed, global sample index))."""

    max_position_embeddings: Callable[[int, int], int] = _roberta_positions
    """(seq_length, pad_token_id) -> rows of the absolute position table build_config sets."""

    config_builder: Callable[..., Any] | None = None
    """For nested configs (RTD: a generator and a discriminator tower): (size fields, overrides,
    vocab_size=, padded_vocab_size=, seq_length=) -> config, checking the overrides itself.
    None: config_class is one flat dataclass and build_config fills it."""

    hf_extra_files: dict[str, str] = dataclasses.field(default_factory=dict)
    """Files an export writes beside the HF model (file name -> what it is); import reads them."""

    hf_extras: Callable[[dict, Any, str], dict[str, dict]] = lambda sd, config, component: {}
    """(full state dict, config, component) -> {file name: tensors} of hf_extra_files to write."""

    hf_recognises: Callable[[set, set], bool] | None = None
    """(HF state-dict keys, file names) -> whether a directory of the family's model_type is this
    architecture; None: the family's default (taken when no other claims it)."""

    rtd_import: RTDImport | None = None
    """Two-tower models: how a HF discriminator becomes one; None: one tower, imported as it is."""


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


def build_rtd(config: RTDConfig, layers: ParallelLayers, sampling_seed: int = 0) -> ReplacedTokenDetection:
    """The RTD model of `config` (generator drawn first, then the discriminator, from the torch RNG);
    sampling_seed keys the generator's samples (the run's seed)."""
    make_generator, make_discriminator = RTD_TOWERS[config.backbone]
    generator = make_generator(config.generator, layers)
    discriminator = make_discriminator(config.discriminator, layers)
    return ReplacedTokenDetection(generator, discriminator, config, sampling_seed=sampling_seed)


def _classifier_names(*pairs: str) -> dict[str, str]:
    return dict(zip(pairs[::2], pairs[1::2]))


# duplicates: one record per tower family, field by field (a table, as MODELS).
FAMILIES: dict[str, FamilySpec] = {
    "roberta": FamilySpec(
        config_class=RobertaConfig, backbone=roberta.backbone, hf_model_type="roberta",
        fields_from_hf=encoder_fields_from_hf, hf_config=roberta.hf_config,
        backbone_to_hf=roberta.backbone_to_hf, backbone_from_hf=roberta.from_hf_state_dict,
        hf_prefix="roberta.", hf_head_prefixes=("lm_head.", "classifier."),
        classifier_head="tanh", classifier_hf_class="RobertaForSequenceClassification",
        classifier_hf_names=_classifier_names("head.dense", "classifier.dense", "head.out_proj", "classifier.out_proj"),
        classifier_hf_config=roberta.classifier_hf_config, pair_separators=2,
        position_rows=lambda cfg: cfg.max_seq_length, max_input_length=lambda cfg: cfg.max_seq_length,
    ),
    "deberta": FamilySpec(
        config_class=DebertaConfig, backbone=deberta_hf.backbone, hf_model_type="deberta-v2",
        fields_from_hf=deberta_hf.fields_from_hf, hf_config=deberta_hf.backbone_hf_config,
        backbone_to_hf=deberta_hf.backbone_to_hf, backbone_from_hf=deberta_hf.from_hf_state_dict,
        hf_prefix="deberta.", hf_head_prefixes=("lm_predictions.", "cls.", "mask_predictions.", "pooler.",
                                                "classifier."),
        classifier_head="pooler", classifier_hf_class="DebertaV2ForSequenceClassification",
        classifier_hf_names=_classifier_names("head.pooler", "pooler.dense", "head.classifier", "classifier"),
        classifier_hf_config=deberta_hf.classifier_hf_config, pair_separators=1,
        position_rows=lambda cfg: cfg.max_position_embeddings, max_input_length=deberta_hf.max_input_length,
    ),
    "electra": FamilySpec(
        config_class=ElectraConfig, backbone=electra.ElectraBackbone, hf_model_type="electra",
        fields_from_hf=electra.fields_from_hf, hf_config=electra.backbone_hf_config,
        backbone_to_hf=electra.backbone_to_hf, backbone_from_hf=electra.backbone_from_hf,
        hf_prefix="electra.", hf_head_prefixes=("generator_predictions.", "generator_lm_head.",
                                                "discriminator_predictions.", "classifier."),
        classifier_head="gelu", classifier_hf_class="ElectraForSequenceClassification",
        classifier_hf_names=_classifier_names("head.dense", "classifier.dense", "head.out_proj", "classifier.out_proj"),
        classifier_hf_config=electra.classifier_hf_config, pair_separators=1,
        position_rows=lambda cfg: cfg.max_position_embeddings,
        max_input_length=lambda cfg: cfg.max_position_embeddings,
    ),
}


# duplicates: the entries share their shape (one record per architecture, field by field): a table, not logic.
MODELS: dict[str, ModelSpec] = {
    "roberta": ModelSpec(
        title="RoBERTa",
        config_class=RobertaConfig,
        builder=roberta.RobertaForMaskedLM,
        sizes=ROBERTA_SIZES,
        family="roberta",
        hf_config=roberta.hf_config,
        to_hf_state_dict=roberta.to_hf_state_dict,
        from_hf_state_dict=roberta.from_hf_state_dict,
        backbone_of=roberta.backbone_of,
        verify_pairs=roberta.verify_pairs,
    ),
    "deberta": ModelSpec(
        title="DeBERTa",
        config_class=DebertaConfig,
        builder=deberta.DebertaForMaskedLM,
        sizes=DEBERTA_SIZES,
        family="deberta",
        hf_config=deberta_hf.hf_config,
        to_hf_state_dict=deberta_hf.to_hf_state_dict,
        from_hf_state_dict=deberta_hf.from_hf_state_dict,
        backbone_of=deberta_hf.backbone_of,
        verify_pairs=deberta_hf.verify_pairs,
        max_position_embeddings=_deberta_positions,
    ),
    "electra": ModelSpec(  # the HF functions export one tower (component=, the discriminator by default)
        title="ELECTRA",
        config_class=RTDConfig,
        builder=build_rtd,
        sizes=ELECTRA_SIZES,
        family="electra",
        hf_config=electra.hf_config,
        to_hf_state_dict=electra.to_hf_state_dict,
        from_hf_state_dict=electra.from_hf_state_dict,  # takes {"generator": ..., "discriminator": ...}
        backbone_of=electra.backbone_of,
        verify_pairs=electra.verify_pairs,
        components=("discriminator", "generator"),
        batch_keys=RTD_BATCH_KEYS,
        config_builder=rtd.build_rtd_config,
        rtd_import=RTDImport(electra.hf_discriminator, electra.fresh_generator, electra.imported_config),
    ),
    # RTDConfig as electra: build_model's first RTDConfig match is electra's, and build_rtd picks
    # the towers by config.backbone ("deberta" here), so one builder serves both.
    "deberta_v3": ModelSpec(  # HF: one tower by component=; the RTD head via deberta_v3_rtd_head_state_dict
        title="DeBERTaV3",
        config_class=RTDConfig,
        builder=build_rtd,
        sizes=DEBERTA_V3_SIZES,
        family="deberta",
        hf_config=deberta_v3.deberta_v3_hf_config,
        to_hf_state_dict=deberta_v3.deberta_v3_to_hf_state_dict,
        from_hf_state_dict=deberta_v3.deberta_v3_from_hf_state_dict,  # generator, discriminator, rtd_head
        backbone_of=deberta_v3.backbone_of,
        verify_pairs=deberta_v3.verify_pairs,
        components=("discriminator", "generator"),
        batch_keys=RTD_BATCH_KEYS,
        config_builder=functools.partial(rtd.build_rtd_config, backbone="deberta"),
        hf_extra_files=deberta_v3.HF_EXTRA_FILES,
        hf_extras=deberta_v3.hf_extras,
        hf_recognises=deberta_v3.hf_recognises,
        rtd_import=RTDImport(deberta_v3.hf_discriminator, deberta_v3.fresh_generator, deberta_v3.imported_config),
    ),
}
MODEL_SIZES: dict[str, dict[str, dict[str, Any]]] = {name: spec.sizes for name, spec in MODELS.items()}

# Set by build_config from the tokenizer and TP size, never by an override.
_DERIVED_FIELDS = ("vocab_size", "padded_vocab_size", "max_position_embeddings")


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise UserError(f"model.name {name!r} is unknown; use one of: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def get_family(family: str) -> FamilySpec:
    if family not in FAMILIES:
        raise UserError(f"model family {family!r} is unknown; use one of: {', '.join(FAMILIES)}")
    return FAMILIES[family]


def family_of_hf(model_type: str | None) -> str:
    """The FAMILIES name of a transformers `model_type`; UserError for one no family reads."""
    for name, family in FAMILIES.items():
        if family.hf_model_type == model_type:
            return name
    raise UserError(f"Hugging Face model type {model_type!r} is not supported; use one of "
                    f"{', '.join(f.hf_model_type for f in FAMILIES.values())}")


def hf_candidates(family: str) -> list[str]:
    """The architectures whose tower is `family`, those that recognise their directories first."""
    names = [name for name, spec in MODELS.items() if spec.family == family]
    return sorted(names, key=lambda name: MODELS[name].hf_recognises is None)


def batch_keys(name: str) -> tuple[str, ...]:
    """The batch keys the pretraining model `name` takes (RTD models: sample_index too)."""
    return get_spec(name).batch_keys


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


def build_model(config, layers: ParallelLayers | None = None, sampling_seed: int = 0) -> nn.Module:
    """The pretraining model for `config` (its architecture found by config class); sampling_seed
    keys the per-sample random draws of models that take sample_index (RTD: the run's seed)."""
    for spec in MODELS.values():
        if type(config) is spec.config_class:
            seeded = {"sampling_seed": sampling_seed} if "sample_index" in spec.batch_keys else {}
            return spec.builder(config, layers or ParallelLayers(1), **seeded)
    raise TypeError(f"no registered model takes a {type(config).__name__}")
