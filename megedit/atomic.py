"""Atomic writes: a file or folder appears complete under its final name, or not at all.

Everything is written under a hidden temporary name beside the target and renamed into place (a rename within one
filesystem is atomic). Replacing an existing folder swaps the two in one step where the OS can (Linux's
``renameat2(RENAME_EXCHANGE)``), so the name always holds the old or the new folder. Temporary names carry the host and
process that made them (``.<name>.tmp-<host>-<pid>-<random>``, ``.<name>.old-...``): what a killed process left behind
is recognised by the next write or load of that name and restored (an old folder whose name is empty) or removed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Callable

HOST = socket.gethostname().replace("-", "_")  # no "-": the name is split on it


def _temporary(final: Path, kind: str) -> Path:
    return final.with_name(f".{final.name}.{kind}-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_leftovers(final: str | os.PathLike) -> None:
    """Clean what killed writes of ``final`` left beside it: if ``final`` is missing, the folder a killed replacement
    had moved aside takes its name back; every other leftover of a dead process on this host is removed. Leftovers of
    a live process (a write in progress) or of another host are not touched."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    stale = {"tmp": [], "old": []}
    for path in final.parent.glob(f".{final.name}.*-*"):
        kind, _, owner = path.name[len(final.name) + 2:].partition("-")
        parts = owner.rsplit("-", 2)
        if kind not in stale or len(parts) != 3 or parts[0] != HOST or not parts[1].isdigit():
            continue
        if not _alive(int(parts[1])):
            stale[kind].append(path)
    if stale["old"] and not final.exists():
        newest = max(stale["old"], key=lambda p: p.stat().st_mtime)
        os.rename(newest, final)
        stale["old"].remove(newest)
    for path in stale["tmp"] + stale["old"]:
        _remove(path)


@functools.lru_cache(maxsize=1)
def _renameat2():
    name = ctypes.util.find_library("c")
    return None if name is None else getattr(ctypes.CDLL(name, use_errno=True), "renameat2", None)


def _ordinary_permissions(path: Path) -> None:
    """What a plain ``open``/``mkdir`` would give under the umask: some writers (safetensors) create files 0600."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the OS or filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary file, which then replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path, "tmp")
    try:
        write(tmp)
        _ordinary_permissions(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename, so a power cut cannot leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_dir(final: str | os.PathLike, fill: Callable[[Path], None], replace: bool = False) -> Path:
    """``fill(tmp)`` builds a folder in a temporary sibling, which is then renamed to ``final``.

    If ``final`` already exists: with ``replace`` the new folder takes its place (swapped in one step where the OS
    can, else moved aside first; the old one is removed only after the swap); without it the existing folder is kept
    (another process finished first).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_leftovers(final)
    tmp = _temporary(final, "tmp")
    tmp.mkdir()
    old = _temporary(final, "old")
    try:
        fill(tmp)
        _ordinary_permissions(tmp)
        if replace and final.exists():
            if _exchange(tmp, final):
                return final  # tmp now holds the old folder: removed below
            final.rename(old)
        try:
            tmp.rename(final)
        except OSError:
            if old.exists() and not final.exists():
                old.rename(final)  # the swap failed: the old folder keeps its name
                raise
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return final
