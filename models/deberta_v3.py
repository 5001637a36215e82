"""DeBERTaV3 (He et al., 2021): replaced token detection over DeBERTa towers, its discriminator
head and its map to Hugging Face transformers.

The generator is models/deberta.py's `DebertaForMaskedLM` (EMD on); the discriminator is
`deberta_v3_discriminator`: `DebertaModel` (no MLM head, no EMD) + `DebertaV3DiscriminatorHead`
(microsoft/DeBERTa's RTD head) as a models/rtd.py `RTDDiscriminator`. The registry's "deberta_v3"
builds them (backbone "deberta") with models/rtd.py's defaults for it: GDES, and no EMD in the
discriminator. With position_biased_input false (V3) the discriminator has no absolute position
table, so only the word table is shared: the generator's position table is the EMD's own.

Shapes: B batch, T sequence, H hidden, V vocab_size.

Decisions:
- The RTD head adds the first token's state to every token's (LayerNorm(h_CLS + h_t)) before its
  dense -> activation -> classifier, as microsoft/DeBERTa's: each decision sees the sequence (in a
  packed row, its own document's first token).
- Export reuses models/deberta_hf.py's map: the generator as DebertaV2ForMaskedLM (the EMD's position
  table dropped with a DroppedOnExportWarning: Hugging Face has no EMD), the discriminator as
  DebertaV2Model with E_D = E_G + E_Delta merged. Hugging Face has no RTD head, so
  `deberta_v3_rtd_head_state_dict` gives it apart, keyed as microsoft/DeBERTa's.
- What is shared follows from the config (`deberta_v3_shared_tables`), as `share_embeddings`
  decides it on the built model.
"""

from __future__ import annotations

import torch
from torch import nn

from models import deberta_hf
from models.config import DebertaConfig, RTDConfig
from models.deberta import DebertaModel
from models.layers import activation_fn, document_starts
from models.parallel import ParallelLayers
from models.rtd import RTD_DEFAULTS, RTDDiscriminator, join_state_dicts, split_state_dict

RTD_HEAD_FILE = "rtd_head.safetensors"  # the RTD head beside a discriminator export (not part of the HF model)


# ---------------------------------------------------------------------------------- discriminator
class DebertaV3DiscriminatorHead(nn.Module):
    """microsoft/DeBERTa's RTD head: LayerNorm(h_CLS + h_t) -> dense -> activation -> classifier.

    Adding the first token's state gives every token's decision the sequence's context.
    """

    def __init__(self, config, layers: ParallelLayers):
        super().__init__()
        std = config.initializer_range
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dense = layers.linear(config.hidden_size, config.hidden_size, init_std=std)
        self.activation = activation_fn(config.activation)
        self.classifier = layers.linear(config.hidden_size, 1, init_std=std)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H) (and the (B, T) mask: with document ids, each token adds the first token of
        its own document) -> (B, T) logits of "replaced"."""
        first = hidden[:, :1]  # (B, 1, H); h_CLS broadcast over T
        if attention_mask is not None:
            starts = document_starts(attention_mask)[..., None]  # (B, T, 1)
            # The row's first token where the document starts there: a 0/1 mask then takes the
            # broadcast alone, forward and backward bit for bit (the gather's gradient is all zero).
            first = torch.where(starts == 0, first, hidden.gather(1, starts.expand_as(hidden)))  # (B, T, H)
        x = self.norm(first + hidden)  # (B, T, H)
        return self.classifier(self.activation(self.dense(x))).squeeze(-1)


def deberta_v3_discriminator(config: DebertaConfig, layers: ParallelLayers) -> RTDDiscriminator:
    """DeBERTaV3's discriminator: the DeBERTa backbone (no MLM head, no EMD: RTDConfig rejects
    enhanced_mask_decoder on it) + microsoft/DeBERTa's RTD head over the last layer's states."""
    return RTDDiscriminator(DebertaModel(config, layers), DebertaV3DiscriminatorHead(config, layers))


# ------------------------------------------------------------------- DeBERTaV3 and Hugging Face
# The towers export through deberta_hf.py's map: the generator as DebertaV2ForMaskedLM (the EMD's
# position table is dropped with a DroppedOnExportWarning: Hugging Face has no EMD), the
# discriminator as DebertaV2Model with E_D = E_G + E_Delta merged. Hugging Face has no RTD head,
# so it goes apart, keyed as in microsoft/DeBERTa's ReplacedTokenDetectionModel
# (`mask_predictions` = LMMaskPredictionHead; "classifer" is their spelling).
DEBERTA_V3_COMPONENTS = {"generator": "mlm", "discriminator": "backbone"}  # -> deberta_hf.py's
_DEBERTA_V3_HEAD = {"norm": "mask_predictions.LayerNorm", "dense": "mask_predictions.dense",
                    "classifier": "mask_predictions.classifer"}
_DEBERTA_V3_BACKBONE = "backbone."  # RTDDiscriminator's prefix of the backbone's keys


def _deberta_v3_component(component: str) -> str:
    if component not in DEBERTA_V3_COMPONENTS:
        raise ValueError(f"component must be generator or discriminator, got {component!r}")
    return DEBERTA_V3_COMPONENTS[component]


def deberta_v3_shared_tables(cfg: RTDConfig) -> tuple[str, ...]:
    """What `share_embeddings` shares, from the config: the word table; the position table only
    when the discriminator has one too (position_biased_input), never under DeBERTaV3's defaults."""
    if cfg.embedding_sharing == "none":
        return ()
    both_positions = cfg.generator.absolute_positions and cfg.discriminator.position_biased_input
    return ("word", "position") if both_positions else ("word",)


