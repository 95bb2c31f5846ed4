"""megedit on EasyEdit's GitHub source (the API of 2024+), the real one: ``../shared/easyedit-github`` beside the
repository (``MEGEDIT_EASYEDIT_GITHUB`` overrides the folder), put first on the path of a fresh process so that it
shadows the registry's wheel that install.sh installs. Its import needs are the ``[easyedit-github]`` extra; timm and
torchvision are stubbed for easyeditor's imports only (megedit/easyedit/import_fixes.py, ``vision_stubs``).

What it checks: the API is told apart and MeG keeps earlier edits exactly when ``sequential_edit`` says so; a loaded
``(model, tokenizer)`` works; AlphaEdit runs where EasyEdit's own cannot (and equals EasyEdit's own where it can);
``megedit run`` gives the same MeG figures on both hosts and MEMIT figures equal to EasyEdit's own on each.
Nothing here is a stand-in: every call goes through the GitHub source's own ``BaseEditor`` and evaluators.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import (REQUESTS, meg_hparams, memit_style_hparams, missing_asset, save_tiny_model, write_counterfact_edits,
                      write_texts)

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT, TESTS = Path(__file__).parents[1], Path(__file__).parent


@pytest.fixture(scope="module")
def github_source() -> Path:
    folder = Path(os.environ.get("MEGEDIT_EASYEDIT_GITHUB") or ROOT.parent / "shared" / "easyedit-github")
    if not (folder / "easyeditor" / "__init__.py").is_file():
        missing_asset(f"needs EasyEdit's GitHub source at {folder} (set MEGEDIT_EASYEDIT_GITHUB to its folder)")
    return folder


def run_on(host, script: str, *args, cwd=None) -> dict:
    """``script`` in a fresh process with EasyEdit's GitHub source first on the path (``host`` is its folder), or
    with the installed wheel (``host`` None); returns the JSON it printed after ``RESULT``."""
    path = ([str(host)] if host else []) + [str(ROOT), str(TESTS)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env,
                         timeout=600, cwd=cwd)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.split("RESULT ", 1)[1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GPT-2 in a folder whose name has "gpt" in it (GitHub EasyEdit's loader picks classes by name), its
    covariance statistics, and MEMIT/AlphaEdit/MeG hparams files for it."""
    from megedit.stats import precompute_stats

    root = tmp_path_factory.mktemp("github")
    model = save_tiny_model(root / "tiny-gpt2")
    files = {alg: memit_style_hparams(root, model, alg=alg) for alg in ("MEMIT", "AlphaEdit")}
    precompute_stats(files["MEMIT"], sources=[str(write_texts(root))], progress=False)
    files["MeG"] = root / "meg.yaml"
    files["MeG"].write_text(yaml.safe_dump(meg_hparams(model).to_dict()))
    return root, model, files


