"""The tiny MeG run of ``tiny_meg``, for test_distributed.py: launched as N processes, or imported and run in one.

usage: accelerate launch ... tests/dp_worker.py FOLDER    (or torchrun ..., or plain python for one process)
    every rank writes FOLDER/rank<r>.pt: the fitted neurons, the trained generator, its samples and the gate
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import megedit.familiarity as familiarity  # noqa: E402
import megedit.fitting as fitting  # noqa: E402
import megedit.meg_main as meg_main  # noqa: E402
from megedit import distributed  # noqa: E402
from megedit.encoder import embed  # noqa: E402
from megedit.generator import NeuronGenerator  # noqa: E402
from tiny_meg import EDITS, UNRELATED, tiny_base, tiny_hparams  # noqa: E402


def dp_hparams(folder: Path, **changes):
    # batches of 31 of the 32 positives: one global batch splits 15/16, the next (1 row) leaves rank 0 none;
    # condition dropout makes DiT's null embedding reached on some ranks only
    return tiny_hparams(folder, fit_batch_edits=1, gen_batch_size=31, gen_cond_dropout=0.25, **changes)


def run(folder: Path, hp) -> dict:
    """Train on the tiny base; the neurons stage 3 fitted, what the edit generates, and the work this process did:
    the prompts of the chunks it fitted, the number of rows its generator and gate steps computed a loss on, and the
    training texts it embedded."""
    fits, fitted_prompts, gen_rows, gate_rows, embedded = [], [], [], [], []
    real = (meg_main.fit_neurons, fitting._fit_chunk, NeuronGenerator._loss, familiarity._batch_loss, meg_main.embed)

    def fit_neurons(*args, **kwargs):
        fits.append(real[0](*args, **kwargs))
        return fits[-1]

    def fit_chunk(model, tok, neuron, mlp, layer, views, *args):
        fitted_prompts.extend(v[0] for v in views)
        return real[1](model, tok, neuron, mlp, layer, views, *args)

    def loss(self, x0, *args, rows=None):
        gen_rows.append(len(x0) if rows is None else rows.stop - rows.start)
        return real[2](self, x0, *args, rows=rows)

    def gate_loss(net, pos, labels, neg, idx, nidx, rows, *args):
        gate_rows.append(len(idx) if rows is None else rows.stop - rows.start)
        return real[3](net, pos, labels, neg, idx, nidx, rows, *args)

    def embed_texts(encoder, texts, *args, **kwargs):
        embedded.extend(texts)
        return real[4](encoder, texts, *args, **kwargs)

    (meg_main.fit_neurons, fitting._fit_chunk, NeuronGenerator._loss, familiarity._batch_loss,
     meg_main.embed) = fit_neurons, fit_chunk, loss, gate_loss, embed_texts
    try:
        model, tok = tiny_base()
        edit, report = meg_main.train_meg(model, tok, EDITS, hp, progress=False)
    finally:
        meg_main.fit_neurons, fitting._fit_chunk, NeuronGenerator._loss, familiarity._batch_loss, meg_main.embed = real
    queries = [r["prompt"] for r in EDITS] + UNRELATED
    emb = embed(edit.encoder, queries)
    return {"neurons": fits[0].weights, "ok": fits[0].ok, "generator": edit.generator.state_dict(),
            "samples": edit.generator.sample(emb), "familiarity": edit.familiarity.state_dict(), "embeddings": emb,
            "gen_loss": report["generator"]["loss"], "world_size": distributed.world_size(),
            "fitted_prompts": fitted_prompts, "gen_rows": gen_rows, "gate_rows": gate_rows, "embedded": embedded}


def main() -> int:
    folder = Path(sys.argv[1])
    torch.set_num_threads(1)
    out = run(folder, dp_hparams(folder, checkpoint_dir=str(folder / "checkpoints")))
    torch.save(out, folder / f"rank{distributed.rank()}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
