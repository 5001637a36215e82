"""DeBERTa-v2/v3 for masked-language-model pretraining (its map to Hugging Face: models/deberta_hf.py).

Post-LN encoder with disentangled attention (He et al., 2020): besides content-to-content, a
query attends to relative positions (c2p: content query x relative-position key) and relative
positions attend to contents (p2c: relative-position query x content key). Relative distances are
bucketed (exact near zero, logarithmic further out: DeBERTaV3) into a table of 2k embeddings shared
by all layers. The Enhanced Mask Decoder (EMD) adds absolute positions only at the end: it runs the
last encoder layer again (the same weights, emd_layers times) with H_{L-1} (the last layer's
input) as keys and values and H_{L-1} + absolute position embeddings as the first query; each
pass's output is the next query, and the MLM head reads the last one. Laid out like Hugging Face's DebertaV2ForMaskedLM so weights map one to one (the EMD
has no counterpart there).

Shapes: B batch, T sequence, H hidden, nh heads (nh/tp on one tensor-parallel rank), hs head size,
2k relative embeddings, N predicted positions, V vocab_size, Vp padded_vocab_size.

Decisions:
- Query, key and value are three separate projections, not one fused QKV matrix: the tensor-parallel
  split is then a plain column split of each (no interleaving of q/k/v blocks per rank), and the
  map to Hugging Face's query_proj/key_proj/value_proj is one to one.
- Attention scores (q.k, the c2p and p2c terms) and the softmax are computed in fp32 whatever the
  parameter dtype or autocast: in fp16 the unscaled sums overflow, a known DeBERTa failure.
- Only padded keys (and, with document ids, other documents' keys) are masked (Hugging Face also
  masks padded query rows; their outputs are ignored).
  A fully padded row softmaxes to a uniform distribution, not NaN.
- The gather indices of the relative positions are cached per (length, device), the 8 most recent.
- `DebertaModel` is the backbone alone (embeddings + encoder, Hugging Face's DebertaV2Model), for
  an RTD discriminator; `DebertaForMaskedLM` extends it with the EMD and the MLM head, so both
  have the same state-dict keys for what they share.

Tensor parallelism comes only through `ParallelLayers`: q/k/v (and the separate position
projections) are column-parallel, so each rank holds some heads; the attention output is
row-parallel. The relative table is replicated; projecting it through the column-parallel layers
sums its gradient over ranks. Word embedding and tied decoder are vocab-parallel as in roberta.py.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from models.config import DebertaConfig
from models.disentangled_attention import (disentangled_attention, flat_relative_indices, reachable_window,
                                          relative_position_buckets)
from models.layers import (CheckpointedLayer, FeedForward, activation_fn, count_parameters, document_offsets,
                           masked_lm_metrics, predicted_positions, rows_at, same_document, word_embedding)
from models.nsp import NextSentenceHead, with_next_sentence_loss
from models.parallel import ParallelLayers

RELATIVE_CACHE_SIZE = 8  # sequence lengths whose relative-position indices stay cached


# --------------------------------------------------------------------------------------- modules
def per_document(positions: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(T, H) embeddings of positions 0..T-1 -> (B, T, H) those of each token's position within
    its document (attention_mask's document ids, models/layers.py); None: (T, H) as they are."""
    return positions if attention_mask is None else positions[document_offsets(attention_mask)]


