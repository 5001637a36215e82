"""Blocks shared by the BERT-family encoders (RoBERTa, ELECTRA): post-LN transformer layer pieces.

Shapes: B batch, T sequence, H hidden, nh heads (nh/tp on one tensor-parallel rank), hs head size.
Tensor parallelism follows Megatron: query/key/value and the FFN's first linear are
column-parallel (each rank holds some heads / some FFN features), the attention output and the
FFN's second linear are row-parallel (their outputs are summed over ranks).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from data.masking import IGNORE_INDEX  # noqa: F401  (the label convention is the data pipeline's)
from models.parallel import ParallelLayers


def predicted_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (N,) flat row-major indices of the predicted positions (label != IGNORE_INDEX).

    Called at the top of a forward: the count N is the step's one unavoidable host sync (the MLM
    head runs on N rows), and taken there it waits only for the batch's copy, not for layers
    already queued on the device. Rows are then picked with `index_select`, which does not sync
    (boolean indexing after the encoder would wait for the whole encoder).
    """
    return (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def rows_at(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) values, (N,) flat positions -> (N, ...) the values there, without a host sync."""
    return values.flatten(0, 1).index_select(0, positions)


def global_argmax(local_scores: torch.Tensor, parallel: ParallelLayers) -> torch.Tensor:
    """(N, Vp/tp) scores split by vocabulary -> (N,) global ids of the row maxima (ties: lowest id)."""
    values, ids = local_scores.max(dim=-1)  # (N,)
    ids = ids + parallel.tp_rank * local_scores.shape[-1]
    if parallel.tp_size == 1:
        return ids
    all_values = parallel.gather_from_tp_region(values[:, None].contiguous())  # (N, tp)
    all_ids = parallel.gather_from_tp_region(ids[:, None].contiguous())  # (N, tp)
    best = all_values.argmax(dim=-1, keepdim=True)  # first maximum: the lowest rank, so lowest id
    return all_ids.gather(-1, best).squeeze(-1)


@torch.no_grad()
def masked_lm_metrics(local_logits: torch.Tensor, targets: torch.Tensor, parallel: ParallelLayers,
                      inputs: Optional[torch.Tensor] = None) -> dict:
    """(N, Vp/tp) local logits (padded vocabulary at finfo.min, so it never wins) and (N,) targets ->
    long scalars mlm_correct (argmax over the whole vocabulary == target) and mlm_predicted (N); with
    the (N,) input ids there, also mlm_hidden_correct and mlm_hidden_predicted over the positions whose
    input is not the target ([MASK] or a random token: only context can tell). Call before the
    vocab-parallel loss, which may work in place on the logits; no host sync."""
    right = global_argmax(local_logits.detach(), parallel) == targets
    out = {"mlm_correct": right.sum(), "mlm_predicted": targets.new_full((), targets.numel())}
    if inputs is not None:
        hidden = inputs != targets
        out.update(mlm_hidden_correct=(right & hidden).sum(), mlm_hidden_predicted=hidden.sum())
    return out


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation a Hugging Face `hidden_act` name means."""
    if name == "gelu":
        return F.gelu  # exact (erf) GELU, as BERT/RoBERTa
    if name == "gelu_new":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}")


# ------------------------------------------------------------------------------ document masks
# A row's attention_mask may number its documents: 0 = padding, 1..k = the row's k-th document, in
# order along the row (data.packing's packed_documents); a 0/1 mask is the one-document case. A
# token attends only within its document and its absolute position restarts there. Both helpers are
# pure tensor ops on the device (no host sync), built once per forward.


