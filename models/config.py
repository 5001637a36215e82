"""Configuration dataclasses of the model architectures (sizes live in models/registry.py)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from data.errors import UserError
from models.typed_config import check_fields

ACTIVATIONS = ("gelu", "gelu_new", "relu")  # Hugging Face names: erf GELU, tanh GELU, ReLU


def pad_vocab_size(vocab_size: int, multiple: int = 128, tp_size: int = 1) -> int:
    """The smallest multiple of lcm(`multiple`, `tp_size`) that is >= vocab_size.

    Padding makes the embedding/decoder matmuls GPU-friendly and lets every TP rank hold an equal
    slice of the vocabulary (VocabParallelEmbedding requires it). The extra rows never receive
    probability mass: the model masks their logits. Using the lcm rather than Megatron's
    `multiple * tp_size` keeps the padded size the same for every power-of-two TP degree up to
    `multiple`, so a checkpoint resumes under another TP degree with tables of the same shape.
    """
    if vocab_size < 1 or multiple < 1 or tp_size < 1:
        raise UserError(
            f"pad_vocab_size needs positive sizes, got vocab_size={vocab_size}, "
            f"multiple={multiple}, tp_size={tp_size}"
        )
    step = math.lcm(multiple, tp_size)
    return math.ceil(vocab_size / step) * step


def hf_encoder_kwargs(cfg) -> dict:
    """Our BERT-family config fields under Hugging Face's names (vocabulary padding trimmed)."""
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size, hidden_act=cfg.activation,
        hidden_dropout_prob=cfg.hidden_dropout, attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.initializer_range, layer_norm_eps=cfg.layer_norm_eps,
    )


