"""Config values checked against dataclass field annotations: one ``ConfigError`` line naming the file, the
``section.key`` and the expected type. A new field of a config dataclass is checked from its annotation with
no extra code (``int``, ``float``, ``str``, ``bool``, ``None``, ``list[...]``, ``dict``, ``Literal[...]``, enums and
unions of them; other annotations are left to the class itself)."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, Literal

from hfemb.errors import ConfigError

_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", type(None): "null",
          dict: "an object", list: "a list", Any: "anything"}


def _arms(hint) -> tuple:
    """The alternatives of a union (``X | Y``, ``Optional[X]``), else ``(hint,)``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _matches(value, hint) -> bool | None:
    """Whether ``value`` fits ``hint``; None when hfemb does not check this kind of annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in {m.value for m in hint}
    if hint is list or origin is list:
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) is not False for v in value))
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return None


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _NAMES:
        return _NAMES[hint]
    if origin is Literal:
        return "one of " + ", ".join("null" if a is None else str(a) for a in args)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in hint)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict:
        return "an object"
    return getattr(hint, "__name__", str(hint))


def check_value(name: str, value, hint, where: str):
    """``value`` if it fits the annotation ``hint`` (an int for a float-only field comes back as a float), else a
    ``ConfigError`` "``where``: '``name``' must be <the expected type>, got <value>"."""
    arms = _arms(hint)
    results = [_matches(value, arm) for arm in arms]
    if any(results) or (None in results and False not in results):
        return float(value) if float in arms and int not in arms and isinstance(value, int) \
            and not isinstance(value, bool) else value
    if None in results:  # some alternative is of a kind hfemb does not check: let the class decide
        return value
    expected = " or ".join(_describe(arm) for arm in arms)
    raise ConfigError(f"{where}: '{name}' must be {expected}, got {value!r}")


def check_annotated(section: str, key: str, value, annotation: str | Any, where: str):
    """``check_value`` with a field annotation given as text (``"int | None"``, ``"list[str] | str"``), as
    ``dataclasses.fields`` reports it under ``from __future__ import annotations``."""
    hint = eval(annotation, {**vars(typing), "Literal": Literal}) if isinstance(annotation, str) else annotation
    return check_value(f"{section}.{key}" if section else key, value, hint, where)


def field_hints(cls) -> dict[str, Any]:
    """The resolved annotations of the fields a dataclass ``cls`` accepts in its constructor."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation naming a type that is not importable here: leave it unchecked
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def check_keys(section: str, given: dict, valid, where: str) -> None:
    """A ``ConfigError`` listing the unknown keys of ``given`` and every valid one."""
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)} in section '{section}'; "
                          f"valid keys: {', '.join(sorted(valid))}")


def check_section(cls, section: str, given, where: str, extra: dict[str, Any] | None = None) -> dict:
    """The values of one config section (a JSON object) checked against the fields of dataclass ``cls`` (and the
    ``extra`` keys: name -> annotation): unknown keys and wrong types are ``ConfigError``s naming ``where`` and
    ``section.key``. Returns the checked values."""
    if not isinstance(given, dict):
        raise ConfigError(f"{where}: section '{section}' must be an object")
    hints = {**field_hints(cls), **(extra or {})}
    check_keys(section, given, hints, where)
    return {k: check_value(f"{section}.{k}", v, hints[k], where) for k, v in given.items()}
