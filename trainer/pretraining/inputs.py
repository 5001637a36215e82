"""Composes data/ for a pretraining run: tokenizer, packed train/validation splits, masking, loaders.

The tokenizer travels with the data: preprocessing recorded it in PREFIX.json, and unless
`data.tokenizer` names another one (which must then have the same fingerprint) it is the one used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from models.registry import get_family, get_spec
from data.errors import UserError
from data.indexed import check_dataset, open_indexed, read_sidecar
from pathlib import Path

from data.blending import SampleStream
from data.loader import MaskedSamples, PretrainLoader, validation_samples
from data.masking import MaskingRecipe
from data.packing import build_packed, split_ranges
from data.sample_cache import SampleIndexCache, dataset_identity
from data.static_masks import StaticMasks, check_static_masks, recipe_values_of
from data.tokenizer import Tokenizer, load_tokenizer
from data.word_starts import open_word_starts, warn_segmenter_versions
from trainer.pretraining.config import PAIR_PACKINGS, PretrainConfig
from trainer.core.parallel import ParallelContext, from_rank0


@dataclass
class PretrainInputs:
    tokenizer: Tokenizer
    train: MaskedSamples
    valid: MaskedSamples | None
    loader: PretrainLoader
    test: MaskedSamples | None = None
    cache: SampleIndexCache | None = None


def resolve_tokenizer(cfg: PretrainConfig) -> Tokenizer:
    prefixes = [prefix for _, prefix in cfg.data.corpora()]
    recorded = read_sidecar(prefixes[0]).get("tokenizer", {})
    if cfg.data.tokenizer is None:
        if "path" not in recorded:
            raise UserError(f"{prefixes[0]}.json records no tokenizer; set data.tokenizer=DIR")
        tokenizer = load_tokenizer(recorded["path"])
    else:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    for prefix in prefixes:  # blended corpora must share one tokenizer
        fingerprint = read_sidecar(prefix).get("tokenizer", {}).get("fingerprint")
        if fingerprint and tokenizer.fingerprint() != fingerprint:
            raise UserError(f"tokenizer {tokenizer.path} is not the one {prefix} was preprocessed with "
                            f"(fingerprint mismatch); use that tokenizer or preprocess again")
    return tokenizer


def reads_word_starts(cfg: PretrainConfig) -> bool:
    """Whether the loader masks by the corpora's word-start companions (data/word_starts.py): dynamic
    whole-word masking (static masks were drawn at preprocessing)."""
    return cfg.data.whole_word_mask and cfg.data.masking != "static"


def check_corpora(cfg: PretrainConfig, ctx: ParallelContext, tokenizer: Tokenizer) -> None:
    """Global rank 0 checks every corpus of data.prefix / data.blend (`data.indexed.check_dataset`:
    .bin against .idx against sidecar and tokenizer) before anything is written; all ranks fail together.
    With whole-word masking it checks the corpora's word-start companions too and warns once when their
    segmenter versions differ from the installed one or from each other."""
    error = ""
    if ctx.is_main:
        try:
            for _, prefix in cfg.data.corpora():
                check_dataset(prefix, tokenizer)
                if cfg.data.masking == "static":  # and its companion of stored masks
                    check_static_masks(prefix, recipe_values_of(cfg.data))
                if reads_word_starts(cfg):
                    open_word_starts(prefix, open_indexed(prefix, check=False))
            if reads_word_starts(cfg):
                warn_segmenter_versions([prefix for _, prefix in cfg.data.corpora()])
        except UserError as err:
            error = str(err)
    error = from_rank0(error)
    if error:
        raise UserError(error)


def build_inputs(cfg: PretrainConfig, ctx: ParallelContext, tokenizer: Tokenizer) -> PretrainInputs:
    """Train/validation/test sample streams (each corpus split by its documents, then blended) and the loader.

    Sample indices come from the on-disk cache; local rank 0 of each node builds what is missing
    while the node's other ranks wait for it."""
    corpora = cfg.data.corpora()
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(corpora[0][1]).parent / "index-cache"
    cache = SampleIndexCache(cache_dir, builds=ctx.local_rank == 0)
    splits = {"train": [], "valid": [], "test": []}
    # data.seq_length_schedule: the train split packed at each phase's length (the first phase's is "train")
    lengths = [cfg.length_at(first + 1) for first, _ in cfg.data.seq_length_schedule] or [cfg.data.seq_length]
    splits.update({("train", k): [] for k in range(1, len(lengths))})
    identities, static = [], []
    pairs = {}  # the pair formats (data/pairs.py): framed as fine-tuning frames pairs (trainer/finetuning/train.py)
    if cfg.data.packing in PAIR_PACKINGS:
        pairs = {"sentence_ends": tokenizer.sentence_marks(), "seed": cfg.train.seed,
                 "pair_separators": get_family(get_spec(cfg.model.name).family).pair_separators}
    for _, prefix in corpora:
        dataset = open_indexed(prefix, check=False)  # check_corpora has checked it
        # its word-start companion, when recorded (check_corpora has checked its sha256)
        word_starts = open_word_starts(prefix, dataset, check=False) if reads_word_starts(cfg) else None
        static.append(StaticMasks(prefix) if cfg.data.masking == "static" else None)
        identity = {**dataset_identity(prefix), "prefix": Path(prefix).name}
        identities.append(identity)
        num_docs = len(dataset.document_indices) - 1
        train_end, valid_end = split_ranges(num_docs, cfg.data.valid_fraction, cfg.data.test_fraction)
        ranges = {"train": (0, train_end, lengths[0]), "valid": (train_end, valid_end, cfg.data.seq_length),
                  "test": (valid_end, num_docs, cfg.data.seq_length)}
        ranges.update({("train", k): (0, train_end, length) for k, length in enumerate(lengths) if k})
        for name, (first, last, length) in ranges.items():
            splits[name].append(build_packed(cfg.data.packing, dataset, first, last, length,
                                             tokenizer.bos_id, tokenizer.eos_id, cache, identity,
                                             word_starts=word_starts, **pairs)
                                if last > first else None)
    weights = [w for w, _ in corpora]

    def stream(name, shuffle: bool):
        parts = [(w, p) for w, p in zip(weights, splits[name]) if p is not None]
        if not parts:
            return None
        split = name if isinstance(name, str) else f"{name[0]}-phase{name[1]}"
        return SampleStream([p for _, p in parts], [w for w, _ in parts], seed=cfg.train.seed, shuffle=shuffle,
                            cache=cache, cache_params={"split": split, "datasets": identities})

    def static_masks(name: str):  # the companions of the stream's corpora, in its order
        if cfg.data.masking != "static":
            return None
        return [m for m, p in zip(static, splits[name]) if p is not None]

    recipe = MaskingRecipe(mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                           special_ids=tuple(tokenizer.special_ids), mask_prob=cfg.data.mask_prob,
                           mask_token_prob=cfg.data.mask_token_prob, random_token_prob=cfg.data.random_token_prob,
                           word_starts=tokenizer.word_start_ids() if cfg.data.whole_word_mask else None,
                           max_span=cfg.data.max_span)
    pad = cfg.data.pad_to_multiple_of
    train, *later = [MaskedSamples(stream("train" if not k else ("train", k), True), recipe, length, tokenizer.pad_id,
                                   cfg.train.seed, pad_to_multiple_of=pad, static_masks=static_masks("train"),
                                   mask_prob_schedule=cfg.data.mask_prob_schedule)
                     for k, length in enumerate(lengths)]  # one per length phase (static masks: one phase)
    held_out = {}
    for name in ("valid", "test"):
        held = stream(name, False)
        held_out[name] = (validation_samples(held, recipe, cfg.data.seq_length, tokenizer.pad_id, cfg.train.seed,
                                             pad_to_multiple_of=pad, static_masks=static_masks(name))
                          if held is not None else None)
    loader = PretrainLoader(train, cfg.train.global_batch_size, cfg.train.micro_batch_size, ctx.dp_rank,
                            ctx.dp_size, num_workers=cfg.data.num_workers, tokens_per_step=cfg.train.tokens_per_step,
                            length_phases=[(first, phase) for (first, _), phase in
                                           zip(cfg.data.seq_length_schedule[1:], later)],
                            batch_warmup_steps=cfg.train.batch_warmup_steps,
                            batch_warmup_start=cfg.train.batch_warmup_start)
    return PretrainInputs(tokenizer=tokenizer, train=train, valid=held_out["valid"], loader=loader,
                          test=held_out["test"], cache=cache)


def single_process_inputs(cfg: PretrainConfig) -> Tuple[Tokenizer, PretrainInputs]:
    """(tokenizer, inputs) through the functions training uses, for one data-parallel rank on the CPU and
    no process group (trainer/pretraining/train.py's `prepare` without the model and the engine): the
    samples of a step and the held-out set do not depend on the data-parallel size. For the tools that
    read what a run trains or evaluates on (tools/show_batch.py, tools/evaluate_checkpoint.py)."""
    cfg.data.num_workers = 0  # the same batches, read in this process
    ctx = ParallelContext.single_cpu()
    cfg.check_batch(ctx.dp_size)
    tokenizer = resolve_tokenizer(cfg)
    check_corpora(cfg, ctx, tokenizer)
    return tokenizer, build_inputs(cfg, ctx, tokenizer)
