"""`megedit run`: MeG, MEMIT and AlphaEdit on the same requests through BaseEditor; tables, plot, resuming."""
import csv
import json

import pytest
import yaml

from megedit import runner
from conftest import three_methods, write_counterfact_edits

pytestmark = pytest.mark.usefixtures("single_thread", "easyedit")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    meg, memit, alpha = three_methods(root)
    data = write_counterfact_edits(root / "edits.json", case_id_offset=10)  # EasyEdit's CounterFact format
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny comparison", "data": {"format": "counterfact", "path": str(data)}, "sizes": [2, 3],
        "methods": [str(meg), str(memit), {"hparams": str(alpha), "name": "AlphaEdit (L2=5)", "set": {"L2": 5.0}}],
        "output": str(root / "out"), "seed": 0, "isolate": False}))  # in-process: faster, and run_method can be watched
    return path


def test_run_writes_tables_plot_and_resumes(config, monkeypatch):
    cfg = runner.load_config(config)
    records = runner.run(cfg, progress=False)
    names = {r["method"] for r in records}
    assert len(records) == 6 and len(names) == 3 and "AlphaEdit (L2=5)" in names
    assert {r["alg_name"] for r in records} == {"MeG", "MEMIT", "AlphaEdit"}
    out = cfg.output
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 6 and {"rel_tf", "gen_ag", "loc_tf", "score", "ee_rewrite", "edit_s", "peak_gb"} <= set(rows[0])
    table = (out / "results.md").read_text()
    assert "| method | n | Rel TF | Rel AG" in table and table.count("\n|") >= 7
    assert (out / "results.png").stat().st_size > 1000
    alpha = next(r for r in records if r["method"] == "AlphaEdit (L2=5)" and r["n"] == 3)
    assert alpha["hparams"]["L2"] == 5.0 and alpha["case_ids"] == [10, 11, 12] and alpha["peak_rss_gb"] > 0
    # EasyEdit's teacher-forced numbers and megedit's agree on every method that does not route: MeG's megedit TF
    # routes on the prompt alone, EasyEdit's on prompt + answer (tests/test_prompt_routed_tf.py)
    for r in (r for r in records if r["alg_name"] != "MeG"):
        assert r["summary"]["rel_tf"] == pytest.approx(r["easyedit"]["post_rewrite_acc"], abs=1e-6)
        assert r["summary"]["gen_tf"] == pytest.approx(r["easyedit"]["post_rephrase_acc"], abs=1e-6)
        assert r["summary"]["loc_tf"] == pytest.approx(r["easyedit"]["post_locality_acc"], abs=1e-6)
    from megedit.cli_run import keep_run_result  # megedit run --keep: every (method, size) in one kept result

    kept = keep_run_result(out / "kept", cfg, records, "megedit run config.yaml --keep kept")
    assert sorted(p.name for p in kept.iterdir()) == ["results.json", "results.md"]
    kept_rows = json.loads((kept / "results.json").read_text())["rows"]
    assert [(k["method"], k["n"]) for k in kept_rows] == [(r["method"], r["n"]) for r in records]
    for k, r in zip(kept_rows, records):
        assert k["score"] == pytest.approx(r["summary"]["score"], nan_ok=True) and k["easyedit"] == r["easyedit"]
    z_files = list((out / "z_cache").rglob("*.npz"))
    assert {f.name.rsplit("case", 1)[1] for f in z_files} == {"10.npz", "11.npz", "12.npz"}
    assert len({f.parent for f in z_files}) == 2  # MEMIT and AlphaEdit each compute their own (share_z: false)
    reused = {(r["alg_name"], r["n"]): r["z_reused"] for r in records if r["alg_name"] != "MeG"}
    assert reused == {("MEMIT", 2): 0, ("MEMIT", 3): 2, ("AlphaEdit", 2): 0, ("AlphaEdit", 3): 2}
    assert "2 of 3 target vectors z were read from the z cache" in table

    real, ran = runner.run_method, []

    def recording(method, requests, *args, **kwargs):
        ran.append((method.name, len(requests)))
        return real(method, requests, *args, **kwargs)

    monkeypatch.setattr(runner, "run_method", recording)
    assert len(runner.run(cfg, progress=False)) == 6 and ran == []  # everything was done: nothing runs again
    assert len(runner.run(runner.load_config(config, sizes=[3]), progress=False)) == 3 and ran == []  # --sizes 3: reused
    cfg.methods[2].overrides["L2"] = 7.0  # a changed setting invalidates that method's results only
    again = runner.run(cfg, progress=False)
    assert ran == [("AlphaEdit (L2=5)", 2), ("AlphaEdit (L2=5)", 3)]
    assert {r["hparams"]["L2"] for r in again if r["alg_name"] == "AlphaEdit"} == {7.0}


