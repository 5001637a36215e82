"""Preemption (SIGTERM, SIGUSR1) and the one small per-step collective every rank joins.

Schedulers warn a job before killing it: Slurm sends SIGTERM (or the signal of `--signal`, often
USR1) to every task; Kubernetes sends SIGTERM. The launchers differ (see docs/fault_tolerance.md):
`deepspeed` forwards SIGTERM to its ranks one by one and exits 1 itself, but does not forward
SIGUSR1; torchrun forwards SIGTERM/SIGINT to its workers; srun delivers the signal to every task.
So each rank handles the signals itself and only records that they arrived. The ranks agree on
the step to stop at through `StepFlags`, a MAX all-reduce of a few numbers per step that also
carries "this step's loss was not finite" and "a time-based checkpoint is due". After stopping, the
trainer saves a checkpoint and exits with EXIT_PREEMPTED; a watchdog started by the signal ends
the process with EXIT_PREEMPTION_TIMEOUT if that takes longer than `checkpoint.preemption_timeout_s`.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Tuple

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # sysexits EX_TEMPFAIL: stopped cleanly after a checkpoint; run the same command again
EXIT_PREEMPTION_TIMEOUT = 76  # the checkpoint after the signal did not finish in time
EXIT_DIVERGED = 3  # too many consecutive steps with a non-finite loss
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.requested = False
        self.signal_name = ""
        self._previous = {}
        self._watchdog = None

    def install(self) -> "PreemptionHandler":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _on_signal(self, signum, frame) -> None:
        if self.requested:
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        # Bounded exit: if the step and the checkpoint hang (a dead peer, a stuck filesystem),
        # leave anyway so the scheduler can reschedule us.
        self._watchdog = threading.Timer(self.timeout_s, self._expire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expire(self) -> None:
        logger.error("no checkpoint %.0f s after %s: exiting with status %d", self.timeout_s, self.signal_name,
                     EXIT_PREEMPTION_TIMEOUT)
        os._exit(EXIT_PREEMPTION_TIMEOUT)


class StepFlags:
    """One MAX all-reduce per step over all ranks: (stop requested, loss not finite, save due)."""

    def __init__(self, device: torch.device):
        self.device = device

    def exchange(self, stop: bool, loss_sum: torch.Tensor, save_due: bool) -> Tuple[bool, bool, bool]:
        flags = torch.stack([
            torch.tensor(float(stop), device=self.device),
            (~torch.isfinite(loss_sum.detach().float())).float().to(self.device),
            torch.tensor(float(save_due), device=self.device),
        ])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop_all, bad, save = (bool(v) for v in flags.tolist())  # the one host sync of the step
        return stop_all, bad, save
