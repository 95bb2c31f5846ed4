"""The edit as an artifact: save_pretrained / from_pretrained round trip, base-model check, atomic and verified saves."""
import copy
import json
import shutil

import pytest
import torch

import megedit.artifact as artifact
from megedit.arch import base_fingerprint
from megedit.artifact import MANIFEST
from megedit.model import MeGEdit, MeGModel

from conftest import tiny_model
from tiny_meg import EDITS, LAYER, UNRELATED, saved_tiny_edit, states_equal, tiny_base


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real MeG edit (all four stages) on a tiny llama, saved once."""
    return saved_tiny_edit(tmp_path_factory.mktemp("artifact"))


def logits(model, tok, texts):
    with torch.no_grad():
        return model(**tok(texts, return_tensors="pt", padding=True)).logits


def test_reloaded_edit_gives_bit_identical_logits(trained):
    edited, tok, saved = trained
    fresh, _ = tiny_base()  # the same base model, loaded anew
    reloaded = MeGModel.from_pretrained(fresh, tok, saved)
    texts = [r["prompt"] for r in EDITS] + UNRELATED
    assert edited.edit.route(texts).rows.numel() > 0  # some rows carry a generated neuron: the test can fail
    before, after = logits(edited, tok, texts), logits(reloaded, tok, texts)
    assert (after - before).abs().max().item() == 0.0 and torch.equal(after, before)
    for part in ("encoder", "familiarity", "generator"):
        assert states_equal(getattr(edited.edit, part), getattr(reloaded.edit, part)), part
    assert reloaded.edit.hparams == edited.edit.hparams and reloaded.edit.layer == LAYER
    assert not torch.equal(before, logits(tiny_base()[0], tok, texts))  # the edit changes the edited rows


def test_manifest_records_version_fingerprint_and_hashes(trained):
    edited, _, saved = trained
    manifest = json.loads((saved / MANIFEST).read_text())
    assert manifest["megedit_version"] and manifest["layer"] == LAYER
    assert manifest["base_model"] == base_fingerprint(edited.model, LAYER) == edited.edit.base_fingerprint
    assert {"hparams.yaml", "familiarity.safetensors", "generator.safetensors"} <= set(manifest["files"])
    assert any(name.startswith("encoder/") for name in manifest["files"])


def test_loading_onto_another_base_model_is_refused(trained):
    _, tok, saved = trained
    with pytest.raises(ValueError, match=r"different base model: its weights_sha256 is .* pass strict=False"):
        MeGModel.from_pretrained(tiny_model("llama", seed=1), tok, saved)
    with pytest.raises(ValueError, match=r"different base model: its model_type is 'llama', this model's is 'gpt2'"):
        MeGModel.from_pretrained(tiny_model("gpt2"), tok, saved)
    shallow = tiny_model("llama")
    shallow.model.layers = shallow.model.layers[:1]  # the edited layer 1 does not exist here
    with pytest.raises(ValueError, match=r"its num_layers is 3, this model's is 1"):
        MeGModel.from_pretrained(shallow, tok, saved)
    with pytest.raises(ValueError, match=r"its dtype is 'torch.float32', this model's is 'torch.bfloat16'"):
        MeGModel.from_pretrained(tiny_base()[0].to(torch.bfloat16), tok, saved)
    other = MeGModel.from_pretrained(tiny_model("llama", seed=1), tok, saved, strict=False)  # same shape: allowed
    assert other.edit.layer == LAYER


def test_from_pretrained_replaces_an_earlier_neuron(trained):
    edited, tok, saved = trained
    base, _ = tiny_base()
    MeGModel.from_pretrained(base, tok, saved)
    again = MeGModel.from_pretrained(base, tok, saved)
    hooks = [len(layer.mlp._forward_hooks) for layer in base.model.layers]
    assert hooks == [0, 1, 0]
    texts = [r["prompt"] for r in EDITS]
    assert torch.equal(logits(again, tok, texts), logits(edited, tok, texts))


def test_interrupted_save_leaves_nothing_that_loads(trained, tmp_path, monkeypatch):
    edited, tok, saved = trained
    real_save = artifact.save_file

    def crash_on_generator(tensors, path):
        if path.endswith("generator.safetensors"):
            raise OSError("simulated crash in the middle of the save")
        real_save(tensors, path)

    monkeypatch.setattr(artifact, "save_file", crash_on_generator)
    target = tmp_path / "edit"
    with pytest.raises(OSError, match="simulated crash"):
        edited.save_pretrained(target)
    assert not target.exists() and list(tmp_path.iterdir()) == []  # no half folder, no stray temporary
    with pytest.raises(ValueError, match="the folder does not exist"):
        MeGEdit.from_pretrained(target)
    # overwriting an existing edit: a crash keeps the old one whole
    shutil.copytree(saved, target)
    with pytest.raises(OSError, match="simulated crash"):
        edited.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit"]
    monkeypatch.undo()
    assert states_equal(MeGEdit.from_pretrained(target).generator, edited.edit.generator)


def test_unfinished_or_damaged_folders_are_refused(trained, tmp_path):
    _, _, saved = trained
    unfinished = tmp_path / "unfinished"
    shutil.copytree(saved, unfinished)
    (unfinished / MANIFEST).unlink()  # what a save killed before its last write would hold
    with pytest.raises(ValueError, match="has no megedit_edit.json"):
        MeGEdit.from_pretrained(unfinished)
    damaged = tmp_path / "damaged"
    shutil.copytree(saved, damaged)
    data = bytearray((damaged / "generator.safetensors").read_bytes())
    data[-1] ^= 1
    (damaged / "generator.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="generator.safetensors does not match its hash"):
        MeGEdit.from_pretrained(damaged)
    incomplete = tmp_path / "incomplete"
    shutil.copytree(saved, incomplete)
    (incomplete / "hparams.yaml").unlink()
    with pytest.raises(ValueError, match="hparams.yaml is missing"):
        MeGEdit.from_pretrained(incomplete)


def test_save_never_overwrites_a_folder_that_is_not_an_edit(trained, tmp_path):
    edited, _, _ = trained
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a saved megedit edit; choose a new or empty folder"):
        edited.save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    edited.save_pretrained(tmp_path / "empty")  # an empty or absent folder is fine, and so is an older edit
    edited.save_pretrained(tmp_path / "empty")


def test_a_hand_built_edit_needs_its_base_model(trained, tmp_path):
    edited, _, _ = trained
    e = edited.edit
    bare = MeGEdit(e.encoder, e.familiarity, e.generator, e.layer, e.hparams)
    with pytest.raises(ValueError, match="pass base_model= to save_pretrained"):
        bare.save_pretrained(tmp_path / "a")
    bare.save_pretrained(tmp_path / "a", base_model=edited.model)
    assert MeGEdit.from_pretrained(tmp_path / "a", base_model=copy.deepcopy(edited.model)).layer == LAYER


def test_a_broken_edit_is_never_written(trained, tmp_path):
    edited, _, _ = trained
    broken = copy.deepcopy(edited.edit)
    with torch.no_grad():
        next(broken.generator.net.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to save a broken edit: generator\.net\..* contains NaN/inf"):
        broken.save_pretrained(tmp_path / "broken")
    assert not (tmp_path / "broken").exists()


# ------------------------------------------------------------------ the manifest, replacement, leftovers, permissions
def edit_copy(saved, tmp_path, name="edit"):
    target = tmp_path / name
    shutil.copytree(saved, target)
    return target


def test_every_manifest_field_is_checked(trained, tmp_path):
    """Changing the top-level layer used to load and silently give other logits."""
    _, _, saved = trained
    target = edit_copy(saved, tmp_path)
    manifest = json.loads((target / MANIFEST).read_text())
    (target / MANIFEST).write_text(json.dumps({**manifest, "layer": manifest["layer"] - 1}))
    with pytest.raises(ValueError, match="was changed after the edit was saved"):
        MeGEdit.from_pretrained(target)
    # a format-1 manifest (no digest of its own) is checked against the parts instead
    old = {k: v for k, v in manifest.items() if k != "manifest_sha256"} | {"format": 1}
    (target / MANIFEST).write_text(json.dumps(old))
    assert MeGEdit.from_pretrained(target).layer == LAYER
    (target / MANIFEST).write_text(json.dumps({**old, "layer": LAYER - 1}))
    with pytest.raises(ValueError, match="its parts disagree on the edited layer"):
        MeGEdit.from_pretrained(target)
    (target / MANIFEST).write_text(json.dumps({**old, "familiarity": {**old["familiarity"], "n_keys": 3}}))
    with pytest.raises(ValueError, match="the manifest's sizes do not fit the saved weights"):
        MeGEdit.from_pretrained(target)


@pytest.mark.parametrize("text, fragment", [("{not json", "is not valid JSON"), ("[1, 2]", "is not a JSON object"),
                                            ('{"format": 2, "layer": 1}', "lacks familiarity, generator")])
def test_a_manifest_that_is_not_json_or_lacks_keys(trained, tmp_path, text, fragment):
    _, _, saved = trained
    target = edit_copy(saved, tmp_path)
    (target / MANIFEST).write_text(text)
    with pytest.raises(ValueError, match=fragment):
        MeGEdit.from_pretrained(target)


def test_replacing_an_edit_never_leaves_the_name_empty(trained, tmp_path, monkeypatch):
    """Every rename a save makes is watched: the name holds a whole edit before and after each one."""
    import os

    edited, _, saved = trained
    target = edit_copy(saved, tmp_path)
    gaps = []

    def watched(real):
        def call(*args, **kwargs):
            result = real(*args, **kwargs)
            if not (target / MANIFEST).exists():
                gaps.append(args)
            return result
        return call

    monkeypatch.setattr(os, "rename", watched(os.rename))
    monkeypatch.setattr(os, "replace", watched(os.replace))
    monkeypatch.setattr(type(target), "rename", watched(type(target).rename))
    edited.save_pretrained(target)
    monkeypatch.undo()
    assert gaps == [] and sorted(p.name for p in tmp_path.iterdir()) == ["edit"]
    assert states_equal(MeGEdit.from_pretrained(target).generator, edited.edit.generator)


def dead_pid() -> int:
    import subprocess
    import sys

    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(process.stdout)


def test_leftovers_of_a_killed_replacement_are_recovered_and_cleaned(trained, tmp_path):
    """A kill between moving the old edit aside and renaming the new one in left both hidden; a killed save left its
    temporary folder. The next load restores the old edit's name and removes the dead process's temporary; a live
    process's temporary (a save in progress) is left alone."""
    import os

    from megedit.atomic import HOST

    edited, _, saved = trained
    dead = dead_pid()
    aside = tmp_path / f".edit.old-{HOST}-{dead}-0000aaaa"
    shutil.copytree(saved, aside)
    (tmp_path / f".edit.tmp-{HOST}-{dead}-0000bbbb").mkdir()
    (tmp_path / f".edit.tmp-{HOST}-{dead}-0000bbbb" / "generator.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f".edit.tmp-{HOST}-{os.getpid()}-0000cccc"
    live.mkdir()
    assert MeGEdit.from_pretrained(tmp_path / "edit").layer == LAYER
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["edit", live.name])
    shutil.rmtree(live)
    (tmp_path / f".other.tmp-{HOST}-{dead}-0000dddd").mkdir()  # another name's leftover: not this save's business
    (tmp_path / f".edit.tmp-{HOST}-{dead}-0000eeee").mkdir()
    edited.save_pretrained(tmp_path / "edit")  # a save cleans them too
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.tmp-{HOST}-{dead}-0000dddd", "edit"]


def test_saved_files_get_ordinary_permissions(trained, tmp_path):
    import os

    edited, _, _ = trained
    before = os.umask(0o022)
    try:
        edited.save_pretrained(tmp_path / "edit")
    finally:
        os.umask(before)
    for path in [tmp_path / "edit", *(tmp_path / "edit").rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path
