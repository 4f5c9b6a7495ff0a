"""Typed manifest sections: each field declared once, with its type, and read back checked.

A section is a dataclass deriving from ``Section``; its annotations say what each field holds:
``int`` (a non-negative integer), ``float``, ``bool``, ``str``, ``dict``/``list`` (JSON kept as
it is), ``RelPath`` (a path inside the artefact directory), ``Literal[...]`` (one of those
values), another ``Section`` (a nested object), ``dict[str, X]`` or ``list[X]``, and
``X | None`` for a field that may be null. A field with a default may be absent (what older
exports lack). ``from_dict`` checks every field and names the first bad one in one line (never
a KeyError or TypeError); keys a section does not declare are kept in ``extra`` and written
back by ``to_dict``, so rewriting a manifest never drops what a newer writer added.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from pathlib import PurePosixPath
from typing import Any, Literal, NewType, TypeVar, get_args, get_origin

from runtime.errors import ArtifactError

RelPath = NewType("RelPath", str)  # a relative path that stays inside the artefact directory

S = TypeVar("S", bound="Section")


class FieldError(ArtifactError):
    """One manifest field that is missing or holds the wrong kind of value."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where} {problem}")
        self.where, self.problem = where, problem


@dataclasses.dataclass
class Section:
    """Base of every manifest section (see the module docstring)."""

    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False,
                                              kw_only=True, metadata={"extra": True})

    @classmethod
    def from_dict(cls: type[S], data: Any, where: str) -> S:
        if not isinstance(data, dict):
            raise FieldError(where, "is not an object")
        values: dict[str, Any] = {}
        for field, kind in _declared(cls):
            path = f"{where}.{field.name}"
            if field.name in data:
                values[field.name] = _read(data[field.name], kind, path)
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise FieldError(path, "is missing")
        names = {field.name for field, _ in _declared(cls)}
        return cls(**values, extra={k: v for k, v in data.items() if k not in names})

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for field, _ in _declared(type(self)):
            value = getattr(self, field.name)
            if value is None and field.default is None:
                continue  # an optional field not set: absent, as older writers left it
            out[field.name] = _write(value)
        return out

    def validate(self, where: str) -> None:
        """What a writer calls before writing: the same checks a reader makes."""
        type(self).from_dict(self.to_dict(), where)


@functools.cache
def _declared(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    hints = typing.get_type_hints(cls, include_extras=False)
    return tuple((f, hints[f.name]) for f in dataclasses.fields(cls) if not f.metadata.get("extra"))


def _read(value: Any, kind: Any, where: str) -> Any:  # noqa: PLR0911, PLR0912 - one case per kind
    origin = get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in get_args(kind):
            return None
        (inner,) = [arg for arg in get_args(kind) if arg is not type(None)]
        return _read(value, inner, where)
    if origin is Literal:
        choices = get_args(kind)
        if isinstance(value, bool) or value not in choices:
            raise FieldError(where, f"is {value!r}, expected one of {', '.join(map(repr, choices))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise FieldError(where, "is not an object")
        _, item = get_args(kind)
        return {key: _read(entry, item, f"{where}.{key}") for key, entry in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise FieldError(where, "is not a list")
        (item,) = get_args(kind)
        return [_read(entry, item, f"{where}[{i}]") for i, entry in enumerate(value)]
    if isinstance(kind, type) and issubclass(kind, Section):
        return kind.from_dict(value, where)
    if kind is RelPath:
        if not isinstance(value, str) or not value or PurePosixPath(value).is_absolute() \
                or ".." in PurePosixPath(value).parts:
            raise FieldError(where, f"must be a path inside the directory, got {value!r}")
        return value
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise FieldError(where, f"must be a non-negative integer, got {value!r}")
        return value
    if kind is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise FieldError(where, f"must be a number, got {value!r}")
        return value
    if kind in (bool, str, dict, list):
        if not isinstance(value, kind):
            raise FieldError(where, f"must be a {_KIND_WORDS[kind]}, got {value!r}")
        return value
    raise TypeError(f"{where}: no reader for {kind!r}")  # a section declared a type this module lacks


_KIND_WORDS = {bool: "true/false", str: "string", dict: "JSON object", list: "JSON list"}


def _write(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, dict):
        return {key: _write(entry) for key, entry in value.items()}
    if isinstance(value, list):
        return [_write(entry) for entry in value]
    return value
