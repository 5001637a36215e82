"""Resuming under another layout: a different data-parallel size, TP degree or ZeRO stage.

The data position needs nothing special: the loader's state is the consumed-sample count, and the
global sample stream is split over however many ranks there are now. The model and optimizer state
do: with ZeRO 1-3 the optimizer state is partitioned over the data-parallel ranks that saved it. Such
a checkpoint is converted once into DeepSpeed's universal format (`ds_to_universal`, using the
`universal_checkpoint_info` every checkpoint carries: which parameters are TP-split and along which
dimension) and loaded with `checkpoint.load_universal`. Supported:

    saved \\ now        same layout   other DP size   other TP degree   other ZeRO stage (1-3)
    ZeRO 0              yes           yes             no                no
    ZeRO 1, 2, 3        yes           yes (universal) yes (universal)   yes (universal)
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


from data.errors import UserError
from trainer.core.checkpoint import MANIFEST, UNIVERSAL, read_meta
from trainer.pretraining.config import PretrainConfig
from trainer.core.parallel import ParallelContext, from_rank0

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumePlan:
    path: Path
    """The tag directory to load (the universal copy when `universal`)."""
    universal: bool


def prepare_resume(tag_dir: Optional[Path], cfg: PretrainConfig, ctx: ParallelContext,
                   own: Path) -> Optional[ResumePlan]:
    """How to load `tag_dir` under this launch's layout. A conversion is written into this run's own
    checkpoints directory `own` (`universal/TAG`; `universal/TAG-from-HASH` for another run's checkpoint,
    HASH of its path and manifest), never beside a checkpoint of another run, which may be read-only or
    being loaded by other runs at the same time; it is written under a temporary name and renamed."""
    if tag_dir is None:
        return None
    saved = read_meta(tag_dir, ("dp_size", "tp_size", "zero_stage"))  # UserError naming the file and key
    now = {"dp_size": ctx.dp_size, "tp_size": ctx.tp_size, "zero_stage": cfg.zero.stage}
    changed = {k: (saved[k], v) for k, v in now.items() if saved[k] != v}
    if not changed:
        return ResumePlan(tag_dir, universal=False)
    what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
    if saved["zero_stage"] == 0:
        if set(changed) == {"dp_size"}:
            return ResumePlan(tag_dir, universal=False)  # full optimizer state in every mp_rank file
        raise UserError(f"cannot resume {tag_dir} ({what}): a ZeRO-0 checkpoint resumes under another "
                        f"data-parallel size only; keep parallel.tensor and zero.stage as saved")
    if cfg.zero.stage == 0:
        raise UserError(f"cannot resume {tag_dir} ({what}) under zero.stage=0: DeepSpeed loads universal "
                        f"checkpoints into ZeRO 1-3 only; use zero.stage=1")
    logger.info("resuming %s with %s: converting to a universal checkpoint", tag_dir.name, what)
    target = universal_copy(tag_dir, Path(own))
    error = ""
    if ctx.rank == 0 and not (target / "zero").is_dir():
        shutil.rmtree(target, ignore_errors=True)  # incomplete: written in place by an older version
        partial = target.with_name(f"{target.name}.partial{os.getpid()}")
        cmd = [sys.executable, "-m", "trainer.core.safe_load", str(tag_dir),  # its torch.loads: weights only
               "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
               "--output_folder", str(partial), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            error = f"ds_to_universal failed on {tag_dir}: {proc.stderr.strip().splitlines()[-1:]}"
            shutil.rmtree(partial, ignore_errors=True)
        else:
            os.replace(partial, target)
    error = from_rank0(error)
    if error:
        raise UserError(error)
    return ResumePlan(target, universal=True)


def universal_copy(tag_dir: Path, own: Path) -> Path:
    """Where the universal conversion of `tag_dir` lives in the checkpoints directory `own`."""
    if tag_dir.parent.resolve() == own.resolve():
        return own / UNIVERSAL / tag_dir.name  # removed when the tag is saved again or pruned
    source = hashlib.sha256(str(tag_dir.resolve()).encode() + (tag_dir / MANIFEST).read_bytes()).hexdigest()
    return own / UNIVERSAL / f"{tag_dir.name}-from-{source[:12]}"
