"""ELECTRA's towers (Clark et al., 2020) and their map to Hugging Face transformers.

Each tower is a BERT encoder (post-LN, learned absolute positions 0..T-1, restarting at each
document of a packed row, token type always 0) whose embeddings have their own width E, projected
to H when E != H (Hugging Face's `embeddings_project`), so a narrow generator can share the
discriminator's tables.
`ElectraGenerator` is the backbone + the MLM head (HF ElectraForMaskedLM: dense H -> E, GELU,
LayerNorm, decoder tied to the word table); `ElectraDiscriminator` the backbone + the per-token head
(HF ElectraForPreTraining: one logit of "replaced" per token). They are the "electra" backbone of
models/rtd.py's `ReplacedTokenDetection` (paired by the registry's `build_rtd`).

Shapes: B batch, T sequence, E embedding size, H hidden, N predicted positions, V vocab_size,
Vp padded_vocab_size (Vp/tp rows on one tensor-parallel rank).

Decisions:
- Laid out like Hugging Face's classes so weights map one to one (`_HF_BACKBONE`, `_HF_HEADS`,
  `_HF_LAYER`); the generator head's GELU is the erf one whatever `activation` says, as HF's.
- The pad row and the vocabulary-padding rows of the word table start at zero, and the
  generator's padding logits are finfo.min (never predicted nor sampled), so the padding stays
  zero and checkpoints round-trip exactly: export trims to V rows, import pads with zero rows.
- `tower_hf_config`, `tower_to_hf_state_dict` and `tower_from_hf_state_dict` map one stand-alone
  tower; `hf_config`, `to_hf_state_dict` and `from_hf_state_dict` map a full RTD state dict one
  tower at a time (the discriminator by default: the one kept), the shared tables merged by
  models/rtd.py's `split_state_dict` (E_D = E_G + E_Delta under gdes) and split back by
  `join_state_dicts`. ELECTRA towers both have word and position tables, so both are shared;
  under embedding_sharing all the whole backbone is, and each exported tower gets a copy of it.

Tensor parallelism comes only through `ParallelLayers`: the word table, the decoder bias and the
generator's logits are vocab-parallel, as in roberta.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ElectraConfig, RTDConfig, hf_encoder_kwargs
from models.layers import (HF_BERT_LAYER, TransformerLayer, activation_fn, attention_bias, document_offsets,
                           encoder_fields_from_hf, masked_lm_metrics, predicted_positions, repad_vocab_rows,
                           rows_at, word_embedding)
from models.parallel import ParallelLayers
from models.rtd import RTD_DEFAULTS, SHARED_TABLES, join_state_dicts, split_state_dict


# ------------------------------------------------------------------------------ ELECTRA towers
class ElectraEmbeddings(nn.Module):
    """word + position (0..T-1) + token type (always 0), LayerNorm, dropout; width E."""

    def __init__(self, config: ElectraConfig, layers: ParallelLayers):
        super().__init__()
        std, E = config.initializer_range, config.embedding_size
        self.word = word_embedding(config, E, layers, std)  # pad and vocabulary-padding rows zero
        self.position = layers.embedding(config.max_position_embeddings, E, std)
        self.token_type = layers.embedding(config.type_vocab_size, E, std)
        self.norm = nn.LayerNorm(E, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids (and document ids: positions restart at each document) -> (B, T, E)."""
        T = input_ids.shape[1]
        if T > self.position.num_embeddings:
            raise ValueError(
                f"sequence length {T} exceeds max_position_embeddings ({self.position.num_embeddings})"
            )
        index = (torch.arange(T, device=input_ids.device) if attention_mask is None
                 else document_offsets(attention_mask))  # (T,) or (B, T)
        # Tables are called, never indexed, so a shared table's owner runs its own forward.
        positions = self.position(index)  # (T, E) or (B, T, E)
        token_type = self.token_type(input_ids.new_zeros(()))  # (E,), token-type id is always 0
        x = self.word(input_ids) + token_type + positions  # (B, T, E)
        return self.dropout(self.norm(x))


