"""RoBERTa for masked-language-model pretraining, and its map to Hugging Face transformers.

Post-LN encoder with learned absolute positions, laid out like Hugging Face's RobertaForMaskedLM so
the weights map one to one. Shapes: B batch, T sequence, H hidden, N predicted (masked)
positions, V vocab_size, Vp padded_vocab_size (Vp/tp rows on one tensor-parallel rank).

Tensor parallelism comes only through `ParallelLayers`: at TP>1 the word embedding is
vocab-parallel and the tied decoder is too (Megatron's parallel_lm_logits: copy the hidden to the
TP region, multiply by the local embedding shard, never gather the logits for the loss).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from models.config import RobertaConfig, hf_encoder_kwargs
from models.layers import (HF_BERT_LAYER, TransformerLayer, attention_bias, count_parameters, document_starts,
                           masked_lm_metrics, predicted_positions, repad_vocab_rows, rows_at,
                           without_pretraining_heads, word_embedding)
from models.nsp import NextSentenceHead, drop_for_export, with_next_sentence_loss
from models.parallel import ParallelLayers


def position_ids(
    input_ids: torch.Tensor, pad_token_id: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """HF/fairseq RoBERTa positions: real tokens count from pad_token_id + 1, padding gets
    pad_token_id. With document ids in attention_mask (models/layers.py) the count restarts at each
    document, so a packed document gets the positions it would get alone."""
    mask = (input_ids != pad_token_id).long()  # (B, T)
    count = torch.cumsum(mask, dim=1)  # (B, T) real tokens up to and including t
    if attention_mask is not None:  # minus those before the token's document
        count = count - (count - mask).gather(1, document_starts(attention_mask))
    return count * mask + pad_token_id


class RobertaEmbeddings(nn.Module):
    """word + token type (always row 0) + position, then LayerNorm and dropout."""

    def __init__(self, config: RobertaConfig, layers: ParallelLayers):
        super().__init__()
        std = config.initializer_range
        self.pad_token_id = config.pad_token_id
        self.word = word_embedding(config, config.hidden_size, layers, std)  # pad and padding rows zero
        self.position = layers.embedding(config.max_position_embeddings, config.hidden_size, std)
        self.token_type = layers.embedding(config.type_vocab_size, config.hidden_size, std)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        with torch.no_grad():  # as HF, the pad position's row starts at zero too
            self.position.weight[config.pad_token_id].zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids (and document ids: positions restart at each document) -> (B, T, H)."""
        positions = position_ids(input_ids, self.pad_token_id, attention_mask)  # (B, T)
        x = self.word(input_ids) + self.token_type.weight[0]  # (B, T, H); token-type id is always 0
        x = x + self.position(positions)
        return self.dropout(self.norm(x))


class MaskedLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder tied to the word embedding (+ a vocabulary bias)."""

    def __init__(self, config: RobertaConfig, layers: ParallelLayers):
        super().__init__()
        self.parallel = layers
        self.dense = layers.linear(config.hidden_size, config.hidden_size, init_std=config.initializer_range)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = layers.vocab_parallel_bias(config.padded_vocab_size)  # (Vp/tp,)

    def forward(self, hidden: torch.Tensor, word_weight: torch.Tensor) -> torch.Tensor:
        """(..., H) and the local word-embedding shard (Vp/tp, H) -> local logits (..., Vp/tp)."""
        x = self.norm(F.gelu(self.dense(hidden)))  # HF's head uses erf GELU whatever hidden_act is
        x = self.parallel.copy_to_tp_region(x)  # gradient summed over the vocabulary shards
        return F.linear(x, word_weight, self.bias)


class RobertaForMaskedLM(nn.Module):
    """RoBERTa encoder + MLM head. `forward` returns the summed loss; `logits` the full logits."""

    def __init__(self, config: RobertaConfig, layers: ParallelLayers):
        super().__init__()
        self.config = config
        self.parallel = layers
        std = config.initializer_range
        layers.check_encoder(config)

        self.embeddings = RobertaEmbeddings(config, layers)
        self.layers = nn.ModuleList(
            TransformerLayer(
                config.hidden_size,
                config.num_heads,
                config.intermediate_size,
                config.activation,
                config.hidden_dropout,
                config.attention_dropout,
                config.layer_norm_eps,
                layers,
                init_std=std,
            )
            for _ in range(config.num_layers)
        )
        self.lm_head = MaskedLMHead(config, layers)
        # last: the other weights draw the same initial values with the head as without it
        self.nsp_head = NextSentenceHead(config.hidden_size, std, layers) if config.next_sentence_head else None

        # True on the local vocabulary columns that are padding (global id >= vocab_size).
        start, end = layers.vocab_range(config.padded_vocab_size)
        padded = torch.arange(start, end) >= config.vocab_size  # (Vp/tp,)
        self.register_buffer("padded_vocab", padded, persistent=False)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask (1 = token, 0 = padding; or document ids 1..k, models/layers.py)
        -> final hidden states (B, T, H)."""
        x = self.embeddings(input_ids, attention_mask)  # (B, T, H)
        bias = attention_bias(attention_mask, x.dtype)  # (B, 1, T, T): within each document
        for layer in self.layers:
            x = layer(x, bias)
        return x

    def _vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> this rank's logits (..., Vp/tp), padded vocabulary entries at finfo.min."""
        logits = self.lm_head(hidden, self.embeddings.word.weight)
        # masked_fill is out of place and saves nothing for backward, so the vocab-parallel loss
        # may work in place on its result.
        return logits.masked_fill(self.padded_vocab, torch.finfo(logits.dtype).min)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        next_sentence_label: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """(B, T) ids, mask and labels (IGNORE_INDEX where not predicted) -> {
        "loss_sum": sum over predicted positions of the cross-entropy (fp32 scalar),
        "num_predicted": number of predicted positions (long scalar),
        "metrics": {"mlm_correct", "mlm_predicted"} long scalars (`masked_lm_metrics`)}.

        The head runs only on the predicted positions (about 15% of them). With the NSP head and
        next_sentence_label (B,) given: the MLM and NSP terms (models/nsp.py `with_next_sentence_loss`).
        """
        positions = predicted_positions(labels)  # (N,)
        targets = rows_at(labels, positions)  # (N,)
        hidden = self.encode(input_ids, attention_mask)  # (B, T, H)
        logits = self._vocab_logits(rows_at(hidden, positions))  # (N, Vp/tp)
        metrics = masked_lm_metrics(logits, targets, self.parallel, rows_at(input_ids, positions))  # before the loss
        losses = self.parallel.vocab_parallel_cross_entropy(logits, targets)  # (N,)
        out = {"loss_sum": losses.sum(), "num_predicted": positions.new_full((), positions.numel()),
               "metrics": metrics}
        if self.nsp_head is None or next_sentence_label is None:
            return out
        return with_next_sentence_loss(out, self.nsp_head(hidden[:, 0]), next_sentence_label, self.config.nsp_weight)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Full logits (B, T, V): gathered over TP ranks, vocabulary padding trimmed."""
        hidden = self.encode(input_ids, attention_mask)
        logits = self.parallel.gather_from_tp_region(self._vocab_logits(hidden))  # (B, T, Vp)
        return logits[..., : self.config.vocab_size]

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters of the whole model (all TP ranks together, padded vocabulary included).

        exclude_embeddings leaves out the word and position tables (the usual count for FLOPs).
        """
        skip = {"embeddings.word.weight", "embeddings.position.weight"} if exclude_embeddings else set()
        return count_parameters(self, skip.__contains__)


# --------------------------------------------------------------------------------- Hugging Face
# Our module names -> transformers.RobertaForMaskedLM's (without the ".weight"/".bias" suffix).
_HF_TOP = {
    "embeddings.word": "roberta.embeddings.word_embeddings",
    "embeddings.position": "roberta.embeddings.position_embeddings",
    "embeddings.token_type": "roberta.embeddings.token_type_embeddings",
    "embeddings.norm": "roberta.embeddings.LayerNorm",
    "lm_head.dense": "lm_head.dense",
    "lm_head.norm": "lm_head.layer_norm",
    "lm_head": "lm_head",  # lm_head.bias
}
_HF_LAYER = HF_BERT_LAYER  # under layers.{i}. / roberta.encoder.layer.{i}.

_HF_LAYER_PREFIX = "roberta.encoder.layer."
# HF keys that carry no weights of ours: the tied decoder (a copy of the word embedding and of
# lm_head.bias), index buffers older checkpoints saved, and the pooler RobertaModel may carry.
_HF_TIED = ("lm_head.decoder.weight", "lm_head.decoder.bias")
_HF_IGNORED_PREFIXES = ("roberta.pooler.",)
_HF_IGNORED = ("roberta.embeddings.position_ids", "roberta.embeddings.token_type_ids")


