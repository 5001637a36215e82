"""Disentangled attention kernels (He et al., 2020) and the relative positions they read.

The relative distances of a length are bucketed (exact near zero, logarithmic further out) and
turned into gather indices once; `DebertaEncoder` caches them per (length, device).
`disentangled_attention` computes softmax(q.k + c2p + p2c) v for one layer's heads with c2p and p2c
gathered from the (T, 2k) score tables into the q.k scores, by one of ATTENTION_KERNELS: a
hand-written autograd function (backward keeps the probabilities and, under dropout, the dropped-out
ones) or one additive bias fed to `scaled_dot_product_attention`. Pure tensor functions: the modules
that own the projections are in models/deberta.py.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------- relative positions
def log_bucket_position(relative: torch.Tensor, position_buckets: int, max_distance: int) -> torch.Tensor:
    """Relative distances -> buckets: exact while |d| <= buckets/2, then logarithmic, reaching
    +-(buckets - 1) at |d| = max_distance - 1 (and beyond it, clipped later by the gather).

    Computed in float32 as microsoft/DeBERTa and Hugging Face do, so bucket edges agree exactly.
    """
    mid = position_buckets // 2
    magnitude = relative.abs()
    far = magnitude.clamp(min=mid)  # the near ones keep their exact distance below
    ratio = torch.log(torch.tensor((max_distance - 1) / mid))  # float32, as the reference
    log_position = torch.ceil(torch.log(far / mid) / ratio * (mid - 1)) + mid
    return torch.where(magnitude <= mid, relative, (log_position * relative.sign()).long())


def relative_position_buckets(
    length: int, position_buckets: int, max_distance: int, device: torch.device | None = None
) -> torch.Tensor:
    """(T, T) long: bucket of the distance i - j from query i to key j (plain i - j if buckets <= 0)."""
    positions = torch.arange(length, device=device)
    return relative_position_buckets_of(positions[:, None] - positions[None, :], position_buckets, max_distance)


@functools.lru_cache(maxsize=None)  # a few ints per length; read again by every forward (and the EMD)
def reachable_window(length: int, position_buckets: int, max_distance: int, span: int) -> tuple[int, int]:
    """[lo, hi): the rows of the (2k, H) relative table that a length's gather indices can reach
    (c2p = bucket(i - j) + k and p2c = k - bucket(j - i), clipped to [0, 2k)). Buckets grow with
    |i - j|, so the farthest pair, T - 1 apart, bounds them: a length whose buckets reach only r
    reads rows k - r .. k + r, and the table (with its projections, products, scatters) can be cut
    to those 2r + 1 rows with the indices shifted by lo. Computed with the bucketing function
    itself (float32 edges), on the host, once per length (cached), without touching a device."""
    far = torch.tensor([max(length - 1, 0)])
    reach = int(relative_position_buckets_of(far, position_buckets, max_distance).abs().max())
    return max(0, span - reach), min(2 * span, span + reach + 1)


def relative_position_buckets_of(relative: torch.Tensor, position_buckets: int, max_distance: int) -> torch.Tensor:
    """`relative_position_buckets` of given distances (plain distances without bucketing)."""
    if position_buckets > 0 and max_distance > 0:
        return log_bucket_position(relative, position_buckets, max_distance)
    return relative


# ------------------------------------------------------------------------- disentangled attention
ATTENTION_KERNELS = ("auto", "fused", "sdpa")


def disentangled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_key: torch.Tensor | None,
    pos_query: torch.Tensor | None,
    relative_indices: tuple[torch.Tensor, torch.Tensor] | None,
    key_padding: torch.Tensor,
    scale: float,
    dropout: float = 0.0,
    kernel: str = "auto",
) -> torch.Tensor:
    """softmax(scale (q.k + c2p + p2c), padded keys masked) (dropped out) v -> (B, nh, T, hs).

    q, k, v (B, nh, T, hs); pos_key / pos_query (1, nh, 2k, hs) or None (term off); relative_indices
    the cached (c2p, p2c) gather indices (T, T), optionally followed by their `flat_relative_indices`
    (DebertaEncoder.relative_inputs caches those too); key_padding (B, 1, T, T) bool, True where
    query i may not see key j (padding, another document: models/layers.py `same_document`), or
    (B, 1, 1, T) for padding alone; the relative positions of the pairs left are within one document.
    c2p[i, j] = q_i . Pk[c2p_index[i, j]] and p2c[i, j] = k_j . Pq[p2c_index[j, i]] are gathers
    from the small (B, nh, T, 2k) score tables into one additive bias of the content scores.

    Two implementations, the same numbers (tests/test_perf_paths.py):
    - "sdpa": the bias (fp32 scores, padded keys at finfo.min) goes to torch's
      scaled_dot_product_attention as a float mask: fused kernels that never keep the probabilities
      (flash on CPU without autograd; memory-efficient on CUDA, which also returns the bias's
      gradient). On CPU with autograd torch falls back to its unfused math path, slower than ours
      once attention dropout is on, so "auto" does not take it there.
    - "fused": our autograd function, fp32 throughout: it keeps the probabilities and, under
      dropout, the dropped-out probabilities for backward (autograd's graph keeps the keep-mask as
      well), works in place, and scatters the score gradient back into the two 2k tables.
    "auto" picks "sdpa" where no graph is built or off the CPU, "fused" otherwise and always for
    fp16 (whose c2p/p2c sums overflow unless computed in fp32: a known DeBERTa failure).
    """
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
    if kernel == "auto":
        graph = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, pos_key, pos_query))
        fp16 = q.dtype == torch.float16 or (
            torch.is_autocast_enabled(q.device.type)
            and torch.get_autocast_dtype(q.device.type) == torch.float16)
        kernel = "fused" if fp16 or (graph and q.device.type == "cpu") else "sdpa"
    c2p_index = p2c_index = c2p_flat = p2c_flat = None
    if relative_indices is not None and (pos_key is not None or pos_query is not None):
        if len(relative_indices) == 2:
            width = (pos_key if pos_key is not None else pos_query).shape[-2]
            relative_indices = (*relative_indices, *flat_relative_indices(*relative_indices, width))
        c2p_index, p2c_index, c2p_flat, p2c_flat = relative_indices
    with torch.autocast(device_type=q.device.type, enabled=False):
        if kernel == "fused":
            pos_key = pos_key.float() if pos_key is not None else None
            pos_query = pos_query.float() if pos_query is not None else None
            context = _FusedDisentangledAttention.apply(
                q.float(), k.float(), v.float(), pos_key, pos_query, c2p_flat, p2c_flat, p2c_index,
                key_padding, scale, dropout)
            return context.to(v.dtype)
        bias = _relative_bias(q.float() * scale, k.float(), pos_key, pos_query, c2p_index, p2c_index,
                              scale)
        if bias is None:
            bias = torch.zeros(key_padding.shape, dtype=torch.float32, device=q.device)
        bias = bias.masked_fill(key_padding, torch.finfo(torch.float32).min)
        dtype = v.dtype if v.dtype != torch.float16 else torch.float32
        context = F.scaled_dot_product_attention(
            q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=bias.to(dtype), dropout_p=dropout,
            scale=scale)
        return context.to(v.dtype)


def flat_relative_indices(
    c2p_index: torch.Tensor, p2c_index: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (c2p, p2c) gather indices as positions in a flattened (T * 2k) score table, both laid
    out as the scores (query i, key j): c2p_flat[i, j] = i * 2k + c2p[i, j], p2c_flat[i, j] =
    j * 2k + p2c[j, i]. One gather per term then writes the bias in order, with no transposed
    (strided) pass over a (T, T) tensor; c2p's backward scatters the same way. width: 2k."""
    T = c2p_index.shape[0]
    rows = torch.arange(T, device=c2p_index.device)[:, None]
    return c2p_index + rows * width, (p2c_index + rows * width).t().contiguous()


