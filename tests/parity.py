"""Helpers of the model tests (roberta, deberta, electra, deberta_v3): random padded inputs, perturbed
weights, a Hugging Face model saved and reloaded, the RTD loss terms by hand, TP ranks' gradients merged."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

from data.masking import IGNORE_INDEX


def _generator(seed: int | torch.Generator) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)


def perturb_(module: torch.nn.Module, seed: int = 3):
    """Make every parameter (biases, LayerNorms, E_Delta too) non-trivial so a mapping mistake shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen))


def padded_ids(lengths: Sequence[int], length: int, vocab: int, pad_id: int, low: int,
               seed: int | torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Ids in [low, vocab) of rows of the given lengths, right-padded with pad_id to `length`, and their mask."""
    input_ids = torch.randint(low, vocab, (len(lengths), length), generator=_generator(seed))
    attention_mask = torch.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        attention_mask[row, :n] = 1
    input_ids[attention_mask == 0] = pad_id
    return input_ids, attention_mask


def mlm_labels(input_ids, attention_mask, seed: int | torch.Generator = 2, always: int = 0):
    """Labels on ~30% of the real tokens (and position `always` of every non-empty row), -100 elsewhere."""
    chosen = (torch.rand(input_ids.shape, generator=_generator(seed)) < 0.3) & attention_mask.bool()
    chosen[:, always] |= attention_mask[:, always].bool()
    return torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def masked_batch(original, attention_mask, labels, mask_id: int, first_index: int) -> Dict[str, torch.Tensor]:
    """What the data pipeline gives an RTD model: the labelled ids masked (100% mask token), labels,
    mask, sample indices from first_index."""
    input_ids = torch.where(labels != IGNORE_INDEX, torch.full_like(original, mask_id), original)
    sample_index = torch.arange(first_index, first_index + len(original))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "sample_index": sample_index}


def assert_reloads_unchanged(hf, path: Path, input_ids, attention_mask, expected: torch.Tensor):
    """Saved and reloaded (what the converter writes), `hf` loads with nothing missing and gives `expected`
    (its first output) exactly; the reloaded model."""
    hf.save_pretrained(path)
    reloaded, info = type(hf).from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        again = reloaded.eval()(input_ids=input_ids, attention_mask=attention_mask)[0]
    torch.testing.assert_close(again, expected, atol=0, rtol=0)
    return reloaded


# Hugging Face's DebertaV2ForMaskedLM head: current module names -> the legacy ones (`legacy=True`).
LEGACY_MLM_HEAD = {"lm_predictions.lm_head.dense": "cls.predictions.transform.dense",
                   "lm_predictions.lm_head.LayerNorm": "cls.predictions.transform.LayerNorm",
                   "lm_predictions.lm_head": "cls.predictions"}


def rename_modules(state_dict: Dict[str, torch.Tensor], names: Dict[str, str]) -> Dict[str, torch.Tensor]:
    """Every key's module path (all but the last name) renamed through `names` where it is listed."""
    renamed = {}
    for key, value in state_dict.items():
        module, param = key.rsplit(".", 1)
        renamed[f"{names.get(module, module)}.{param}"] = value
    return renamed


def sharded_pair(build, rank: int, tp: int, perturb=perturb_):
    """`build(layers)` at TP=1 (seed 0, perturbed) and at TP=tp over megatron-core's groups, holding this
    rank's shard of the same weights: (reference, parallel, partition dims)."""
    from models.parallel import ParallelLayers, partition_dims, shard_state_dict

    torch.manual_seed(0)
    reference = build(ParallelLayers(1))
    perturb(reference)
    dims = partition_dims(reference)
    parallel = build(ParallelLayers.from_parallel_state())
    parallel.load_state_dict(shard_state_dict(reference.state_dict(), dims, rank, tp), strict=True)
    return reference, parallel, dims


def merged_grads(model: torch.nn.Module, dims: dict, tp: int) -> dict:
    """Every TP rank's gradients of `model` merged into the full ones (name -> gradient or None)."""
    import torch.distributed as dist

    from models.parallel import merge_state_dicts

    per_rank = [None] * tp
    dist.all_gather_object(per_rank, {n: p.grad for n, p in model.named_parameters()})
    return merge_state_dicts(per_rank, dims)


# ------------------------------------------------------------------------- replaced token detection
def no_grad(param: torch.nn.Parameter) -> bool:
    return param.grad is None or not param.grad.any()


def has_grad(param: torch.nn.Parameter) -> bool:
    return param.grad is not None and bool(param.grad.abs().sum() > 0)


def metric_counts(out: dict) -> dict:
    return {k: v.tolist() for k, v in out["metrics"].items()}  # ints; lists for the logit histograms


def logit_histogram_by_hand(logits: torch.Tensor, where: torch.Tensor) -> list:
    return torch.histc(logits[where].clamp(-16, 16), bins=256, min=-16, max=16).long().tolist()


def favour_token_(model, batch: dict, token: int = 7):
    """Half the originals become `token`, which the generator favours: its argmax is right there and
    some samples equal the original (labelled original), so both paths are exercised."""
    chosen = (batch["labels"] != IGNORE_INDEX).nonzero()[::2]
    batch["labels"][chosen[:, 0], chosen[:, 1]] = token
    with torch.no_grad():
        model.generator.lm_head.bias[token] += 4.0


def assert_rtd_loss_terms_by_hand(model, batch: dict, out: dict, seed: int, vocab: int, rtd_weight: float):
    """`out` (the model's output on `batch`, sampling seed `seed`, temperature 1): its loss sums, metric
    counts and total loss, computed again from the towers' public pieces."""
    from models.layers import predicted_positions
    from models.parallel import ParallelLayers
    from models.rtd import sample_replacements, total_loss

    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    predicted, real = labels != IGNORE_INDEX, mask.bool()
    with torch.no_grad():
        full = model.generator.logits(ids, mask)  # (B, T, V)
        mlm = F.cross_entropy(full[predicted], labels[predicted], reduction="sum")
        local = model.generator.predicted_logits(ids, mask, predicted_positions(labels))
        sampled = sample_replacements(local, predicted.sum(1), batch["sample_index"], seed, 1.0, vocab,
                                      ParallelLayers(1))
        original = torch.where(predicted, labels, ids)
        corrupted = original.clone()
        corrupted[predicted] = sampled
        replaced = (corrupted != original) & real
        logits = model.discriminator.rtd_logits(corrupted, mask)
        rtd = F.binary_cross_entropy_with_logits(logits[real], replaced[real].float(), reduction="sum")
    torch.testing.assert_close(out["loss_sums"]["mlm"], mlm, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out["loss_sums"]["rtd"], rtd, atol=1e-4, rtol=1e-5)

    guess = (logits > 0) & real
    expected = {
        "mlm_correct": int((full[predicted].argmax(-1) == labels[predicted]).sum()),
        "mlm_predicted": int(predicted.sum()),
        "mlm_hidden_correct": int(((full.argmax(-1) == labels) & predicted & (ids != labels)).sum()),
        "mlm_hidden_predicted": int((predicted & (ids != labels)).sum()),
        "rtd_correct": int(((guess == replaced) & real).sum()),
        "rtd_tokens": int(real.sum()),
        "rtd_true_positives": int((guess & replaced).sum()),
        "rtd_predicted_positives": int(guess.sum()),
        "rtd_actual_positives": int(replaced.sum()),
        "rtd_replaced_histogram": logit_histogram_by_hand(logits, replaced & real),
        "rtd_original_histogram": logit_histogram_by_hand(logits, real & ~replaced),
    }
    assert metric_counts(out) == expected
    assert 0 < expected["mlm_correct"] < expected["mlm_predicted"]
    assert 0 < expected["rtd_actual_positives"] < expected["mlm_predicted"]

    counts = {"predicted": predicted.sum(), "tokens": real.sum()}
    torch.testing.assert_close(total_loss(out, counts), mlm / predicted.sum() + rtd_weight * rtd / real.sum(),
                               atol=1e-5, rtol=1e-5)
