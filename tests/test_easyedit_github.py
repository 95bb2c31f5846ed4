"""Registration against the GitHub EasyEdit API (2024+), which cannot be installed here: a stand-in ``easyeditor``
package with that API's signatures and control flow (``sequential_edit``; apply functions called without
``keep_original_weight``; non-sequential edits restored from ``weights_copy``) runs in a fresh process.
What it checks: the API is told apart by its signatures, EasyEdit's own AlphaEdit stays, and MeG keeps earlier edits
exactly when ``sequential_edit`` says so."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REQUESTS, save_tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

STAND_IN = {
    "__init__.py": "from .editors.editor import BaseEditor\n",
    "util/__init__.py": "",
    "util/alg_dict.py": """
        def apply_own_alphaedit(*args, **kwargs):
            raise NotImplementedError("EasyEdit's own AlphaEdit (not needed here)")

        ALG_DICT = {"AlphaEdit": apply_own_alphaedit}
        """,
    "editors/__init__.py": "",
    "editors/batch_editor.py": """
        class BatchEditor:
            @staticmethod
            def is_batchable_method(alg_name):
                return alg_name in ("MEMIT", "AlphaEdit")
        """,
    "editors/editor.py": """
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..util.alg_dict import ALG_DICT
        from .batch_editor import BatchEditor


        class BaseEditor:
            @classmethod
            def from_hparams(cls, hparams):
                return cls(hparams)

            def __init__(self, hparams):
                self.model_name, self.alg_name, self.hparams = hparams.model_name, hparams.alg_name, hparams
                self.apply_algo = ALG_DICT[hparams.alg_name]
                if not isinstance(self.model_name, str):
                    self.model, self.tok = self.model_name
                elif "gpt" in self.model_name.lower():
                    self.model = AutoModelForCausalLM.from_pretrained(self.model_name)
                    self.tok = AutoTokenizer.from_pretrained(self.model_name)
                else:
                    raise NotImplementedError(self.model_name)

            def edit(self, prompts, target_new, ground_truth=None, target_neg=None, rephrase_prompts=None,
                     locality_inputs=None, portability_inputs=None, sequential_edit=False, verbose=True, **kwargs):
                return self.edit_requests(self.requests(prompts, target_new, kwargs["subject"]), sequential_edit)

            def edit_requests(self, requests, sequential_edit=False, verbose=True, **kwargs):
                assert self.hparams.batch_size == 1
                for request in requests:
                    edited, weights_copy = self.apply_algo(self.model, self.tok, [request], self.hparams, copy=False,
                                                           return_orig_weights=True, keep_original_weight=False)
                    if not sequential_edit:
                        self.restore(weights_copy)
                return [], edited, weights_copy

            def batch_edit(self, prompts, target_new, ground_truth=None, target_neg=None, rephrase_prompts=None,
                           locality_inputs=None, portability_inputs=None, sequential_edit=False, verbose=True,
                           **kwargs):
                assert BatchEditor.is_batchable_method(self.alg_name)
                requests, size = self.requests(prompts, target_new, kwargs["subject"]), self.hparams.batch_size
                for start in range(0, len(requests), size):
                    edited, weights_copy = self.apply_algo(self.model, self.tok, requests[start:start + size],
                                                           self.hparams, copy=False, return_orig_weights=True)
                    if sequential_edit:
                        self.model = edited
                    else:
                        self.restore(weights_copy)
                return [], edited, weights_copy

            @staticmethod
            def requests(prompts, targets, subjects):
                return [dict(prompt=p, target_new=t, subject=s) for p, t, s in zip(prompts, targets, subjects)]

            def restore(self, weights_copy):
                params = dict(self.model.named_parameters())
                with torch.no_grad():
                    for name, value in weights_copy.items():
                        params[name][...] = value
        """,
}

SCRIPT = """
import json, sys, torch
from megedit.easyedit import meg_adapter, register
from conftest import REQUESTS, meg_hparams

trainings, real = [], meg_adapter.apply_meg_to_model
def recording(model, tok, requests, hparams, **kwargs):
    trainings.append([r["prompt"] for r in requests])
    return real(model, tok, requests, hparams, **{**kwargs, "progress": False})
meg_adapter.apply_meg_to_model = recording

out = {"api": register()}
from easyeditor import BaseEditor
from easyeditor.editors.batch_editor import BatchEditor
from easyeditor.util.alg_dict import ALG_DICT
out["own_alphaedit_kept"] = ALG_DICT["AlphaEdit"].__module__ == "easyeditor.util.alg_dict"
out["meg_batchable"] = BatchEditor.is_batchable_method("MeG")
editor = BaseEditor.from_hparams(meg_hparams(sys.argv[1]))
probe = editor.tok("The capital of France is", return_tensors="pt")
with torch.no_grad():
    before = editor.model(**probe).logits
prompts, targets, subjects = ([r[k] for r in REQUESTS] for k in ("prompt", "target_new", "subject"))
for call, sequential in (("batch_edit", False), ("edit", False), ("edit", True)):
    trainings.clear()
    getattr(editor, call)(prompts[:2], targets[:2], subject=subjects[:2], sequential_edit=sequential)
    out[f"{call} sequential={sequential}"] = trainings[:]
    if call == "batch_edit":
        with torch.no_grad():
            out["unchanged after batch_edit"] = bool(torch.equal(editor.model(**probe).logits, before))
out["batch_size"] = editor.hparams.batch_size
print("RESULT " + json.dumps(out))
"""


def test_github_api_registration(tmp_path):
    for name, text in STAND_IN.items():
        path = tmp_path / "easyeditor" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    model_path = save_tiny_model(tmp_path / "tiny-gpt2")  # "gpt" in the name: the stand-in's loader takes it
    tests, root = Path(__file__).parent, Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root), str(tests)]),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", SCRIPT, model_path], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.split("RESULT ", 1)[1])
    a, b = [r["prompt"] for r in REQUESTS[:2]]
    assert out["api"] == "github" and out["own_alphaedit_kept"] and out["meg_batchable"]
    assert out["batch_edit sequential=False"] == [[a, b]]  # one training for the whole batch, batch_size 1
    assert out["unchanged after batch_edit"] and out["batch_size"] == 1
    assert out["edit sequential=False"] == [[a], [b]]  # each edit alone
    assert out["edit sequential=True"] == [[a], [a, b]]  # earlier edits kept
