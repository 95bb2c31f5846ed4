"""MeGHyperParams: the shipped YAMLs load; every kind of bad input is rejected with a message naming the field."""
from pathlib import Path

import pytest
import yaml

from megedit.hparams import HParamsError, MeGHyperParams

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "hparams" / "MeG").glob("*.yaml"))


def write(tmp_path, text: str, name: str = "hp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def minimal(**extra) -> str:
    return yaml.safe_dump({"model_name": "tiny", "layer": 1, **extra})


def test_there_are_shipped_yamls():
    assert SHIPPED, "hparams/MeG/*.yaml is empty"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_yaml_loads_with_every_key_a_field(path):
    raw = yaml.safe_load(path.read_text())
    hp = MeGHyperParams.from_hparams(path)
    assert hp.alg_name == "MeG"
    for key, value in raw.items():  # every key in the file reached its field (floats possibly coerced)
        assert getattr(hp, key) == (float(value) if isinstance(getattr(hp, key), float) else value), key
    assert MeGHyperParams.from_dict(hp.to_dict()) == hp  # round trip (the CLI rebuilds hparams this way)


def test_yaml_suffix_may_be_left_off():
    path = SHIPPED[0]
    assert MeGHyperParams.from_hparams(str(path)[: -len(".yaml")]) == MeGHyperParams.from_hparams(path)


def test_minimal_file_gets_defaults(tmp_path):
    hp = MeGHyperParams.from_hparams(write(tmp_path, minimal()))
    assert (hp.model_name, hp.layer, hp.device, hp.generator) == ("tiny", 1, "cpu", "dit")


def test_unknown_key_with_did_you_mean(tmp_path):
    path = write(tmp_path, minimal(fit_stpes=10))
    with pytest.raises(HParamsError) as e:
        MeGHyperParams.from_hparams(path)
    msg = str(e.value)
    assert "'fit_stpes'" in msg and "did you mean 'fit_steps'?" in msg and str(path) in msg


def test_unknown_key_without_close_match(tmp_path):
    with pytest.raises(HParamsError, match=r"unknown key\(s\) 'zzzzqqq'$"):
        MeGHyperParams.from_hparams(write(tmp_path, minimal(zzzzqqq=1)))


def test_missing_required_key(tmp_path):
    with pytest.raises(HParamsError, match=r"missing required key\(s\) \['layer'\]"):
        MeGHyperParams.from_hparams(write(tmp_path, yaml.safe_dump({"model_name": "tiny"})))


@pytest.mark.parametrize("key, value", [("layer", "two"), ("layer", 1.5), ("fit_steps", True), ("fit_lr", "fast"),
                                        ("encoder_tune", "yes"), ("pseudo_edit_data", 3), ("dit_mlp_ratio", [4])])
def test_wrong_type_names_the_field(tmp_path, key, value):
    with pytest.raises(HParamsError) as e:
        MeGHyperParams.from_hparams(write(tmp_path, minimal(**{key: value})))
    assert f"field {key!r} must be" in str(e.value) and repr(value) in str(e.value)
    assert "<class" not in str(e.value)  # type names as written in the dataclass: int, float, str | None


@pytest.mark.parametrize("key, value", [("generator", "gan"), ("sample_scheduler", "euler"),
                                        ("gen_prediction_type", "noise"), ("pseudo_edit_format", "csv")])
def test_bad_choice_names_the_field_and_the_choices(tmp_path, key, value):
    with pytest.raises(HParamsError) as e:
        MeGHyperParams.from_hparams(write(tmp_path, minimal(**{key: value})))
    assert f"field {key!r} must be one of" in str(e.value) and repr(value) in str(e.value)


@pytest.mark.parametrize("changes, field", [({"fit_steps": 0}, "fit_steps"), ({"dit_heads": 3}, "dit_heads"),
                                            ({"familiarity_classes": 1}, "familiarity_classes"),
                                            ({"layer": -1}, "layer"), ({"alg_name": "ROME"}, "alg_name"),
                                            ({"sample_steps": 2000}, "sample_steps"),
                                            ({"gen_diverge_ratio": 0.9}, "gen_diverge_ratio"),
                                            ({"gen_diverge_ratio": -1.0}, "gen_diverge_ratio")])
def test_bad_values_name_the_field(changes, field):
    with pytest.raises(HParamsError, match=field):
        MeGHyperParams(**{"model_name": "x", "layer": 1, **changes})


def test_malformed_yaml(tmp_path):
    path = write(tmp_path, "model_name: tiny\nlayer: [1, 2\n")
    with pytest.raises(HParamsError, match="is not valid YAML"):
        MeGHyperParams.from_hparams(path)


@pytest.mark.parametrize("text", ["- model_name\n- layer\n", "just a string\n", ""])
def test_yaml_that_is_not_a_mapping(tmp_path, text):
    with pytest.raises(HParamsError, match="must be a YAML mapping"):
        MeGHyperParams.from_hparams(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(HParamsError, match="does not exist") as e:
        MeGHyperParams.from_hparams(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(e.value)


@pytest.mark.parametrize("value, expected", [(0, "cuda:0"), (3, "cuda:3"), ("cuda:1", "cuda:1"), ("cpu", "cpu")])
def test_device_int_means_cuda(tmp_path, value, expected):
    assert MeGHyperParams.from_hparams(write(tmp_path, minimal(device=value))).device == expected
    assert MeGHyperParams(model_name="x", layer=0).replace(device=value).device == expected


def test_bool_device_is_rejected():
    with pytest.raises(HParamsError, match="'device'"):
        MeGHyperParams(model_name="x", layer=0, device=True)


def test_exponent_string_is_coerced_to_float(tmp_path):
    path = write(tmp_path, "model_name: tiny\nlayer: 1\nfit_lr: 1e-4\nfamiliarity_epsilon: 5e-1\n")
    assert yaml.safe_load(path.read_text())["fit_lr"] == "1e-4"  # what YAML 1.1 gives without a dot
    hp = MeGHyperParams.from_hparams(path)
    assert hp.fit_lr == 1e-4 and isinstance(hp.fit_lr, float)
    assert hp.familiarity_epsilon == 0.5  # float | None field
    with pytest.raises(HParamsError, match="'fit_steps'"):  # int fields are not coerced from strings
        MeGHyperParams.from_hparams(write(tmp_path, "model_name: tiny\nlayer: 1\nfit_steps: '1e2'\n", "b.yaml"))


def test_a_folder_is_not_an_hparams_file(tmp_path):
    (tmp_path / "MeG").mkdir()
    with pytest.raises(HParamsError, match="MeG"):
        MeGHyperParams.from_hparams(tmp_path / "MeG")


# ------------------------------------------------------------------------------------- renamed keys
OLD_KEYS = [("gen_scheduler", "sample_scheduler", "ddpm"), ("gen_sample_steps", "sample_steps", 3),
            ("dit_hidden", "gen_hidden", 64), ("dit_depth", "gen_depth", 2)]


@pytest.mark.parametrize("old, new, value", OLD_KEYS)
def test_an_old_key_still_works_and_the_warning_names_the_new_one(tmp_path, caplog, old, new, value):
    with pytest.warns(DeprecationWarning, match=f"'{old}' is deprecated: it is now '{new}'"):
        hp = MeGHyperParams.from_hparams(write(tmp_path, minimal(**{old: value})))
    assert getattr(hp, new) == value
    assert new in caplog.text  # logged too: a YAML user sees it without Python's warning filters
    assert old not in hp.to_dict() and hp.to_dict()[new] == value  # saved (edits, checkpoints) under the new name
    with pytest.warns(DeprecationWarning, match=new):
        assert getattr(MeGHyperParams(model_name="x", layer=1, **{old: value}), new) == value
    with pytest.warns(DeprecationWarning, match=new):
        assert getattr(MeGHyperParams(model_name="x", layer=1).replace(**{old: value}), new) == value


@pytest.mark.parametrize("old, new, value", OLD_KEYS)
def test_an_old_key_beside_its_new_name_is_refused(tmp_path, old, new, value):
    with pytest.raises(HParamsError, match=f"'{old}' is the old name of '{new}'"):
        MeGHyperParams.from_hparams(write(tmp_path, minimal(**{old: value, new: value})))


def test_shipped_yamls_use_the_new_names():
    from megedit.hparams import DEPRECATED_KEYS

    for path in SHIPPED:
        assert not set(yaml.safe_load(path.read_text())) & set(DEPRECATED_KEYS), path
