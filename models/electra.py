"""ELECTRA towers and replaced token detection (RTD) over any generator/discriminator pair.

Shapes: B batch, T sequence, E embedding size, H hidden, N predicted positions (labelled by the
data pipeline), V vocab_size, Vp padded_vocab_size (Vp/tp rows on one tensor-parallel rank).

Forward contract of `ReplacedTokenDetection` (what the trainer relies on)
------------------------------------------------------------------------
    out = model(input_ids, attention_mask, labels, sample_index)
input_ids (B, T): the generator's input, already masked by the data pipeline (the selected tokens
    replaced by the mask token with probability `RTDConfig.generator_mask_token_prob`, the rest of
    the selected tokens unchanged); labels (B, T): the original id at selected positions, -100
    elsewhere; attention_mask (B, T): 1 = token, 0 = padding; sample_index (B,) long: the global
    index of each sample in the run's consumed-sample stream (seeds the generator's sampling).
out = {
  "loss_sums":    {"mlm": sum of the generator's cross-entropy over predicted positions,
                   "rtd": sum of the discriminator's binary cross-entropy over real tokens},
  "loss_weights": {"mlm": 1.0, "rtd": rtd_weight},
  "normalizers":  {"mlm": "predicted", "rtd": "tokens"},
  "metrics":      long scalars, sums over the micro-batch (see `ReplacedTokenDetection.forward`)}
The trainer sums loss_sums and metrics over micro-batches and data-parallel ranks and computes
    loss = sum_k loss_weights[k] * loss_sums[k] / global_count[normalizers[k]]
where global_count["predicted"] counts labels != -100 and global_count["tokens"] counts
attention_mask == 1 over the whole global batch (`total_loss` is that formula), so the loss does
not depend on micro-batching or the data-parallel size.

Embedding sharing (`RTDConfig.embedding_sharing`) covers the word table and, where both towers
have one, the absolute position table (the ELECTRA paper shares "token and position embeddings"):
  none  separate tables;
  es    the discriminator looks up the generator's table: both losses update it;
  gdes  E_D = sg(E_G) + E_Delta (DeBERTaV3): E_Delta starts at zero, is the discriminator's own
        parameter (`...gdes_delta.weight`), and is the only table the RTD loss updates; the MLM
        loss updates E_G. E_Delta is built from the discriminator's own table module, so it has
        E_G's shape and vocabulary-parallel partitioning. The discriminator's exported E_D is
        E_G + E_Delta (`merged_discriminator_embeddings`, `split_state_dict`).
Ownership (ZeRO-3 gathers a module's parameters only around that module's own forward): every
table is read only inside the forward of the module that registers it. E_G stays registered in
the generator (one owner, one state-dict key, so TP sharding by name still works); the
discriminator's `SharedEmbedding` keeps an unregistered reference to E_G's module and *calls* it,
so E_G is gathered by its owner's hooks; E_Delta is a registered submodule of `SharedEmbedding`
and is called the same way. (Reading `.weight` of a `SharedEmbedding` outside a forward, as
export does, needs the parameters gathered first, e.g. deepspeed.zero.GatheredParameters.)

Weight decay: E_Delta is a 2-D table named `gdes_delta`, so the usual rule (no decay for 1-D and
`norm` parameters) decays it. That is deliberate: decoupled decay on E_G and on E_Delta sums to
exactly the decay E_D = E_G + E_Delta would get as a table of its own (as under `none`), and
microsoft/DeBERTa decays it too. A recipe that wants E_D free to drift can exclude `gdes_delta`.

DeBERTaV3 (backbone "deberta", registry name deberta_v3): the generator is `DebertaForMaskedLM`
(EMD on), the discriminator `deberta_v3_discriminator` (`DebertaModel` + `DebertaV3DiscriminatorHead`,
no EMD), GDES by default. With position_biased_input false (V3) the discriminator has no absolute
position table, so only the word table is shared: the generator's position table is the EMD's own.

Any tower pair plugs in: the generator exposes `embeddings` (with `word`, optionally `position`),
`config.vocab_size/padded_vocab_size`, `parallel` and `predicted_logits(input_ids,
attention_mask, predicted)`; the discriminator exposes `embeddings` and `rtd_logits(input_ids,
attention_mask)` (`RTDDiscriminator` makes one from any backbone with `encode` and a head such as
`DebertaV3DiscriminatorHead`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.errors import UserError
from models import deberta
from models.config import RTD_BACKBONE_CONFIGS, DebertaConfig, ElectraConfig, RTDConfig, hf_encoder_kwargs
from models.deberta import DebertaForMaskedLM, DebertaModel
from models.layers import IGNORE_INDEX, TransformerLayer, activation_fn, attention_bias, predicted_positions, rows_at
from models.parallel import ParallelLayers

SAMPLING_STREAM = 0x47454E53  # "GENS": keeps the generator's sampling apart from masking's streams
SHARED_TABLES = ("word", "position")  # embedding tables shared under es / gdes, where both have them


# ------------------------------------------------------------------------------ ELECTRA towers
class ElectraEmbeddings(nn.Module):
    """word + position (0..T-1) + token type (always 0), LayerNorm, dropout; width E."""

    def __init__(self, config: ElectraConfig, layers: ParallelLayers):
        super().__init__()
        std, E = config.initializer_range, config.embedding_size
        self.word = layers.vocab_embedding(config.padded_vocab_size, E, std)
        self.position = layers.embedding(config.max_position_embeddings, E, std)
        self.token_type = layers.embedding(config.type_vocab_size, E, std)
        self.norm = nn.LayerNorm(E, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

        # As HF, the pad token's row starts at zero; so do the vocabulary-padding rows (never
        # predicted nor sampled, so they stay zero and checkpoints round-trip exactly).
        start, end = layers.vocab_range(config.padded_vocab_size)
        with torch.no_grad():
            if start <= config.pad_token_id < end:
                self.word.weight[config.pad_token_id - start].zero_()
            self.word.weight[max(config.vocab_size - start, 0) :].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.position.num_embeddings:
            raise ValueError(
                f"sequence length {T} exceeds max_position_embeddings ({self.position.num_embeddings})"
            )
        # Tables are called, never indexed, so a shared table's owner runs its own forward.
        positions = self.position(torch.arange(T, device=input_ids.device))  # (T, E)
        token_type = self.token_type(input_ids.new_zeros(()))  # (E,), token-type id is always 0
        x = self.word(input_ids) + token_type + positions  # (B, T, E)
        return self.dropout(self.norm(x))


class ElectraBackbone(nn.Module):
    """HF ElectraModel: embeddings (width E) -> projection to H if E != H -> post-LN layers."""

    def __init__(self, config: ElectraConfig, layers: ParallelLayers):
        super().__init__()
        self.config = config
        self.parallel = layers
        std = config.initializer_range
        layers.divide(config.num_heads, "num_heads")
        layers.divide(config.intermediate_size, "intermediate_size")
        layers.divide(config.padded_vocab_size, "padded_vocab_size")
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
        """(B, T) ids and mask (1 = token, 0 = padding) -> final hidden states (B, T, H)."""
        x = self.embeddings(input_ids)  # (B, T, E)
        if self.project is not None:
            x = self.project(x)  # (B, T, H)
        bias = attention_bias(attention_mask, x.dtype)  # (B, 1, 1, T)
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
        """MLM alone, RobertaForMaskedLM's contract: {"loss_sum", "num_predicted"}."""
        positions = predicted_positions(labels)  # (N,)
        logits = self.predicted_logits(input_ids, attention_mask, positions)
        losses = self.parallel.vocab_parallel_cross_entropy(logits, rows_at(labels, positions))  # (N,)
        return {"loss_sum": losses.sum(), "num_predicted": positions.new_tensor(positions.numel())}

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

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, T) logits of "replaced"."""
        x = self.norm(hidden[:, :1] + hidden)  # (B, T, H); h_CLS broadcast over T
        return self.classifier(self.activation(self.dense(x))).squeeze(-1)


class ElectraDiscriminator(ElectraBackbone):
    """ELECTRA discriminator: backbone + per-token head (HF ElectraForPreTraining)."""

    def __init__(self, config: ElectraConfig, layers: ParallelLayers):
        super().__init__(config, layers)
        self.head = ElectraDiscriminatorHead(config, layers)

    def rtd_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> (B, T) logits of "replaced" (HF ElectraForPreTraining.logits)."""
        return self.head(self.encode(input_ids, attention_mask))

    forward = rtd_logits