REGISTRATION = """
import json, sys, torch
from megedit.easyedit import meg_adapter, register
from conftest import REQUESTS, meg_hparams

trainings, real = [], meg_adapter.apply_meg_to_model
def recording(model, tok, requests, hparams, **kwargs):
    trainings.append([r["prompt"] for r in requests])
    return real(model, tok, requests, hparams, **{**kwargs, "progress": False})
meg_adapter.apply_meg_to_model = recording

out = {"api": register()}
import easyeditor
from easyeditor import BaseEditor
from easyeditor.editors.batch_editor import BatchEditor
from easyeditor.util.alg_dict import ALG_DICT
out["source"] = easyeditor.__file__
out["alphaedit"] = [ALG_DICT["AlphaEdit"].__module__, ALG_DICT["AlphaEdit"].easyedit_apply.__module__]
out["meg_batchable"] = BatchEditor.is_batchable_method("MeG")
out["vision_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("timm", "torchvision"))
editor = BaseEditor.from_hparams(meg_hparams(sys.argv[1]))
probe = editor.tok("The capital of France is", return_tensors="pt")
with torch.no_grad():
    before = editor.model(**probe).logits
prompts, targets, subjects = ([r[k] for r in REQUESTS] for k in ("prompt", "target_new", "subject"))
for call, sequential in (("batch_edit", False), ("edit", False), ("edit", True)):
    trainings.clear()
    metrics, _, _ = getattr(editor, call)(prompts[:2], targets[:2], subject=subjects[:2], sequential_edit=sequential,
                                          verbose=False)
    out[f"{call} sequential={sequential}"] = trainings[:]
    if call == "batch_edit":
        out["scored by EasyEdit"] = sorted(metrics[0]["post"])
        with torch.no_grad():
            out["unchanged after batch_edit"] = bool(torch.equal(editor.model(**probe).logits, before))
out["batch_size"] = editor.hparams.batch_size

# a loaded (model, tokenizer) in place of the name: EasyEdit's evaluators need a name string
pair_hp = meg_hparams(sys.argv[1])
pair_hp.model_name = (editor.model, editor.tok)  # as EasyEdit's README passes a loaded model
pair = BaseEditor.from_hparams(pair_hp)
metrics, edited, _ = pair.batch_edit(prompts, targets, subject=subjects, sequential_edit=True, verbose=False,
                                     locality_inputs={"neighborhood": {
                                         "prompt": [r["locality"]["neighborhood"]["prompt"] for r in REQUESTS],
                                         "ground_truth": [r["locality"]["neighborhood"]["ground_truth"]
                                                          for r in REQUESTS]}})
out["pair model_name"] = pair.model_name
out["pair scored"] = sorted(metrics[0]["post"]) + sorted(metrics[0]["post"].get("locality", {}))
out["pair rewrite"] = [m["post"]["rewrite_acc"] for m in metrics]
print("RESULT " + json.dumps(out))
"""


def test_registration_and_meg_on_the_github_source(github_source, tiny):
    _, model, _ = tiny
    out = run_on(github_source, REGISTRATION, model)
    a, b = [r["prompt"] for r in REQUESTS[:2]]
    assert out["api"] == "github" and out["source"].startswith(str(github_source))
    assert out["alphaedit"] == ["megedit.easyedit.alphaedit_choice", "easyeditor.models.alphaedit.AlphaEdit_main"]
    assert out["meg_batchable"] and out["vision_modules"] == []  # the stubs leave nothing behind
    assert out["batch_edit sequential=False"] == [[a, b]]  # one training for the whole batch, batch_size 1
    assert {"rewrite_acc"} <= set(out["scored by EasyEdit"])
    assert out["unchanged after batch_edit"] and out["batch_size"] == 1
    assert out["edit sequential=False"] == [[a], [b]]  # each edit alone
    assert out["edit sequential=True"] == [[a], [a, b]]  # earlier edits kept
    assert out["pair model_name"].endswith("tiny-gpt2")
    assert {"rewrite_acc", "neighborhood_acc"} <= set(out["pair scored"]) and len(out["pair rewrite"]) == 3


ALPHAEDIT = """
import json, sys, torch
from megedit.easyedit import implementation, load_hparams, register
from megedit.easyedit.loader import load_model_named

register()
import importlib
from easyeditor import BaseEditor
from easyeditor.util.alg_dict import ALG_DICT
own = importlib.import_module("easyeditor.models.alphaedit.AlphaEdit_main")
memit = importlib.import_module("easyeditor.models.memit.memit_main")
from conftest import REQUESTS

hp_path, xl_path, z_template = sys.argv[1:4]
args = [[r[k] for r in REQUESTS] for k in ("prompt", "target_new")]
subjects = [r["subject"] for r in REQUESTS]
out = {}

def weights(editor, hp):
    return torch.cat([editor.model.get_parameter(hp.rewrite_module_tmp.format(l) + ".weight").detach().flatten()
                      for l in hp.layers]).clone()

# a model name EasyEdit's AlphaEdit does not know: megedit's edits, and follows sequential_edit
hp = load_hparams(hp_path)
out["implementation"] = implementation(hp)
editor = BaseEditor.from_hparams(hp)
before = weights(editor, hp)
editor.batch_edit(*args, subject=subjects, sequential_edit=False, verbose=False)
out["restored"] = bool(torch.equal(weights(editor, hp), before))
metrics, _, _ = editor.batch_edit(*args, subject=subjects, sequential_edit=True, verbose=False)
out["kept"] = not torch.equal(weights(editor, hp), before)
out["rewrite"] = [m["post"]["rewrite_acc"] for m in metrics]

# a name it knows (gpt2-xl) and P_loc where it writes P: EasyEdit's own edits; megedit's gives the same update
xl = load_hparams(hp_path)
xl.model_name, xl.P_loc = xl_path, "null_space_project.pt"
out["xl implementation"] = implementation(xl)
deltas = {}
for name, apply in (("easyedit", ALG_DICT["AlphaEdit"]), ("megedit", None)):
    model, tok = load_model_named(xl_path)
    start = weights(type("E", (), {"model": model})(), xl)
    memit.CONTEXT_TEMPLATES_CACHE = own.CONTEXT_TEMPLATES_CACHE = [["{}"]]  # both: the same context templates
    requests = [{**r, "target_new": r["target_new"], "case_id": r["case_id"]} for r in REQUESTS]
    if apply is None:
        from megedit.baselines.alphaedit import apply_alphaedit_to_model as apply
    apply(model, tok, requests, xl, copy=False, return_orig_weights=True, cache_template=z_template)
    deltas[name] = weights(type("E", (), {"model": model})(), xl) - start
out["wrote P in cwd"] = __import__("os").path.exists("null_space_project.pt")
out["delta norm"] = float(deltas["easyedit"].norm())
out["difference"] = float((deltas["easyedit"] - deltas["megedit"]).norm())
print("RESULT " + json.dumps(out))
"""


