"""Recipe YAML -> parser defaults, with the checks TrlParser leaves out.

TrlParser copies YAML values into argparse defaults as they are, so `learning_rate: 1e-5` (a *string* in
YAML 1.1) reaches TrainingArguments as "1e-5"; here numeric fields get numbers and anything else of the
wrong kind is an error naming the key. Unknown keys are reported with the file and the dataclasses
searched (TrlParser only says "Unknown arguments from config file").
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from kvtrain.io import parse_error_line


def load_recipe(path: str | Path, dataclass_types: tuple[type, ...]) -> dict[str, Any]:
    """The recipe's key -> value mapping, validated against the fields of `dataclass_types`.

    A top-level `env:` mapping is exported to the environment (TrlParser's convention) and removed.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ValueError(f"recipe {path}: cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {path}: not valid YAML: {parse_error_line(err)}") from None
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path}: expected a mapping of argument names to values")
    env = data.pop("env", {})
    if not isinstance(env, dict):
        raise ValueError(f"recipe {path}: 'env' must be a mapping of variable names to values")
    fields = {f.name: f for cls in dataclass_types for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(cls.__name__ for cls in dataclass_types)
        raise ValueError(f"recipe {path}: unknown key(s) {unknown}; not a field of {names}")
    hints = {}
    for cls in dataclass_types:
        hints.update(typing.get_type_hints(cls))
    for key, value in data.items():
        data[key] = _coerce(path, key, value, hints.get(key))
    for name, value in env.items():
        os.environ[str(name)] = str(value)
    return data


def _coerce(path: Path, key: str, value: Any, hint: Any) -> Any:
    """Numbers for int/float fields (YAML reads `1e-5` as a string); other values are left to the dataclass."""
    if value is None or hint is None:
        return value
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    if float in kinds and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"recipe {path}: {key}={value!r} is not a number") from None
    if int in kinds and float not in kinds and isinstance(value, str) and str not in kinds:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"recipe {path}: {key}={value!r} is not an integer") from None
    if kinds == [bool] and not isinstance(value, bool):
        raise ValueError(f"recipe {path}: {key}={value!r} must be true or false")
    return value


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)