class RTDDiscriminator(nn.Module):
    """A discriminator from any backbone with `encode` and `embeddings` (DeBERTa) and a head.

    The backbone must not carry an MLM head: its parameters would get no gradient (a DDP/ZeRO
    error, and dead weight in the checkpoint).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def embeddings(self) -> nn.Module:
        return self.backbone.embeddings

    def rtd_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.encode(input_ids, attention_mask))

    forward = rtd_logits


def deberta_v3_discriminator(config: DebertaConfig, layers: ParallelLayers) -> RTDDiscriminator:
    """DeBERTaV3's discriminator: the DeBERTa backbone (no MLM head, no EMD: RTDConfig rejects
    enhanced_mask_decoder on it) + microsoft/DeBERTa's RTD head over the last layer's states."""
    return RTDDiscriminator(DebertaModel(config, layers), DebertaV3DiscriminatorHead(config, layers))


# ---------------------------------------------------------------------------- embedding sharing
class SharedEmbedding(nn.Module):
    """The discriminator's view of a generator table: E_G (es) or sg(E_G) + E_Delta (gdes).

    E_G's module is referenced, not registered (see the module docstring: one owner per table),
    and called, so under ZeRO-3 its owner's hooks gather it. E_Delta (`gdes_delta`) is registered
    here. The sum is taken after the lookups (lookup is linear), so no Vp x E table is built.
    """

    def __init__(self, source: nn.Module, gdes_delta: nn.Module | None):
        super().__init__()
        self._source = (source,)  # a tuple hides it from nn.Module registration
        self.gdes_delta = gdes_delta

    @property
    def source(self) -> nn.Module:
        return self._source[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        shared = self.source(ids)
        if self.gdes_delta is None:
            return shared  # es: the RTD gradient reaches E_G
        return shared.detach() + self.gdes_delta(ids)  # gdes: stop-gradient on E_G

    @property
    def weight(self) -> torch.Tensor:
        """The effective table (local shard): E_G, or E_G (detached) + E_Delta."""
        if self.gdes_delta is None:
            return self.source.weight
        return self.source.weight.detach() + self.gdes_delta.weight

    @property
    def num_embeddings(self) -> int:
        return self.source.num_embeddings


def share_embeddings(generator: nn.Module, discriminator: nn.Module, mode: str) -> tuple[str, ...]:
    """Point the discriminator's tables at the generator's (`mode` es or gdes); the names shared.

    A table is shared when both towers' `embeddings` have it (DeBERTaV3's discriminator has no
    absolute positions). Under gdes the discriminator's own table module, zeroed, becomes E_Delta:
    same shape, same class, same TP partitioning as E_G.
    """
    if mode == "none":
        return ()
    gen_tables = dict(generator.embeddings.named_children())
    disc_tables = dict(discriminator.embeddings.named_children())
    shared = []
    for name in SHARED_TABLES:
        if name not in gen_tables or name not in disc_tables:
            continue
        source, own = gen_tables[name], disc_tables[name]
        if source.weight.shape != own.weight.shape:
            raise UserError(
                f"embedding_sharing {mode}: the generator's {name} table {tuple(source.weight.shape)} "
                f"and the discriminator's {tuple(own.weight.shape)} differ; use equal sizes or none"
            )
        delta = None
        if mode == "gdes":
            with torch.no_grad():
                own.weight.zero_()
            delta = own
        setattr(discriminator.embeddings, name, SharedEmbedding(source, delta))
        shared.append(name)
    return tuple(shared)


def _module_path(root: nn.Module, module: nn.Module) -> str:
    for name, candidate in root.named_modules():
        if candidate is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(root).__name__}")


def split_state_dict(
    rtd_sd: dict[str, torch.Tensor],
    shared_tables: tuple[str, ...],
    embedding_sharing: str,
    discriminator_embeddings: str = "embeddings",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An RTD state dict (full, or one TP rank's) -> the generator's and the discriminator's as
    stand-alone towers: the discriminator's shared tables become plain `{path}.{name}.weight`
    entries holding E_G (es) or E_G + E_Delta (gdes), what is exported as E_D."""
    gen = {k[len("generator.") :]: v for k, v in rtd_sd.items() if k.startswith("generator.")}
    disc = {k[len("discriminator.") :]: v for k, v in rtd_sd.items() if k.startswith("discriminator.")}
    for name in shared_tables:
        table = f"{discriminator_embeddings}.{name}"
        shared = gen[f"embeddings.{name}.weight"]
        if embedding_sharing == "gdes":
            disc[f"{table}.weight"] = shared + disc.pop(f"{table}.gdes_delta.weight")
        else:
            disc[f"{table}.weight"] = shared.clone()
    return gen, disc


