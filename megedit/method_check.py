"""Every method's final hparams (its file, the run config's model/device and its ``set:`` overrides) checked before
the first model loads: the checks ``megedit edit`` makes, so that ``megedit run`` never finds a bad value after a
model has loaded, or only when that method's turn comes hours later."""
from __future__ import annotations

import dataclasses
import typing

from .hparams import MeGHyperParams, coerce_value, type_ok

# int fields of any method that count training epochs or optimiser steps: 0 trains nothing (or breaks a scheduler)
COUNTS = ("epochs", "steps")


def _device(hp) -> str | None:
    device = getattr(hp, "device", None)
    if isinstance(device, int) and not isinstance(device, bool):
        return f"cuda:{device}"  # EasyEdit's convention
    return device if isinstance(device, str) else None


def _check_types(hp, where: str) -> None:
    """Each dataclass field against its annotation (EasyEdit's hparams classes are dataclasses too)."""
    if not dataclasses.is_dataclass(hp):
        return
    try:
        hints = typing.get_type_hints(type(hp))
    except Exception:  # an annotation this Python cannot evaluate: nothing to check against
        return
    for f in dataclasses.fields(hp):
        hint = hints.get(f.name)
        if hint is None or f.name == "device":  # EasyEdit annotates device as int and uses "cpu": check_device's
            continue
        value = getattr(hp, f.name)
        if value is None and hint is str:  # EasyEdit annotates optional paths as str (GitHub AlphaEdit's P_loc: unset
            continue  # means "compute it", which megedit's AlphaEdit does where EasyEdit's would not run)
        if typing.get_origin(hint) is typing.Literal:
            if value not in typing.get_args(hint):
                raise ValueError(f"{where}: hparams field {f.name!r} must be one of {typing.get_args(hint)}, got "
                                 f"{value!r}")
            continue
        value = coerce_value(value, hint)
        if not type_ok(value, hint):
            raise ValueError(f"{where}: hparams field {f.name!r} must be {getattr(hint, '__name__', hint)}, got "
                             f"{value!r}")
        setattr(hp, f.name, value)
        if isinstance(value, int) and not isinstance(value, bool) and f.name.endswith(COUNTS) and value <= 0:
            raise ValueError(f"{where}: hparams field {f.name!r} must be positive (it counts training "
                             f"{'epochs' if f.name.endswith('epochs') else 'steps'}), got {value!r}")


def check_method_hparams(hp, where: str):
    """Raise ValueError naming ``where`` and the field; return the hparams (a MeG one rebuilt, hence validated)."""
    from .arch import check_config
    from .cli_edit import model_config
    from .loading import check_device

    config = model_config(hp.model_name)
    if getattr(hp, "alg_name", None) == "MeG":
        hp = MeGHyperParams.from_dict(dataclasses.asdict(hp), source=where)
        fields = {"layer": [hp.layer]}
    else:
        _check_types(hp, where)
        fields = {name: value if isinstance(value, list) else [value] for name in ("layers", "v_loss_layer")
                  if (value := getattr(hp, name, None)) is not None}
    try:
        check_config(config, 0)  # an architecture megedit knows
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for name, layers in fields.items():
        bad = [layer for layer in layers if n is not None and not 0 <= layer < n]
        if bad:
            raise ValueError(f"{where}: hparams field {name!r} = {getattr(hp, name)!r} is out of range: this "
                             f"{config.model_type} model has {n} decoder layers; use 0..{n - 1}")
    check_device(_device(hp), f"{where}: hparams field 'device'")
    return hp
