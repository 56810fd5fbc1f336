"""Strict YAML <-> frozen-dataclass conversion for the project's file contracts.

Every contract (HardwareProfile, ModelSpec, Workload, Plan, reports) is a frozen dataclass. Loading
is strict: an unknown key, a missing key or a value of the wrong type is a `SchemaError` that names
the file, the key path, what was expected and what was found. Nothing here knows any one contract.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml


class SchemaError(ValueError):
    """A contract file or value does not match its schema (names file, key, expected, found)."""


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _fail(source: str, path: str, expected: str, found: Any) -> SchemaError:
    where = f"{source}: " if source else ""
    return SchemaError(f"{where}key '{path}': expected {expected}, found {_describe(found)}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} items"
    if origin is dict:
        return f"a mapping of {_type_name(typing.get_args(tp)[1])}"
    if hasattr(tp, "from_yaml_value"):
        return tp.yaml_expected
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return str(tp)


def convert(tp: Any, value: Any, source: str, path: str) -> Any:
    """Convert a plain YAML value to type `tp`, raising SchemaError naming `path` on mismatch."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return convert(arg, value, source, path)
            except SchemaError as exc:
                errors.append(exc)
        if value is None:
            raise _fail(source, path, _type_name(tp), value)
        if len(errors) == 1:
            raise errors[0]
        raise _fail(source, path, _type_name(tp), value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(source, path, "true or false", value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise _fail(source, path, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:  # YAML 1.1 reads "1e9" (no dot) as a string; accept it as a number
                    value = float(value)
                except ValueError:
                    raise _fail(source, path, "a number", value) from None
            else:
                raise _fail(source, path, "a number", value)
        value = float(value)
        if math.isnan(value):
            raise _fail(source, path, "a number (not NaN)", value)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _fail(source, path, "a string", value)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _fail(source, path, _type_name(tp), value)
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(args[0], v, source, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise _fail(source, path, _type_name(tp), value)
        return tuple(convert(a, v, source, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(source, path, _type_name(tp), value)
        key_tp, val_tp = typing.get_args(tp)
        return {convert(key_tp, k, source, f"{path}"): convert(val_tp, v, source, f"{path}.{k}")
                for k, v in value.items()}
    if hasattr(tp, "from_yaml_value"):
        try:
            return tp.from_yaml_value(value)
        except (TypeError, ValueError) as exc:
            raise _fail(source, path, f"{tp.yaml_expected} ({exc})", value) from None
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, prefix=path)
    raise TypeError(f"no conversion for {tp!r}")  # a programming error, not a user error


def from_dict(cls: type, data: Any, source: str = "", prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown and missing keys are errors naming the key."""
    if not isinstance(data, dict):
        raise _fail(source, prefix or cls.__name__, f"a mapping ({cls.__name__})", data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    where = f"{source}: " if source else ""
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise SchemaError(f"{where}unknown key '{key}' in {cls.__name__}; "
                          f"allowed keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, field in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise SchemaError(f"{where}missing key '{path}' ({_type_name(hints[name])}) "
                                  f"in {cls.__name__}")
            continue
        kwargs[name] = convert(hints[name], data[name], source, path)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        if isinstance(exc, SchemaError):
            raise
        raise SchemaError(f"{where}{cls.__name__}{' at ' + prefix if prefix else ''}: {exc}") from None


def to_plain(value: Any) -> Any:
    """Dataclasses and tuples to plain dicts/lists that yaml.safe_dump writes."""
    if hasattr(value, "to_yaml_value"):
        return value.to_yaml_value()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file; a missing file or a syntax error is a SchemaError naming the file."""
    path = Path(path)
    if not path.exists():
        raise SchemaError(f"{path}: file not found")
    if path.is_dir():
        raise SchemaError(f"{path} is a directory; give a YAML file")
    try:
        with path.open(encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise SchemaError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SchemaError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                          "a YAML file is expected") from None
    except OSError as exc:
        raise SchemaError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except RecursionError:
        raise SchemaError(f"{path}: nested too deeply to read as YAML") from None


class _Dumper(yaml.SafeDumper):
    """Block style for mappings; flow style for lists of numbers ([x, y] pairs, vectors)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> Any:
    def scalar(v: Any) -> bool:
        return isinstance(v, (int, float, bool)) or v is None

    flat = all(scalar(v) or (isinstance(v, list) and all(scalar(x) for x in v)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat and bool(data))


_Dumper.add_representer(list, _represent_list)


def dump_yaml(obj: Any, path: str | Path | None = None) -> str:
    text = yaml.dump(to_plain(obj), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)  # atomic: a crash never leaves half a file
    return text


def check_schema_version(cls: type, data: Any, source: str, supported: int) -> None:
    if isinstance(data, dict) and "schema_version" in data and data["schema_version"] != supported:
        raise SchemaError(f"{source}: key 'schema_version': this version of specoffload reads "
                          f"{cls.__name__} schema {supported}, found {data['schema_version']!r}")


class YamlContract:
    """Mixin for a contract dataclass: strict `from_dict`, `load` and atomic `save` as YAML.

    The subclass sets `SCHEMA` (the schema version this code reads) and has a `schema_version` field.
    """

    SCHEMA = 1

    @classmethod
    def from_dict(cls, data: Any, source: str = ""):
        check_schema_version(cls, data, source, cls.SCHEMA)
        return from_dict(cls, data, source)

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(load_yaml(path), str(path))

    def save(self, path: str | Path) -> None:
        dump_yaml(self, path)