def join_state_dicts(
    gen_sd: dict[str, torch.Tensor],
    disc_sd: dict[str, torch.Tensor],
    shared_tables: tuple[str, ...],
    embedding_sharing: str,
    discriminator_embeddings: str = "embeddings",
) -> dict[str, torch.Tensor]:
    """Inverse of `split_state_dict`: E_Delta = E_D - E_G under gdes; under es E_D must be E_G."""
    disc = dict(disc_sd)
    for name in shared_tables:
        table = f"{discriminator_embeddings}.{name}"
        merged, shared = disc.pop(f"{table}.weight"), gen_sd[f"embeddings.{name}.weight"]
        if embedding_sharing == "gdes":
            disc[f"{table}.gdes_delta.weight"] = merged - shared
        elif not torch.equal(merged, shared):
            raise ValueError(
                f"embedding_sharing es: the discriminator's {name} table differs from the "
                "generator's; load it with embedding_sharing gdes or none"
            )
    return {**{f"generator.{k}": v for k, v in gen_sd.items()},
            **{f"discriminator.{k}": v for k, v in disc.items()}}


# ------------------------------------------------------------------------------------ sampling
def sampling_seed(seed: int, sample_index: int) -> int:
    """The seed of one sample's sampling noise: from (run seed, global sample index) only."""
    state = np.random.SeedSequence([seed, sample_index, SAMPLING_STREAM]).generate_state(1, np.uint64)[0]
    return int(state) & (2**63 - 1)


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
def sample_replacements(
    local_logits: torch.Tensor,
    rows_per_sample: Sequence[int] | torch.Tensor,
    sample_index: Sequence[int] | torch.Tensor,
    seed: int,
    temperature: float,
    vocab_size: int,
    parallel: ParallelLayers,
) -> torch.Tensor:
    """Gumbel-max samples from softmax(logits / temperature) over the real vocabulary: (N,) ids.

    local_logits (N, Vp/tp): rows grouped by sample, rows_per_sample[b] of them for sample b.
    The noise of sample b is drawn for all V real ids from a generator seeded by
    (seed, sample_index[b]) and this rank keeps its vocabulary slice, so a sample gets the same
    replacement at any TP size, micro-batching or data-parallel layout; padded ids (>= V) get
    -inf and are never drawn. No autograd: the sampled ids are integers. The per-sample loop runs
    on the host: give rows_per_sample and sample_index as lists to keep it from syncing here.
    """
    rows_per_sample, sample_index = (x.tolist() if torch.is_tensor(x) else x for x in (rows_per_sample, sample_index))
    device = local_logits.device
    width = local_logits.shape[-1]
    start = parallel.tp_rank * width
    real = max(0, min(width, vocab_size - start))  # real ids on this rank: start .. start + real
    noise = torch.full(local_logits.shape, -torch.inf, dtype=torch.float32, device=device)
    row = 0
    for index, count in zip(sample_index, rows_per_sample):
        if count == 0:
            continue
        generator = torch.Generator(device=device).manual_seed(sampling_seed(seed, index))
        uniform = torch.rand((count, vocab_size), generator=generator, device=device)  # (n_b, V)
        uniform = uniform[:, start : start + real].clamp_min(torch.finfo(torch.float32).tiny)
        noise[row : row + count, :real] = -torch.log(-torch.log(uniform))  # Gumbel(0, 1)
        row += count
    return global_argmax(local_logits.float() / temperature + noise, parallel)


