"""Model FLOPs of training, per input token: what "equal compute" means between arms of different sizes.

The usual count (Kaplan et al. 2020; Megatron's MFU): a training step costs 3 forward passes (forward,
and backward at twice the forward), and a forward pass costs 2 FLOPs per multiply-add of

- every tower's layers: the Q, K, V and output projections (4 H^2), the feed-forward (2 H I), and
  attention's scores and weighted sum (2 T H over a row of T tokens); DeBERTa adds the c2p / p2c score
  tables against the 2k relative positions (2k H multiply-adds per position type) and the enhanced mask decoder's
  passes through the last layer;
- ELECTRA's factored embeddings: the E -> H projection of every token (E != H);
- an MLM head (dense H x H, or H x E for ELECTRA's generator, and the decoder to the padded vocabulary)
  on the predicted positions only (this trainer's heads skip the others);
- an RTD discriminator head (dense H x H and H -> 1) on every token.

Embedding lookups, softmax, LayerNorm and the loss are not counted (a few percent at these shapes).
"""
from __future__ import annotations

from models.config import DebertaConfig, ElectraConfig, RobertaConfig, RTDConfig


def _tower_forward(config, seq_length: int) -> float:
    """Forward FLOPs per token of one tower's encoder layers (and EMD passes, factored embeddings)."""
    H, I = config.hidden_size, config.intermediate_size
    layers = config.num_layers
    per_layer = 2 * (4 * H * H + 2 * H * I) + 2 * 2 * seq_length * H
    if isinstance(config, DebertaConfig):
        if config.relative_attention:
            per_layer += 2 * (2 * config.relative_span) * H * len(config.pos_att_type)  # a 2k-row score table each
        if config.enhanced_mask_decoder:
            layers += config.emd_layers
    flops = layers * per_layer
    if isinstance(config, ElectraConfig) and config.embedding_size != H:
        flops += 2 * config.embedding_size * H
    return float(flops)


def _mlm_head_forward(config) -> float:
    """Forward FLOPs of the MLM head at one predicted position."""
    H = config.hidden_size
    width = config.embedding_size if isinstance(config, ElectraConfig) else H
    return float(2 * (H * width + width * config.padded_vocab_size))


def training_flops_per_token(config, seq_length: int, predicted_fraction: float = 0.15) -> float:
    """Training FLOPs (3 x forward) per input token of the pretraining model of `config` (any registry
    config: RoBERTa, DeBERTa, or an RTD pair) on rows of `seq_length` tokens, `predicted_fraction` of
    them predicted by the MLM head (data.mask_prob)."""
    if not 0.0 <= predicted_fraction <= 1.0:
        raise ValueError(f"predicted_fraction must be in [0, 1], got {predicted_fraction}")
    if isinstance(config, RTDConfig):
        gen, disc = config.generator, config.discriminator
        H = disc.hidden_size
        forward = (_tower_forward(gen, seq_length) + predicted_fraction * _mlm_head_forward(gen)
                   + _tower_forward(disc, seq_length) + 2 * (H * H + H))
        return 3.0 * forward  # shared weights (embedding_sharing) save memory, not compute: both towers run
    if isinstance(config, (RobertaConfig, DebertaConfig)):
        return 3.0 * (_tower_forward(config, seq_length) + predicted_fraction * _mlm_head_forward(config))
    raise TypeError(f"no FLOP count for a {type(config).__name__}")
