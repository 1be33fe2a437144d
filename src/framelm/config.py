"""Typed configuration: dataclasses loaded from YAML with strict checking.

Every stage declares a dataclass subclassing `StageConfig`. Each field is made with `field(...,
help=...)` (the help is shown by `--help`); a field made with `hash=False` is an execution detail (worker count, rank) that does not change results and so does not enter the
config hash that decides whether a stage re-runs.

`from_dict` rejects unknown keys (suggesting the closest known one), values of the wrong type
and, through `validate()`, values that break a constraint. Errors name the full dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from framelm.errors import ConfigError

T = TypeVar("T", bound="StageConfig")


def field(default: Any = dataclasses.MISSING, *, help: str, hash: bool = True, default_factory: Any = dataclasses.MISSING):
    """A dataclass field with a help text; `hash=False` keeps it out of the config hash."""
    kwargs: dict[str, Any] = {"metadata": {"help": help, "hash": hash}}
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    return dataclasses.field(**kwargs)


@dataclasses.dataclass
class StageConfig:
    """Base class of every configuration dataclass.

    A stage's config may also define these, which `framelm.pipeline` looks up by name:
        upstream() -> keys        the records it reads, when not its Stage's `after`
                                  (e.g. "export#frame": one part of a record)
        input_fingerprint(run)    what it reads that no upstream record describes (report: every
                                  file it draws; compare: replaced trainings); it re-runs when this changes
        owned_stages()            the (stage, config) runs it makes itself through run_stage (compare)
        remakes_inputs = True     it remakes what input_fingerprint reads, so is recorded with the
                                  hash it leaves behind
        world_size, lock_name(k)  a distributed stage's rank count and per-rank lock
    """

    def validate(self) -> None:
        """Check constraints between fields; raise ConfigError naming the key and value."""

    def instance(self) -> str | None:
        """Name of this run of a stage that can run several times in one run directory
        (e.g. one training run per schedule and seed); None for single-instance stages."""
        return None

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
        return _build(cls, data or {}, where)

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def hashed_dict(self) -> dict[str, Any]:
        """The fields that determine results (metadata hash=True), recursively."""
        return _plain(self, hashed_only=True)

    def config_hash(self) -> str:
        return stable_hash(self.hashed_dict())


def stable_hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _plain(obj: Any, hashed_only: bool = False) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            if hashed_only and not f.metadata.get("hash", True):
                continue
            out[f.name] = _plain(getattr(obj, f.name), hashed_only)
        return out
    if isinstance(obj, (list, tuple)):
        return [_plain(v, hashed_only) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _plain(v, hashed_only) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"'{where or 'config'}' must be a mapping of keys to values, got {type(data).__name__}: {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(str(k), list(fields), n=1)
        allowed = f"allowed keys{' of ' + where if where else ''}: {', '.join(sorted(fields))}"
        hint = f"did you mean '{close[0]}'? {allowed[0].upper()}{allowed[1:]}" if close else allowed
        raise ConfigError(f"unknown key '{_key(where, str(k))}'; {hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _key(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{_key(where, name)}': {f.metadata.get('help', '')}")
    obj = cls(**kwargs)
    if isinstance(obj, StageConfig):
        try:
            obj.validate()
        except ConfigError as exc:
            if where and not str(exc).startswith(where):
                raise ConfigError(f"{where}: {exc}") from None
            raise
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for alt in args:
            if alt is type(None):
                continue
            try:
                return _convert(alt, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"'{key}' = {value!r} fits none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"'{key}' = {value!r} is not allowed; choose one of: {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' must be a list, got {type(value).__name__}: {value!r}")
        item = args[0] if args else Any
        items = [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {type(value).__name__}: {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, key): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"'{key}' must be an integer, got {type(value).__name__}: {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads 3e-4 (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' must be a number, got {type(value).__name__}: {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}' must be a string, got {type(value).__name__}: {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"'{key}' must be a path string, got {value!r}")
        return Path(value)
    raise ConfigError(f"'{key}': unsupported config type {_type_name(tp)}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a syntax error names the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like key.subkey=value, e.g. train.lr=3e-4")
    dotted, raw = assignment.split("=", 1)
    parts = [p for p in dotted.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override '{assignment}' has an empty key")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" as a string; users mean the number
            value = float(value)
        except ValueError:
            pass
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if isinstance(child, list):
            whole = ".".join(parts[:parts.index(p) + 1])
            raise ConfigError(f"override '{assignment}': '{whole}' is a list, whose items have no dotted keys; set the "
                              f"whole list, e.g. --set '{whole}=[...]' (--help lists the keys of its items)")
        if not isinstance(child, dict):
            raise ConfigError(f"override '{assignment}': '{p}' is not a mapping")
        node = child
    node[parts[-1]] = value
