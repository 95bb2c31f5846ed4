"""A tiny MeG run with checkpoints that kills itself (SIGKILL, no cleanup) at a chosen point; used by test_resume.py.

usage: python resume_worker.py FOLDER EVENT:N LOG
    dies at the start of the N-th EVENT of this process ("fit": a chunk of neurons, "gen": a generator step);
    appends every event (see tiny_meg.count_stage_calls) to LOG, one per line, as it happens.
"""
import os
import signal
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from megedit.meg_main import train_meg  # noqa: E402
from tiny_meg import EDITS, count_stage_calls, tiny_base, tiny_hparams  # noqa: E402


def main() -> int:
    folder, kill_at, log = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    kill_event, kill_n = kill_at.split(":")
    seen = Counter()

    def on_call(event: str) -> None:
        seen[event] += 1
        with open(log, "a") as f:
            f.write(event + "\n")
        if event == kill_event and seen[event] == int(kill_n):
            os.kill(os.getpid(), signal.SIGKILL)

    torch.set_num_threads(1)
    count_stage_calls(setattr, on_call)
    model, tok = tiny_base()
    train_meg(model, tok, EDITS, resume_hparams(folder), progress=False)
    return 0


def resume_hparams(folder: Path):
    return tiny_hparams(folder, checkpoint_dir=str(folder / "checkpoints"), checkpoint_gen_epochs=2)


if __name__ == "__main__":
    sys.exit(main())