class DebertaEmbeddings(nn.Module):
    """word (+ absolute position if position_biased_input) (+ token type row 0), LayerNorm,
    dropout. The position table is also the EMD's, hence `absolute_positions`; `position_table`
    builds it even when the input does not use it (for the EMD)."""

    def __init__(self, config: DebertaConfig, layers: ParallelLayers, position_table: bool = False):
        super().__init__()
        std = config.initializer_range
        self.position_biased_input = config.position_biased_input
        self.word = word_embedding(config, config.hidden_size, layers, std)  # pad and padding rows zero
        self.position = (
            layers.embedding(config.max_position_embeddings, config.hidden_size, std)
            if config.position_biased_input or position_table else None
        )
        self.token_type = (
            layers.embedding(config.type_vocab_size, config.hidden_size, std)
            if config.type_vocab_size > 0 else None
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def absolute_positions(self, length: int) -> torch.Tensor:
        """(T, H) embeddings of positions 0..T-1 (DeBERTa counts from 0, with no pad offset)."""
        if length > self.position.num_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings ({self.position.num_embeddings})"
            )
        return self.position.weight[:length]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids (and document ids, for position_biased_input) -> (B, T, H)."""
        x = self.word(input_ids)  # (B, T, H)
        if self.position_biased_input:
            x = x + per_document(self.absolute_positions(input_ids.shape[1]), attention_mask)
        if self.token_type is not None:
            x = x + self.token_type.weight[0]  # token-type id is always 0
        # Hugging Face also zeroes padding positions here; no real token can see them (their keys
        # are masked), so we do not.
        return self.dropout(self.norm(x))


class DisentangledSelfAttention(nn.Module):
    """softmax((q.k + c2p + p2c) / sqrt(hs * (1 + terms))) v; heads split across TP ranks.

    `hidden` gives keys and values; `query_states` (default `hidden`) gives queries, which the
    enhanced mask decoder sets apart.
    """

    def __init__(self, config: DebertaConfig, layers: ParallelLayers):
        super().__init__()
        H, std = config.hidden_size, config.initializer_range
        self.num_local_heads = layers.divide(config.num_heads, "num_heads")
        self.head_size = config.head_size
        self.content_to_position = "c2p" in config.pos_att_type
        self.position_to_content = "p2c" in config.pos_att_type
        terms = 1 + self.content_to_position + self.position_to_content
        self.scale = 1.0 / math.sqrt(self.head_size * terms)

        self.query = layers.column_linear(H, H, init_std=std)
        self.key = layers.column_linear(H, H, init_std=std)
        self.value = layers.column_linear(H, H, init_std=std)
        # DeBERTa-v1/v2 project positions with their own matrices; V3 reuses query/key (share_att_key).
        self.pos_key = self.pos_query = None
        if not config.share_att_key:
            if self.content_to_position:
                self.pos_key = layers.column_linear(H, H, init_std=std)
            if self.position_to_content:
                self.pos_query = layers.column_linear(H, H, init_std=std)
        self.output = layers.row_linear(H, H, init_std=std)
        self.relative_dropout = nn.Dropout(config.hidden_dropout)
        self.attention_dropout = nn.Dropout(config.attention_dropout)
        self.kernel = "auto"  # disentangled_attention's implementation (tests and benches set it)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, nh*hs) -> (B, nh, T, hs)."""
        B, T, _ = x.shape
        return x.view(B, T, self.num_local_heads, self.head_size).transpose(1, 2)

    def forward(
        self,
        hidden: torch.Tensor,
        key_padding: torch.Tensor,
        relative_table: torch.Tensor | None = None,
        relative_indices: tuple[torch.Tensor, torch.Tensor] | None = None,
        query_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden, query_states (B, T, H); key_padding (B, 1, T, T) (or (B, 1, 1, T)) bool, True
        where the query may not see the key (`key_padding_mask`);
        relative_table (2k, H) and relative_indices from DebertaEncoder.relative_inputs.
        -> (B, T, H), summed over TP ranks."""
        query_states = hidden if query_states is None else query_states
        B, T, _ = hidden.shape
        q = self._heads(self.query(query_states))  # (B, nh, T, hs)
        k = self._heads(self.key(hidden))  # (B, nh, T, hs)
        v = self._heads(self.value(hidden))  # (B, nh, T, hs)

        pos_key = pos_query = None
        if self.content_to_position or self.position_to_content:
            table = self.relative_dropout(relative_table)[None]  # (1, 2k, H)
            if self.content_to_position:
                project = self.key if self.pos_key is None else self.pos_key
                pos_key = self._heads(project(table))  # (1, nh, 2k, hs)
            if self.position_to_content:
                project = self.query if self.pos_query is None else self.pos_query
                pos_query = self._heads(project(table))  # (1, nh, 2k, hs)

        dropout = self.attention_dropout.p if self.training else 0.0
        context = disentangled_attention(
            q, k, v, pos_key, pos_query, relative_indices, key_padding, self.scale, dropout,
            kernel=self.kernel,
        )  # (B, nh, T, hs)
        context = context.transpose(1, 2).reshape(B, T, -1)  # (B, T, H/tp)
        return self.output(context)


class DebertaLayer(CheckpointedLayer):
    """Post-LN layer: x = LN(query + drop(attn(query; kv))); x = LN(x + drop(ffn(x)))."""

    def __init__(self, config: DebertaConfig, layers: ParallelLayers):
        super().__init__()
        H, std = config.hidden_size, config.initializer_range
        self.attention = DisentangledSelfAttention(config, layers)
        self.attention_norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.ffn = FeedForward(H, config.intermediate_size, config.activation, layers, std)
        self.ffn_norm = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def layer_forward(
        self,
        hidden: torch.Tensor,
        key_padding: torch.Tensor,
        relative_table: torch.Tensor | None,
        relative_indices: tuple[torch.Tensor, torch.Tensor] | None,
        query_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query = hidden if query_states is None else query_states
        attended = self.attention(hidden, key_padding, relative_table, relative_indices, query)
        x = self.attention_norm(query + self.dropout(attended))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class DebertaEncoder(nn.Module):
    """The layers and the relative-position embeddings they all share."""

    def __init__(self, config: DebertaConfig, layers: ParallelLayers):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(DebertaLayer(config, layers) for _ in range(config.num_layers))
        self.relative_embeddings = self.relative_norm = None
        if config.relative_attention:
            span = config.relative_span
            std = config.initializer_range
            self.relative_embeddings = layers.embedding(2 * span, config.hidden_size, std)
            if config.norm_rel_ebd == "layer_norm":
                self.relative_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # (T, device) -> (c2p, p2c, c2p_flat, p2c_flat), the least recently used dropped beyond
        # RELATIVE_CACHE_SIZE lengths (batches padded to their longest sample come in many lengths).
        self._index_cache: OrderedDict[tuple[int, torch.device], tuple[torch.Tensor, ...]] = OrderedDict()

    def relative_window(self, length: int) -> tuple[int, int]:
        """[lo, hi): the rows of the 2k relative embeddings a length reaches (`reachable_window`)."""
        return reachable_window(length, self.config.position_buckets, self.config.max_relative_distance,
                                self.config.relative_span)

    def relative_indices(self, length: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(c2p, p2c, c2p_flat, p2c_flat): gather indices (T, T) into the rows [lo, hi) of the 2k relative
        embeddings that the length reaches (`relative_window`), and their `flat_relative_indices`,
        cached per (T, device).

        c2p[i, j] = bucket(i - j) + k - lo and p2c[j, i] = -bucket(j - i) + k - lo, clipped to [0, 2k) first.
        """
        key = (length, torch.device(device))
        if key in self._index_cache:
            self._index_cache.move_to_end(key)
            return self._index_cache[key]
        span = self.config.relative_span
        lo, hi = self.relative_window(length)
        buckets = relative_position_buckets(
            length, self.config.position_buckets, self.config.max_relative_distance, device
        )  # (T, T)
        c2p = (buckets + span).clamp(0, 2 * span - 1) - lo
        p2c = (span - buckets).clamp(0, 2 * span - 1) - lo
        self._index_cache[key] = (c2p, p2c, *flat_relative_indices(c2p, p2c, hi - lo))
        while len(self._index_cache) > RELATIVE_CACHE_SIZE:
            self._index_cache.popitem(last=False)
        return self._index_cache[key]

    def relative_inputs(self, length: int, device: torch.device):
        """(the rows [lo, hi) of the relative table that the length reaches (hi - lo, H), normalised if
        norm_rel_ebd, and the gather indices into them), or Nones. Below about twice the bucket count
        the window is narrower than 2k (255 of 512 rows at 128 tokens with 256 buckets): every layer's
        position projections, c2p/p2c products and their backward scatters shrink with it."""
        if self.relative_embeddings is None:
            return None, None
        lo, hi = self.relative_window(length)
        table = self.relative_embeddings.weight[lo:hi]
        if self.relative_norm is not None:
            table = self.relative_norm(table)  # per row: the same rows as normalising the whole table
        return table, self.relative_indices(length, device)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, H) embeddings -> (output of the last layer, its input H_{L-1}), both (B, T, H)."""
        table, indices = self.relative_inputs(x.shape[1], x.device)
        last_input = x
        for layer in self.layers:
            last_input = x
            x = layer(x, key_padding, table, indices)
        return x, last_input


class MaskedLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> decoder tied to the word embedding (+ a vocabulary bias)."""

    def __init__(self, config: DebertaConfig, layers: ParallelLayers):
        super().__init__()
        self.parallel = layers
        self.activation = activation_fn(config.activation)
        self.dense = layers.linear(config.hidden_size, config.hidden_size, init_std=config.initializer_range)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = layers.vocab_parallel_bias(config.padded_vocab_size)  # (Vp/tp,)

    def forward(self, hidden: torch.Tensor, word_weight: torch.Tensor) -> torch.Tensor:
        """(..., H) and the local word-embedding shard (Vp/tp, H) -> local logits (..., Vp/tp)."""
        x = self.norm(self.activation(self.dense(hidden)))
        x = self.parallel.copy_to_tp_region(x)  # gradient summed over the vocabulary shards
        return F.linear(x, word_weight, self.bias)


