"""One explicit parallel context over megatron-core `parallel_state`, and DeepSpeed's mpu adapter.

Global rank and world size come from the launcher (deepspeed, torchrun, or none: one process);
the local rank picks the device. Tensor-parallel peers share a data-parallel rank: they read the
same samples and draw the same masks and dropout.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from data.errors import UserError
from trainer.core.quiet import quiet_megatron_import

logger = logging.getLogger(__name__)

EXIT_PEER_TIMEOUT = 69  # sysexits EX_UNAVAILABLE: a collective waited past train.collective_timeout_s
_ROOT = Path(__file__).resolve().parents[1]
_peer_hung = False  # process-wide on purpose (read at exit): after a timeout, shutdown leaves the groups


def from_rank0(value):
    """Global rank 0's value (any picklable object) on every rank: decisions and errors that rank 0
    alone makes (files it checked) then hold everywhere, so that all ranks act, or fail, together."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]

@dataclass(frozen=True)
class ParallelContext:
    rank: int
    world_size: int
    local_rank: int
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device

    @classmethod
    def single_cpu(cls) -> "ParallelContext":
        """One process on the CPU, no process group (the tools that read what a run trains on)."""
        return cls(rank=0, world_size=1, local_rank=0, tp_size=1, tp_rank=0, dp_size=1, dp_rank=0,
                   device=torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_group(self):
        from megatron.core import parallel_state
        return parallel_state.get_data_parallel_group()

    @property
    def tp_group(self):
        from megatron.core import parallel_state
        return parallel_state.get_tensor_model_parallel_group()


class MegatronMPU:
    """The `mpu` object DeepSpeed asks for, mapped onto megatron-core's tensor and data groups."""

    def __init__(self):
        with quiet_megatron_import():
            from megatron.core import parallel_state
        self._ps = parallel_state

    def get_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    # Megatron-style names that DeepSpeed's universal-checkpoint loader asks for.
    def get_tensor_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_data_parallel_rank(self):
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_cpu_shm_op() -> None:
    """Tells DeepSpeed not to JIT-build its CPU shared-memory all-reduce op.

    DeepSpeed builds that op on every CPU `init_distributed` (30-80 s with g++ on the first launch, under a
    lock file in ~/.cache/torch_extensions that a killed build leaves behind and every later launch then
    waits on forever). Only DeepSpeed inference's `inference_all_reduce` uses it; training collectives go
    through torch.distributed (gloo) either way. DeepSpeed keeps the probed op table in one module-level
    dict, so marking the op incompatible there makes `build_shm_op` return None.
    """
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def shutdown_parallel() -> None:
    """Destroys megatron-core's groups and torch.distributed's while the interpreter is still whole.

    Left to interpreter teardown, gloo's worker threads can outlive Python and abort a process whose
    run had succeeded (SIGABRT, "terminate called without an active exception", exit -6 in the
    launcher: seen once in CI after a clean 2-rank run). `init_parallel` registers this at exit;
    calling it again is a no-op. Destroying is local to the process (no collective), so a rank that
    leaves on an error does not wait for its peers here. After a collective timed out nothing is
    destroyed: the process is leaving with an error anyway, and a group whose peer is stopped is
    not one to tear down politely.
    """
    if _peer_hung:
        return
    with quiet_megatron_import():
        from megatron.core import parallel_state
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init_parallel(tensor_parallel: int, collective_timeout_s: float = 1800.0) -> ParallelContext:
    """Starts torch.distributed (via DeepSpeed) and megatron-core's groups; works for one plain process too.

    Every group gets `collective_timeout_s` (train.collective_timeout_s): a collective that waits longer for
    a peer raises, and `exit_if_a_peer_hangs` turns that into a one-line error and a non-zero exit.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # `python -m trainer.pretrain`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    accelerator = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if accelerator.device_name() == "cpu":
            _skip_cpu_shm_op()
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), verbose=False,
                                   timeout=datetime.timedelta(seconds=collective_timeout_s))
        atexit.register(shutdown_parallel)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    if world_size % tensor_parallel:
        raise UserError(f"parallel.tensor={tensor_parallel} does not divide the world size {world_size}; "
                        f"launch a multiple of {tensor_parallel} processes or change parallel.tensor")
    with quiet_megatron_import():
        from megatron.core import parallel_state
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                                 distributed_timeout_minutes=collective_timeout_s / 60)
    return ParallelContext(
        rank=rank, world_size=world_size, local_rank=local_rank, tp_size=tensor_parallel,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(), dp_rank=parallel_state.get_data_parallel_rank(),
        device=device)


@contextlib.contextmanager
def exit_if_a_peer_hangs(collective_timeout_s: float) -> Iterator[None]:
    """Turns a collective that timed out (a peer rank stopped, hung or died) into a one-line error on
    stderr and exit status EXIT_PEER_TIMEOUT, instead of a traceback or a process that never ends."""
    global _peer_hung
    try:
        yield
    except RuntimeError as err:  # torch.distributed.DistBackendError is one
        collective = _collective_name(err.__traceback__)
        if not _is_timeout(err) or not (collective or isinstance(err, dist.DistBackendError)):
            raise
        _peer_hung = True
        message = (f"a collective{f' ({collective})' if collective else ''} did not complete within "
                   f"train.collective_timeout_s={collective_timeout_s:g} s (a peer rank hung or died): "
                   f"{_first_line(err)}")
        logger.error("%s", message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_PEER_TIMEOUT) from None


def _is_timeout(err: BaseException) -> bool:
    text = str(err).lower()  # gloo: "Timed out waiting 20000ms for recv operation to complete"
    return "timed out" in text or "timeout" in text


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _collective_name(tb) -> Optional[str]:
    """The torch.distributed function that waited (all_reduce, broadcast, barrier, ...) and the project's
    line that called it, as far as the traceback tells: e.g. "all_reduce, called at trainer/core/step.py:88"."""
    collective, caller = None, None
    while tb is not None:
        code, line = tb.tb_frame.f_code, tb.tb_lineno
        file = Path(code.co_filename)
        if file.name == "distributed_c10d.py" and not code.co_name.startswith("_") and code.co_name != "wrapper":
            collective = collective or code.co_name  # the outermost public one: broadcast_object_list, not broadcast
        elif collective is None and file.is_relative_to(_ROOT) and ".venv" not in file.parts:
            caller = f"{file.relative_to(_ROOT)}:{line}"
        tb = tb.tb_next
    if collective is None:
        return None
    return f"{collective}, called at {caller}" if caller else collective