# ------------------------------------------------------------------------ replaced token detection
class ReplacedTokenDetection(nn.Module):
    """Generator (MLM) + discriminator (RTD) trained jointly, with embedding sharing.

    `sampling_seed` (the run's seed; the trainer sets it) and each sample's global index seed the
    generator's samples, so TP peers agree and a resumed run replays the same replacements.
    """

    def __init__(
        self, generator: nn.Module, discriminator: nn.Module, config: RTDConfig, sampling_seed: int = 0
    ):
        super().__init__()
        self.config = config
        self.generator = generator
        self.discriminator = discriminator
        self.parallel = generator.parallel
        self.sampling_seed = sampling_seed
        self.shared_tables = share_embeddings(generator, discriminator, config.embedding_sharing)
        self.discriminator_embeddings = _module_path(discriminator, discriminator.embeddings)
        self.loss_weights = {"mlm": 1.0, "rtd": config.rtd_weight}
        """The weights of the two terms; a training schedule may change them between steps."""

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        sample_index: torch.Tensor,
    ) -> dict[str, dict]:
        """See the module docstring for the contract. metrics (long scalars, micro-batch sums):
        mlm_correct / mlm_predicted: generator argmax == original, over predicted positions;
        rtd_correct / rtd_tokens: discriminator right (logit > 0 means "replaced"), real tokens;
        rtd_true_positives, rtd_predicted_positives, rtd_actual_positives (= the number of
        replaced tokens): precision = TP / predicted positives, recall = TP / actual positives.
        """
        positions = predicted_positions(labels)  # (N,) flat; a host sync before any layer is queued
        # The sampler's per-sample loop needs its counts and indices on the host: read them now too.
        rows_per_sample = labels.ne(IGNORE_INDEX).sum(dim=1)  # (B,)
        host = torch.cat([rows_per_sample, sample_index.to(rows_per_sample)]).tolist()
        rows_per_sample, sample_ids = host[: len(host) // 2], host[len(host) // 2:]
        real = attention_mask.bool()  # (B, T)
        targets = rows_at(labels, positions)  # (N,) original ids
        gen_logits = self.generator.predicted_logits(input_ids, attention_mask, positions)  # (N, Vp/tp)

        # Read the logits before the loss: megatron's vocab-parallel cross-entropy works in place.
        with torch.no_grad():
            sampled = sample_replacements(
                gen_logits.detach(), rows_per_sample, sample_ids, self.sampling_seed,
                self.config.temperature, self.generator.config.vocab_size, self.parallel,
            )  # (N,)
            generator_argmax = global_argmax(gen_logits.detach(), self.parallel)  # (N,)
            original = input_ids.flatten().index_copy(0, positions, targets)  # (B*T,) the unmasked input
            corrupted = original.index_copy(0, positions, sampled).view_as(input_ids)  # the discriminator's input
            replaced = (corrupted != original.view_as(input_ids)) & real  # a sample equal to the original is original

        mlm_losses = self.parallel.vocab_parallel_cross_entropy(gen_logits, targets)  # (N,)
        rtd_logits = self.discriminator.rtd_logits(corrupted, attention_mask)  # (B, T)
        # Padding weighs 0 (a weight, not boolean indexing, which would sync on the host).
        rtd_losses = F.binary_cross_entropy_with_logits(
            rtd_logits.float(), replaced.float(), weight=real.float(), reduction="none"
        )  # (B, T)

        with torch.no_grad():
            guess = (rtd_logits.detach() > 0) & real  # (B, T) predicted "replaced"
            metrics = {
                "mlm_correct": (generator_argmax == targets).sum(),
                "mlm_predicted": positions.new_tensor(positions.numel()),
                "rtd_correct": ((guess == replaced) & real).sum(),
                "rtd_tokens": real.sum(),
                "rtd_true_positives": (guess & replaced).sum(),
                "rtd_predicted_positives": guess.sum(),
                "rtd_actual_positives": replaced.sum(),
            }
        return {
            "loss_sums": {"mlm": mlm_losses.sum(), "rtd": rtd_losses.sum()},
            "loss_weights": dict(self.loss_weights),
            "normalizers": {"mlm": "predicted", "rtd": "tokens"},
            "metrics": metrics,
        }

    @torch.no_grad()
    def merged_discriminator_embeddings(self) -> dict[str, torch.Tensor]:
        """The discriminator's effective tables (local TP shards): E_G + E_Delta under gdes, E_G
        under es, its own under none. This is what is exported as its E_D."""
        tables = dict(self.discriminator.embeddings.named_children())
        return {name: tables[name].weight.detach().clone() for name in SHARED_TABLES if name in tables}

    def split_state_dict(self, rtd_sd: dict[str, torch.Tensor]):
        """(generator's, discriminator's) stand-alone state dicts; see `split_state_dict`."""
        return split_state_dict(rtd_sd, self.shared_tables, self.config.embedding_sharing,
                                self.discriminator_embeddings)

    def join_state_dicts(self, gen_sd: dict[str, torch.Tensor], disc_sd: dict[str, torch.Tensor]):
        """This model's state dict from stand-alone tower state dicts; see `join_state_dicts`."""
        return join_state_dicts(gen_sd, disc_sd, self.shared_tables, self.config.embedding_sharing,
                                self.discriminator_embeddings)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters of both towers (all TP ranks together, each shared table once).

        exclude_embeddings leaves out the word/position tables and E_Delta (the count for FLOPs).
        """
        total = 0
        for name, param in self.named_parameters():
            if exclude_embeddings and (
                ".embeddings.word." in name or ".embeddings.position." in name or "gdes_delta" in name
            ):
                continue
            split = getattr(param, "tensor_model_parallel", False)
            total += param.numel() * (self.parallel.tp_size if split else 1)
        return total


def total_loss(output: dict, counts: dict[str, torch.Tensor | float]) -> torch.Tensor:
    """sum_k weight_k * loss_sum_k / counts[normalizer_k], counts over the global batch (>= 1)."""
    total = 0.0
    for key, loss_sum in output["loss_sums"].items():
        count = torch.as_tensor(counts[output["normalizers"][key]], dtype=torch.float64).clamp(min=1.0)
        total = total + output["loss_weights"][key] * loss_sum / count.to(loss_sum)
    return total


# RTDConfig.backbone -> (generator, discriminator) builders.
RTD_TOWERS = {
    "electra": (ElectraGenerator, ElectraDiscriminator),
    "deberta": (DebertaForMaskedLM, deberta_v3_discriminator),  # DeBERTaV3
}

# Per backbone, what differs from the dataclasses' defaults (a size's fields and overrides win):
# DeBERTaV3 trains with GDES, and its discriminator is the bare backbone (the EMD is part of the
# generator's MLM decoder; microsoft/DeBERTa's RTD head reads the last encoder layer).
RTD_DEFAULTS = {
    "electra": {},
    "deberta": {"embedding_sharing": "gdes", "discriminator": {"enhanced_mask_decoder": False}},
}


_RTD_FIELDS = ("rtd_weight", "temperature", "embedding_sharing", "generator_mask_token_prob")
_TOWERS = ("generator", "discriminator")
_DERIVED = ("vocab_size", "padded_vocab_size", "max_position_embeddings")  # from tokenizer / data


def build_rtd_config(
    size_fields: dict, overrides: dict, *, vocab_size: int, padded_vocab_size: int, seq_length: int,
    backbone: str = "electra",
) -> RTDConfig:
    """The RTDConfig of one registry size (registry `config_builder`).

    size_fields: {"generator": {...}, "discriminator": {...}} tower fields. overrides: RTD fields
    (rtd_weight, ...), "generator"/"discriminator" dicts of tower fields, or a tower field (say
    hidden_dropout) set on both towers; what they leave unset comes from RTD_DEFAULTS[backbone],
    then the dataclasses. Positions 0..T-1 with at least 512 rows, as every released ELECTRA and
    DeBERTa (HF's default), so exported models take the usual lengths.
    """
    tower_class = RTD_BACKBONE_CONFIGS[backbone]
    tower_fields = [f.name for f in dataclasses.fields(tower_class) if f.name not in _DERIVED]
    valid = [*_RTD_FIELDS, *_TOWERS, *tower_fields]
    if seq_length < 1:
        raise UserError(f"data.seq_length must be >= 1, got {seq_length}")
    defaults = RTD_DEFAULTS[backbone]
    towers = {name: {**defaults.get(name, {}), **size_fields[name]} for name in _TOWERS}
    rtd = {key: value for key, value in defaults.items() if key in _RTD_FIELDS}
    for key, value in overrides.items():
        if key in _RTD_FIELDS:
            rtd[key] = value
        elif key in _TOWERS:  # applied below, after the fields set on both towers
            if not isinstance(value, dict):
                raise UserError(f"model override {key!r} must be a mapping of {backbone} tower fields")
            unknown = sorted(set(value) - set(tower_fields))
            if unknown:
                raise UserError(
                    f"model override '{key}.{unknown[0]}' is not a {backbone} tower field; "
                    f"valid: {', '.join(tower_fields)}"
                )
        elif key in tower_fields:
            for name in _TOWERS:
                towers[name][key] = value
        else:
            raise UserError(
                f"model override {key!r} is not a {backbone} config field; valid: {', '.join(valid)}"
            )
    derived = dict(vocab_size=vocab_size, padded_vocab_size=padded_vocab_size,
                   max_position_embeddings=max(seq_length, 512))
    for name in _TOWERS:  # a tower's own override wins over one set on both
        towers[name].update(overrides.get(name, {}))
        towers[name].update(derived)
    return RTDConfig(**towers, backbone=backbone, **rtd)


def build_rtd(config: RTDConfig, layers: ParallelLayers) -> ReplacedTokenDetection:
    """The RTD model of `config` (generator drawn first, then the discriminator, from the torch RNG)."""
    make_generator, make_discriminator = RTD_TOWERS[config.backbone]
    generator = make_generator(config.generator, layers)
    discriminator = make_discriminator(config.discriminator, layers)
    return ReplacedTokenDetection(generator, discriminator, config)


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
_HF_LAYER = {  # under layers.{i}. / electra.encoder.layer.{i}. (BERT's layout)
    "attention.query": "attention.self.query",
    "attention.key": "attention.self.key",
    "attention.value": "attention.self.value",
    "attention.output": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "ffn.up": "intermediate.dense",
    "ffn.down": "output.dense",
    "ffn_norm": "output.LayerNorm",
}
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
            if value.shape[0] != cfg.vocab_size:
                raise ValueError(
                    f"{key} has {value.shape[0]} vocabulary rows but the config's vocab_size is "
                    f"{cfg.vocab_size}"
                )
            padding = value.new_zeros((cfg.padded_vocab_size - cfg.vocab_size, *value.shape[1:]))
            value = torch.cat([value, padding])
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


# ------------------------------------------------------------------- DeBERTaV3 and Hugging Face
# The towers export through deberta.py's map: the generator as DebertaV2ForMaskedLM (the EMD's
# position table is dropped with a DroppedOnExportWarning: Hugging Face has no EMD), the
# discriminator as DebertaV2Model with E_D = E_G + E_Delta merged. Hugging Face has no RTD head,
# so it goes apart, keyed as in microsoft/DeBERTa's ReplacedTokenDetectionModel
# (`mask_predictions` = LMMaskPredictionHead; "classifer" is their spelling).
DEBERTA_V3_COMPONENTS = {"generator": "mlm", "discriminator": "backbone"}  # -> deberta.py's
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
    return deberta.hf_config(getattr(cfg, component), _deberta_v3_component(component))


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
    return deberta.to_hf_state_dict(gen if component == "generator" else backbone,
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
    gen = deberta.from_hf_state_dict(hf_sds["generator"], cfg.generator)
    backbone = deberta.from_hf_state_dict(hf_sds["discriminator"], cfg.discriminator)
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