def _check_encoder(cfg, more_positive: tuple) -> None:
    """The checks every BERT-family encoder config shares (sizes, vocabulary, heads, pad id,
    dropouts, epsilons, activation); `more_positive` names architecture-specific sizes that must be >= 1."""
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size") + more_positive:
        if getattr(cfg, name) < 1:
            raise UserError(f"model config: {name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.padded_vocab_size < cfg.vocab_size:
        raise UserError(
            f"model config: padded_vocab_size ({cfg.padded_vocab_size}) must be >= vocab_size "
            f"({cfg.vocab_size}); use models.config.pad_vocab_size"
        )
    if cfg.hidden_size % cfg.num_heads:
        raise UserError(
            f"model config: hidden_size ({cfg.hidden_size}) must be divisible by num_heads "
            f"({cfg.num_heads}); change one of them"
        )
    if not 0 <= cfg.pad_token_id < cfg.vocab_size:
        raise UserError(
            f"model config: pad_token_id ({cfg.pad_token_id}) must be a vocabulary id "
            f"in [0, {cfg.vocab_size})"
        )
    for name in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise UserError(f"model config: {name} must be in [0, 1), got {getattr(cfg, name)}")
    for name in ("layer_norm_eps", "initializer_range"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"model config: {name} must be > 0, got {getattr(cfg, name)}")
    if cfg.activation not in ACTIVATIONS:
        raise UserError(
            f"model config: activation {cfg.activation!r} is unknown; use one of {', '.join(ACTIVATIONS)}"
        )


def _check_nsp_weight(cfg) -> None:
    if cfg.nsp_weight < 0:
        raise UserError(f"model config: nsp_weight must be >= 0, got {cfg.nsp_weight}")


@dataclass
class EncoderConfig:
    """The fields every BERT-family encoder here shares, in this order (Hugging Face's names in
    `hf_encoder_kwargs`), checked by one `__post_init__`. An architecture's config extends it, adds its own
    fields after these, and redeclares a field (which keeps its place) to change its default or to say
    what it means there. Defaults are BERT's."""

    vocab_size: int
    """Size of the tokenizer's vocabulary: the ids that can be predicted (or sampled). Exported to Hugging Face."""

    hidden_size: int
    """Width of the residual stream (768 for base)."""

    num_layers: int
    """Number of transformer layers."""

    num_heads: int
    """Attention heads per layer; hidden_size / num_heads is the head size. TP splits the heads."""

    intermediate_size: int
    """Width of the feed-forward layer (4 * hidden_size in the paper's models)."""

    max_position_embeddings: int
    """Rows of the learned position table (its layout: the architecture's config)."""

    padded_vocab_size: int | None = None
    """Rows of the word embedding / tied decoder (>= vocab_size), padded so TP divides it; see
    `pad_vocab_size`. None means vocab_size. Rows >= vocab_size are never predicted nor sampled."""

    hidden_dropout: float = 0.1
    """Dropout on the embeddings and on each sub-layer's output before the residual add."""

    attention_dropout: float = 0.1
    """Dropout on the attention probabilities."""

    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon (1e-12 in BERT/ELECTRA)."""

    pad_token_id: int = 0
    """Id of the padding token ([PAD] = 0 in BERT's vocabulary); its row starts at zero."""

    initializer_range: float = 0.02
    """Standard deviation of the N(0, std) init of every weight matrix and embedding."""

    type_vocab_size: int = 2
    """Rows of the token-type table (BERT's two segments)."""

    activation: str = "gelu"
    """Feed-forward (and head) activation, by its Hugging Face name: one of ACTIVATIONS."""

    def __post_init__(self):
        check_fields(self, "model config")
        if self.padded_vocab_size is None:
            self.padded_vocab_size = self.vocab_size

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class RobertaConfig(EncoderConfig):
    """RoBERTa encoder with a masked-language-model head (Liu et al., 2019)."""

    max_position_embeddings: int
    """Rows of the learned position table. HF RoBERTa layout: seq_length + 2, because positions
    start at pad_token_id + 1 (= 2) and pad tokens use row pad_token_id."""

    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon (1e-5 in fairseq/HF RoBERTa)."""

    pad_token_id: int = 1
    """Id of the padding token (1 in the RoBERTa vocabulary); also the position-id offset."""

    type_vocab_size: int = 1
    """Rows of the token-type table. RoBERTa uses no segments: one row, always id 0; kept so the
    weights map one to one onto Hugging Face's RobertaModel."""

    next_sentence_head: bool = False
    """BERT's next-sentence-prediction head (models/nsp.py) beside the MLM head; the trainer turns it on
    for the pair formats (data.packing segment_pair / sentence_pair). Not exported to Hugging Face."""

    nsp_weight: float = 1.0
    """Weight of the NSP loss (mean over samples) beside the MLM loss (mean over predicted tokens)."""

    def __post_init__(self):
        super().__post_init__()
        _check_encoder(self, ("type_vocab_size",))
        _check_nsp_weight(self)
        if self.max_position_embeddings < self.pad_token_id + 2:
            raise UserError(
                f"model config: max_position_embeddings ({self.max_position_embeddings}) must be "
                f">= pad_token_id + 2; set it to seq_length + pad_token_id + 1"
            )

    @property
    def max_seq_length(self) -> int:
        """Longest input the position table holds (positions start after pad_token_id)."""
        return self.max_position_embeddings - self.pad_token_id - 1


POSITION_ATTENTION_TYPES = ("c2p", "p2c")  # content-to-position, position-to-content
RELATIVE_EMBEDDING_NORMS = ("layer_norm", "none")  # Hugging Face's `norm_rel_ebd` values


@dataclass
class DebertaConfig(EncoderConfig):
    """DeBERTa-v2/v3 encoder with a masked-language-model head (He et al., 2020; 2021).

    Defaults are DeBERTaV3's: log-bucketed relative positions shared by all layers and normalised,
    content projections reused for positions, no absolute positions in the input. The enhanced mask
    decoder reuses the last of the num_layers (it adds none); hidden_dropout also drops the relative
    embeddings.
    """

    max_position_embeddings: int
    """Rows of the absolute position table, positions 0..T-1 (no pad offset, unlike RoBERTa). The
    table exists only when position_biased_input or enhanced_mask_decoder needs it. 512 in every
    released DeBERTa; also the fallback of max_relative_positions = -1."""

    layer_norm_eps: float = 1e-7
    """LayerNorm epsilon (1e-7 in the released DeBERTa models)."""

    pad_token_id: int = 0
    """Id of the padding token ([PAD] = 0 in the DeBERTa SentencePiece vocabulary)."""

    type_vocab_size: int = 0
    """Rows of the token-type table; 0 (DeBERTaV3) means no token-type embedding at all."""

    relative_attention: bool = True
    """Disentangled attention over relative positions. False leaves plain content-to-content
    attention (then pos_att_type must be empty)."""

    pos_att_type: list[str] = dataclasses.field(default_factory=lambda: ["p2c", "c2p"])
    """Relative-position terms added to content-to-content attention, any subset of
    POSITION_ATTENTION_TYPES: "c2p" (content query, relative-position key) and "p2c"
    (relative-position query, content key). The scale is 1/sqrt(head_size * (1 + len))."""

    position_buckets: int = 256
    """Relative distances are mapped to this many log-scaled buckets (exact below
    position_buckets / 2, logarithmic up to max_relative_positions); -1 uses plain distances
    clipped to +-max_relative_positions. The relative table has 2 * (buckets or max) rows."""

    max_relative_positions: int = 512
    """Largest relative distance told apart; -1 means max_position_embeddings (Hugging Face)."""

    norm_rel_ebd: str = "layer_norm"
    """"layer_norm" normalises the shared relative embeddings once per forward (DeBERTaV3);
    "none" uses them raw (DeBERTa-v1/v2)."""

    share_att_key: bool = True
    """Project relative embeddings with the content query/key projections (DeBERTaV3); False adds
    separate pos_key_proj / pos_query_proj per layer (DeBERTa-v1/v2)."""

    position_biased_input: bool = False
    """Add absolute position embeddings to the input (BERT style). DeBERTa adds them only in the
    enhanced mask decoder instead."""

    enhanced_mask_decoder: bool = True
    """Enhanced Mask Decoder: before the MLM head, run the last encoder layer again emd_layers
    times with absolute positions in the query (needs position_biased_input false)."""

    emd_layers: int = 2
    """Passes of the (shared) last encoder layer in the enhanced mask decoder (2 in DeBERTa)."""

    next_sentence_head: bool = False
    """BERT's next-sentence-prediction head (models/nsp.py) beside the MLM head; the trainer turns it on
    for the pair formats (data.packing segment_pair / sentence_pair). Not exported to Hugging Face."""

    nsp_weight: float = 1.0
    """Weight of the NSP loss (mean over samples) beside the MLM loss (mean over predicted tokens)."""

    def __post_init__(self):
        super().__post_init__()
        if self.type_vocab_size < 0:
            raise UserError(f"model config: type_vocab_size must be >= 0, got {self.type_vocab_size}")
        _check_encoder(self, ("max_position_embeddings", "emd_layers"))
        _check_nsp_weight(self)
        unknown = [t for t in self.pos_att_type if t not in POSITION_ATTENTION_TYPES]
        if unknown or len(set(self.pos_att_type)) != len(self.pos_att_type):
            raise UserError(
                f"model config: pos_att_type {self.pos_att_type} must list distinct entries of "
                f"{', '.join(POSITION_ATTENTION_TYPES)} (or be [])"
            )
        if not self.relative_attention and self.pos_att_type:
            raise UserError(
                "model config: relative_attention is false but pos_att_type is "
                f"{self.pos_att_type}; set pos_att_type to [] or relative_attention to true"
            )
        if self.norm_rel_ebd not in RELATIVE_EMBEDDING_NORMS:
            raise UserError(
                f"model config: norm_rel_ebd {self.norm_rel_ebd!r} is unknown; use one of "
                f"{', '.join(RELATIVE_EMBEDDING_NORMS)}"
            )
        if self.position_buckets != -1 and self.position_buckets < 2:
            raise UserError(
                f"model config: position_buckets must be -1 (clipped distances) or >= 2, got "
                f"{self.position_buckets}"
            )
        if self.max_relative_positions != -1 and self.max_relative_positions < 1:
            raise UserError(
                f"model config: max_relative_positions must be -1 (= max_position_embeddings) or "
                f">= 1, got {self.max_relative_positions}"
            )
        if self.position_buckets > 0 and self.max_relative_distance <= self.position_buckets // 2 + 1:
            raise UserError(
                f"model config: max_relative_positions ({self.max_relative_distance}) must exceed "
                f"position_buckets / 2 + 1 ({self.position_buckets // 2 + 1}) for log buckets; "
                "raise it or lower position_buckets"
            )
        if self.enhanced_mask_decoder and self.position_biased_input:
            raise UserError(
                "model config: enhanced_mask_decoder adds absolute positions at the end and needs "
                "position_biased_input false; set one of them to false"
            )

    @property
    def max_relative_distance(self) -> int:
        """max_relative_positions with -1 resolved (to max_position_embeddings, as Hugging Face)."""
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def relative_span(self) -> int:
        """k of the paper: relative embeddings have 2k rows, for bucketed distances in [-k, k)."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative_distance

    @property
    def absolute_positions(self) -> bool:
        """Whether the model has an absolute position table (input bias or the EMD's)."""
        return self.position_biased_input or self.enhanced_mask_decoder


# RTD config fields that were removed: their old name -> what sets it now (saved configs that still hold
# one load without it; a user override naming one is refused with this).
REMOVED_RTD_FIELDS = {
    "generator_mask_token_prob": "data.mask_token_prob (the data pipeline masks the generator's input; "
                                 "the RTD recipes set it to 1.0, microsoft/DeBERTa's RTD task)",
}

EMBEDDING_SHARING = ("none", "es", "gdes", "all")  # DeBERTaV3's names (no sharing, sharing,
# gradient-disentangled) and ELECTRA's "all weights" (section 3.2)


@dataclass
class ElectraConfig(EncoderConfig):
    """One ELECTRA tower, generator or discriminator (Clark et al., 2020): a BERT encoder (post-LN,
    absolute positions 0..T-1, two token types; EncoderConfig's defaults are BERT's) over factored
    embeddings, laid out like Hugging Face's ElectraModel so the weights map one to one. `activation`
    is the feed-forward's and the discriminator head's; the generator head always uses erf GELU, as
    Hugging Face."""

    hidden_size: int
    """Width of the residual stream (256 small, 768 base, 1024 large discriminators)."""

    max_position_embeddings: int
    """Rows of the learned position table: positions 0..T-1 (BERT layout, no pad offset)."""

    embedding_size: int | None = None
    """Width of the word/position/token-type tables; None means hidden_size. When it differs,
    `embeddings_project` maps it to hidden_size: a narrow generator then shares the
    discriminator's tables (128 for ELECTRA-Small, = hidden_size for base and large)."""

    def __post_init__(self):
        super().__post_init__()
        if self.embedding_size is None:
            self.embedding_size = self.hidden_size
        _check_encoder(self, ("max_position_embeddings", "embedding_size", "type_vocab_size"))


# RTDConfig.backbone -> the config class of its towers ("deberta": DeBERTaV3).
RTD_BACKBONE_CONFIGS: dict[str, type] = {"electra": ElectraConfig, "deberta": DebertaConfig}


@dataclass
class RTDConfig:
    """Replaced token detection (ELECTRA; DeBERTaV3): a generator trained by MLM, a discriminator
    trained to tell its samples from the original tokens, and how their embeddings are shared.

    The sampling seed is not here: it is the run's seed (an attribute of the model the trainer
    sets), combined with each sample's global index (`sample_index` in the batch).
    """

    generator: Any
    """The generator's tower config (an RTD_BACKBONE_CONFIGS[backbone]; a dict is converted)."""

    discriminator: Any
    """The discriminator's tower config (same class as the generator's)."""

    backbone: str = "electra"
    """Architecture of both towers: a key of RTD_BACKBONE_CONFIGS."""

    rtd_weight: float = 50.0
    """lambda in L = L_MLM + lambda * L_RTD, with L_MLM averaged over predicted tokens and L_RTD
    over all real tokens. 50 is the ELECTRA paper's value, tuned for joint training with one
    optimizer and shared embeddings, which is what this trainer does. microsoft/DeBERTa's code
    defaults to 10 but trains generator and discriminator with separate optimizers, where a
    constant factor on the discriminator's loss mostly cancels in Adam; here lambda also weighs
    the two losses in the gradient-norm clip and, under `es`, in the shared table's gradient."""

    temperature: float = 1.0
    """Softmax temperature of the generator's samples (ELECTRA and microsoft/DeBERTa: 1.0).
    Towards 0 the generator's argmax is taken: fewer, harder replacements."""

    embedding_sharing: str = "es"
    """How the towers share word (and absolute position) embeddings: "none" (separate tables),
    "es" (one table that both losses update; the ELECTRA paper's default), "gdes" (DeBERTaV3:
    E_D = sg(E_G) + E_Delta; MLM updates E_G, RTD only E_Delta), "all" (ELECTRA section 3.2:
    the towers are one backbone, embeddings, projection and every layer, updated by both losses;
    only the generator's MLM head and the discriminator's RTD head are their own. It needs equal
    tower configs and the electra backbone; exports copy the shared backbone into both towers)."""

    def __post_init__(self):
        check_fields(self, "model config")  # generator and discriminator (Any) are checked by their class
        if self.backbone not in RTD_BACKBONE_CONFIGS:
            raise UserError(
                f"model config: backbone {self.backbone!r} is unknown; use one of "
                f"{', '.join(RTD_BACKBONE_CONFIGS)}"
            )
        tower_class = RTD_BACKBONE_CONFIGS[self.backbone]
        for name in ("generator", "discriminator"):
            value = getattr(self, name)
            if isinstance(value, dict):
                value = tower_class(**value)
                setattr(self, name, value)
            if not isinstance(value, tower_class):
                raise UserError(
                    f"model config: {name} must be a {tower_class.__name__} (or its fields), "
                    f"got {type(value).__name__}"
                )
        if self.embedding_sharing not in EMBEDDING_SHARING:
            raise UserError(
                f"model config: embedding_sharing {self.embedding_sharing!r} is unknown; use one of "
                f"{', '.join(EMBEDDING_SHARING)}"
            )
        if self.rtd_weight < 0:
            raise UserError(f"model config: rtd_weight must be >= 0, got {self.rtd_weight}")
        if self.temperature <= 0:
            raise UserError(f"model config: temperature must be > 0, got {self.temperature}")
        gen, disc = self.generator, self.discriminator
        if self.backbone == "deberta" and disc.enhanced_mask_decoder:
            # The discriminator is the bare backbone + the RTD head; the EMD decodes the MLM.
            raise UserError(
                "model config: the deberta discriminator has no MLM head, so no enhanced mask "
                "decoder; set discriminator: {enhanced_mask_decoder: false} (the generator keeps its own)"
            )
        # The generator's samples are the discriminator's input ids: one vocabulary.
        for name in ("vocab_size", "padded_vocab_size", "pad_token_id"):
            if getattr(gen, name) != getattr(disc, name):
                raise UserError(
                    f"model config: generator.{name} ({getattr(gen, name)}) must equal "
                    f"discriminator.{name} ({getattr(disc, name)})"
                )
        if self.embedding_sharing == "all":
            if self.backbone != "electra":
                raise UserError(
                    f"model config: embedding_sharing 'all' is for backbone electra, not {self.backbone!r} "
                    "(DeBERTaV3's generator has its own enhanced mask decoder); use es or gdes"
                )
            for field in dataclasses.fields(gen):  # one backbone: every field of the towers equal
                if getattr(gen, field.name) != getattr(disc, field.name):
                    raise UserError(
                        f"model config: embedding_sharing 'all' needs generator.{field.name} "
                        f"({getattr(gen, field.name)}) = discriminator.{field.name} "
                        f"({getattr(disc, field.name)}); set the generator's size to the discriminator's"
                    )
        if self.embedding_sharing != "none":
            # Shared tables need one shape (the hidden sizes may differ: ELECTRA projects).
            width = "embedding_size" if self.backbone == "electra" else "hidden_size"
            for name in (width, "max_position_embeddings"):
                if getattr(gen, name) != getattr(disc, name):
                    raise UserError(
                        f"model config: embedding_sharing {self.embedding_sharing!r} needs "
                        f"generator.{name} ({getattr(gen, name)}) = discriminator.{name} "
                        f"({getattr(disc, name)}); set embedding_sharing: none or equal sizes"
                    )
