"""An export folder holds what gift_quant wrote (the files its manifest lists) and maybe files of the user's (a model
card, a README): replacing or removing an export touches only the former.

Every step leaves a folder the next run recognises and finishes: removal deletes the listed files and the manifest
last (a removal cut short is a manifest whose files are partly gone, still an export); replacement first writes a
manifest claiming both the old and the new files, then swaps them, then puts the new manifest in place.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator

from .checkpoint import MANIFEST
from .errors import UserError
from .io_utils import PARTIAL_MARK, check_replaceable, new_sibling, write_text

WHAT = "gift_quant export"
# What a run writes in its output folder besides its exports: an export path may not lie in (or be) one of these.
RUN_ENTRIES = ("quantize", "quantize_log.csv", "reconstruct", "reconstruct_log.csv", "recover", "compare",
               "comparison.json", "comparison.md", "recovery.png", "results.json", "report.md", "recipe.resolved.yaml",
               ".gift_quant.lock")


def _read_manifest(folder: Path) -> dict | None:
    try:
        doc = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != "gift_quant" or not isinstance(doc.get("files"), dict):
        return None
    return doc


def _inside(name: str) -> bool:
    """A manifest entry that names a file inside the folder (never an absolute path or one climbing out of it)."""
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and name != MANIFEST


def owned_files(folder: Path) -> list[str] | None:
    """The files (relative paths) the folder's manifest says gift_quant wrote, or None when it has no manifest of
    ours (then it is not an export and nothing in it may be removed)."""
    doc = _read_manifest(folder)
    return None if doc is None else [n for n in doc["files"] if _inside(n)]


def is_export(folder: Path) -> bool:
    return owned_files(folder) is not None


def _unlink(folder: Path, name: str) -> None:
    path = folder / name
    path.unlink(missing_ok=True)
    for parent in path.parents:  # subfolders the export created, once empty
        if parent == folder or folder not in parent.parents:
            break
        try:
            parent.rmdir()
        except OSError:
            break


def remove_export(folder: Path) -> None:
    """Delete the export's own files, the manifest last; the folder goes too unless the user's files remain, in
    which case an empty manifest stays so that the next export may write there again."""
    folder = Path(folder)
    names = owned_files(folder)
    if names is None:
        raise UserError(f"{folder} is not a previous {WHAT}; refusing to remove anything from it")
    for name in names:
        _unlink(folder, name)
    (folder / PARTIAL_MARK).unlink(missing_ok=True)
    if any(p.name != MANIFEST for p in folder.iterdir()):
        write_text(folder / MANIFEST, json.dumps({"format": "gift_quant", "files": {}}, indent=2) + "\n")
    else:
        (folder / MANIFEST).unlink()
        folder.rmdir()


def install_export(new: Path, target: Path) -> None:
    """Move the export built in ``new`` to ``target``, replacing only the files of an earlier export there."""
    doc = _read_manifest(new)
    if doc is None:
        raise ValueError(f"{new} holds no manifest to install")
    if not target.exists():
        (new / PARTIAL_MARK).unlink(missing_ok=True)
        os.replace(new, target)
        return
    mine = [n for n in doc["files"] if _inside(n)]
    old = set(owned_files(target) or ())
    clash = [n for n in mine if n not in old and (target / n).exists()]
    if clash:
        raise UserError(f"{target / clash[0]} is not part of the earlier export but the new one writes that file; "
                        f"move it away and run again")
    claim = {"format": "gift_quant", "files": {**{n: {} for n in old}, **doc["files"]}, "incomplete": True}
    write_text(target / MANIFEST, json.dumps(claim, indent=2) + "\n")  # a kill from here on leaves ours to clean
    for name in sorted(old - set(mine)):
        _unlink(target, name)
    for name in mine:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(new / name, target / name)
    os.replace(new / MANIFEST, target / MANIFEST)


@contextmanager
def staged_export(path: Path) -> Iterator[Path]:
    """A temporary sibling folder to write an export into; on success it is installed at ``path`` (see above), on
    failure it is removed and ``path`` is untouched. ``path`` may hold only an earlier export (and the user's files
    beside it) or nothing."""
    path = Path(path)
    tmp = new_sibling(path, is_export, WHAT)
    try:
        yield tmp
        check_replaceable(path, is_export, WHAT)
        install_export(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