class ElectraBackbone(nn.Module):
    """HF ElectraModel: embeddings (width E) -> projection to H if E != H -> post-LN layers."""

    backbone_modules = ("embeddings", "project", "layers")
    """What embedding_sharing all shares between the towers (models/rtd.py `share_embeddings`)."""

    def __init__(self, config: ElectraConfig, layers: ParallelLayers):
        # the encoders' shared prologue (config, TP layers, init std, the TP divisibility check), as RoBERTa's
        super().__init__()
        self.config = config
        self.parallel = layers
        std = config.initializer_range
        layers.check_encoder(config)
        self.embeddings = ElectraEmbeddings(config, layers)
        self.project = (
            layers.linear(config.embedding_size, config.hidden_size, init_std=std)
            if config.embedding_size != config.hidden_size else None
        )
        self.layers = nn.ModuleList(
            TransformerLayer(
                config.hidden_size, config.num_heads, config.intermediate_size, config.activation,
                config.hidden_dropout, config.attention_dropout, config.layer_norm_eps, layers, init_std=std,
            )
            for _ in range(config.num_layers)
        )

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask (1 = token, 0 = padding; or document ids 1..k, models/layers.py)
        -> final hidden states (B, T, H)."""
        x = self.embeddings(input_ids, attention_mask)  # (B, T, E)
        if self.project is not None:
            x = self.project(x)  # (B, T, H)
        bias = attention_bias(attention_mask, x.dtype)  # (B, 1, T, T): within each document
        for layer in self.layers:
            x = layer(x, bias)
        return x


class ElectraGeneratorHead(nn.Module):
    """HF ElectraGeneratorPredictions + generator_lm_head: dense (H -> E) -> GELU -> LayerNorm ->
    decoder tied to the word embedding (+ a vocabulary bias)."""

    def __init__(self, config: ElectraConfig, layers: ParallelLayers):
        super().__init__()
        self.parallel = layers
        std = config.initializer_range
        self.dense = layers.linear(config.hidden_size, config.embedding_size, init_std=std)
        self.norm = nn.LayerNorm(config.embedding_size, eps=config.layer_norm_eps)
        self.bias = layers.vocab_parallel_bias(config.padded_vocab_size)  # (Vp/tp,)

    def forward(self, hidden: torch.Tensor, word_weight: torch.Tensor) -> torch.Tensor:
        """(..., H) and the local word-embedding shard (Vp/tp, E) -> local logits (..., Vp/tp)."""
        x = self.norm(F.gelu(self.dense(hidden)))  # HF's generator head: erf GELU whatever hidden_act
        x = self.parallel.copy_to_tp_region(x)  # gradient summed over the vocabulary shards
        return F.linear(x, word_weight, self.bias)


class ElectraGenerator(ElectraBackbone):
    """ELECTRA generator: backbone + MLM head (HF ElectraForMaskedLM)."""

    def __init__(self, config: ElectraConfig, layers: ParallelLayers):
        super().__init__(config, layers)
        self.lm_head = ElectraGeneratorHead(config, layers)
        start, end = layers.vocab_range(config.padded_vocab_size)
        padded = torch.arange(start, end) >= config.vocab_size  # (Vp/tp,) local padding columns
        self.register_buffer("padded_vocab", padded, persistent=False)

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> this rank's logits (..., Vp/tp), padded vocabulary entries at finfo.min."""
        logits = self.lm_head(hidden, self.embeddings.word.weight)
        # Out of place and saves nothing for backward: the vocab-parallel loss may work in place.
        return logits.masked_fill(self.padded_vocab, torch.finfo(logits.dtype).min)

    def predicted_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Local logits (N, Vp/tp) at the (N,) flat positions (`predicted_positions`)."""
        return self.vocab_logits(rows_at(self.encode(input_ids, attention_mask), positions))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """MLM alone, RobertaForMaskedLM's contract: {"loss_sum", "num_predicted", "metrics"}."""
        positions = predicted_positions(labels)  # (N,)
        targets = rows_at(labels, positions)  # (N,)
        logits = self.predicted_logits(input_ids, attention_mask, positions)
        metrics = masked_lm_metrics(logits, targets, self.parallel, rows_at(input_ids, positions))  # before the loss
        losses = self.parallel.vocab_parallel_cross_entropy(logits, targets)  # (N,)
        return {"loss_sum": losses.sum(), "num_predicted": positions.new_full((), positions.numel()),
                "metrics": metrics}

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Full logits (B, T, V): gathered over TP ranks, vocabulary padding trimmed."""
        logits = self.vocab_logits(self.encode(input_ids, attention_mask))
        return self.parallel.gather_from_tp_region(logits)[..., : self.config.vocab_size]


class ElectraDiscriminatorHead(nn.Module):
    """HF ElectraDiscriminatorPredictions: dense -> activation -> classifier, one logit per token."""

    def __init__(self, config, layers: ParallelLayers):
        super().__init__()
        std = config.initializer_range
        self.dense = layers.linear(config.hidden_size, config.hidden_size, init_std=std)
        self.activation = activation_fn(config.activation)
        self.classifier = layers.linear(config.hidden_size, 1, init_std=std)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, T) logits of "replaced"."""
        return self.classifier(self.activation(self.dense(hidden))).squeeze(-1)