def test_config_errors_name_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": "x.json"}, "sizes": [10], "methods": ["nope.yaml"], "metric": []}))
    with pytest.raises(ValueError, match="unknown key.*metric"):
        runner.load_config(path)
    path.write_text(yaml.safe_dump({"data": {"path": "x.json"}, "sizes": [0], "methods": ["nope.yaml"]}))
    with pytest.raises(ValueError, match="sizes"):
        runner.load_config(path)
    path.write_text(yaml.safe_dump({"data": {"path": "x.json"}, "sizes": [1], "methods": ["nope.yaml"]}))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        runner.load_config(path)
    with pytest.raises(ValueError, match=r"--sizes must be positive integers, got \[100, 0\]"):
        runner.load_config(path, sizes=[100, 0])


def test_every_method_is_checked_before_the_first_edits(config, monkeypatch):
    """A request too long for the last method's max_length stops the run before the first method starts."""
    cfg = runner.load_config(config)
    cfg.methods[2].overrides["max_length"] = 8
    monkeypatch.setattr(runner, "run_method", lambda *a, **k: pytest.fail("a method ran"))
    with pytest.raises(ValueError, match=r"AlphaEdit \(L2=5\).*max_length=8.*at least 12\. case 12: rephrase prompt"):
        runner.run(cfg, progress=False)


def test_isolated_run_matches_the_in_process_one(config, tmp_path):
    """isolate: true runs each method in a fresh process; with the same seed it edits exactly as in-process."""
    cfg = runner.load_config(config)
    memit = next(m for m in cfg.methods if "memit" in m.hparams)
    in_process = runner.run_method(memit, _requests(cfg, 2), cfg, tmp_path / "a.log", progress=False)
    cfg.isolate, cfg.z_cache = True, tmp_path / "z"
    isolated = runner.run_isolated(memit, _requests(cfg, 2), cfg, tmp_path / "b.log", progress=False)
    assert isolated["z_reused"] == 0 and isolated["peak_rss_gb"] > 0
    assert isolated["summary"] == in_process["summary"] and isolated["easyedit"] == in_process["easyedit"]


def _requests(cfg, n):
    from megedit.data import load_requests

    return load_requests(cfg.data_format, cfg.data_path, n=n)