def hf_config(cfg: RobertaConfig):
    """The transformers.RobertaConfig describing the same model (vocabulary padding trimmed)."""
    import transformers

    return transformers.RobertaConfig(
        **hf_encoder_kwargs(cfg),
        pad_token_id=cfg.pad_token_id,
        tie_word_embeddings=True,
        architectures=["RobertaForMaskedLM"],
    )


def _to_hf_key(key: str) -> str:
    module, param = key.rsplit(".", 1)
    if module.startswith("layers."):
        _, index, rest = module.split(".", 2)
        return f"{_HF_LAYER_PREFIX}{index}.{_HF_LAYER[rest]}.{param}"
    return f"{_HF_TOP[module]}.{param}"


def _from_hf_key(key: str) -> str:
    module, param = key.rsplit(".", 1)
    if module.startswith(_HF_LAYER_PREFIX):
        index, rest = module[len(_HF_LAYER_PREFIX) :].split(".", 1)
        ours = {hf: our for our, hf in _HF_LAYER.items()}[rest]
        return f"layers.{index}.{ours}.{param}"
    ours = {hf: our for our, hf in _HF_TOP.items()}[module]
    return f"{ours}.{param}"


def to_hf_state_dict(our_sd: dict[str, torch.Tensor], cfg: RobertaConfig) -> dict[str, torch.Tensor]:
    """A full (TP-merged) state dict of ours -> transformers.RobertaForMaskedLM's, padding trimmed.

    Includes the tied `lm_head.decoder.weight/bias` (the same tensors as the word embedding and
    lm_head.bias), so `load_state_dict(strict=True)` accepts it. The NSP head is left out (a warning).
    """
    our_sd = drop_for_export(our_sd, "RobertaForMaskedLM")
    hf_sd = {}
    for key, value in our_sd.items():
        try:
            hf_key = _to_hf_key(key)
        except KeyError:
            raise KeyError(f"to_hf_state_dict: no Hugging Face name for {key!r}") from None
        if key in ("embeddings.word.weight", "lm_head.bias"):
            value = value[: cfg.vocab_size].clone()  # drop the vocabulary padding
        hf_sd[hf_key] = value
    hf_sd["lm_head.decoder.weight"] = hf_sd["roberta.embeddings.word_embeddings.weight"]
    hf_sd["lm_head.decoder.bias"] = hf_sd["lm_head.bias"]
    return hf_sd


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], cfg: RobertaConfig) -> dict[str, torch.Tensor]:
    """transformers.RobertaForMaskedLM's state dict -> ours (full, vocabulary re-padded with zeros)."""
    our_sd = {}
    for key, value in hf_sd.items():
        if key in _HF_TIED or key in _HF_IGNORED or key.startswith(_HF_IGNORED_PREFIXES):
            continue
        try:
            our_key = _from_hf_key(key)
        except (KeyError, ValueError):
            raise KeyError(f"from_hf_state_dict: unexpected Hugging Face key {key!r}") from None
        if our_key in ("embeddings.word.weight", "lm_head.bias"):
            value = repad_vocab_rows(key, value, cfg)
        our_sd[our_key] = value
    return our_sd


# ----------------------------------------------------------------------- adapter (models/README.md)
def backbone(config: RobertaConfig, layers: ParallelLayers) -> RobertaForMaskedLM:
    """The encoder without its MLM head (which a classifier would leave without gradient)."""
    model = RobertaForMaskedLM(config, layers)
    del model.lm_head
    return model


def backbone_of(config: RobertaConfig, sd: dict) -> tuple[RobertaConfig, dict]:
    """A pretraining model (config, full state dict) -> (classifier backbone config, its state dict)."""
    return dataclasses.replace(config, next_sentence_head=False), without_pretraining_heads(sd)


def backbone_to_hf(sd: dict[str, torch.Tensor], cfg: RobertaConfig) -> dict[str, torch.Tensor]:
    """A backbone's state dict -> RobertaModel's keys under "roberta." (padding trimmed)."""
    # the map writes the tied MLM decoder from lm_head.bias: give it one, then drop the head
    placeholder = {"lm_head.bias": torch.zeros(cfg.padded_vocab_size)}
    return {k: v for k, v in to_hf_state_dict({**sd, **placeholder}, cfg).items() if not k.startswith("lm_head.")}


def classifier_hf_config(hf, dropout: float) -> None:
    hf.classifier_dropout = dropout


def verify_pairs(model, out, ids, mask, component=None, extras=None) -> dict:
    """What an export must reproduce: the MLM logits of RobertaForMaskedLM."""
    return {"MLM logits": (model.logits(ids, mask), out.logits)}
