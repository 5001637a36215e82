"""BERT's next-sentence-prediction (NSP) head and loss, shared by RoBERTa and DeBERTa.

The head reads the first token's final encoder state (B, H): pooler dense H -> H + tanh, then a
Linear(H, 2) classifier (Hugging Face's BertPooler + BertOnlyNSPHead). Label 0: B continues A; 1: B
is random. Both layers are replicated on tensor-parallel ranks (`ParallelLayers.linear`), whose
inputs (the encoder output) agree, so the head's gradients agree too.

Hugging Face's RobertaForMaskedLM and DebertaV2ForMaskedLM have no NSP head: an export leaves
`nsp_head.*` out with a warning (`drop_for_export`); the native file keeps it.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from models.parallel import ParallelLayers

PREFIX = "nsp_head."


class NextSentenceHead(nn.Module):
    def __init__(self, hidden_size: int, init_std: float, layers: ParallelLayers):
        super().__init__()
        self.pooler = layers.linear(hidden_size, hidden_size, init_std=init_std)
        self.classifier = layers.linear(hidden_size, 2, init_std=init_std)

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        """(B, H) -> logits (B, 2)."""
        return self.classifier(torch.tanh(self.pooler(first_token)))


def with_next_sentence_loss(mlm: dict, logits: torch.Tensor, labels: torch.Tensor, weight: float) -> dict:
    """An MLM output ({"loss_sum", "num_predicted", "metrics"}) and the head's (B, 2) logits -> the
    multi-term form of trainer/core/step.py: the MLM sum over predicted tokens (weight 1) and the NSP
    cross-entropy summed over the B samples (weight `weight`), each normalised by its global count;
    metrics gain nsp_correct and nsp_samples (long scalars)."""
    labels = labels.long()
    nsp = F.cross_entropy(logits.float(), labels, reduction="sum")
    metrics = {**mlm["metrics"], "nsp_correct": (logits.detach().argmax(dim=-1) == labels).sum(),
               "nsp_samples": labels.new_full((), labels.numel())}
    return {"loss_sums": {"mlm": mlm["loss_sum"], "nsp": nsp}, "loss_weights": {"mlm": 1.0, "nsp": float(weight)},
            "normalizers": {"mlm": "predicted", "nsp": "samples"}, "num_predicted": mlm["num_predicted"],
            "metrics": metrics}


def drop_for_export(our_sd: dict, architecture: str) -> dict:
    """`our_sd` without the NSP head, warning (text with "dropped", which the exporter logs) if it had one."""
    dropped = [key for key in our_sd if key.startswith(PREFIX)]
    if dropped:
        warnings.warn(f"Hugging Face {architecture} has no next-sentence-prediction head: dropped "
                      f"{', '.join(dropped)} (the native file keeps them)", UserWarning, stacklevel=3)
    return {k: v for k, v in our_sd.items() if not k.startswith(PREFIX)}
