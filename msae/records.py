"""Results and settings that are saved as JSON: dataclasses written and read through one pair of methods.

Every file a run holds that is not a tensor or a table (cfg.json's msae block, eval.json, absorption.json, the
feature store's manifest.json, metrics.jsonl lines, a job's spec, a toy result) is one of these, so a page or a
command reads named fields with known types instead of walking dict paths. `from_json` rebuilds nested records,
lists, tuples and dicts of them from the type hints; keys it does not know are ignored (a newer writer may add
some) and a missing key takes the field's default, or is an error naming the record and the key. A field whose
default is None is left out of the JSON while it is None."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar, Union

R = TypeVar("R", bound="Record")


class RecordError(ValueError):
    """A JSON document that does not hold the record it should; the message names the record and the field."""


def _is_record(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _decode(tp: Any, value: Any, where: str) -> Any:
    """`value` (parsed JSON) as type `tp`."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise RecordError(f"{where}: {value!r} is not one of {', '.join(map(repr, typing.get_args(tp)))}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _decode(inner[0], value, where) if len(inner) == 1 else value
    if value is None:
        return None
    if _is_record(tp):
        if not isinstance(value, Mapping):
            raise RecordError(f"{where}: expected an object, got {type(value).__name__}")
        return _from_mapping(tp, value, where)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        item = args[0] if args else Any
        items = [_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        _, item = typing.get_args(tp)
        return {k: _decode(item, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _from_mapping(cls: type, data: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    renamed = getattr(cls, "RENAMED", {})
    if renamed:  # files written under a field's old name read as the new one
        data = {renamed.get(k, k): v for k, v in data.items()}
    kwargs = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name in data:
            kwargs[f.name] = _decode(hints[f.name], data[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecordError(f"{where}: the field {f.name!r} is missing")
    return cls(**kwargs)


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # A field that is None by default and None now is left out: absent means unknown, and reads back as None.
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.default is None and getattr(value, f.name) is None)}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


class Record:
    """Mixin for a dataclass saved as JSON: `to_json` gives plain JSON types, `from_json` the record back. A
    record whose field was renamed lists {old name: new name} in a class attribute RENAMED, so that files written
    before still read."""

    def to_json(self) -> dict[str, Any]:
        return _encode(self)

    @classmethod
    def from_json(cls: type[R], data: Mapping[str, Any]) -> R:
        if not isinstance(data, Mapping):
            raise RecordError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        return _from_mapping(cls, data, cls.__name__)

    def dumps(self) -> str:
        """Indented JSON text with a final newline, as every record file is written."""
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def loads(cls: type[R], text: str) -> R:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{cls.__name__}: not valid JSON ({exc})") from None
        return cls.from_json(data)