def _relative_bias(q_scaled, k, pos_key, pos_query, c2p_index, p2c_index, scale):
    """c2p + p2c (B, nh, T, T) in fp32 (scaled), or None when neither term is on."""
    B, nh, T, _ = q_scaled.shape
    bias = None
    if pos_key is not None:
        c2p = q_scaled @ pos_key.float().transpose(-1, -2)  # (B, nh, T, 2k): query i x bucket
        bias = torch.gather(c2p, -1, c2p_index.expand(B, nh, T, T))
    if pos_query is not None:
        p2c = k @ (pos_query.float() * scale).transpose(-1, -2)  # (B, nh, T, 2k): key j x bucket
        p2c = torch.gather(p2c, -1, p2c_index.expand(B, nh, T, T)).transpose(-1, -2)
        bias = p2c if bias is None else bias + p2c
    return bias


class _FusedDisentangledAttention(torch.autograd.Function):
    """Disentangled attention with a hand-written backward (fp32 inputs; see disentangled_attention).

    Saved for backward: q (scaled), k, v, the position tables, the probabilities
    (B, nh, T, T) and, under dropout, the dropped-out probabilities (B, nh, T, T) fp32: backward
    then needs neither the keep-mask nor a pass to rebuild them (bench/README.md, "DeBERTaV3 RTD
    step: where the time goes").
    """

    @staticmethod
    def forward(ctx, q, k, v, pos_key, pos_query, c2p_flat, p2c_flat, p2c_index, key_padding, scale, dropout):
        """c2p_flat / p2c_flat: `flat_relative_indices`; p2c_index: the (T, T) one, for backward."""
        B, nh, T, _ = q.shape
        qs = q * scale
        scores = qs @ k.transpose(-1, -2)  # (B, nh, T, T)
        if pos_key is not None:
            c2p = (qs @ pos_key.transpose(-1, -2)).view(B, nh, -1)  # (B, nh, T * 2k)
            scores += torch.gather(c2p, -1, c2p_flat.view(1, 1, -1).expand(B, nh, -1)).view(B, nh, T, T)
            del c2p
        pos_query_s = pos_query * scale if pos_query is not None else None
        if pos_query is not None:
            p2c = (k @ pos_query_s.transpose(-1, -2)).view(B, nh, -1)  # (B, nh, T * 2k), key rows
            scores += torch.gather(p2c, -1, p2c_flat.view(1, 1, -1).expand(B, nh, -1)).view(B, nh, T, T)
            del p2c
        scores.masked_fill_(key_padding, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        del scores
        kept = probs
        if dropout > 0.0:
            # keep-mask: u >= dropout, P(keep) = 1 - dropout; in place as 1.0 / 0.0 times the
            # probabilities: the dropped-out ones (before the 1/(1-p)), no bool mask allocated.
            kept = torch.rand_like(probs).ge_(dropout).mul_(probs)
            context = (kept @ v).mul_(1.0 / (1.0 - dropout))
        else:
            context = probs @ v
        ctx.save_for_backward(qs, k, v, pos_key, pos_query_s, c2p_flat, p2c_index, key_padding, probs, kept,
                              context)
        ctx.scale, ctx.dropout = scale, dropout
        return context

    @staticmethod
    def backward(ctx, grad):
        qs, k, v, pos_key, pos_query_s, c2p_flat, p2c_index, key_padding, probs, kept, context = ctx.saved_tensors
        scale, dropout = ctx.scale, ctx.dropout
        B, nh, T, _ = qs.shape
        # The dropout scale goes on the small (B, nh, T, hs) tensors, not on the (T, T) ones.
        grad = grad.contiguous() if dropout == 0.0 else grad * (1.0 / (1.0 - dropout))
        grad_v = kept.transpose(-1, -2) @ grad
        # Masked keys have P = 0 and so dS = 0, except in rows whose keys are all masked (uniform
        # P), where masked_fill's backward gives dS = 0. Zeroing those rows of the output gradient
        # on its way to dS does that with a (B, nh, T, hs) product: no (T, T) pass, no host sync.
        # grad_v keeps them (uniform P does carry a gradient to v).
        grad_s = grad * ~key_padding.all(-1, keepdim=True)
        d = grad_s @ v.transpose(-1, -2)  # (B, nh, T, T): d loss / d probs, before the keep-mask
        # softmax backward: dS = P * (dP - sum_j dP P), in place, where sum_j dP_ij P_ij =
        # dO_i . O_i (O the output, dropout included): no (T, T) product for the row sums.
        row_sums = (grad_s * context).sum(-1, keepdim=True) * (1.0 - dropout)  # (B, nh, T, 1)
        if dropout > 0.0:
            # dP = d * keep, so P * dP = d * kept (the saved dropped-out probabilities): two
            # in-place passes, no keep-mask to convert or probabilities to rebuild.
            d.mul_(kept).addcmul_(probs, row_sums, value=-1.0)
        else:
            d.sub_(row_sums).mul_(probs)
        del grad_s, kept
        grad_qs = d @ k
        grad_k = d.transpose(-1, -2) @ qs
        grad_pos_key = grad_pos_query = None
        flat_d = d.view(B, nh, -1)
        if pos_key is not None:
            table = d.new_zeros(B, nh, T * pos_key.shape[-2])
            table.scatter_add_(-1, c2p_flat.view(1, 1, -1).expand(B, nh, -1), flat_d)
            table = table.view(B, nh, T, -1)  # (B, nh, T, 2k), query rows
            grad_qs += table @ pos_key
            grad_pos_key = (table.transpose(-1, -2) @ qs).sum(0, keepdim=True)
            del table
        if pos_query_s is not None:
            # Row-wise from the transposed scores: the flat scatter would write across the whole
            # table for consecutive elements (measured 8x slower on CPU).
            table = d.new_zeros(B, nh, T, pos_query_s.shape[-2])  # (B, nh, T, 2k), key rows
            table.scatter_add_(-1, p2c_index.expand(B, nh, T, T), d.transpose(-1, -2))
            grad_k += table @ pos_query_s
            grad_pos_query = (table.transpose(-1, -2) @ k).sum(0, keepdim=True) * scale
            del table
        return (grad_qs * scale, grad_k, grad_v, grad_pos_key, grad_pos_query,
                None, None, None, None, None, None)
