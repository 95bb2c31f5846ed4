"""Validation splits: zsRE's validation edits and MeG's training pool come from one file and never share a record."""
from pathlib import Path

import pytest

from megedit.data import load_requests
from megedit.hparams import HParamsError, MeGHyperParams
from megedit.meg_main import load_pool
from megedit.runner import load_config

from test_data import data_dir

ROOT = Path(__file__).resolve().parents[1]


def meg_pool_hparams(method) -> MeGHyperParams:
    return MeGHyperParams.from_dict({**MeGHyperParams.from_hparams(method.hparams).to_dict(), **method.overrides})


def test_zsre_validation_edits_and_pool_are_disjoint(monkeypatch):
    monkeypatch.setenv("MEGEDIT_DATA", str(data_dir()))
    val = load_config(ROOT / "examples/sweeps/zsre_meg_val.yaml")
    test = load_config(ROOT / "bench/configs/zsre_1k.yaml")
    edits = load_requests(val.data_format, val.data_path, n=max(val.sizes), offset=val.offset)
    pools = [meg_pool_hparams(m) for cfg in (val, test) for m in cfg.methods if "MeG" in m.name]
    assert len(pools) == len(val.methods) + 1  # every validation row and the test config's MeG row
    for hp in pools:  # every MeG run, validation or test, learns from the same part of the file
        assert (hp.pseudo_edit_data, hp.pseudo_edit_offset) == (val.data_path, val.offset + max(val.sizes))
    pool = load_requests("zsre", val.data_path, offset=pools[0].pseudo_edit_offset)
    assert len(edits) == 200 and len(pool) == 800
    assert not {r["case_id"] for r in edits} & {r["case_id"] for r in pool}
    built = load_pool(edits, pools[0])  # what training reads: none of the validation edits' prompts
    assert not {r["prompt"] for r in edits} & {it.prompt for it in built.items}
    assert test.data_path != val.data_path  # the test edits are another file


def test_pool_offset_skips_the_validation_records(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGEDIT_DATA", str(data_dir()))
    hp = MeGHyperParams(model_name="x", layer=0, pseudo_edit_data="zsre/zsre_mend_train-1k.json")
    first = load_requests("zsre", "zsre/zsre_mend_train-1k.json", n=300)
    whole = {it.prompt for it in load_pool([], hp).items}
    skipped = {it.prompt for it in load_pool([], MeGHyperParams.from_dict({**hp.to_dict(),
                                                                           "pseudo_edit_offset": 300})).items}
    assert {r["prompt"] for r in first} & whole and not {r["prompt"] for r in first} & skipped
    with pytest.raises(HParamsError, match="pseudo_edit_offset"):
        MeGHyperParams.from_dict({**hp.to_dict(), "pseudo_edit_offset": -1})


def test_every_hparams_file_says_which_split_chose_its_settings():
    for path in sorted((ROOT / "hparams").glob("*/*.yaml")):
        lines = [l for l in path.read_text().splitlines() if l.startswith("# settings chosen on:")]
        assert len(lines) == 1, path
