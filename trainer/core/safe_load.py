"""Reading torch files as data, never as code.

`torch.load(weights_only=False)` runs whatever a pickle names: a checkpoint from elsewhere could run
any program on load. Every torch file this project reads goes through `safe_torch_load`: torch's
restricted unpickler (`weights_only=True`) plus exactly the classes the project's own checkpoints
hold besides tensors and containers (found by loading every file written by runs at ZeRO
0-3 in fp32, bf16 and fp16). A file that names anything else is refused with a one-line `UserError`
naming the file and the type.

DeepSpeed reads files too. Its engine reads model and optimizer states through a pluggable checkpoint
engine: `install_checkpoint_engine` gives it one that loads with `safe_torch_load`. Where DeepSpeed
calls torch.load(weights_only=False) itself (zero_to_fp32 in conversion, ds_to_universal and the
universal-checkpoint load on a layout change), `weights_only_loads` forces weights_only=True with the
same allowlist (torch's TORCH_FORCE_WEIGHTS_ONLY_LOAD) and names the file at fault.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import pickle
import re
import warnings
from typing import Any, Callable, FrozenSet, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from data.errors import UserError

# pickle GLOBAL name -> (module, attribute) of the object it stands for
CHECKPOINT_GLOBALS = {
    # the numpy RNG state in rng/rank*.pt: ("MT19937", uint32 array, pos, has_gauss, cached_gaussian)
    "numpy._core.multiarray._reconstruct": ("numpy._core.multiarray", "_reconstruct"),
    "numpy.core.multiarray._reconstruct": ("numpy._core.multiarray", "_reconstruct"),  # written by numpy 1.x
    "numpy.ndarray": ("numpy", "ndarray"),
    "numpy.dtype": ("numpy", "dtype"),
    "numpy.dtypes.UInt32DType": ("numpy.dtypes", "UInt32DType"),
    # DeepSpeed's optimizer states (ZeRO *_optim_states.pt; the model states' `optimizer` at ZeRO-0)
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": ("deepspeed.runtime.fp16.loss_scaler",
                                                             "DynamicLossScaler"),
    "deepspeed.runtime.zero.config.ZeroStageEnum": ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    "deepspeed.utils.tensor_fragment.fragment_address": ("deepspeed.utils.tensor_fragment", "fragment_address"),
}
CHECKPOINT_TYPES: FrozenSet[str] = frozenset(CHECKPOINT_GLOBALS)
WEIGHTS_ONLY: FrozenSet[str] = frozenset()  # model weights (native files, pytorch_model.bin): tensors only

# how torch's restricted unpickler names what it refused, across its messages
_REFUSED = (re.compile(r"GLOBAL ([\w.]+)"), re.compile(r"got <class '([\w.]+)'>"),
            re.compile(r"Unsupported operand (\d+)"))


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu",
                    allowed: Iterable[str] = CHECKPOINT_TYPES) -> Any:
    """torch.load(path) that builds only tensors, containers, numbers and the `allowed` globals."""
    allowed = frozenset(allowed)
    try:
        with _only(()):  # the static scan reports everything beyond torch's own defaults
            needed = _globals_in(path)
        if needed is not None:  # a zip-format file: its pickle is scanned before anything is built
            refused = sorted(needed - allowed)
            if refused:
                raise _refusal(path, ", ".join(refused))
        # numpy dtype classes never appear as GLOBALs (the unpickler meets them as type(dtype)): always
        # registered; DeepSpeed's classes only when named, so that reading a file need not import DeepSpeed
        names = sorted(allowed if needed is None else needed | {n for n in allowed if n.startswith("numpy")})
        with _only(_resolve(tuple(names))), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refusal(path, _refused_name(err)) from None
    except (EOFError, ValueError, OSError) as err:
        raise UserError(f"{path}: not a readable torch file ({type(err).__name__}: {err}); "
                        f"truncated, or not written by torch.save?") from None
    except RuntimeError as err:
        if "PytorchStreamReader" not in str(err) and "zip archive" not in str(err):
            raise
        raise UserError(f"{path}: not a readable torch file ({str(err).splitlines()[0]}); "
                        f"truncated or corrupt?") from None


@contextlib.contextmanager
def _only(extra: Sequence) -> Iterator[None]:
    """Exactly `extra` beyond torch's defaults. Libraries widen torch's process-wide allowlist on import
    (megatron.core adds PosixPath, BytesIO, argparse.Namespace, ...): set aside while we read."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(list(extra))
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


