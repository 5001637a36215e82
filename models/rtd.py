"""Replaced token detection (RTD) over any generator/discriminator pair: embedding sharing,
the generator's sampling, the joint loss and the RTD config.

Shapes: B batch, T sequence, E embedding size, H hidden, N predicted positions (labelled by the
data pipeline), V vocab_size, Vp padded_vocab_size (Vp/tp rows on one tensor-parallel rank).

Forward contract of `ReplacedTokenDetection` (what the trainer relies on)
------------------------------------------------------------------------
    out = model(input_ids, attention_mask, labels, sample_index)
input_ids (B, T): the generator's input, already masked by the data pipeline (the selected tokens
    replaced by the mask token with probability data.mask_token_prob, by a random token with
    data.random_token_prob, the rest unchanged: the RTD recipes mask them all); labels (B, T): the original id at selected positions, -100
    elsewhere; attention_mask (B, T): 1 = token, 0 = padding, or document ids 1..k (both towers
    then attend within each document, models/layers.py); sample_index (B,) long: the global
    index of each sample in the run's consumed-sample stream (seeds the generator's sampling).
out = {
  "loss_sums":    {"mlm": sum of the generator's cross-entropy over predicted positions,
                   "rtd": sum of the discriminator's binary cross-entropy over real tokens},
  "loss_weights": {"mlm": 1.0, "rtd": rtd_weight},
  "normalizers":  {"mlm": "predicted", "rtd": "tokens"},
  "metrics":      long scalars or fixed-length long vectors (histograms), sums over the
                  micro-batch (see `ReplacedTokenDetection.forward`)}
The trainer sums loss_sums and metrics over micro-batches and data-parallel ranks and computes
    loss = sum_k loss_weights[k] * loss_sums[k] / global_count[normalizers[k]]
where global_count["predicted"] counts labels != -100 and global_count["tokens"] counts
attention_mask != 0 over the whole global batch (`total_loss` is that formula), so the loss does
not depend on micro-batching or the data-parallel size.

Embedding sharing (`RTDConfig.embedding_sharing`) covers the word table and, where both towers
have one, the absolute position table (the ELECTRA paper shares "token and position embeddings"):
  none  separate tables;
  es    the discriminator looks up the generator's table: both losses update it;
  gdes  E_D = sg(E_G) + E_Delta (DeBERTaV3): E_Delta starts at zero, is the discriminator's own
        parameter (`...gdes_delta.weight`), and is the only table the RTD loss updates; the MLM
        loss updates E_G. E_Delta is built from the discriminator's own table module, so it has
        E_G's shape and vocabulary-parallel partitioning. The discriminator's exported E_D is
        E_G + E_Delta (`merged_discriminator_embeddings`, `split_state_dict`);
  all   (ELECTRA section 3.2, equal tower configs, electra only) the generator's backbone modules
        (`backbone_modules`: embeddings, projection, layers) ARE the discriminator's: one set of
        parameters that both losses update, only the heads apart. `named_parameters()` (and so every
        optimizer and ZeRO partition) sees each once, under its first name (`generator.`); the state
        dict holds it under both towers' names, so either tower's keys are a full tower (export,
        `split_state_dict`), and `join_state_dicts` refuses towers whose backbones differ.
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

Sampling: the replacements are Gumbel-max draws from softmax(logits / temperature) over the real
vocabulary, the noise of each sample seeded by (run seed, the sample's global index) alone
(`sampling_seed`), so a sample gets the same replacement at any TP size, micro-batching or
data-parallel layout, and a resumed run replays the same replacements.

Any tower pair plugs in: the generator exposes `embeddings` (with `word`, optionally `position`),
`config.vocab_size/padded_vocab_size`, `parallel` and `predicted_logits(input_ids,
attention_mask, predicted)`; the discriminator exposes `embeddings` and `rtd_logits(input_ids,
attention_mask)` (`RTDDiscriminator` makes one from any backbone with `encode` and a head such as
`models.deberta_v3.DebertaV3DiscriminatorHead`, called as head(hidden, attention_mask)); under
`all` the generator also names its backbone's submodules in `backbone_modules` (the discriminator
has them under the same names).
The towers are in models/electra.py (ELECTRA) and models/deberta.py + models/deberta_v3.py
(DeBERTaV3); the registry's `build_rtd` pairs them by `RTDConfig.backbone`, so this file imports
no tower.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from data.seeding import derive_seed
from data.errors import UserError
from models.config import REMOVED_RTD_FIELDS, RTD_BACKBONE_CONFIGS, RTDConfig
from models.layers import IGNORE_INDEX, count_parameters, global_argmax, predicted_positions, rows_at
from models.parallel import ParallelLayers

SAMPLING_STREAM = 0x47454E53  # "GENS": keeps the generator's sampling apart from masking's streams
SHARED_TABLES = ("word", "position")  # embedding tables shared under es / gdes, where both have them
AUC_BINS, AUC_LOGIT_RANGE = 256, 16.0  # histogram of the discriminator's logits: 256 bins over [-16, 16]


# ------------------------------------------------------------ a discriminator from any backbone
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

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> the backbone's final hidden states (B, T, H)."""
        return self.backbone.encode(input_ids, attention_mask)

    def rtd_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> (B, T) logits; the head also gets the mask (document ids)."""
        return self.head(self.encode(input_ids, attention_mask), attention_mask)

    forward = rtd_logits


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
    same shape, same class, same TP partitioning as E_G. Under all the generator's
    `backbone_modules` become the discriminator's (its own are dropped); the tables then shared
    are returned likewise.
    """
    if mode == "none":
        return ()
    gen_tables = dict(generator.embeddings.named_children())
    disc_tables = dict(discriminator.embeddings.named_children())
    if mode == "all":  # RTDConfig checked that the towers' configs are equal
        for name in generator.backbone_modules:
            setattr(generator, name, getattr(discriminator, name))
        return tuple(name for name in SHARED_TABLES if name in gen_tables and name in disc_tables)
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
    entries holding E_G (es) or E_G + E_Delta (gdes), what is exported as E_D. Under all the
    state dict already holds the shared backbone under both towers' names: each gets it whole."""
    gen = {k[len("generator.") :]: v for k, v in rtd_sd.items() if k.startswith("generator.")}
    disc = {k[len("discriminator.") :]: v for k, v in rtd_sd.items() if k.startswith("discriminator.")}
    if embedding_sharing == "all":
        return gen, disc
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
    """Inverse of `split_state_dict`: E_Delta = E_D - E_G under gdes; under es E_D must be E_G;
    under all every weight the towers both name (the backbone) must be equal (UserError naming it)."""
    disc = dict(disc_sd)
    if embedding_sharing == "all":
        common = [key for key in gen_sd if key in disc]
        if not common:
            raise UserError("embedding_sharing all: the generator and the discriminator have no weight "
                            "of the same name; they are not towers of one backbone")
        for key in common:
            if gen_sd[key].shape != disc[key].shape or not torch.equal(gen_sd[key], disc[key]):
                raise UserError(
                    f"embedding_sharing all: the generator's {key} differs from the discriminator's; "
                    "their backbones must be one set of weights (load them with embedding_sharing none)"
                )
        shared_tables = ()  # the discriminator's keys are its own already
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


