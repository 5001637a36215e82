"""Helpers for tests that start real processes: the tools, the trainer under its launchers."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tensor_parallel_group(rank: int, port: int, tp: int):
    """Inside a process that torch.multiprocessing.spawn started: a gloo group of `tp` ranks with
    megatron-core's tensor-parallel state over it, torn down on the way out (also after a failure)."""
    import torch
    import torch.distributed as dist

    from models.parallel import import_megatron_core

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=tp)
    parallel_state = import_megatron_core().parallel_state
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def env() -> Dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["PYTHONWARNINGS"] = "ignore"
    e["OMP_NUM_THREADS"] = "1"  # 2 ranks on 2 cores: one thread each
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    return e


def run(cmd: Sequence[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def start(cmd: Sequence[str]) -> subprocess.Popen:
    return subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(procs: List[subprocess.Popen], timeout: int = 600) -> List[str]:
    outputs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outputs.append(out)
    for p, out in zip(procs, outputs):
        if p.returncode != 0:
            raise AssertionError(f"{p.args} exited {p.returncode}\n{out[-8000:]}")
    return outputs


def python_tool(name: str, *args) -> subprocess.CompletedProcess:
    return run([sys.executable, ROOT / "tools" / name, *args])


def bpe_pipeline(root: Path, corpus_mb: float, vocab_size: int, workers: int) -> str:
    """The demo pipeline's tools as a user runs them: docstring corpus -> BPE -> IndexedDataset; the prefix."""
    python_tool("build_demo_corpus.py", "--output", root / "corpus.jsonl", "--max-mb", corpus_mb)
    python_tool("train_tokenizer.py", "--input", root / "corpus.jsonl", "--type", "bpe", "--vocab-size", vocab_size,
                "--output", root / "tok")
    python_tool("preprocess_data.py", "--input", root / "corpus.jsonl", "--tokenizer", root / "tok",
                "--output-prefix", root / "bin" / "corpus", "--workers", workers)
    return str(root / "bin" / "corpus")


def as_overrides(values: Mapping[str, object], **extra) -> List[str]:
    """`key.sub=value` arguments: `values`, then `extra` (a keyword `a__b` names the key `a.b`), later ones winning."""
    merged = {**values, **{k.replace("__", "."): v for k, v in extra.items()}}
    return [f"{k}={v}" for k, v in merged.items()]


def deepspeed_cmd(num_procs: int, overrides: Sequence[str], config: Optional[str] = None) -> List[str]:
    cmd = [BIN / "deepspeed", "--num_gpus", num_procs, "--master_port", free_port(), "--module", "trainer.pretrain"]
    if config:
        cmd += ["--config", config]
    return cmd + list(overrides)


def torchrun_cmd(num_procs: int, overrides: Sequence[str]) -> List[str]:
    return [BIN / "torchrun", "--nproc_per_node", num_procs, "--master_addr", "127.0.0.1",
            "--master_port", free_port(), "-m", "trainer.pretrain", *overrides]


def metrics(run_dir: Path) -> List[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def start_group(cmd) -> subprocess.Popen:
    """A launcher in its own process group, so that a SIGKILL can take all its ranks at once."""
    return subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists() and any(f'"step": {step},' in line for line in path.read_text().splitlines()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def train_records(run_dir: Path) -> Dict[int, dict]:
    """Step -> the training record (validation records are separate lines).

    A step logged twice (two ranks writing, or a resumed run repeating a step) fails here.
    """
    records = [r for r in metrics(run_dir) if "loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"steps logged more than once in {run_dir}: {steps}"
    return {r["step"]: r for r in records}
