"""The one place where tensor parallelism enters the models.

`ParallelLayers` builds the layers a model splits across tensor-parallel (TP) ranks. At TP=1 they
are plain `nn.Linear` / `nn.Embedding` and no process group is needed; at TP>1 they are
megatron-core's `ColumnParallelLinear`, `RowParallelLinear` and `VocabParallelEmbedding`. In both
cases a layer's `forward(x)` returns one tensor and its state-dict keys are `weight` (and `bias`),
so model code and checkpoints look the same under every layout.

Every split parameter carries megatron's attributes (`tensor_model_parallel`, `partition_dim`,
`partition_stride`), at TP=1 too, so `partition_dims(model)` says which parameters a TP layout
splits and along which dimension; `shard_state_dict` / `merge_state_dicts` convert between a full
state dict and per-rank ones (contiguous chunks along that dimension).

Initialisation is N(0, init_std) drawn on the full (unsplit) weight from the ordinary torch RNG and
biases are zero, at every TP size: with the same seed, a layer built at TP=n holds exactly the
rank's shard of the layer built at TP=1 (megatron's CPU initialisation draws the full "master"
weight and keeps its slice).

On CPU (gloo), megatron-core 0.16.1's layers, `copy_to_tensor_model_parallel_region` and
`vocab_parallel_cross_entropy` work; its CUDA RNG tracker asserts (so `use_cpu_initialization`)
and `gather_from_tensor_model_parallel_region` allocates on `torch.cuda.current_device()` (so the
gather here is our own).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from data.errors import UserError

# megatron's names for the attributes it sets on split parameters.
_TP_ATTRIBUTES = ("tensor_model_parallel", "partition_dim", "partition_stride")


def _mark_split(param: nn.Parameter, dim: int) -> None:
    """Tag a parameter the way megatron-core tags the ones it splits (used at TP=1)."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