def test_alphaedit_runs_on_the_github_source(github_source, tiny, tmp_path):
    """SmolLM2-like names get megedit's AlphaEdit (EasyEdit's would stop at NameError: P); names EasyEdit's handles
    get EasyEdit's own, and the two make the same update from the same target vectors."""
    root, model, files = tiny
    xl = Path(save_tiny_model(root / "tiny-gpt2-xl"))  # same weights (seed 0), a name EasyEdit's AlphaEdit knows
    for stats in (root / "stats" / "tiny-gpt2").iterdir():  # its covariance files under its own folder name
        target = root / "stats" / "tiny-gpt2-xl" / stats.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(stats, target_is_directory=True)
    out = run_on(github_source, ALPHAEDIT, files["AlphaEdit"], xl, tmp_path / "z" / "z{}_{}_{}.npz", cwd=tmp_path)
    assert out["implementation"]["code"] == "megedit.baselines.alphaedit"
    assert "only for model names containing llama, qwen, gpt2-xl" in out["implementation"]["why"]
    assert out["restored"] and out["kept"] and len(out["rewrite"]) == 3
    assert out["xl implementation"] == {"code": "easyeditor.models.alphaedit", "why": None}
    assert out["wrote P in cwd"] and out["delta norm"] > 1e-3
    assert out["difference"] < 2e-3 * out["delta norm"]  # EasyEdit solves in float32, megedit in float64


RUN = """
import json, sys
from megedit import runner
cfg = runner.load_config(sys.argv[1], output=sys.argv[2])
records = runner.run(cfg, progress=False)
print("RESULT " + json.dumps([{k: r[k] for k in ("method", "alg_name", "summary", "easyedit", "easyedit_api",
                                                 "implementation")} for r in records]))
"""


