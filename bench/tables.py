"""Rebuild the README tables that kept results back: ``python bench/tables.py`` (``--check``: only say if stale).

A table lives between two markers in README.md or bench/README.md; the first names the kept result folders it shows,
in order (paths from the repository root)::

    <!-- kept-table: bench/results/cf100-meg bench/results/cf100-baselines -->
    (generated: one row per method and size of each folder's results.json, linking its results.md)
    <!-- /kept-table -->

Nothing between the markers is typed by hand; rows without a kept result file stay outside them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from megedit.keep import metrics_table  # noqa: E402

READMES = ("README.md", "bench/README.md")
BLOCK = re.compile(r"(<!-- kept-table:(?P<folders>[^>]*)-->\n)(?P<body>.*?)(<!-- /kept-table -->)", re.S)
EMPTY = "_No kept result file here yet._\n"


def table(folders: list[str], root: Path, readme: Path) -> str:
    rows = []
    for folder in folders:
        path = root / folder / "results.json"
        if not path.exists():
            raise SystemExit(f"{readme}: kept-table names {folder}, which has no results.json")
        kept = json.loads(path.read_text())
        link = os.path.relpath(root / folder / "results.md", readme.parent)
        rows += [{**row, "link": link} for row in kept["rows"]]
    return metrics_table(rows) + "\n" if rows else EMPTY


def rebuild(text: str, root: Path, readme: Path) -> str:
    return BLOCK.sub(lambda m: m.group(1) + table(m.group("folders").split(), root, readme) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
    parser.add_argument("--root", default=str(ROOT), help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    root, stale = Path(args.root), []
    for name in READMES:
        readme = root / name
        if not readme.exists():
            continue
        text = readme.read_text()
        new = rebuild(text, root, readme)
        if new != text:
            stale.append(name)
            if not args.check:
                readme.write_text(new)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)} (run python bench/tables.py)")
        return 1
    print(("rebuilt: " + ", ".join(stale)) if stale and not args.check else "tables up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