def key_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask, 1 = token, 0 = padding, or document ids 1..k -> (B, 1, T, T) bool, True where
    the query may not see the key: padding, or another document (`same_document`). Relative
    positions need nothing more: a pair within one document has the distance it has alone."""
    return ~same_document(attention_mask)


class DebertaModel(nn.Module):
    """The backbone without a head (Hugging Face's DebertaV2Model): embeddings + encoder. The body of
    an RTD discriminator; the enhanced mask decoder belongs to the MLM model, not to this."""

    def __init__(self, config: DebertaConfig, layers: ParallelLayers, position_table: bool = False):
        super().__init__()
        self.config = config
        self.parallel = layers
        layers.check_encoder(config)
        self.embeddings = DebertaEmbeddings(config, layers, position_table)
        self.encoder = DebertaEncoder(config, layers)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask (1 = token, 0 = padding; or document ids 1..k, models/layers.py)
        -> encoder output (B, T, H), without EMD."""
        x = self.embeddings(input_ids, attention_mask)
        return self.encoder(x, key_padding_mask(attention_mask))[0]

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters of the whole model (all TP ranks together, padded vocabulary included).

        exclude_embeddings leaves out the word and absolute position tables (the count for FLOPs).
        """
        skip = {"embeddings.word.weight", "embeddings.position.weight"} if exclude_embeddings else set()
        return count_parameters(self, skip.__contains__)


class DebertaForMaskedLM(DebertaModel):
    """DeBERTa encoder (+ enhanced mask decoder) + MLM head. Same contract as RobertaForMaskedLM."""

    def __init__(self, config: DebertaConfig, layers: ParallelLayers):
        super().__init__(config, layers, position_table=config.absolute_positions)
        self.lm_head = MaskedLMHead(config, layers)
        # last: the other weights draw the same initial values with the head as without it
        self.nsp_head = (NextSentenceHead(config.hidden_size, config.initializer_range, layers)
                         if config.next_sentence_head else None)

        # True on the local vocabulary columns that are padding (global id >= vocab_size).
        start, end = layers.vocab_range(config.padded_vocab_size)
        padded = torch.arange(start, end) >= config.vocab_size  # (Vp/tp,)
        self.register_buffer("padded_vocab", padded, persistent=False)

    def enhanced_mask_decoder(
        self, last_input: torch.Tensor, key_padding: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """H_{L-1} (B, T, H) -> the EMD's output (B, T, H): the last encoder layer applied
        emd_layers times with keys/values H_{L-1}, first query H_{L-1} + absolute positions (from
        each document's start given document ids), each pass's output the next pass's query
        (microsoft/DeBERTa's EnhancedMaskDecoder)."""
        T = last_input.shape[1]
        layer = self.encoder.layers[-1]
        table, indices = self.encoder.relative_inputs(T, last_input.device)
        query = last_input + per_document(self.embeddings.absolute_positions(T), attention_mask)  # (B, T, H)
        for _ in range(self.config.emd_layers):
            query = layer(last_input, key_padding, table, indices, query_states=query)
        return query

    def mlm_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) states the MLM head reads: the EMD's output, or the encoder's without EMD."""
        return self._hidden_states(input_ids, attention_mask)[1]

    def _hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """(encoder output, states the MLM head reads), each (B, T, H)."""
        key_padding = key_padding_mask(attention_mask)  # (B, 1, T, T)
        hidden, last_input = self.encoder(self.embeddings(input_ids, attention_mask), key_padding)
        if self.config.enhanced_mask_decoder:
            return hidden, self.enhanced_mask_decoder(last_input, key_padding, attention_mask)
        return hidden, hidden

    def _vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> this rank's logits (..., Vp/tp), padded vocabulary entries at finfo.min (the same
        three lines as the ELECTRA generator's `vocab_logits`: each model's own head and tables)."""
        logits = self.lm_head(hidden, self.embeddings.word.weight)
        return logits.masked_fill(self.padded_vocab, torch.finfo(logits.dtype).min)

    def predicted_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Local logits (N, Vp/tp) at the (N,) flat positions (`predicted_positions`), through the
        EMD if enabled; padded vocabulary at finfo.min. The RTD generator interface.

        The head runs only on the predicted positions; the EMD runs on all of them (its queries
        are independent, but the bookkeeping to run it on N positions is not worth 2 layers).
        """
        return self._vocab_logits(rows_at(self.mlm_hidden(input_ids, attention_mask), positions))

    # The MLM models' forward contract (models/README.md): RoBERTa's signature and result, on purpose.
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        next_sentence_label: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """(B, T) ids, mask and labels (IGNORE_INDEX where not predicted) -> {
        "loss_sum": sum over predicted positions of the cross-entropy (fp32 scalar),
        "num_predicted": number of predicted positions (long scalar),
        "metrics": {"mlm_correct", "mlm_predicted"} long scalars (`masked_lm_metrics`)}.
        With the NSP head and next_sentence_label (B,) given: the MLM and NSP terms (models/nsp.py),
        the NSP head reading the first token of the encoder output (before the EMD)."""
        positions = predicted_positions(labels)  # (N,)
        targets = rows_at(labels, positions)  # (N,)
        nsp = self.nsp_head is not None and next_sentence_label is not None
        if nsp:
            encoded, hidden = self._hidden_states(input_ids, attention_mask)
            logits = self._vocab_logits(rows_at(hidden, positions))  # (N, Vp/tp)
        else:
            logits = self.predicted_logits(input_ids, attention_mask, positions)  # (N, Vp/tp)
        metrics = masked_lm_metrics(logits, targets, self.parallel, rows_at(input_ids, positions))  # before the loss
        losses = self.parallel.vocab_parallel_cross_entropy(logits, targets)  # (N,)
        out = {"loss_sum": losses.sum(), "num_predicted": positions.new_full((), positions.numel()),
               "metrics": metrics}
        if not nsp:
            return out
        return with_next_sentence_loss(out, self.nsp_head(encoded[:, 0]), next_sentence_label, self.config.nsp_weight)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Full MLM logits (B, T, V) (through the EMD if enabled): gathered over TP ranks, trimmed."""
        hidden = self.mlm_hidden(input_ids, attention_mask)
        logits = self.parallel.gather_from_tp_region(self._vocab_logits(hidden))  # (B, T, Vp)
        return logits[..., : self.config.vocab_size]
