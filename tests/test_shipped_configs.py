"""Every `megedit run` config the project ships loads, and every setting it sets exists in its method's hparams (a
misspelt key would otherwise surface hours into a run); sweeps read validation data, never a reported split."""
from pathlib import Path

import pytest

from megedit.runner import load_config, method_hparams

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted(ROOT.glob("examples/sweeps/*.yaml"))
CONFIGS = sorted([*ROOT.glob("examples/*.yaml"), *SWEEPS, *ROOT.glob("bench/configs/*.yaml")])
REPORTED = ("counterfact/counterfact-edit.json", "zsre/zsre_mend_edit_portability.json")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_shipped_config_loads_with_every_setting_it_sets(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs name hparams files relative to the repository root
    cfg = load_config(path)
    assert cfg.methods and cfg.sizes
    for method in cfg.methods:
        hp = method_hparams(method, cfg)
        for key, value in method.overrides.items():
            assert getattr(hp, key) == value, (method.name, key)


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_a_sweep_chooses_on_validation_data(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(path)
    assert cfg.data_path not in REPORTED and cfg.split != "reported", path