def deberta_v3_hf_config(cfg: RTDConfig, component: str = "discriminator"):
    """The transformers.DebertaV2Config of one tower (DebertaV2Model for the discriminator)."""
    return deberta_hf.hf_config(getattr(cfg, component), _deberta_v3_component(component))


def deberta_v3_split_state_dict(rtd_sd: dict[str, torch.Tensor], cfg: RTDConfig):
    """A full RTD state dict -> (generator's, discriminator backbone's, RTD head's) state dicts,
    stand-alone: the backbone's word table is E_D (E_G + E_Delta under gdes)."""
    gen, disc = split_state_dict(rtd_sd, deberta_v3_shared_tables(cfg), cfg.embedding_sharing,
                                 _DEBERTA_V3_BACKBONE + "embeddings")
    prefix = _DEBERTA_V3_BACKBONE
    backbone = {k[len(prefix) :]: v for k, v in disc.items() if k.startswith(prefix)}
    head = {k[len("head.") :]: v for k, v in disc.items() if k.startswith("head.")}
    return gen, backbone, head


def deberta_v3_to_hf_state_dict(
    rtd_sd: dict[str, torch.Tensor], cfg: RTDConfig, component: str = "discriminator"
) -> dict[str, torch.Tensor]:
    """A full RTD state dict -> DebertaV2Model's (discriminator, E_D merged) or
    DebertaV2ForMaskedLM's (generator), vocabulary padding trimmed."""
    kind = _deberta_v3_component(component)
    gen, backbone, _ = deberta_v3_split_state_dict(rtd_sd, cfg)
    return deberta_hf.to_hf_state_dict(gen if component == "generator" else backbone,
                                     getattr(cfg, component), kind)


def deberta_v3_rtd_head_state_dict(rtd_sd: dict[str, torch.Tensor], cfg: RTDConfig) -> dict:
    """The discriminator's RTD head alone (6 tensors), keyed as microsoft/DeBERTa's:
    mask_predictions.{LayerNorm, dense, classifer}.{weight, bias}."""
    _, _, head = deberta_v3_split_state_dict(rtd_sd, cfg)
    out = {}
    for key, value in head.items():
        module, param = key.rsplit(".", 1)
        out[f"{_DEBERTA_V3_HEAD[module]}.{param}"] = value
    return out


def deberta_v3_from_hf_state_dict(hf_sds: dict[str, dict[str, torch.Tensor]], cfg: RTDConfig) -> dict:
    """{"generator": DebertaV2ForMaskedLM's, "discriminator": DebertaV2Model's, optionally
    "rtd_head": `deberta_v3_rtd_head_state_dict`'s} -> an RTD state dict (E_Delta = E_D - E_G
    under gdes). What the inputs lack is absent: the RTD head without "rtd_head", the generator's
    EMD position table unless its checkpoint carries one (our exports drop it). Load such a result
    with strict=False over a freshly built model."""
    missing = {"generator", "discriminator"} - set(hf_sds)
    if missing:
        raise KeyError(f"from_hf_state_dict needs both towers' state dicts; missing {sorted(missing)}")
    gen = deberta_hf.from_hf_state_dict(hf_sds["generator"], cfg.generator)
    backbone = deberta_hf.from_hf_state_dict(hf_sds["discriminator"], cfg.discriminator)
    if any(key.startswith("lm_head.") for key in backbone):
        raise ValueError("the discriminator must be a DebertaV2Model's state dict (no MLM head)")
    disc = {_DEBERTA_V3_BACKBONE + k: v for k, v in backbone.items()}
    ours = {hf: our for our, hf in _DEBERTA_V3_HEAD.items()}
    for key, value in hf_sds.get("rtd_head", {}).items():
        module, param = key.rsplit(".", 1)
        if module not in ours:
            raise KeyError(f"from_hf_state_dict: unexpected RTD head key {key!r}")
        disc[f"head.{ours[module]}.{param}"] = value
    return join_state_dicts(gen, disc, deberta_v3_shared_tables(cfg), cfg.embedding_sharing,
                            _DEBERTA_V3_BACKBONE + "embeddings")