def same_document(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool, True where query i may attend key j: j is a real
    token of i's document. A padding query (id 0) attends every real key, as a 0/1 mask always
    let it: for a 0/1 mask this is the key-padding mask broadcast over the queries, exactly."""
    ids = attention_mask
    real_key = (ids != 0)[:, None, :]  # (B, 1, T)
    query_pad = (ids == 0)[:, :, None]  # (B, T, 1)
    same = ids[:, :, None] == ids[:, None, :]  # (B, T, T)
    return (real_key & (same | query_pad))[:, None]  # (B, 1, T, T)


def document_starts(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, T) long: the index where each token's document begins.

    A document begins where the id rises above every earlier nonzero id; the row's first
    document (and any padding before the second) counts from index 0, so a 0/1 mask gives all
    zeros and positions are exactly the ones without documents. Padding after a document
    continues it (its positions are never attended to)."""
    ids = attention_mask.long()
    seen = ids.cummax(dim=1).values  # (B, T) highest id so far
    before = F.pad(seen[:, :-1], (1, 0))  # (B, T) highest id strictly before
    begins = (ids > before) & (before > 0)
    index = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return torch.where(begins, index, 0).cummax(dim=1).values


def document_offsets(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, T) long position of each token within its document (from 0)."""
    index = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return index - document_starts(attention_mask)


def attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T) document ids (0/1: 1 = real token, 0 = padding) -> (B, 1, T, T) additive bias for the
    scores: 0 where `same_document` lets the query see the key, finfo(dtype).min elsewhere.

    finfo.min rather than -inf: a row whose keys are all padding then softmaxes to a uniform
    distribution instead of NaN (its outputs are ignored anyway).
    """
    keep = same_document(attention_mask)  # (B, 1, T, T)
    bias = torch.zeros(keep.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~keep, torch.finfo(dtype).min)


class CheckpointedLayer(nn.Module):
    """An encoder layer whose activations can be recomputed in backward instead of kept.

    With `checkpoint` set (`enable_activation_checkpointing`), a forward that builds a graph keeps
    only the layer's inputs; backward runs the layer again (torch.utils.checkpoint, non-reentrant,
    the RNG state restored so dropout draws the same masks): activation memory of one layer instead
    of all of them, for about one more forward of compute. Subclasses implement `layer_forward`.
    """

    checkpoint = False

    def forward(self, *args, **kwargs):
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.layer_forward, *args, use_reentrant=False, **kwargs)
        return self.layer_forward(*args, **kwargs)


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """Every CheckpointedLayer of a model (both towers of an RTD model, DeBERTa's too)."""
    return [module for module in model.modules() if isinstance(module, CheckpointedLayer)]


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every encoder layer in backward; returns how many layers were set."""
    layers = encoder_layers(model)
    for layer in layers:
        layer.checkpoint = True
    return len(layers)


def compile_layers(model: nn.Module, **options) -> int:
    """torch.compile every encoder layer in place (nn.Module.compile; `options` go to torch.compile).

    Layers, not the whole model: the model's forward has data-dependent shapes (the predicted
    positions, the generator's samples) that would break a whole-model graph every step, while a
    layer's shapes change only with the batch shape. Returns how many layers were compiled.
    """
    layers = encoder_layers(model)
    for layer in layers:
        layer.compile(**options)
    return len(layers)


class SelfAttention(nn.Module):
    """Multi-head self-attention; heads are split across tensor-parallel ranks."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        attention_dropout: float,
        layers: ParallelLayers,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.num_local_heads = layers.divide(num_heads, "num_heads")
        self.head_size = hidden_size // num_heads
        self.attention_dropout = attention_dropout
        self.query = layers.column_linear(hidden_size, hidden_size, init_std=init_std)
        self.key = layers.column_linear(hidden_size, hidden_size, init_std=init_std)
        self.value = layers.column_linear(hidden_size, hidden_size, init_std=init_std)
        self.output = layers.row_linear(hidden_size, hidden_size, init_std=init_std)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        nh, hs = self.num_local_heads, self.head_size
        q = self.query(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.key(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.value(x).view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attention_dropout if self.training else 0.0
        )  # (B, nh, T, hs), softmax(q k^T / sqrt(hs) + bias) v
        context = context.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, H/tp)
        return self.output(context)  # (B, T, H), summed over TP ranks