def test_precomputed_z_are_the_ones_the_run_computes(config, tmp_path, monkeypatch):
    """bench/precompute_z.py (2 processes) writes the z files a run would write; the run then reads every one of them
    and edits exactly as a run that computed its own."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import numpy as np
    import precompute_z

    raw = yaml.safe_load(open(config))
    raw.update(z_cache=str(tmp_path / "ahead"), sizes=[3])
    ahead = tmp_path / "ahead.yaml"
    ahead.write_text(yaml.safe_dump(raw))
    assert precompute_z.main([str(ahead), "--workers", "2"]) == 0
    folders = sorted(p for p in (tmp_path / "ahead").iterdir())
    assert len(folders) == 2 and all(len(list(f.glob("*.npz"))) == 3 for f in folders)  # MEMIT's and AlphaEdit's
    log = [json.loads(line) for f in folders for line in open(f / "precompute_z.jsonl")]
    assert [e["computed"] for e in log] == [3, 3] and log[0]["templates"][0] == ["{}"]

    cfg = runner.load_config(ahead)
    memit = next(m for m in cfg.methods if "memit" in m.hparams)
    with_cache = runner.run_method(memit, _requests(cfg, 3), cfg, tmp_path / "a.log", progress=False)
    assert with_cache["z_reused"] == 3
    cfg.z_cache = tmp_path / "own"
    own = runner.run_method(memit, _requests(cfg, 3), cfg, tmp_path / "b.log", progress=False)
    assert own["z_reused"] == 0 and own["summary"] == with_cache["summary"]
    for f in (tmp_path / "own").rglob("*.npz"):
        ahead_z = np.load(tmp_path / "ahead" / f.parent.name / f.name)["v_star"]
        np.testing.assert_allclose(ahead_z, np.load(f)["v_star"], rtol=1e-5, atol=1e-6)
    assert precompute_z.main([str(ahead), "--check", "2"]) == 0  # nothing left to do; the check recomputes two
    assert json.loads(open(folders[0] / "precompute_z.jsonl").readlines()[-1])["check_relative_difference"][1] < 1e-5


def test_drop_conflicts_leaves_out_later_conflicting_records(config, tmp_path, monkeypatch):
    """data.drop_conflicts: each size takes the file's first n records less those whose prompt an earlier record
    edits to another target; the result records which; without the option the run stops before any method starts."""
    raw = yaml.safe_load(config.read_text())
    records = json.loads(open(raw["data"]["path"]).read())
    conflicting = {**records[0], "case_id": 99, "target_new": records[0]["target_new"] + " Jr."}
    data = tmp_path / "edits.json"
    data.write_text(json.dumps([records[0], conflicting, *records[1:]]))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**raw, "data": {"format": "counterfact", "path": str(data)}, "sizes": [2, 4],
                                    "output": str(tmp_path / "out")}))
    monkeypatch.setattr(runner, "run_method", lambda *a, **k: pytest.fail("a method ran"))
    with pytest.raises(ValueError, match=r"case_id 99.*conflicting targets"):
        runner.run(runner.load_config(path), progress=False)

    path.write_text(yaml.safe_dump({**raw, "data": {"format": "counterfact", "path": str(data), "drop_conflicts": True},
                                    "sizes": [2, 4], "methods": raw["methods"][:1], "output": str(tmp_path / "out")}))
    edited = []

    def fake_method(method, requests, *args, **kwargs):
        edited.append([r["case_id"] for r in requests])
        return {"summary": {"score": 0.0}, "edit_seconds": 0.0, "peak_rss_gb": 0.0}

    monkeypatch.setattr(runner, "run_method", fake_method)
    monkeypatch.setattr(runner, "write_outputs", lambda cfg, records: None)
    done = runner.run(runner.load_config(path), progress=False)
    assert edited == [[10], [10, 11, 12]]
    assert [r["dropped_conflicting_case_ids"] for r in done] == [[99], [99]]
    for bad, match in (({"drop_conflicts": "yes"}, "drop_conflicts must be true or false"),
                       ({"drop_conflict": True}, r"unknown data key\(s\) \['drop_conflict'\]")):
        path.write_text(yaml.safe_dump({**raw, "data": {"path": str(data), **bad}}))
        with pytest.raises(ValueError, match=match):
            runner.load_config(path)


PARENT = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from megedit.runner import exit_with_parent
if __name__ == "__main__":
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=exit_with_parent,
                             initargs=(os.getpid(), 0.2)) as pool:
        print(pool.submit(os.getpid).result(), flush=True)
        pool.submit(time.sleep, 120).result()
"""


def test_an_isolated_worker_ends_with_its_killed_parent(tmp_path):
    """Killing `megedit run` must not leave its method's worker process running on."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        os.kill(worker, 0)  # alive while the parent is
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the worker outlived its parent")
    finally:
        parent.kill()