# ----------------------------------------------------------------------- adapter (models/README.md)
HF_EXTRA_FILES = {RTD_HEAD_FILE: "RTD head, microsoft/DeBERTa's key names; not part of the HF model"}


def backbone_of(config: RTDConfig, sd: dict) -> tuple[DebertaConfig, dict]:
    """An RTD model (config, full state dict) -> its discriminator backbone (E_D merged), no EMD."""
    _, backbone, _ = deberta_v3_split_state_dict(sd, config)
    return deberta_hf.without_emd(config.discriminator), backbone


def hf_extras(rtd_sd: dict[str, torch.Tensor], cfg: RTDConfig, component: str) -> dict[str, dict]:
    """Files beside an export that the HF model has no place for: the discriminator's RTD head."""
    return {RTD_HEAD_FILE: deberta_v3_rtd_head_state_dict(rtd_sd, cfg)} if component == "discriminator" else {}


def hf_recognises(keys: set[str], files: set[str]) -> bool:
    """A DebertaV2 directory is a DeBERTaV3 discriminator when it has an RTD head or no MLM head."""
    has_mlm_head = any(k.startswith(("lm_predictions.", "cls.predictions.")) for k in keys)
    return RTD_HEAD_FILE in files or any(k.startswith("mask_predictions.") for k in keys) or not has_mlm_head


def hf_discriminator(hf_sd: dict[str, torch.Tensor]) -> tuple[dict, dict, bool]:
    """A DebertaV2 state dict -> (DebertaV2Model's, {"rtd_head": its mask_predictions.* weights},
    whether an MLM head was left out)."""
    dropped = [k for k in hf_sd if k.startswith(("lm_predictions.", "cls.", "mask_predictions."))]
    disc = {k.removeprefix(deberta_hf.BACKBONE_PREFIX): v for k, v in hf_sd.items() if k not in dropped}
    head = {k: v for k, v in hf_sd.items() if k.startswith("mask_predictions.")}
    return disc, {"rtd_head": head}, any(k.startswith(("lm_predictions.", "cls.")) for k in dropped)


def fresh_generator(disc_fields: dict) -> dict:
    """The registry's DeBERTaV3 generator for a discriminator alone: the same width, half the depth."""
    return dict(disc_fields, num_layers=max(1, disc_fields["num_layers"] // 2),
                enhanced_mask_decoder=not disc_fields["position_biased_input"])


def imported_config(gen_fields: dict, disc_fields: dict, sharing: str | None) -> RTDConfig:
    sharing = sharing or RTD_DEFAULTS["deberta"].get("embedding_sharing", "es")
    return RTDConfig(generator=gen_fields, discriminator=disc_fields, backbone="deberta", embedding_sharing=sharing)


def rtd_head_with(head: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of our RTD head holding `tensors` (an exported RTD head file's, microsoft/DeBERTa's keys)."""
    import copy

    ours = {hf: our for our, hf in _DEBERTA_V3_HEAD.items()}
    sd = {}
    for key, value in tensors.items():
        module, param = key.rsplit(".", 1)
        sd[f"{ours[module]}.{param}"] = value
    head = copy.deepcopy(head)
    head.load_state_dict(sd, strict=True)
    return head


def verify_pairs(model, out, ids, mask, component="discriminator", extras=None) -> dict:
    """What an export must reproduce: the generator's as deberta's; the discriminator's
    DebertaV2Model states, and our RTD head (from the exported file) on them."""
    if component == "generator":
        return deberta_hf.verify_pairs(model.generator, out, ids, mask)
    disc = model.discriminator
    hidden = out.hidden_states[-1]
    return {"hidden states": (disc.backbone.encode(ids, mask), out.last_hidden_state),
            "RTD logits (our head on HF states)": (disc.rtd_logits(ids, mask),
                                                   rtd_head_with(disc.head, extras[RTD_HEAD_FILE])(hidden))}
