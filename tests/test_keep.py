"""Kept results: ``megedit edit --keep`` writes a small record of the run, and bench/tables.py rebuilds README tables
from such records."""
import json
from pathlib import Path

import pytest

from megedit.cli import main

from conftest import bench_script
from test_cli import assert_one_line_error, edits_file, no_model_loading, run_edit, tiny_model_dir, tiny_yaml  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def tables():
    return bench_script("tables")


def test_edit_keeps_a_result_that_the_tables_are_built_from(tmp_path, capsys, monkeypatch):
    kept = tmp_path / "repo" / "bench" / "results" / "tiny4"
    argv = ["edit", str(tiny_yaml(tmp_path, tiny_model_dir(tmp_path), seed=2)), "--data", str(edits_file(tmp_path)),
            "--n", "4", "--out", str(tmp_path / "out"), "--keep", str(kept)]
    import megedit.keep

    states = iter([{"commit": "a" * 40, "dirty": False}])  # a second look (a commit made during the run) would fail
    monkeypatch.setattr(megedit.keep, "git_state", lambda: next(states))
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"kept: {kept}/results.md" in out and "training texts left out" in out
    assert sorted(p.name for p in kept.iterdir()) == ["results.json", "results.md"]  # no weights
    record = json.loads((kept / "results.json").read_text())
    full = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["command"] == "megedit " + " ".join(argv)
    assert record["seed"] == 2 and record["config"]["MeG"]["hparams"]["seed"] == 2
    assert record["git"] == {"commit": "a" * 40, "dirty": False}  # the checkout as the command started
    assert record["packages"]["torch"] and record["machine"]["cpus"] >= 1
    (row,) = record["rows"]
    assert row["method"] == "MeG" and row["n"] == 4
    assert {m: row[m] for m in ("rel_tf", "gen_ag", "loc_tf", "score")} == \
        {m: full["post"][m] for m in ("rel_tf", "gen_ag", "loc_tf", "score")}
    assert set(record["seconds"]["MeG"]) >= {"stage1_encoder", "stage3_neurons", "stage4_generator", "post_eval"}
    assert "gate familiar: edit_prompt" in record["per_kind"]["MeG"]
    assert record["training_texts_left_out"]["MeG"] == full["training_texts_left_out"]
    md = (kept / "results.md").read_text()
    assert record["command"] in md and f"| MeG | 4 |" in md

    # the README table between the markers comes from that file, and --check sees a hand edit
    readme = tmp_path / "repo" / "README.md"
    readme.write_text("intro\n<!-- kept-table: bench/results/tiny4 -->\nold\n<!-- /kept-table -->\nend\n")
    assert tables().main(["--root", str(tmp_path / "repo")]) == 0
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("<!-- /kept-table -->\nend\n")
    assert f"| MeG | 4 | {edits_file(tmp_path)} | {row['rel_tf']:.1f} |" in text
    assert "[bench/results/tiny4/results.md](bench/results/tiny4/results.md)" in text
    assert tables().main(["--root", str(tmp_path / "repo"), "--check"]) == 0
    readme.write_text(text.replace(f"| {row['score']:.1f} |", "| 99.9 |"))
    assert tables().main(["--root", str(tmp_path / "repo"), "--check"]) == 1

    # a kept result is never overwritten, not even with --overwrite (which only frees --out): refused before the
    # model is loaded
    rc, err, elapsed = run_edit(capsys, *argv[1:], "--overwrite")
    assert_one_line_error(rc, err, elapsed, "already holds a kept result")


def test_kept_table_naming_a_missing_folder_fails(tmp_path):
    (tmp_path / "README.md").write_text("<!-- kept-table: bench/results/none -->\n<!-- /kept-table -->\n")
    with pytest.raises(SystemExit, match="bench/results/none, which has no results.json"):
        tables().main(["--root", str(tmp_path)])


def test_the_committed_readmes_match_their_kept_results():
    assert tables().main(["--check"]) == 0


def test_kept_result_says_what_its_edit_time_leaves_out(tmp_path):
    """A row whose target vectors came from the z cache, or whose MeG stages came from an earlier run's checkpoints,
    says so under the table: its edit time is not a time to compare like for like."""
    from megedit.keep import keep

    rows = [{"method": "AlphaEdit", "n": 3, "data": "d.json", "edit_s": 2.0, "z_reused": 2},
            {"method": "MeG", "n": 3, "data": "d.json", "edit_s": 9.0, "resumed": True},
            {"method": "MEMIT", "n": 3, "data": "d.json", "edit_s": 5.0, "z_reused": 0, "resumed": False,
             "easyedit_api": "github", "implementation": "easyeditor.models.memit.memit_main"}]
    md = (keep(tmp_path / "k", "k", rows, 0, {}, {}, {}, extra={"easyedit_source": "../easyedit"}) /
          "results.md").read_text()
    assert "EasyEdit imported from: `../easyedit`" in md  # the GitHub source's version is not in the package list
    assert "MEMIT n=3: EasyEdit API github, update by `easyeditor.models.memit.memit_main`" in md
    assert "AlphaEdit n=3: 2 of its target vectors z were read from the z cache" in md
    assert "MeG n=3: its stages were read from checkpoints of an earlier run" in md
    assert "MEMIT n=3: its stages" not in md and "MEMIT n=3: 0 of" not in md


def test_cost_fits_growth_only_within_one_setting_and_cpu(tmp_path, monkeypatch):
    """bench/cost.py on kept results: the 10k file's two settings and the two CPUs are separate curves."""
    cost = bench_script("cost")
    kept = [str(ROOT / "bench/results" / name) for name in ("counterfact_meg_2k", "counterfact_meg_10k",
                                                             "counterfact_meg_10k_v2")]
    assert len({row["group"] for row in cost.records(kept)}) == 3  # AVX2 vs AVX512-BF16; gate/generator epochs
    half = json.loads((ROOT / "bench/results/counterfact_meg_10k_v2/results.json").read_text())
    half["rows"][0].update(n=4960, edit_s=half["rows"][0]["edit_s"] / 2)
    half["seconds"]["MeG"] = {k: v / 2 ** 1.5 if k == "stage4_generator" else v / 2
                              for k, v in half["seconds"]["MeG"].items()}
    half["config"]["MeG"]["hparams"]["checkpoint_dir"] = "/elsewhere"  # changes nothing trained: same setting
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "results.json").write_text(json.dumps(half))
    monkeypatch.setattr("sys.argv", ["cost.py", kept[2], str(tmp_path / "half"), "--out", str(tmp_path / "out")])
    cost.main()
    (exponents,) = json.loads((tmp_path / "out" / "cost.json").read_text())["exponents"].values()
    assert exponents["edit_seconds"] == pytest.approx(1.0, abs=0.01)
    assert exponents["stage4_generator"] == pytest.approx(1.5, abs=0.02)
    assert "time ≈ a·n^1.00" in (tmp_path / "out" / "cost.md").read_text()
