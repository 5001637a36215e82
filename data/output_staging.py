"""The temporary files preprocessing keeps beside its output prefix: the shard directory of a run
(named by host and pid, so that a later run can tell a killed run's leftovers and remove them), and
the one-line errors of an output that cannot be written (a file in the way, no permission, a full disk)."""
import errno
import glob
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Optional

from data.errors import UserError

log = logging.getLogger(__name__)


def _shard_dir_prefix(output_prefix: Path) -> str:
    """The shard directory of a run names its host and pid, so that a later run can tell it is stale."""
    return f".{output_prefix.name}.shards-{socket.gethostname()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_temporaries(output_prefix: Path) -> None:
    """Remove what killed runs (SIGKILL, power loss) left beside `output_prefix`: shard directories
    whose process on this host is gone and, when no run is writing this prefix any more (every run
    holds a shard directory while its `IndexedWriter` writes), the writer's `.NAME.tmp-*` files.
    Shard directories of live processes or other hosts, and their writers' files, are left alone."""
    parent, name = output_prefix.parent, output_prefix.name
    if not parent.is_dir():
        return
    owner = re.compile(rf"\.{re.escape(name)}\.shards-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]{{8}}")
    host, writing = socket.gethostname(), False
    for path in parent.glob(f".{glob.escape(name)}.shards-*"):
        match = owner.fullmatch(path.name)
        if match and match["host"] == host and not _pid_alive(int(match["pid"])):
            log.warning("removing %s, left by a killed run (pid %s)", path, match["pid"])
            shutil.rmtree(path, ignore_errors=True)
        else:
            writing = True
    if not writing:
        for pattern in (f".{glob.escape(name)}.tmp-*", f"..{glob.escape(name)}.tmp-*"):
            for path in parent.glob(pattern):
                log.warning("removing %s, left by a killed run", path)
                path.unlink(missing_ok=True)


def make_shard_dir(output_prefix: Path) -> Path:
    """Check the output prefix can be written, clear a killed run's leftovers, and make the shard directory."""
    if output_prefix.is_dir() or str(output_prefix).endswith(os.sep):
        raise UserError(f"--output-prefix {output_prefix} names a directory; give a path prefix such as "
                        f"{output_prefix / 'corpus'}")
    try:
        output_prefix.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(output_prefix)
        return Path(tempfile.mkdtemp(dir=output_prefix.parent, prefix=_shard_dir_prefix(output_prefix)))
    except (FileExistsError, NotADirectoryError) as err:  # a file where a directory should be
        raise UserError(f"--output-prefix {output_prefix}: {err.filename or output_prefix.parent} is not a "
                        f"directory; choose another --output-prefix") from None
    except OSError as err:
        raise UserError(f"--output-prefix {output_prefix}: cannot write in {output_prefix.parent} "
                        f"({err.strerror or err}); choose another --output-prefix") from None


_WRITE_ERRNOS = {errno.ENOSPC: "free space there", errno.EDQUOT: "free space there (disk quota exceeded)",
                 errno.EFBIG: "choose another file system", errno.EROFS: "choose another --output-prefix"}


def write_error(err: OSError, output_prefix: Path) -> Optional[UserError]:
    """A full disk (or quota) while writing the output, as a one-line error; None for other errors."""
    if err.errno not in _WRITE_ERRNOS:
        return None
    return UserError(f"cannot write {err.filename or output_prefix.parent}: {err.strerror or os.strerror(err.errno)}; "
                     f"{_WRITE_ERRNOS[err.errno]} and rerun (nothing was written to {output_prefix})")