def test_megedit_run_on_both_hosts(github_source, tiny, tmp_path, easyedit):
    """The same comparison (MeG, MEMIT, AlphaEdit; same requests and seed) on the wheel and on the GitHub source: MeG's
    figures are the same on both, and on each host megedit's teacher-forced figures equal EasyEdit's own, so the edits
    are scored while still on the model (GitHub's batch_edit restores it unless sequential_edit=True)."""
    root, _, files = tiny
    data = write_counterfact_edits(tmp_path / "edits.json")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"format": "counterfact", "path": str(data)}, "sizes": [3], "seed": 0,
                                      "methods": [str(files[a]) for a in ("MeG", "MEMIT", "AlphaEdit")],
                                      "isolate": False}))
    hosts = {"wheel": run_on(None, RUN, config, tmp_path / "wheel"),
             "github": run_on(github_source, RUN, config, tmp_path / "github")}
    by = {host: {r["alg_name"]: r for r in records} for host, records in hosts.items()}
    for host, records in by.items():
        assert {r["easyedit_api"] for r in records.values()} == {host}
        # scored on the edited model: megedit's TF numbers are EasyEdit's own for the methods that do not route (MeG's
        # megedit TF routes on the prompt alone, EasyEdit's on prompt + answer: tests/test_prompt_routed_tf.py)
        for r in (r for r in records.values() if r["alg_name"] != "MeG"):
            assert r["summary"]["rel_tf"] == pytest.approx(r["easyedit"]["post_rewrite_acc"], abs=1e-6), (host, r)
            assert r["summary"]["gen_tf"] == pytest.approx(r["easyedit"]["post_rephrase_acc"], abs=1e-6), (host, r)
            assert r["summary"]["loc_tf"] == pytest.approx(r["easyedit"]["post_locality_acc"], abs=1e-6), (host, r)
        # MEMIT's edit moved the neighbours' predictions (EasyEdit's locality < 100): on a restored model megedit
        # would have found them unmoved (100), as `megedit run` did on the GitHub source before it said sequential_edit
        assert records["MEMIT"]["easyedit"]["post_locality_acc"] < 100
        assert records["AlphaEdit"]["implementation"]["code"] == "megedit.baselines.alphaedit"
    assert by["wheel"]["MeG"]["summary"] == by["github"]["MeG"]["summary"]
    for key in ("post_rewrite_acc", "post_rephrase_acc"):  # and EasyEdit's own scoring of MeG agrees across hosts
        assert by["wheel"]["MeG"]["easyedit"][key] == pytest.approx(by["github"]["MeG"]["easyedit"][key], abs=1e-6)
    assert by["wheel"]["AlphaEdit"]["implementation"]["why"] == "the installed EasyEdit has no AlphaEdit"
    assert "only for model names" in by["github"]["AlphaEdit"]["implementation"]["why"]


Z_FOLDER = """
import json, sys
from pathlib import Path
from megedit import runner
from megedit.baselines.z_cache import z_cache_template
cfg = runner.load_config(sys.argv[1], output=sys.argv[2])
method = cfg.methods[0]
folder = Path(z_cache_template(cfg, method, runner.method_hparams(method, cfg))).parent
print("RESULT " + json.dumps({"folder": str(folder), "settings": json.loads((folder / "settings.json").read_text())}))
"""


def test_each_host_keeps_its_own_z_vectors(github_source, tiny, tmp_path):
    """GitHub EasyEdit's compute_z gives other target vectors than the wheel's (other context templates), so a run on
    one host must not read the z another host cached in the same output folder; the wheel's folder keeps its name."""
    _, _, files = tiny
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"format": "counterfact", "path": str(write_counterfact_edits(
        tmp_path / "edits.json"))}, "sizes": [3], "seed": 0, "methods": [str(files["MEMIT"])]}))
    wheel = run_on(None, Z_FOLDER, config, tmp_path / "out")
    github = run_on(github_source, Z_FOLDER, config, tmp_path / "out")
    assert wheel["folder"] != github["folder"]
    assert "easyedit_api" not in wheel["settings"] and github["settings"]["easyedit_api"] == "github"


def test_which_alphaedit_github_easyedit_can_run(tmp_path, monkeypatch):
    """The rule `register()` applies on the GitHub API, case by case (no EasyEdit needed)."""
    from types import SimpleNamespace

    from megedit.easyedit.alphaedit_choice import easyedit_cannot

    monkeypatch.chdir(tmp_path)
    cached = tmp_path / "P.pt"
    cached.write_bytes(b"")

    def why(name, p_loc):
        return easyedit_cannot(SimpleNamespace(model_name=name, P_loc=p_loc))

    assert why("meta-llama/Llama-3-8B", str(cached)) is None  # a name it sizes P for, P already computed
    assert why("Qwen/Qwen2.5-7B", "./null_space_project.pt") is None  # it writes P where P_loc says
    assert why("gpt2-xl", str(tmp_path / "null_space_project.pt")) is None
    assert "would write its projection to ./null_space_project.pt" in why("llama3-8b", str(tmp_path / "x" / "P.pt"))
    assert "would write" in why("llama3-8b", None)
    assert "model_name is 'smollm2-135m'" in why("smollm2-135m", str(cached))
    assert "only for model names" in why("EleutherAI/gpt-j-6b", str(cached))  # P yes, its key cache no
    assert "loaded model" in why((object(), object()), str(cached))
