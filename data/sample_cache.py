"""On-disk cache of sample indices, keyed by the parameters that determine them.

A sample index (DOC-SENTENCES table, FULL-SENTENCES offsets, blending order) is a few numpy
arrays computed from the `.idx` file and the run's data settings. Building one for a large corpus
takes seconds to minutes, so it is built once per node and reused by every rank and every later run
with the same parameters:

- the key is a hash of the parameters, the dataset's identity (path, size, mtime) included, so a
  change of any of them builds a new index beside the old one;
- one process per node (local rank 0) builds; the others wait for the directory to appear;
- the arrays are written as `.npy` files into a temporary directory that is renamed into place,
  so a reader never sees half an index, and two nodes building at once on a shared file system
  both succeed (the second rename loses and is discarded). Readers memory-map the arrays.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

from data.errors import UserError

Arrays = Dict[str, np.ndarray]


def dataset_identity(prefix: str | Path) -> dict:
    """What identifies the contents of PREFIX.idx without reading it: path, size, modification time."""
    path = Path(f"{prefix}.idx").resolve()
    stat = path.stat()
    return {"idx": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class SampleIndexCache:
    """`get(kind, params, build)` returns cached arrays, building them here only if `builds`."""

    def __init__(self, directory: str | Path, builds: bool = True, wait_s: float = 3600.0, poll_s: float = 0.2):
        self.directory = Path(directory)
        self.builds, self.wait_s, self.poll_s = builds, wait_s, poll_s
        self.built: List[Path] = []  # what this process built (the tests count rebuilds)
        self.loaded: List[Path] = []

    def path(self, kind: str, params: dict) -> Path:
        key = hashlib.sha256(json.dumps({"kind": kind, **params}, sort_keys=True).encode()).hexdigest()[:20]
        return self.directory / f"{kind}-{key}"

    def get(self, kind: str, params: dict, build: Callable[[], Arrays]) -> Arrays:
        path = self.path(kind, params)
        if not path.is_dir():
            if self.builds:
                self._write(path, params, build())
                self.built.append(path)
            else:
                self._wait(path)
        self.loaded.append(path)
        names = json.loads((path / "params.json").read_text())["arrays"]
        return {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in names}

    def _write(self, path: Path, params: dict, arrays: Arrays) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
        except OSError as err:
            raise UserError(f"cannot write the sample-index cache in {self.directory} ({err.strerror}); "
                            f"set data.cache_dir to a writable directory") from None
        try:
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
            (tmp / "params.json").write_text(json.dumps({**params, "arrays": sorted(arrays)}, indent=1))
            try:
                os.rename(tmp, path)
            except OSError:  # another node renamed the same index into place first
                if not path.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _wait(self, path: Path) -> None:
        deadline = time.monotonic() + self.wait_s
        while not path.is_dir():
            if time.monotonic() > deadline:
                raise UserError(f"waited {self.wait_s:.0f} s for local rank 0 to build {path}; "
                                f"check that rank's log")
            time.sleep(self.poll_s)
