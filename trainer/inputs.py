"""Composes data/ for a pretraining run: tokenizer, packed train/validation splits, masking, loaders.

The tokenizer travels with the data: preprocessing recorded it in PREFIX.json, and unless
`data.tokenizer` names another one (which must then have the same fingerprint) it is the one used.
"""
from __future__ import annotations

from dataclasses import dataclass

from data.errors import UserError
from data.indexed import open_indexed, read_sidecar
from data.loader import MaskedSamples, PretrainLoader, validation_samples
from data.masking import MaskingRecipe
from data.packing import FullSentences, split_documents
from data.tokenizer import Tokenizer, load_tokenizer
from trainer.config import PretrainConfig
from trainer.parallel import ParallelContext


@dataclass
class PretrainInputs:
    tokenizer: Tokenizer
    train: MaskedSamples
    valid: MaskedSamples | None
    loader: PretrainLoader


def resolve_tokenizer(cfg: PretrainConfig) -> Tokenizer:
    sidecar = read_sidecar(cfg.data.prefix)
    recorded = sidecar.get("tokenizer", {})
    if cfg.data.tokenizer is None:
        if "path" not in recorded:
            raise UserError(f"{cfg.data.prefix}.json records no tokenizer; set data.tokenizer=DIR")
        tokenizer = load_tokenizer(recorded["path"])
    else:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    if recorded.get("fingerprint") and tokenizer.fingerprint() != recorded["fingerprint"]:
        raise UserError(f"tokenizer {tokenizer.path} is not the one {cfg.data.prefix} was preprocessed with "
                        f"(fingerprint mismatch); use that tokenizer or preprocess again")
    return tokenizer


def build_inputs(cfg: PretrainConfig, ctx: ParallelContext, tokenizer: Tokenizer) -> PretrainInputs:
    dataset = open_indexed(cfg.data.prefix)
    doc_index = dataset.document_indices  # item index where each document starts, plus the end
    num_docs = len(doc_index) - 1
    train_docs = split_documents(num_docs, cfg.data.valid_fraction)
    ends = doc_index[1:]

    def packed(first_doc: int, last_doc: int) -> FullSentences:
        return FullSentences(dataset, int(doc_index[first_doc]), int(doc_index[last_doc]), ends,
                             cfg.data.seq_length, tokenizer.bos_id, tokenizer.eos_id)

    recipe = MaskingRecipe(mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                           special_ids=tuple(tokenizer.special_ids), mask_prob=cfg.data.mask_prob,
                           mask_token_prob=cfg.data.mask_token_prob, random_token_prob=cfg.data.random_token_prob)
    train = MaskedSamples(packed(0, train_docs), recipe, cfg.data.seq_length, tokenizer.pad_id, cfg.train.seed)
    valid = None
    if train_docs < num_docs:
        valid = validation_samples(packed(train_docs, num_docs), recipe, cfg.data.seq_length, tokenizer.pad_id,
                                   cfg.train.seed)
    loader = PretrainLoader(train, cfg.train.global_batch_size, cfg.train.micro_batch_size, ctx.dp_rank,
                            ctx.dp_size, num_workers=cfg.data.num_workers)
    return PretrainInputs(tokenizer=tokenizer, train=train, valid=valid, loader=loader)