class ElectraDiscriminator(ElectraBackbone):
    """ELECTRA discriminator: backbone + per-token head (HF ElectraForPreTraining)."""

    def __init__(self, config: ElectraConfig, layers: ParallelLayers):
        super().__init__(config, layers)
        self.head = ElectraDiscriminatorHead(config, layers)

    def rtd_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> (B, T) logits of "replaced" (HF ElectraForPreTraining.logits)."""
        return self.head(self.encode(input_ids, attention_mask))

    forward = rtd_logits


# --------------------------------------------------------------------------------- Hugging Face
# Our module names -> transformers' ElectraForMaskedLM / ElectraForPreTraining (no suffix).
_HF_BACKBONE = {
    "embeddings.word": "electra.embeddings.word_embeddings",
    "embeddings.position": "electra.embeddings.position_embeddings",
    "embeddings.token_type": "electra.embeddings.token_type_embeddings",
    "embeddings.norm": "electra.embeddings.LayerNorm",
    "project": "electra.embeddings_project",
}
_HF_HEADS = {
    "generator": {
        "lm_head.dense": "generator_predictions.dense",
        "lm_head.norm": "generator_predictions.LayerNorm",
        "lm_head": "generator_lm_head",  # lm_head.bias; the weight is the tied word embedding
    },
    "discriminator": {
        "head.dense": "discriminator_predictions.dense",
        "head.classifier": "discriminator_predictions.dense_prediction",
    },
}
_HF_LAYER = HF_BERT_LAYER  # under layers.{i}. / electra.encoder.layer.{i}.

_HF_LAYER_PREFIX = "electra.encoder.layer."
_HF_ARCHITECTURES = {"generator": "ElectraForMaskedLM", "discriminator": "ElectraForPreTraining"}
_HF_IGNORED = ("electra.embeddings.position_ids", "electra.embeddings.token_type_ids")
_VOCAB_ROWS = ("embeddings.word.weight", "lm_head.bias")  # padded to Vp in ours, V in HF


def _check_component(component: str) -> None:
    if component not in _HF_ARCHITECTURES:
        raise ValueError(f"component must be generator or discriminator, got {component!r}")


def tower_hf_config(cfg: ElectraConfig, component: str):
    """The transformers.ElectraConfig of one tower (vocabulary padding trimmed)."""
    import transformers

    _check_component(component)
    return transformers.ElectraConfig(
        embedding_size=cfg.embedding_size,
        **hf_encoder_kwargs(cfg),
        pad_token_id=cfg.pad_token_id,
        tie_word_embeddings=True,
        architectures=[_HF_ARCHITECTURES[component]],
    )


def _hf_modules(component: str) -> dict[str, str]:
    return {**_HF_BACKBONE, **_HF_HEADS[component]}


def _to_hf_key(key: str, component: str) -> str:
    module, param = key.rsplit(".", 1)
    if module.startswith("layers."):
        _, index, rest = module.split(".", 2)
        return f"{_HF_LAYER_PREFIX}{index}.{_HF_LAYER[rest]}.{param}"
    return f"{_hf_modules(component)[module]}.{param}"


def _from_hf_key(key: str, component: str) -> str:
    module, param = key.rsplit(".", 1)
    if module.startswith(_HF_LAYER_PREFIX):
        index, rest = module[len(_HF_LAYER_PREFIX) :].split(".", 1)
        ours = {hf: our for our, hf in _HF_LAYER.items()}[rest]
        return f"layers.{index}.{ours}.{param}"
    ours = {hf: our for our, hf in _hf_modules(component).items()}[module]
    return f"{ours}.{param}"


def tower_to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ElectraConfig, component: str) -> dict:
    """A stand-alone tower's full (TP-merged) state dict -> ElectraForMaskedLM's (generator) or
    ElectraForPreTraining's (discriminator), vocabulary padding trimmed; the generator's tied
    `generator_lm_head.weight` included so `load_state_dict(strict=True)` accepts it."""
    _check_component(component)
    hf_sd = {}
    for key, value in sd.items():
        try:
            hf_key = _to_hf_key(key, component)
        except KeyError:
            raise KeyError(f"to_hf_state_dict: no Hugging Face name for {component} key {key!r}") from None
        hf_sd[hf_key] = value[: cfg.vocab_size].clone() if key in _VOCAB_ROWS else value
    if component == "generator":
        hf_sd["generator_lm_head.weight"] = hf_sd["electra.embeddings.word_embeddings.weight"]
    return hf_sd


def tower_from_hf_state_dict(hf_sd: dict[str, torch.Tensor], cfg: ElectraConfig, component: str) -> dict:
    """Inverse of `tower_to_hf_state_dict`: vocabulary re-padded with zero rows."""
    _check_component(component)
    sd = {}
    for key, value in hf_sd.items():
        if key in _HF_IGNORED or key == "generator_lm_head.weight":
            continue
        try:
            our_key = _from_hf_key(key, component)
        except (KeyError, ValueError):
            raise KeyError(f"from_hf_state_dict: unexpected Hugging Face {component} key {key!r}") from None
        if our_key in _VOCAB_ROWS:
            value = repad_vocab_rows(key, value, cfg)
        sd[our_key] = value
    return sd


def _electra_shared_tables(cfg: RTDConfig) -> tuple[str, ...]:
    return () if cfg.embedding_sharing == "none" else SHARED_TABLES  # ELECTRA towers have both


def hf_config(cfg: RTDConfig, component: str = "discriminator"):
    """The transformers config of the exported tower (the discriminator is the one kept)."""
    return tower_hf_config(getattr(cfg, component), component)


def to_hf_state_dict(
    rtd_sd: dict[str, torch.Tensor], cfg: RTDConfig, component: str = "discriminator"
) -> dict:
    """A full RTD state dict -> one tower's Hugging Face state dict (E_D = E_G + E_Delta under gdes)."""
    _check_component(component)
    gen_sd, disc_sd = split_state_dict(rtd_sd, _electra_shared_tables(cfg), cfg.embedding_sharing)
    sd = gen_sd if component == "generator" else disc_sd
    return tower_to_hf_state_dict(sd, getattr(cfg, component), component)


