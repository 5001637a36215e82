"""Configuration dataclasses of the model architectures (sizes live in models/registry.py)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from data.errors import UserError

ACTIVATIONS = ("gelu", "gelu_new", "relu")  # Hugging Face names: erf GELU, tanh GELU, ReLU


def pad_vocab_size(vocab_size: int, multiple: int = 128, tp_size: int = 1) -> int:
    """The smallest multiple of `multiple * tp_size` that is >= vocab_size.

    Padding makes the embedding/decoder matmuls GPU-friendly and lets every TP rank hold an equal
    slice of the vocabulary (VocabParallelEmbedding requires it). The extra rows never receive
    probability mass: the model masks their logits.
    """
    if vocab_size < 1 or multiple < 1 or tp_size < 1:
        raise UserError(
            f"pad_vocab_size needs positive sizes, got vocab_size={vocab_size}, "
            f"multiple={multiple}, tp_size={tp_size}"
        )
    step = multiple * tp_size
    return math.ceil(vocab_size / step) * step


def _check_types(cfg) -> None:
    """Reject wrong types by field name (configs come from YAML and `key=value` overrides)."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        kind = field.type
        if kind in ("int", "int | None"):
            ok = (value is None and kind == "int | None") or (
                isinstance(value, int) and not isinstance(value, bool)
            )
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                setattr(cfg, field.name, float(value))
        elif kind == "str":
            ok = isinstance(value, str)
        else:  # pragma: no cover - a new field type must be added above
            raise TypeError(f"unhandled config field type {kind} for {field.name}")
        if not ok:
            raise UserError(
                f"model config: {field.name} must be {kind}, got {value!r} ({type(value).__name__})"
            )


@dataclass
class RobertaConfig:
    """RoBERTa encoder with a masked-language-model head (Liu et al., 2019)."""

    vocab_size: int
    """Size of the tokenizer's vocabulary: the ids that can be predicted. Exported to Hugging Face."""

    hidden_size: int
    """Width of the residual stream (768 for base)."""

    num_layers: int
    """Number of transformer layers."""

    num_heads: int
    """Attention heads per layer; hidden_size / num_heads is the head size. TP splits the heads."""

    intermediate_size: int
    """Width of the feed-forward layer (4 * hidden_size in the paper's models)."""

    max_position_embeddings: int
    """Rows of the learned position table. HF RoBERTa layout: seq_length + 2, because positions
    start at pad_token_id + 1 (= 2) and pad tokens use row pad_token_id."""

    padded_vocab_size: int | None = None
    """Rows of the word embedding / tied decoder (>= vocab_size), padded so TP divides it; see
    `pad_vocab_size`. None means vocab_size. Rows >= vocab_size are never predicted."""

    hidden_dropout: float = 0.1
    """Dropout on the embeddings and on each sub-layer's output before the residual add."""

    attention_dropout: float = 0.1
    """Dropout on the attention probabilities."""

    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon (1e-5 in fairseq/HF RoBERTa)."""

    pad_token_id: int = 1
    """Id of the padding token (1 in the RoBERTa vocabulary); also the position-id offset."""

    initializer_range: float = 0.02
    """Standard deviation of the N(0, std) init of every weight matrix and embedding."""

    type_vocab_size: int = 1
    """Rows of the token-type table. RoBERTa uses no segments: one row, always id 0; kept so the
    weights map one to one onto Hugging Face's RobertaModel."""

    activation: str = "gelu"
    """Feed-forward activation, by its Hugging Face name: one of ACTIVATIONS."""

    def __post_init__(self):
        _check_types(self)
        if self.padded_vocab_size is None:
            self.padded_vocab_size = self.vocab_size
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "type_vocab_size"):
            if getattr(self, name) < 1:
                raise UserError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if self.padded_vocab_size < self.vocab_size:
            raise UserError(
                f"model config: padded_vocab_size ({self.padded_vocab_size}) must be >= vocab_size "
                f"({self.vocab_size}); use models.config.pad_vocab_size"
            )
        if self.hidden_size % self.num_heads:
            raise UserError(
                f"model config: hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads}); change one of them"
            )
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise UserError(
                f"model config: pad_token_id ({self.pad_token_id}) must be a vocabulary id "
                f"in [0, {self.vocab_size})"
            )
        if self.max_position_embeddings < self.pad_token_id + 2:
            raise UserError(
                f"model config: max_position_embeddings ({self.max_position_embeddings}) must be "
                f">= pad_token_id + 2; set it to seq_length + pad_token_id + 1"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"model config: {name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("layer_norm_eps", "initializer_range"):
            if getattr(self, name) <= 0:
                raise UserError(f"model config: {name} must be > 0, got {getattr(self, name)}")
        if self.activation not in ACTIVATIONS:
            raise UserError(
                f"model config: activation {self.activation!r} is unknown; use one of {', '.join(ACTIVATIONS)}"
            )

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_seq_length(self) -> int:
        """Longest input the position table holds (positions start after pad_token_id)."""
        return self.max_position_embeddings - self.pad_token_id - 1
