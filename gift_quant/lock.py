"""One run per output folder: a second run into a folder in use is refused with the holder's pid.

The lock is an advisory ``flock`` on the output folder itself (taking it writes nothing, so a run refused later by
preflight leaves the folder untouched); the holder records its pid in ``.gift_quant.lock`` once it starts writing
and removes it when it ends.
The kernel releases the lock when its process dies however it dies, so a stale lock (a dead pid in the file) is
simply taken over.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError

LOCK = ".gift_quant.lock"
log = logging.getLogger(__name__)


@contextmanager
def output_lock(folder: Path) -> Iterator[None]:
    """Hold the lock on ``folder`` (an existing folder) for the duration; UserError when another run holds it."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"output folder {folder} is in use by another gift_quant run ({_holder(folder)}); wait "
                            f"for it to end or choose another --output-dir") from None
        except OSError as err:  # a file system without locks (some network mounts): run, but say so
            log.warning("cannot lock %s (%s); make sure no other run writes there", folder, err.strerror)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield
    finally:
        _forget_holder(folder)
        os.close(fd)


def record_holder(folder: Path) -> None:
    from .io_utils import write_text

    write_text(Path(folder) / LOCK, f"{os.getpid()}\n")


def _forget_holder(folder: Path) -> None:
    """The pid file goes with its run (the lock is the folder's flock, so removing it races with no one); a killed
    run leaves it behind, and the next run overwrites it."""
    path = Path(folder) / LOCK
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


def _holder(folder: Path) -> str:
    from .io_utils import _alive

    try:
        pid = int((Path(folder) / LOCK).read_text().strip())
    except (OSError, ValueError):
        return "pid not recorded yet: it is still starting"
    return f"pid {pid}" if _alive(pid) else "pid not recorded yet: it is still starting"
