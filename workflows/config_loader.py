"""Typed configuration: dataclasses are the schema, YAML files are instances, `--set a.b=c` overrides.

This module holds the generic machinery only (strict loading, overrides, validation errors). The run config
sections themselves live beside the workflows that own them. Rules:

- unknown keys are an error that lists the valid ones; a key a section has dropped (its dataclass's `removed_keys`
  ClassVar, {old name: where the setting lives now}) is an error that says which key to use instead;
- values are checked against the field's type (including `Literal` choices) before any work starts;
- a key written twice in one YAML mapping is an error (PyYAML would keep the last one without a word);
- `--set` values are parsed as YAML, so `--set train.lr=1e-4` gives a float and `--set a.b=[1,2]` a list.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what would be valid."""


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping key written twice; the message says which and on which lines."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping: PyYAML keeps the last one silently, so a
    second `train:` section or `lr:` would drop the first without a word. Merge keys (`<<: *base`) still override."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:  # the keys written here, before flatten_mapping adds the merged ones
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKeyError(f"key {key!r} appears twice (lines {seen[key]} and {line}); keep one")
                seen[key] = line
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
        return super().construct_mapping(node, deep)


def _read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only, like yaml.safe_load


REMOVED_KEYS_ATTR = "removed_keys"  # ClassVar of a section dataclass: {removed key: "use <new key> ..."}


def _unknown_key_hints(cls: Any, keys: list[str], prefix: str) -> str:
    """The hint for unknown `keys` of section `cls`: " (a.b was removed: use ...)" for a key it lists as removed,
    " (did you mean a.lr?)" for a near miss of one of its keys, or ""."""
    import difflib

    removed = getattr(cls, REMOVED_KEYS_ATTR, None) or {}
    names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    hints = []
    for key in keys:
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.7)
        if key in removed:
            hints.append(f"{prefix}{key} was removed: {removed[key]}")
        elif close:
            hints.append(f"did you mean {prefix}{close[0]}?")
    return f" ({'; '.join(hints)})" if hints else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and minimally convert) `value` against annotation `tp`; raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} matches none of the allowed types ({'; '.join(errors)})")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not valid; choose one of {', '.join(repr(c) for c in choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}{_bracket_hint(key, value)}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "2e-4" (no dot) as a string; accept what float() accepts
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        # Refused, not turned back into text: `--set` values are YAML like the file's, so `run.name=no` means the
        # same in both, and the text typed (no or off, 1.10 or 1.1) cannot be recovered from the value anyway.
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}{_quote_hint(key, value)}")
        return value
    return value


def _quote_hint(key: str, value: Any) -> str:
    """For a scalar that YAML read as a boolean, number or date where text is wanted: how to quote it."""
    if isinstance(value, (list, dict)) or value is None:
        return ""
    if isinstance(value, bool):  # the text typed is lost: no, off and false all read as False
        why, text = "YAML reads unquoted yes, no, on, off, true and false as true/false", "no"
    else:
        kind = "a number" if isinstance(value, (int, float)) else f"a {type(value).__name__}"
        why, text = f"YAML reads it as {kind}", str(value)
    hint = f"; {why}: quote it to keep it text, e.g. \"{text}\""
    return hint + ("" if "[" in key else f" (on the command line: --set '{key}=\"{text}\"')")


def _bracket_hint(key: str, value: Any) -> str:
    """For a value given where a list is wanted (`0.9,0.99`): the same items in YAML's brackets."""
    if isinstance(value, dict):
        return ""
    items = [item.strip() for item in value.split(",")] if isinstance(value, str) else [str(value)]
    shown = f"[{', '.join(items)}]"
    return f"; write a list in brackets, {shown}" + ("" if "[" in key else
                                                     f" (on the command line: --set '{key}={shown}')")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a plain dict, strictly: unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)}{_unknown_key_hints(cls, unknown, prefix)}; "
            f"valid keys here: {', '.join(prefix + k for k in fields)}"
        )
    hints = get_type_hints(cls)
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # __post_init__ validation
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {exc}") from exc


def drop_removed_keys(cls: type, data: dict[str, Any], prefix: str = "") -> tuple[dict[str, Any], list[str]]:
    """`data` without the keys its sections list as removed (`removed_keys`), and the dotted names dropped.

    For config files this project wrote itself before a key was removed (a checkpoint's recipe.yaml), which must
    still load; a user's recipe that sets a removed key fails in `from_dict` with the hint instead."""
    removed = getattr(cls, REMOVED_KEYS_ATTR, None) or {}
    hints = get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
    out: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in data.items():
        if key in removed:
            dropped.append(prefix + key)
            continue
        section = hints.get(key)
        if dataclasses.is_dataclass(section) and isinstance(value, dict):
            value, inner = drop_removed_keys(section, value, f"{prefix}{key}.")
            dropped += inner
        out[key] = value
    return out, dropped


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) of a config dataclass (or of a dict): what Ray, YAML and MLflow
    receive."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(obj if isinstance(obj, dict) else dataclasses.asdict(obj))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a", "b", "c"], yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        return key.split("."), _read_yaml(raw) if raw.strip() else ""
    except _DuplicateKeyError as exc:
        raise ConfigError(f"override {text!r}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc}); check its quotes and "
                          f"brackets") from None