def import_megatron_core():
    """megatron.core, imported without its "Transformer Engine and Apex are not installed" noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex")
        import megatron.core

    return megatron.core


def _normal_init(std: float):
    def init(weight: torch.Tensor) -> None:
        nn.init.normal_(weight, mean=0.0, std=std)

    return init


@functools.cache
def _megatron_classes():
    """Subclasses of megatron-core's TP layers with a plain-tensor `forward` and plain state dict.

    megatron's linears return `(output, bias)` and define `get_extra_state`, which puts an
    `_extra_state: None` entry in every state dict (kept for Transformer Engine compatibility).
    Restoring `nn.Module.get_extra_state` removes that key, so TP=1 and TP>1 state dicts have the
    same keys. megatron's `set_extra_state` (which ignores its argument) stays: its load pre-hook
    inserts `_extra_state` into every state dict being loaded, and only an overridden
    `set_extra_state` consumes it under strict loading.
    Imported lazily: megatron-core is slow to import and TP=1 never needs it.
    """
    tensor_parallel = import_megatron_core().tensor_parallel

    class ColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
        get_extra_state = nn.Module.get_extra_state

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            output, _ = super().forward(x)  # bias already added: skip_bias_add=False
            return output

    class RowParallelLinear(tensor_parallel.RowParallelLinear):
        get_extra_state = nn.Module.get_extra_state

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            output, _ = super().forward(x)
            return output

    return ColumnParallelLinear, RowParallelLinear, tensor_parallel.VocabParallelEmbedding


class ParallelLayers:
    """Factory of TP-aware layers and the communication helpers that go with them.

    `ParallelLayers(tp_size=1)` needs nothing else. At TP>1 megatron-core's `parallel_state` must be
    initialised with that tensor-parallel size; `ParallelLayers.from_parallel_state()` reads it.
    """

    def __init__(self, tp_size: int = 1):
        if tp_size < 1:
            raise UserError(f"tensor-parallel size must be >= 1, got {tp_size}")
        self.tp_size = tp_size
        self.tp_rank = 0
        self.group = None
        self.model_parallel_config = None
        if tp_size > 1:
            core = import_megatron_core()
            ModelParallelConfig, parallel_state = core.ModelParallelConfig, core.parallel_state

            if not parallel_state.model_parallel_is_initialized():
                raise RuntimeError(
                    f"ParallelLayers(tp_size={tp_size}) needs megatron-core parallel_state "
                    "initialised first (parallel_state.initialize_model_parallel)"
                )
            initialised = parallel_state.get_tensor_model_parallel_world_size()
            if initialised != tp_size:
                raise RuntimeError(
                    f"ParallelLayers(tp_size={tp_size}) but parallel_state has TP={initialised}"
                )
            self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
            self.group = parallel_state.get_tensor_model_parallel_group()
            self.model_parallel_config = ModelParallelConfig(
                tensor_model_parallel_size=tp_size,
                use_cpu_initialization=True,  # the CUDA path needs megatron's CUDA RNG tracker
                params_dtype=torch.float32,
            )

    @classmethod
    def from_parallel_state(cls) -> "ParallelLayers":
        """The factory for the TP size megatron-core's parallel_state holds (TP=1 if uninitialised)."""
        parallel_state = import_megatron_core().parallel_state
        if not parallel_state.model_parallel_is_initialized():
            return cls(1)
        return cls(parallel_state.get_tensor_model_parallel_world_size())

    def __repr__(self) -> str:
        return f"ParallelLayers(tp_size={self.tp_size}, tp_rank={self.tp_rank})"

    def __deepcopy__(self, memo) -> "ParallelLayers":
        # Models keep a reference for their communication helpers; a process group cannot be
        # copied, and the factory holds no state a copy of the model would need to own.
        return self

    # ----------------------------------------------------------------------------- sizes
    def check_encoder(self, config) -> None:
        """UserError unless TP divides the encoder's heads, FFN width and padded vocabulary."""
        for what in ("num_heads", "intermediate_size", "padded_vocab_size"):
            self.divide(getattr(config, what), what)

    def divide(self, size: int, what: str) -> int:
        """`size / tp_size`, raising a UserError naming `what` when TP does not divide it."""
        if size % self.tp_size:
            raise UserError(
                f"{what} ({size}) must be divisible by the tensor-parallel size ({self.tp_size}); "
                "change one of them"
            )
        return size // self.tp_size

    def vocab_range(self, padded_vocab_size: int) -> tuple[int, int]:
        """[start, end) of the vocabulary rows this rank holds in vocab-parallel layers."""
        per_rank = self.divide(padded_vocab_size, "padded vocabulary size")
        return self.tp_rank * per_rank, (self.tp_rank + 1) * per_rank

    # ----------------------------------------------------------------------------- layers
    def column_linear(
        self, in_features: int, out_features: int, bias: bool = True, init_std: float = 0.02
    ) -> nn.Module:
        """y = x W^T + b with W's rows (the output features) split across TP ranks.

        Input: the full x on every rank. Output: this rank's slice of the features (not gathered).
        """
        if self.tp_size == 1:
            layer = self.linear(in_features, out_features, bias, init_std)
            _mark_split(layer.weight, 0)
            if bias:
                _mark_split(layer.bias, 0)
            return layer
        self.divide(out_features, "column-parallel output size")
        column, _, _ = _megatron_classes()
        return column(
            in_features,
            out_features,
            config=self.model_parallel_config,
            init_method=_normal_init(init_std),
            bias=bias,
            gather_output=False,
            skip_bias_add=False,
            tp_group=self.group,
        )

    # duplicates: row_linear mirrors column_linear on purpose (the split dimension and megatron-core's
    # gather_output / input_is_parallel keywords differ); one helper would hide which is which.
    def row_linear(
        self, in_features: int, out_features: int, bias: bool = True, init_std: float = 0.02
    ) -> nn.Module:
        """y = x W^T + b with W's columns (the input features) split across TP ranks.

        Input: this rank's slice of the features. Output: the full y, summed over ranks. The bias
        is not split (added once, after the sum).
        """
        if self.tp_size == 1:
            layer = self.linear(in_features, out_features, bias, init_std)
            _mark_split(layer.weight, 1)
            return layer
        self.divide(in_features, "row-parallel input size")
        _, row, _ = _megatron_classes()
        return row(
            in_features,
            out_features,
            config=self.model_parallel_config,
            init_method=_normal_init(init_std),
            bias=bias,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=self.group,
        )

    def vocab_embedding(
        self, num_embeddings: int, embedding_dim: int, init_std: float = 0.02
    ) -> nn.Module:
        """Embedding table with its rows (the vocabulary) split across TP ranks.

        Input: token ids over the whole vocabulary. Output: full embeddings on every rank.
        """
        if self.tp_size == 1:
            layer = self.embedding(num_embeddings, embedding_dim, init_std)
            _mark_split(layer.weight, 0)
            return layer
        self.divide(num_embeddings, "vocabulary-parallel embedding rows")
        _, _, vocab = _megatron_classes()
        return vocab(
            num_embeddings,
            embedding_dim,
            init_method=_normal_init(init_std),
            config=self.model_parallel_config,
            tp_group=self.group,
        )

    def vocab_parallel_bias(self, padded_vocab_size: int) -> nn.Parameter:
        """A zero bias over the vocabulary, split like `vocab_embedding`'s rows (decoder bias)."""
        bias = nn.Parameter(torch.zeros(self.divide(padded_vocab_size, "padded vocabulary size")))
        _mark_split(bias, 0)
        return bias

    @staticmethod
    def linear(
        in_features: int, out_features: int, bias: bool = True, init_std: float = 0.02
    ) -> nn.Linear:
        """A replicated (not split) `nn.Linear`, initialised like the split ones."""
        # skip_init: nn.Linear's own kaiming init would consume RNG that TP>1 layers do not.
        layer = nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias)
        nn.init.normal_(layer.weight, mean=0.0, std=init_std)
        if bias:
            nn.init.zeros_(layer.bias)
        return layer

    @staticmethod
    def embedding(num_embeddings: int, embedding_dim: int, init_std: float = 0.02) -> nn.Embedding:
        """A replicated (not split) `nn.Embedding` initialised N(0, init_std)."""
        layer = nn.utils.skip_init(nn.Embedding, num_embeddings, embedding_dim)
        nn.init.normal_(layer.weight, mean=0.0, std=init_std)
        return layer

    # ----------------------------------------------------------------------------- communication
    def copy_to_tp_region(self, x: torch.Tensor) -> torch.Tensor:
        """Identity forward; all-reduce of the gradient over TP ranks backward (megatron's "f")."""
        if self.tp_size == 1:
            return x
        tensor_parallel = import_megatron_core().tensor_parallel
        return tensor_parallel.copy_to_tensor_model_parallel_region(x, group=self.group)

    def gather_from_tp_region(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the ranks' slices along the last dimension (backward: keep own slice)."""
        if self.tp_size == 1:
            return x
        # Not megatron's gather_from_tensor_model_parallel_region: it allocates its buffer on
        # torch.cuda.current_device() and so fails on CPU.
        return _GatherLastDim.apply(x, self.group)

    def vocab_parallel_cross_entropy(
        self, logits: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        """Per-position cross-entropy (no reduction) of logits[..., V/tp] split by vocabulary.

        `target` holds global vocabulary ids and no ignore index: select the predicted positions
        first. The result is the full loss, identical on every TP rank. Computed in fp32.
        """
        if self.tp_size == 1:
            return F.cross_entropy(logits.float(), target, reduction="none")
        tensor_parallel = import_megatron_core().tensor_parallel
        # megatron's kernel subtracts the max in place from `logits.float()`, which for fp32 logits
        # is `logits` itself: pass a tensor no other autograd node saved (or expect an error).
        return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), target)


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dimension, on any device; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(group.size())]
        torch.distributed.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        group = ctx.group
        return grad.chunk(group.size(), dim=-1)[group.rank()].contiguous(), None


