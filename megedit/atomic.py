"""Atomic writes: a file or folder appears complete under its final name, or not at all.

Everything is written under a hidden temporary name beside the target and renamed into place (a rename within one
filesystem is atomic), so a crash or a kill mid-write leaves at most a stray ``.<name>.tmp-*`` that nothing reads.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` fills a temporary file, which then replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename, so a power cut cannot leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_dir(final: str | os.PathLike, fill: Callable[[Path], None], replace: bool = False) -> Path:
    """``fill(tmp)`` builds a folder in a temporary sibling, which is then renamed to ``final``.

    If ``final`` already exists: with ``replace`` the new folder takes its place (the old one is removed only after the
    swap); without it the existing folder is kept (another process finished first).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        fill(tmp)
        if replace and final.exists():
            final.rename(old)
        try:
            tmp.rename(final)
        except OSError:
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return final