class CommandParser(argparse.ArgumentParser):
    """The workflows' argument parser: an option it does not know is named first, with the closest one it does
    (argparse would report `--manfest` as "the following arguments are required: --manifest", or with the parent
    command's usage). Subcommands' parsers are of this class too (argparse makes them of their parent's)."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if not any(isinstance(action, argparse._SubParsersAction) for action in self._actions):  # a leaf command
            known = [option for action in self._actions for option in action.option_strings]
            for token in sys.argv[1:] if args is None else args:
                if token == "--":
                    break
                flag = token.split("=", 1)[0]
                if flag.startswith("--") and not any(option.startswith(flag) for option in known):  # (prefixes ok)
                    close = difflib.get_close_matches(flag, known, n=1)
                    self.error(f"unrecognized option {flag}" + (f" (did you mean {close[0]}?)" if close else ""))
        return super().parse_known_args(args, namespace)


def config_parser(prog: str, description: str, config_help: str, override_help: str) -> Any:
    """The argument parser a config-driven workflow CLI starts from: `--config FILE` (required) and `--set`."""
    parser = CommandParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help=config_help)
    add_override_option(parser, override_help)
    return parser


def add_override_option(parser: Any, help: str) -> None:
    """The `--set KEY=VALUE ...` option every workflow CLI takes: several pairs after one flag, or the flag repeated;
    the pairs land in `args.overrides`, applied in order."""
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help=f"{help}; several pairs after one --set, or --set repeated")


def apply_overrides(cls: type, data: dict[str, Any], overrides: list[str], where: str = "--set") -> dict[str, Any]:
    """Apply `--set` overrides to a raw config dict, checking every key path against the schema `cls`. `where`
    names the overrides' source in errors."""
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node, schema = data, cls
        for depth, part in enumerate(path):
            names = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
            shown = ".".join(path[: depth + 1])
            if names is not None and part not in names:
                valid = ", ".join(".".join(path[:depth] + [n]) for n in names)
                hint = _unknown_key_hints(schema, [part], ".".join(path[:depth] + [""]))
                raise ConfigError(f"unknown key {shown} in {where} {text!r}{hint}; valid keys here: {valid}")
            if depth == len(path) - 1:
                node[part] = value
                break
            child_schema = get_type_hints(schema)[part] if names is not None else None
            child = node.get(part)
            if (names is not None and not _takes_mapping(child_schema)) or not (
                    child is None or isinstance(child, dict) or dataclasses.is_dataclass(child)):
                fix = f"--set {shown}=VALUE" if where == "--set" else f"{shown}=VALUE"
                raise ConfigError(f"{shown} is a value, not a section (in {where} {text!r}): write {fix}")
            if child is None:
                child = {}
            elif dataclasses.is_dataclass(child):
                child = to_dict(child)
            else:
                child = dict(child)
            node[part] = child
            node, schema = child, child_schema
    return data


def _takes_mapping(tp: Any) -> bool:
    """Whether a field of type `tp` holds keys that `--set a.b.c` may reach into (a section, a dict, Any)."""
    if tp is Any or tp is dict or get_origin(tp) is dict or dataclasses.is_dataclass(tp):
        return True
    return get_origin(tp) in (typing.Union, types.UnionType) and any(_takes_mapping(t) for t in get_args(tp))


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing or malformed file, or one with a key written twice, is a ConfigError naming
    it."""
    path = Path(path)
    if not path.is_file():
        shipped = Path(__file__).parent / "configs" / path.name  # `--config smoke.yaml`, meaning a shipped recipe
        hint = f"; the shipped recipe of that name is {shipped}" if shipped.is_file() else ""
        raise ConfigError(f"config file {path} does not exist{hint}")
    try:
        data = _read_yaml(path.read_text()) or {}
    except _DuplicateKeyError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load `cls` from an optional YAML file plus `--set` overrides; the dataclass defaults are the base."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(cls, data, overrides or [])
    return from_dict(cls, data)


def dump_yaml(obj: Any) -> str:
    """The resolved config as YAML text (saved next to checkpoints and logged to MLflow), credentials inside URIs
    redacted: credentials belong in the environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, MLFLOW_TRACKING_*)."""
    from workflows.runtime import redact_secrets

    return yaml.safe_dump(redact_secrets(to_dict(obj)), sort_keys=False)
