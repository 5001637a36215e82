"""Every random choice here derives its generator or seed from a tuple of integers (run seed, global sample
index or step, a stream tag that keeps two uses apart) through numpy's SeedSequence: one helper for both."""
from __future__ import annotations

import numpy as np


def derive_rng(*parts: int) -> np.random.Generator:
    """A numpy Generator seeded by SeedSequence(parts): the same parts give the same draws on every rank."""
    return np.random.default_rng(np.random.SeedSequence(list(parts)))


def derive_seed(*parts: int, bits: int = 32) -> int:
    """One integer seed (e.g. for torch.manual_seed) from SeedSequence(parts): its first 32- or 64-bit word."""
    dtype = {32: np.uint32, 64: np.uint64}[bits]
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype)[0])