class FeedForward(nn.Module):
    """up (H -> I, column-parallel) -> activation -> down (I -> H, row-parallel)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str,
        layers: ParallelLayers,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.activation = activation_fn(activation)
        self.up = layers.column_linear(hidden_size, intermediate_size, init_std=init_std)
        self.down = layers.row_linear(intermediate_size, hidden_size, init_std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.activation(self.up(x)))  # (B, T, I/tp) in the middle


class TransformerLayer(CheckpointedLayer):
    """Post-LN layer (BERT/RoBERTa): x = LN(x + drop(attn(x))); x = LN(x + drop(ffn(x)))."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        activation: str,
        hidden_dropout: float,
        attention_dropout: float,
        layer_norm_eps: float,
        layers: ParallelLayers,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.attention = SelfAttention(hidden_size, num_heads, attention_dropout, layers, init_std)
        self.attention_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.ffn = FeedForward(hidden_size, intermediate_size, activation, layers, init_std)
        self.ffn_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(hidden_dropout)

    def layer_forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.dropout(self.attention(x, bias)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


def encoder_fields_from_hf(hf) -> dict:
    """A transformers config (its class's defaults where config.json leaves a key out) -> our
    BERT-family config fields; the inverse of models/config.hf_encoder_kwargs, the vocabulary
    padded for any TP <= 128."""
    from models.config import pad_vocab_size

    return dict(
        vocab_size=hf.vocab_size, padded_vocab_size=pad_vocab_size(hf.vocab_size), hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads, intermediate_size=hf.intermediate_size,
        max_position_embeddings=hf.max_position_embeddings, hidden_dropout=float(hf.hidden_dropout_prob),
        attention_dropout=float(hf.attention_probs_dropout_prob), layer_norm_eps=float(hf.layer_norm_eps),
        pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0,
        initializer_range=float(hf.initializer_range), type_vocab_size=hf.type_vocab_size,
        activation=hf.hidden_act)


def without_pretraining_heads(sd: dict) -> dict:
    """`sd` without the pretraining heads (MLM, NSP), which are no part of a classifier's backbone."""
    return {k: v for k, v in sd.items() if not k.startswith(("lm_head.", "nsp_head."))}


def word_embedding(config, width: int, layers: ParallelLayers, std: float) -> nn.Module:
    """The (vocabulary-parallel) word table, its pad token's row and vocabulary-padding rows at zero:
    as HF for the pad row; the padding rows are never predicted nor sampled (their logits are
    masked), so they stay zero and checkpoints round-trip exactly."""
    word = layers.vocab_embedding(config.padded_vocab_size, width, std)
    start, end = layers.vocab_range(config.padded_vocab_size)
    with torch.no_grad():
        if start <= config.pad_token_id < end:
            word.weight[config.pad_token_id - start].zero_()
        word.weight[max(config.vocab_size - start, 0) :].zero_()
    return word


def repad_vocab_rows(key: str, value: torch.Tensor, cfg) -> torch.Tensor:
    """A Hugging Face tensor of vocab_size rows (word table, MLM bias) -> ours, padded with zero rows
    to padded_vocab_size; ValueError naming `key` when its vocabulary is not the config's."""
    if value.shape[0] != cfg.vocab_size:
        raise ValueError(f"{key} has {value.shape[0]} vocabulary rows but the config's vocab_size is {cfg.vocab_size}")
    return torch.cat([value, value.new_zeros((cfg.padded_vocab_size - cfg.vocab_size, *value.shape[1:]))])


def count_parameters(model: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> int:
    """Parameters of the whole model (all TP ranks together, padded vocabulary included, a shared
    parameter once), leaving out those whose name `skip` matches."""
    total = 0
    for name, param in model.named_parameters():
        if skip(name):
            continue
        split = getattr(param, "tensor_model_parallel", False)
        total += param.numel() * (model.parallel.tp_size if split else 1)
    return total


HF_BERT_LAYER = {  # TransformerLayer's modules -> Hugging Face BERT-family layer's (RoBERTa, ELECTRA)
    "attention.query": "attention.self.query",
    "attention.key": "attention.self.key",
    "attention.value": "attention.self.value",
    "attention.output": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "ffn.up": "intermediate.dense",
    "ffn.down": "output.dense",
    "ffn_norm": "output.LayerNorm",
}
