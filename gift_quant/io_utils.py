"""Atomic file and folder writes that never delete what they did not create.

A reader never sees a half-written file or folder under its final name. A folder is built in a temporary sibling
marked as ours (``.gift_quant_partial`` holding the writer's pid) and renamed into place; an existing target is
replaced only when it is empty or the caller recognises it as an earlier result of the same kind. Siblings left by a
killed writer are removed by the next write to the same target.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import UserError

PARTIAL_MARK = ".gift_quant_partial"
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once (os.umask can only be read by setting it)


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would make results private; ordinary files follow the umask
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_replaceable(path: Path, ours: Callable[[Path], bool], what: str) -> None:
    """Refuse (UserError) a target that exists and is neither an empty folder nor recognised by ``ours``."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise UserError(f"{path} exists and is not a folder; choose another path for the {what}")
    if any(path.iterdir()) and not ours(path):
        raise UserError(f"{path} exists and is not a previous {what}; refusing to replace it (choose another path "
                        f"or remove it yourself)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(path: Path) -> None:
    """Remove temporary siblings of ``path`` that a killed writer left behind (marked as ours, writer gone)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for sibling in path.parent.glob(f".{path.name}.*.tmp"):
        mark = sibling / PARTIAL_MARK
        if not sibling.is_dir() or sibling.is_symlink() or not mark.is_file():
            continue
        try:
            pid = int(mark.read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid != os.getpid() and (pid == 0 or not _alive(pid)):
            shutil.rmtree(sibling, ignore_errors=True)


def _mark(folder: Path) -> None:
    (folder / PARTIAL_MARK).write_text(f"{os.getpid()}\n")


def new_sibling(path: Path, ours: Callable[[Path], bool], what: str) -> Path:
    """A new marked temporary folder beside ``path`` to build its replacement in, after checking that ``path`` may
    be replaced and removing partial folders that killed runs left beside it."""
    check_replaceable(path, ours, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared folder
    _mark(tmp)
    return tmp


@contextmanager
def atomic_dir(path: Path, ours: Callable[[Path], bool] = lambda p: False, what: str = "output folder"
               ) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it takes the place of ``path``, on failure it is removed.

    ``path`` may already exist only as an empty folder or as something ``ours(path)`` recognises (checked before and
    again after the work); anything else raises UserError and is left untouched.
    """
    path = Path(path)
    tmp = new_sibling(path, ours, what)
    old = None
    try:
        yield tmp
        check_replaceable(path, ours, what)
        if path.exists():
            # Swap by renames: the target is never missing, and a kill in between leaves marked siblings only.
            _mark(path)
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
            os.replace(path, old)
        os.replace(tmp, path)
        (path / PARTIAL_MARK).unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old, path)  # put the previous result back
            (path / PARTIAL_MARK).unlink(missing_ok=True)
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