# ------------------------------------------------------------------------------- diagnostics
def logit_histogram(logits: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """(AUC_BINS,) long counts of the logits at `where` (a bool mask of their shape) in fixed bins of
    width 2 * AUC_LOGIT_RANGE / AUC_BINS, the ends clamped: additive over micro-batches and ranks,
    so the trainer can compute a ROC AUC from summed histograms. Scatter-add: no host sync."""
    scaled = (logits.detach().float().nan_to_num(0.0).clamp(-AUC_LOGIT_RANGE, AUC_LOGIT_RANGE)
              + AUC_LOGIT_RANGE) * (AUC_BINS / (2 * AUC_LOGIT_RANGE))
    bins = scaled.long().clamp(0, AUC_BINS - 1).flatten()  # floor: the scaled logits are >= 0
    counts = torch.zeros(AUC_BINS, dtype=torch.long, device=logits.device)
    return counts.index_add_(0, bins, where.flatten().long())


# ------------------------------------------------------------------------------------ sampling
def sampling_seed(seed: int, sample_index: int) -> int:
    """The seed of one sample's sampling noise: from (run seed, global sample index) only."""
    return derive_seed(seed, sample_index, SAMPLING_STREAM, bits=64) & (2**63 - 1)


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

    `sampling_seed` (the run's seed, given at construction: registry.build_model(..., sampling_seed=))
    and each sample's global index seed the generator's samples, so TP peers agree and a resumed
    run replays the same replacements.
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
        mlm_hidden_correct / mlm_hidden_predicted: the same where the generator's input is not the original;
        rtd_correct / rtd_tokens: discriminator right (logit > 0 means "replaced"), real tokens;
        rtd_true_positives, rtd_predicted_positives, rtd_actual_positives (= the number of
        replaced tokens): precision = TP / predicted positives, recall = TP / actual positives;
        rtd_replaced_histogram / rtd_original_histogram: (AUC_BINS,) long vectors, the
        discriminator's logits on replaced / original real tokens (`logit_histogram`: the ROC AUC).
        """
        positions = predicted_positions(labels)  # (N,) flat; a host sync before any layer is queued
        # The sampler's per-sample loop needs its counts and indices on the host: read them now too.
        rows_per_sample = labels.ne(IGNORE_INDEX).sum(dim=1)  # (B,)
        host = torch.cat([rows_per_sample, sample_index.to(rows_per_sample)]).tolist()
        rows_per_sample, sample_ids = host[: len(host) // 2], host[len(host) // 2:]
        real = attention_mask != 0  # (B, T); document ids 1..k are all real tokens
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
            generator_right = generator_argmax == targets
            hidden = rows_at(input_ids, positions) != targets  # [MASK] or random: only context tells
            metrics = {
                "mlm_correct": generator_right.sum(),
                "mlm_predicted": positions.new_full((), positions.numel()),
                "mlm_hidden_correct": (generator_right & hidden).sum(),
                "mlm_hidden_predicted": hidden.sum(),
                "rtd_correct": ((guess == replaced) & real).sum(),
                "rtd_tokens": real.sum(),
                "rtd_true_positives": (guess & replaced).sum(),
                "rtd_predicted_positives": guess.sum(),
                "rtd_actual_positives": replaced.sum(),
                "rtd_replaced_histogram": logit_histogram(rtd_logits, replaced),
                "rtd_original_histogram": logit_histogram(rtd_logits, real & ~replaced),
            }
        return {
            "loss_sums": {"mlm": mlm_losses.sum(), "rtd": rtd_losses.sum()},
            "loss_weights": dict(self.loss_weights),
            "normalizers": {"mlm": "predicted", "rtd": "tokens"},
            "metrics": metrics,
        }

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> the discriminator's final hidden states (B, T, H): the tower that
        is handed to downstream tasks (an MLM model's `encode` is its encoder, the same contract)."""
        return self.discriminator.encode(input_ids, attention_mask)

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
        tables = (".embeddings.word.", ".embeddings.position.", "gdes_delta")
        return count_parameters(self, lambda name: exclude_embeddings and any(t in name for t in tables))


def total_loss(output: dict, counts: dict[str, torch.Tensor | float]) -> torch.Tensor:
    """sum_k weight_k * loss_sum_k / counts[normalizer_k], counts over the global batch (>= 1)."""
    total = 0.0
    for key, loss_sum in output["loss_sums"].items():
        count = torch.as_tensor(counts[output["normalizers"][key]], dtype=torch.float64).clamp(min=1.0)
        total = total + output["loss_weights"][key] * loss_sum / count.to(loss_sum)
    return total


# ------------------------------------------------------------------------------------ config
# Per backbone, what differs from the dataclasses' defaults (a size's fields and overrides win):
# DeBERTaV3 trains with GDES, and its discriminator is the bare backbone (the EMD is part of the
# generator's MLM decoder; microsoft/DeBERTa's RTD head reads the last encoder layer).
RTD_DEFAULTS = {
    "electra": {},
    "deberta": {"embedding_sharing": "gdes", "discriminator": {"enhanced_mask_decoder": False}},
}


_RTD_FIELDS = ("rtd_weight", "temperature", "embedding_sharing")
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
        if key in REMOVED_RTD_FIELDS:
            raise UserError(f"model override {key!r} was removed: set {REMOVED_RTD_FIELDS[key]}")
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
