"""Reading a YAML file that must hold a mapping: one place for the checks and their messages."""
from __future__ import annotations

from pathlib import Path

import yaml


def read_yaml_mapping(path: str | Path, what: str, error: type[Exception] = ValueError,
                      missing_error: type[Exception] = FileNotFoundError) -> dict:
    """The mapping in ``path`` (``what``, e.g. "run config", names it in messages); a missing file raises
    ``missing_error``, broken YAML or anything but a mapping raises ``error``."""
    p = Path(path)
    if not p.is_file():
        reason = "is a folder, not a file" if p.is_dir() else "does not exist"
        raise missing_error(f"{what} {str(path)!r} {reason}")
    try:
        config = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        raise error(f"{p} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(config, dict):
        raise error(f"{p} must be a YAML mapping")
    return config
