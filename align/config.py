"""Typed recipe configuration: YAML + dotted overrides -> validated dataclasses.

A recipe is a YAML mapping. Its schema is a tree of dataclasses; defaults live in the
schema only. Loading is strict in the way nanoGPT's configurator is strict, without
its `exec`:

- an unknown key fails and names the closest valid key (`train.lrr` -> `train.lr`);
- a value of the wrong type fails (`train.max_steps: "ten"`);
- a value outside its range fails (`train.lr: 0`), before any model or data is loaded.

Field constraints are written in the field's metadata: `check=` takes a predicate and
`expect=` the words the error uses for it, e.g.
`lr: float = field(default=1e-4, metadata=positive("learning rate"))`.

Overrides are `key.path=value` strings whose values are parsed as YAML
(`train.max_steps=20`, `model.lora.target_modules=[q_proj,v_proj]`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from align.errors import AlignError


# ---------------------------------------------------------------------------
# field constraints
# ---------------------------------------------------------------------------
def positive(what: str = "value") -> dict:
    """A number > 0 (a word such as `auto`, where the type allows one, is not checked)."""
    return {"check": lambda v: isinstance(v, str) or v > 0, "expect": f"{what} > 0"}


def at_least(low: int, what: str = "value", why: str = "") -> dict:
    return {"check": lambda v: v >= low, "expect": f"{what} >= {low}" + (f" ({why})" if why else "")}


def non_negative(what: str = "value") -> dict:
    return {"check": lambda v: v >= 0, "expect": f"{what} >= 0"}


def in_range(lo: float, hi: float, what: str = "value") -> dict:
    return {"check": lambda v: lo <= v <= hi, "expect": f"{lo} <= {what} <= {hi}"}


# ---------------------------------------------------------------------------
# YAML + overrides
# ---------------------------------------------------------------------------
def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise AlignError(f"recipe {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise AlignError(f"recipe {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AlignError(f"recipe {path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set `a.b.c=value` keys in a nested dict (a copy); values are parsed as YAML."""
    data = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise AlignError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise AlignError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(data):
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


# ---------------------------------------------------------------------------
# dict -> dataclass, with checks
# ---------------------------------------------------------------------------
T = typing.TypeVar("T")


def build(cls: type[T], data: Any, where: str = "") -> T:
    """Validate `data` against dataclass `cls` and return an instance.

    `where` is the dotted path of this section, used in error messages.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AlignError(f"{where or 'recipe'}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise AlignError(_unknown_key_message(key, list(fields), where))
    values = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        value = _coerce(hints[name], value, path)
        check = fields[name].metadata.get("check")
        if check is not None and value is not None and not check(value):
            raise AlignError(f"{path}: got {value!r}, expected {fields[name].metadata['expect']}")
        values[name] = value
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except AlignError as err:  # a message already naming its key (where.key: ...) is kept as it is
            named = str(err).startswith(f"{where}.")
            raise AlignError(f"{where}: {err}" if where and not named else str(err)) from None
    return obj


def _unknown_key_message(key, valid: list[str], where: str) -> str:
    return unknown_key_message(key, valid, where)


def unknown_key_message(key, valid: list[str], where: str, aliases: dict[str, str] | None = None) -> str:
    """"unknown key X; did you mean Y?" with Y the closest of `valid` and of `aliases` (other names
    accepted here, alias -> the key it stands for), listing `valid`."""
    aliases = aliases or {}
    prefix = f"{where}." if where else ""
    close = difflib.get_close_matches(str(key), list(valid) + list(aliases), n=1, cutoff=0.5)
    hint = ""
    if close and close[0] in aliases:
        hint = f"; did you mean {aliases[close[0]]} ({prefix}{close[0]}, TRL's name, is accepted too)?"
    elif close:
        hint = f"; did you mean {prefix}{close[0]}?"
    return f"unknown key {prefix}{key}{hint} (valid keys here: {', '.join(valid)})"


def flat_keys(d: dict, prefix: str = "") -> dict:
    """A nested recipe dict as {dotted key: value}: {"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}"


def _coerce(tp, value, path: str):
    """Check `value` against type hint `tp`; int is accepted for float."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, path)
            except AlignError as err:
                errors.append(str(err))
        raise AlignError(errors[0] if len(errors) == 1 else f"{path}: got {_describe(value)}, expected {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value is False and "no" in choices:
            value = "no"  # YAML 1.1 reads an unquoted `no` as false (train.mixed_precision=no)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise AlignError(f"{path}: got {value!r}, expected one of {', '.join(map(str, choices))}{hint}")
        return value
    if origin is list or tp is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise AlignError(f"{path}: got {_describe(value)}, expected a list")
        return [_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise AlignError(f"{path}: got {_describe(value)}, expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is float:
        if isinstance(value, str):
            value = _yaml_float(value)  # PyYAML reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AlignError(f"{path}: got {_describe(value)}, expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise AlignError(f"{path}: got {_describe(value)}, expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise AlignError(f"{path}: got {_describe(value)}, expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise AlignError(f"{path}: got {_describe(value)}, expected a string")
        return value
    raise TypeError(f"config schema: unsupported type {tp!r} at {path}")


def _yaml_float(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _type_name(tp) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(tp) if a is not type(None))


# ---------------------------------------------------------------------------
# the schema, read back: every key, its default and its docstring
# ---------------------------------------------------------------------------
def field_docs(cls) -> dict[str, str]:
    """{field name: its docstring} of a dataclass, read from its source with `ast`.

    The convention here (CleanRL's `Args`, PEP 257's "attribute docstrings"): a string
    literal right under a field documents it. Fields without one are left out.
    """
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def schema_keys(cls, prefix: str = "") -> list[tuple[str, Any, str]]:
    """[(dotted key, default, docstring)] of every key of dataclass `cls`, nested sections expanded.

    A section (a dataclass field) is not a key of its own unless it may be null (`data.from_policy`);
    a default made by a factory is called (`train.report_to`: ["none"]).
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = prefix + f.name
        tp = hints[f.name]
        options = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
            Union, types.UnionType) else [tp]
        section = next((o for o in options if dataclasses.is_dataclass(o)), None)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is dataclasses.MISSING:
            default = None
        if section is not None:
            if default is None:
                rows.append((key, None, docs.get(f.name, "")))
            rows.extend(schema_keys(section, key + "."))
        else:
            rows.append((key, default, docs.get(f.name, "")))
    return rows