def from_hf_state_dict(hf_sds: dict[str, dict[str, torch.Tensor]], cfg: RTDConfig) -> dict:
    """{"generator": ElectraForMaskedLM's, "discriminator": ElectraForPreTraining's} -> a full RTD
    state dict (E_Delta = E_D - E_G under gdes; under es both must hold the same tables)."""
    missing = {"generator", "discriminator"} - set(hf_sds)
    if missing:
        raise KeyError(f"from_hf_state_dict needs both towers' state dicts; missing {sorted(missing)}")
    gen_sd = tower_from_hf_state_dict(hf_sds["generator"], cfg.generator, "generator")
    disc_sd = tower_from_hf_state_dict(hf_sds["discriminator"], cfg.discriminator, "discriminator")
    return join_state_dicts(gen_sd, disc_sd, _electra_shared_tables(cfg), cfg.embedding_sharing)


# ----------------------------------------------------------------------- adapter (models/README.md)
def backbone_of(config: RTDConfig, sd: dict) -> tuple[ElectraConfig, dict]:
    """An RTD model (config, full state dict) -> its discriminator tower without head (E_D merged)."""
    _, disc = split_state_dict(sd, _electra_shared_tables(config), config.embedding_sharing)
    return config.discriminator, {k: v for k, v in disc.items() if not k.startswith("head.")}