def _refused_name(err: pickle.UnpicklingError) -> str:
    text = str(err)
    what = next((m.group(1) for p in _REFUSED for m in [p.search(text)] if m), None)
    if what is not None and what.isdigit():
        return f"pickle opcode {what}"  # one torch's restricted unpickler does not execute
    return what or text.strip().splitlines()[-1]


def _refusal(path: str | os.PathLike, what: str) -> UserError:
    if what.startswith("pickle opcode"):
        return UserError(f"{path}: refused to load: it uses {what}, which torch's safe loader does not run "
                         f"(not a file written by torch.save?)")
    return UserError(f"{path}: refused to load: it would build or call {what}, which no file of this project "
                     f"holds (a file from elsewhere is data, never code)")


def _globals_in(path: str | os.PathLike) -> Optional[FrozenSet[str]]:
    """The non-default globals a zip-format file's pickle names (read statically), None for other formats."""
    try:
        return frozenset(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except ValueError:  # legacy (non-zip) serialization: the restricted unpickler alone decides
        return None
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError):
        return None  # torch.load below reports what is wrong with it


@functools.lru_cache(maxsize=None)
def _resolve(names: Tuple[str, ...]) -> List[Tuple[Callable, str]]:
    """(object, pickle name) pairs: registered under the name the file uses (numpy 1 and 2 differ)."""
    return [(getattr(importlib.import_module(CHECKPOINT_GLOBALS[n][0]), CHECKPOINT_GLOBALS[n][1]), n)
            for n in names if n in CHECKPOINT_GLOBALS]


@contextlib.contextmanager
def weights_only_loads(files: Sequence[str | os.PathLike]) -> Iterator[None]:
    """Every torch.load inside (DeepSpeed's zero_to_fp32 passes weights_only=False) reads with
    weights_only=True and the checkpoint allowlist; a refusal names the file among `files` at fault."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"  # read by torch.load at every call
    try:
        with _only(_resolve(tuple(sorted(CHECKPOINT_TYPES)))):
            yield
    except pickle.UnpicklingError as err:
        for path in files:
            safe_torch_load(path)  # raises the one-line refusal for the file at fault
        raise _refusal("a file DeepSpeed read", _refused_name(err)) from None
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value


@functools.lru_cache(maxsize=None)
def _safe_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch.save engine; loads (model states, ZeRO optimizer partitions) via safe_torch_load."""

        def load(self, path: str, map_location=None):
            return safe_torch_load(path, map_location=map_location)

    return SafeTorchCheckpointEngine


def install_checkpoint_engine(engine) -> None:
    """Makes `engine.load_checkpoint` read every model-state and optimizer-state file with safe_torch_load."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:  # decoupled/fast writers: not configured here
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}")
    engine.checkpoint_engine = _safe_engine_class()(engine._config)


def run_module(checkpoint: str, module: str, argv: Sequence[str]) -> None:
    """Runs a DeepSpeed tool that reads `checkpoint` (ds_to_universal: torch.load(weights_only=False)
    throughout) as __main__, with every torch.load inside restricted as `weights_only_loads`."""
    import runpy
    import sys
    from pathlib import Path

    sys.argv = [module, *argv]
    with weights_only_loads(sorted(Path(checkpoint).rglob("*.pt"))):
        runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":  # python -m trainer.core.safe_load CHECKPOINT_DIR MODULE [ARGS...] (trainer/core/elastic.py)
    import sys

    from trainer.core.cli import run_cli

    run_cli(lambda _: run_module(sys.argv[1], sys.argv[2], sys.argv[3:]) or 0)
