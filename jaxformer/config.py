"""Configs as frozen dataclasses, declared one way for both models.

Each model has two: the architecture config (``config.json``: what rebuilding the model from a
checkpoint needs) and the run config (``run.json``: data, optimizer, schedule, cadence). A field is
declared with :func:`param`: its default, its help (which becomes the command-line help, see
:mod:`jaxformer.commands.cli`), its allowed values, and whether ``--resume`` may change it. Values are
checked when a config is built, so a bad one never reaches the code that uses it.
"""

import dataclasses
import json
import math
import operator
import os
import types
import typing
from pathlib import Path

from jaxformer.errors import InputError


def param(default, help: str, *, choices=None, ge=None, gt=None, le=None, lt=None, resumable: bool = False):
    """A dataclass field with its help, allowed values (``choices``, bounds ``ge``/``gt``/``le``/``lt``)
    and whether ``--resume`` may change it (``resumable``: it does not alter what the run computes)."""
    meta = dict(help=help, choices=choices, ge=ge, gt=gt, le=le, lt=lt, resumable=resumable)
    return dataclasses.field(default=default, metadata=meta)


def field_types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _optional(tp) -> tuple[object, bool]:
    """(X, True) for ``X | None``; (tp, False) otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def coerce(tp, value, name: str):
    """``value`` (from JSON or parsed text) as type ``tp``; InputError naming ``name`` otherwise."""
    base, optional = _optional(tp)
    if value is None:
        if optional:
            return None
        raise InputError(f"{name}: a value is required (got none)")
    if typing.get_origin(base) is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise InputError(f"{name}={value!r}: expected a list")
        item = typing.get_args(base)[0]
        return tuple(coerce(item, v, name) for v in value)
    if base is bool:
        if not isinstance(value, bool):
            raise InputError(f"{name}={value!r}: expected true or false")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{name}={value!r}: expected an integer")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{name}={value!r}: expected a number")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise InputError(f"{name}={value!r}: expected a string")
        return value
    raise TypeError(f"{name}: unsupported config type {tp}")


def parse_text(tp, text: str, name: str):
    """A command-line string as type ``tp``: ``none`` for an optional field, ``true``/``false`` for
    booleans, comma-separated items for lists."""
    base, optional = _optional(tp)
    if optional and text.strip().lower() in ("none", "null"):
        return None
    if typing.get_origin(base) is tuple:
        items = [t.strip() for t in text.strip().strip("[]()").split(",") if t.strip()]
        return tuple(parse_text(typing.get_args(base)[0], t, name) for t in items)
    if base is bool:
        words = {"true": True, "yes": True, "1": True, "on": True, "false": False, "no": False, "0": False, "off": False}
        if text.strip().lower() not in words:
            raise InputError(f"{name}={text!r}: expected true or false")
        return words[text.strip().lower()]
    if base in (int, float):
        try:
            return base(text)
        except ValueError:
            raise InputError(f"{name}={text!r}: expected {'an integer' if base is int else 'a number'}") from None
    return text


def check_value(f: dataclasses.Field, value, name: str | None = None) -> None:
    """InputError unless ``value`` satisfies the field's ``choices`` and bounds."""
    name, meta = name or f.name, f.metadata
    if value is None:
        return
    for v in (value if isinstance(value, tuple) else (value,)):
        if meta.get("choices") is not None and v not in meta["choices"]:
            raise InputError(f"{name}={v!r}: choose from {', '.join(map(str, meta['choices']))}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if isinstance(v, float) and math.isnan(v):
                raise InputError(f"{name}=nan: not a number")
            for key, holds, word in BOUNDS:
                if meta.get(key) is not None and not holds(v, meta[key]):
                    raise InputError(f"{name}={v}: must be {word} {meta[key]}")


BOUNDS = (("ge", operator.ge, ">="), ("gt", operator.gt, ">"), ("le", operator.le, "<="), ("lt", operator.lt, "<"))


class Config:
    """Mixin for frozen dataclass configs: checked on construction, JSON in and out."""

    def __post_init__(self):
        types_ = field_types(type(self))
        for f in dataclasses.fields(self):
            value = coerce(types_[f.name], getattr(self, f.name), f.name)
            object.__setattr__(self, f.name, value)
            check_value(f, value)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config", ignore: tuple[str, ...] = ()):
        """From a JSON object; unknown keys (other than ``ignore``) are an InputError naming ``source``."""
        if not isinstance(d, dict):
            raise InputError(f"{source}: expected a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - set(ignore))
        if unknown:
            raise InputError(f"{source}: unknown {cls.__name__} keys {unknown}")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except InputError as e:
            raise InputError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> None:
        """Writes the JSON atomically (a temporary file renamed into place)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path, ignore: tuple[str, ...] = ()):
        return cls.from_dict(read_json(path), str(path), ignore)


def read_json(path: str | Path):
    """A JSON file's value; InputError naming the file (and line) when it is missing or malformed."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None


def resume_changes(stored: Config, requested: dict) -> Config:
    """The rule for ``--resume``, shared by both trainers: the stored run config wins; the
    ``requested`` changes are applied when every changed field is ``resumable`` (it does not alter
    what the run computes: its length, cadence, outputs), else an InputError lists the others."""
    fields = {f.name: f for f in dataclasses.fields(stored)}
    requested = dataclasses.asdict(stored.replace(**requested))  # values checked first
    changed = {k: v for k, v in requested.items() if getattr(stored, k) != v}
    refused = sorted(k for k in changed if not fields[k].metadata.get("resumable"))
    if refused:
        allowed = sorted(k for k, f in fields.items() if f.metadata.get("resumable"))
        detail = ", ".join(f"{k}={changed[k]!r} (the run has {getattr(stored, k)!r})" for k in refused)
        raise InputError(f"--resume cannot change {detail}: a resumed run keeps its settings; it may change only "
                         f"{', '.join(allowed)}. Start a new --out for other settings.")
    return stored.replace(**changed)
