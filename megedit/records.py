"""What every result megedit writes is made of: the metric names, the environment it ran in, an atomic JSON write.

The CLI, ``megedit run``, ``megedit keep`` and the benchmarks all take these from here (importing this module is cheap:
no torch until ``environment()`` is called).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

# the six metrics of every evaluation (megedit.evaluate), and the ones a result table reports (their Score too)
METRICS = ("rel_tf", "rel_ag", "gen_tf", "gen_ag", "loc_tf", "loc_ag")
REPORTABLE = (*METRICS, "score")


def environment() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "command": " ".join(sys.argv), "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json(path: Path, payload: dict) -> None:
    """Write atomically: a crash never leaves a half-written results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
