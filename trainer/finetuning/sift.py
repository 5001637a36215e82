"""SiFT: scale-invariant fine-tuning (He et al., 2020, DeBERTa §3.3), virtual adversarial training
on the *normalised* word embeddings.

Perturbing raw embeddings is not scale invariant: their norms differ between words and grow with
model size, so one noise level is too small for some tokens and wrecks others, and adversarial
fine-tuning of large models becomes unstable. SiFT normalises first: a forward pre-hook on the
embedding LayerNorm replaces its input x (word embeddings plus whatever the backbone adds there:
positions, token type) by LN0(x), a LayerNorm without affine parameters, and in the adversarial
passes by LN0(x) + delta, so the model's own LayerNorm then sees a perturbation of fixed scale.
Per training step, as microsoft/DeBERTa does (its DeBERTa/sift/sift.py; this is our own code):

  1. clean pass:      logits = f(LN0(x))                        (the task loss uses it)
  2. delta ~ N(0, noise_std^2), clamped to +-2 noise_std
  3. ascent:          g = d/d delta D(f(LN0(x) + delta), sg(logits));
                      delta <- delta + step_size * g / (1e-6 + max_h |g|)   (per token, over the hidden
                      dimension: a max-norm, so the step does not depend on the gradient's scale)
  4. adversarial pass: loss += weight * D(f(sg(LN0(x)) + delta), logits)

D is the symmetric KL divergence between the two predicted distributions for classification and
the squared error for regression. Its gradient reaches the parameters through both passes (for
classification through each side with the other side's probabilities held fixed, as the
reference); delta itself is a constant in step 4. If g is not finite (overflow in fp16), the
adversarial term is skipped for that batch. The hook acts only in training mode: evaluation
and exported models compute the plain model.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-7  # the non-affine LayerNorm's epsilon (microsoft/DeBERTa's)


def symmetric_kl_sum(logits: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """sum over the batch of KL(p || q) + KL(q || p), p = softmax(logits), q = softmax(other).

    Each side's probabilities are held fixed in the gradient of the other side's log-probabilities,
    so the gradient is the reference's (a sum of two cross-entropies) and the value is the
    divergence itself (>= 0, zero only when the predictions agree).
    """
    log_p, log_q = F.log_softmax(logits.float(), -1), F.log_softmax(other.float(), -1)
    p, q = log_p.detach().exp(), log_q.detach().exp()
    return (p * (log_p.detach() - log_q) + q * (log_q.detach() - log_p)).sum()


def squared_error_sum(predictions: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    return ((predictions.float() - other.float()) ** 2).sum()


def consistency(logits: torch.Tensor, other: torch.Tensor, regression: bool) -> torch.Tensor:
    return squared_error_sum(logits, other) if regression else symmetric_kl_sum(logits, other)


class SiFT:
    """Hooks a model's embedding LayerNorm; `adversarial_loss` runs steps 2-4 after a clean forward."""

    def __init__(self, embedding_norm: nn.Module, noise_std: float = 1e-2, step_size: float = 1e-4,
                 weight: float = 1.0):
        self.noise_std, self.step_size, self.weight = noise_std, step_size, weight
        self.normalized: Optional[torch.Tensor] = None  # LN0(x) of the last clean training pass
        self.delta: Optional[torch.Tensor] = None  # set during the adversarial passes
        self.skipped = 0  # batches whose perturbation gradient was not finite
        self._handle = embedding_norm.register_forward_pre_hook(self._pre_hook)

    def remove(self) -> None:
        self._handle.remove()

    def _pre_hook(self, module: nn.Module, args):
        if not module.training:
            return None
        x = args[0]
        if self.delta is None:  # a clean pass: remember LN0(x) for the adversarial passes
            self.normalized = F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)
            return (self.normalized,)
        return ((self.normalized.detach().float() + self.delta).to(x.dtype),)

    def adversarial_loss(self, forward: Callable[[], torch.Tensor], clean_logits: torch.Tensor,
                         regression: bool) -> Optional[torch.Tensor]:
        """weight x D(perturbed, clean), summed over the batch; None when the ascent's gradient
        is not finite. `forward()` reruns the model on the batch of the last clean pass."""
        if self.normalized is None:
            raise RuntimeError("SiFT.adversarial_loss needs a clean training forward first")
        base = self.normalized
        try:
            noise = torch.randn(base.shape, device=base.device, dtype=torch.float32) * self.noise_std
            self.delta = noise.clamp(-2 * self.noise_std, 2 * self.noise_std).requires_grad_(True)
            ascent = consistency(forward(), clean_logits.detach(), regression)
            (grad,) = torch.autograd.grad(ascent, self.delta)
            if not torch.isfinite(grad).all():
                self.skipped += 1
                return None
            with torch.no_grad():
                step = grad / (1e-6 + grad.abs().amax(dim=-1, keepdim=True))  # per-token max-norm
                self.delta = (self.delta + self.step_size * step).detach()
            return self.weight * consistency(forward(), clean_logits, regression)
        finally:
            self.delta = None
            self.normalized = base
