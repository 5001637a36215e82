"""The optimizer-step loop every run here shares: pretraining, and each seed of a fine-tuning run.

    loop = StepLoop(engine, ctx, seed=..., clip=..., max_bad_steps=..., log_every=..., metrics=...)
    for step in loop.steps(first, last, micro_batches):   # forward/backward, clip-or-skip, the NaN guard
        ...bookkeeping of the caller's state...
        if loop.log_due(step, first_logged):                 # one record over the window
            loop.log(step, {...the caller's fields...})
        ...evaluation, checkpoints...
        if loop.stop: ...save and leave...

Per step the loop sets the dropout seed from (seed, step, data-parallel rank), runs the step's
micro-batches through `trainer.core.step.train_step` (every loss term normalised over the global
batch, whatever the split), exchanges the stop / non-finite / save-due flags between ranks in one
all-reduce, counts skipped steps (raising TrainingDiverged after `max_bad_steps` in a row) and adds
the step to the logging window. Nothing here syncs the device with the host between logs.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from trainer.core.metrics import MetricsWriter
from trainer.core.parallel import ParallelContext, exit_if_a_peer_hangs
from trainer.core.preemption import EXIT_DIVERGED, StepFlags
from trainer.core.step import Accumulator, Forward, dropout_seed, train_step

logger = logging.getLogger(__name__)


class TrainingDiverged(Exception):
    """Too many consecutive non-finite losses: the run stops with EXIT_DIVERGED (3)."""


def run_guarded(train: Callable[[], Tuple[int, Dict]], collective_timeout_s: float, what: str) -> Tuple[int, Dict]:
    """`train()` -> (exit status, summary), with the two ends every run shares: a collective that timed
    out exits EXIT_PEER_TIMEOUT naming it; a run that diverged gives (EXIT_DIVERGED, {}) and one line."""
    try:
        with exit_if_a_peer_hangs(collective_timeout_s):
            return train()
    except TrainingDiverged as err:
        logger.error("%s stopped: %s", what, err)
        print(f"error: {what} stopped: {err}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED, {}


class BadStepGuard:
    """Counts steps whose loss was not finite (their update was skipped) and stops a run that keeps
    producing them."""

    def __init__(self, limit: int, skipped: int = 0, in_a_row: int = 0, where: str = ""):
        self.limit, self.skipped, self.in_a_row, self.where = limit, skipped, in_a_row, where

    def update(self, bad: bool, step: int) -> None:
        if not bad:
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        logger.warning("%sstep %d: non-finite loss, update skipped (%d in a row)", self.where, step, self.in_a_row)
        if self.in_a_row >= self.limit:
            raise TrainingDiverged(f"{self.in_a_row} consecutive steps with a NaN/Inf loss, the last at "
                                   f"{self.where}step {step}; lower optim.lr, check the data, or resume from an "
                                   f"earlier checkpoint")


class LogWindow:
    """What happened since the last log: the finite steps' loss terms and metrics (device tensors),
    and the tokens and samples of every step."""

    def __init__(self):
        self.acc, self.tokens, self.samples, self.start = Accumulator(), 0.0, 0.0, time.perf_counter()

    def add(self, out: Dict, bad: bool) -> None:
        if not bad:
            self.acc.merge(out["acc"])
        self.tokens = self.tokens + out["tokens"]
        self.samples = self.samples + out["samples"]

    def rates(self) -> Dict[str, float]:
        elapsed = time.perf_counter() - self.start
        return {"tokens_per_sec": float(self.tokens) / elapsed, "samples_per_sec": float(self.samples) / elapsed}


class StepLoop:
    """The loop over optimizer steps (see the module docstring). `forward(engine, batch)` returns the
    model's loss sums (default: `engine(**batch)`); `preemption` asks for a stop; `save_due()` on global
    rank 0 asks for a time-based checkpoint; `before_step(step)` runs after the dropout seed is set."""

    def __init__(self, engine, ctx: ParallelContext, *, seed: int, clip: Optional[float], max_bad_steps: int,
                 log_every: int, metrics: MetricsWriter, preemption=None, forward: Optional[Forward] = None,
                 vocab_size: Optional[int] = None, mask_id: Optional[int] = None, lr_group: int = 0,
                 where: str = "", skipped: int = 0, bad_in_a_row: int = 0):
        self.engine, self.ctx, self.seed, self.clip = engine, ctx, seed, clip
        self.log_every, self.metrics, self.preemption, self.forward = log_every, metrics, preemption, forward
        self.vocab_size, self.mask_id, self.lr_group, self.where = vocab_size, mask_id, lr_group, where
        self.guard = BadStepGuard(max_bad_steps, skipped, bad_in_a_row, where)
        self.flags = StepFlags(ctx.device)
        self.window = LogWindow()
        self.first = self.last = 0
        self.unsynced_tokens = 0.0
        self.out: Dict = {}
        self.stop = self.save_due = False
        self.step_lr = 0.0

    @property
    def skipped(self) -> int:
        return self.guard.skipped

    def steps(self, first: int, last: int, micro_batches: Callable[[int], List[Dict[str, torch.Tensor]]],
              before_step: Optional[Callable[[int], None]] = None, save_due: Callable[[], bool] = lambda: False,
              inject_nan=()) -> Iterator[int]:
        """Runs steps first..last, yielding each after its update; the caller may break after `stop`."""
        self.first, self.last = first, last
        for step in range(first, last + 1):
            batches = micro_batches(step)
            torch.manual_seed(dropout_seed(self.seed, step, self.ctx.dp_rank))
            if before_step is not None:
                before_step(step)
            self.step_lr = self.engine.get_lr()[self.lr_group]  # this step's (the scheduler moves on in it)
            self.out = train_step(self.engine, batches, self.ctx, self.clip, inject_nan=step in inject_nan,
                                  vocab_size=self.vocab_size, mask_id=self.mask_id, forward=self.forward)
            requested = self.preemption is not None and self.preemption.requested
            self.stop, bad, self.save_due = self.flags.exchange(
                requested, self.out["acc"].total(), self.ctx.is_main and save_due())
            self.guard.update(bad, step)
            self.window.add(self.out, bad)
            self.unsynced_tokens = self.unsynced_tokens + self.out["tokens"]  # device tensor
            yield step

    def log_due(self, step: int, first_logged: int) -> bool:
        """A log record is due at `first_logged`, every `log_every` steps, at the last step and at a stop."""
        return step == first_logged or step % self.log_every == 0 or step == self.last or self.stop

    def take_tokens(self) -> int:
        """The input tokens of the steps since the last call (one host sync)."""
        tokens, self.unsynced_tokens = int(self.unsynced_tokens), 0.0
        return tokens

    def log(self, step: int, fields: Dict) -> Dict:
        """One record of `fields`, the window's per-token losses and metrics, the LR, the gradient norm
        and the rates, written to metrics.jsonl / TensorBoard; the window starts over."""
        grad_norm = self.out["grad_norm"] if self.clip is not None else self.engine.get_global_grad_norm()
        record = {**fields, **(self.window.acc.reduce(self.ctx) if self.window.acc.terms else {"loss": None}),
                  "lr": self.step_lr,
                  "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  **self.window.rates(), "skipped_steps": self.guard.skipped}
        self.metrics.log(step, record)
        logger.info("%sstep %d/%d loss %s lr %.3g grad_norm %s %.0f tok/s", self.where, step, self.last,
                    f"{record['loss']:.4f}" if record["loss"] is not None else "-", record["lr"],
                    f"{record['grad_norm']:.3f}" if record["grad_norm"] is not None else "-",
                    record["tokens_per_sec"])
        self.window = LogWindow()
        return record