def fields_from_hf(hf) -> dict:
    """A transformers ElectraConfig -> ElectraConfig fields."""
    return dict(encoder_fields_from_hf(hf), embedding_size=getattr(hf, "embedding_size", hf.hidden_size))


def backbone_hf_config(cfg: ElectraConfig):
    return tower_hf_config(cfg, "discriminator")


def backbone_to_hf(sd: dict[str, torch.Tensor], cfg: ElectraConfig) -> dict[str, torch.Tensor]:
    return tower_to_hf_state_dict(sd, cfg, "discriminator")


def backbone_from_hf(hf_sd: dict[str, torch.Tensor], cfg: ElectraConfig) -> dict[str, torch.Tensor]:
    return tower_from_hf_state_dict(hf_sd, cfg, "discriminator")


def classifier_hf_config(hf, dropout: float) -> None:
    hf.classifier_dropout = dropout


def hf_discriminator(hf_sd: dict[str, torch.Tensor]) -> tuple[dict, dict, bool]:
    """An ElectraForPreTraining state dict -> (the discriminator's HF state dict, no extras, False:
    nothing dropped); ValueError for a generator's (ElectraForMaskedLM)."""
    if any(k.startswith("generator_predictions.") for k in hf_sd):
        raise ValueError("is an ELECTRA generator (ElectraForMaskedLM); pass the discriminator as --from-hf "
                         "and this directory as --generator")
    return hf_sd, {}, False


def fresh_generator(disc_fields: dict) -> dict:
    """ELECTRA's generator for a discriminator alone: 1/4 of its width, the same embeddings."""
    return dict(disc_fields, hidden_size=max(disc_fields["hidden_size"] // 4, 1),
                num_heads=max(disc_fields["num_heads"] // 4, 1),
                intermediate_size=max(disc_fields["intermediate_size"] // 4, 1))


def imported_config(gen_fields: dict, disc_fields: dict, sharing: str | None) -> RTDConfig:
    sharing = sharing or RTD_DEFAULTS["electra"].get("embedding_sharing", "es")
    return RTDConfig(generator=gen_fields, discriminator=disc_fields, backbone="electra", embedding_sharing=sharing)


def verify_pairs(model, out, ids, mask, component="discriminator", extras=None) -> dict:
    """What an export must reproduce: ElectraForPreTraining's logits, or ElectraForMaskedLM's."""
    if component == "generator":
        return {"MLM logits": (model.generator.logits(ids, mask), out.logits)}
    return {"RTD logits": (model.discriminator.rtd_logits(ids, mask), out.logits)}