# --------------------------------------------------------------------------------- state dicts
def partition_dims(model: nn.Module) -> dict[str, int]:
    """{parameter name: dimension} of every parameter a TP layout splits (same at every TP size),
    under each name the state dict has for it (a module shared by two towers has two)."""
    dims = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if getattr(param, "tensor_model_parallel", False):
            if getattr(param, "partition_stride", 1) != 1:
                raise NotImplementedError(f"{name}: strided TP partitions are not supported")
            dims[name] = param.partition_dim
    return dims


def shard_state_dict(
    full_sd: dict[str, torch.Tensor], dims: dict[str, int], tp_rank: int, tp_size: int
) -> dict[str, torch.Tensor]:
    """The state dict of TP rank `tp_rank`: split entries are contiguous chunks, others copied."""
    shard = {}
    for key, value in full_sd.items():
        if key in dims:
            dim = dims[key]
            if value.shape[dim] % tp_size:
                raise ValueError(
                    f"{key}: size {value.shape[dim]} along dim {dim} not divisible by TP={tp_size}"
                )
            value = value.chunk(tp_size, dim=dim)[tp_rank]
        shard[key] = value.clone()
    return shard


def merge_state_dicts(
    rank_sds: list[dict[str, torch.Tensor]], dims: dict[str, int]
) -> dict[str, torch.Tensor]:
    """Inverse of `shard_state_dict`: split entries concatenated in rank order, others from rank 0."""
    if not rank_sds:
        raise ValueError("merge_state_dicts needs at least one state dict")
    keys = list(rank_sds[0])
    for rank, sd in enumerate(rank_sds[1:], start=1):
        if list(sd) != keys:
            raise ValueError(f"TP rank {rank} has different state-dict keys from rank 0")
    merged = {}
    for key in keys:
        if key in dims:
            merged[key] = torch.cat([sd[key] for sd in rank_sds], dim=dims[key])
        else:
            merged[key] = rank_sds[0][key]
    return merged
