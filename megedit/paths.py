"""Output paths checked before any work: a folder the run will write must be creatable and writable now, not found
unwritable after hours of training."""
from __future__ import annotations

import os
import uuid
from pathlib import Path


def check_writable_folder(folder: str | os.PathLike, what: str) -> Path:
    """Raise ValueError (naming ``what``, e.g. "--out") unless ``folder`` is, or can be created as, a writable folder.

    Nothing is left behind: the probe is a file written and removed in the folder or in its nearest existing parent.
    """
    folder = Path(os.path.expanduser(str(folder)))
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        where = "is" if existing == folder else f"would be inside {existing}, which is"
        raise ValueError(f"{what} {folder} {where} a file, not a folder; choose another path")
    # a real write, not os.access: root passes access checks on a read-only mount or a folder it may not write
    probe = existing / f".megedit-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{what} {folder} cannot be written: {existing} refuses new files ({e.strerror}); choose a "
                         "folder you can write") from None
    return folder


def check_results_folder(folder: str | os.PathLike, overwrite: bool, name: str = "results.json") -> Path:
    """``check_writable_folder`` for ``--out``, which also must not already hold an earlier run's ``name`` unless
    ``overwrite``."""
    folder = check_writable_folder(folder, "--out")
    if (folder / name).exists() and not overwrite:
        raise ValueError(f"--out {folder} already holds {name} from an earlier run; pass --overwrite to replace it, or "
                         "choose another --out")
    return folder
