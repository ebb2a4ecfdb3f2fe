"""One configuration system: a settings class is written once; files, flags and checks derive from it.

Every settings class of the library and of the jobs is a plain :mod:`dataclasses` dataclass. Each
field has a type, a default and a ``#:`` comment above it (its documentation). From that one
description:

* :func:`load` builds the class from a mapping (a YAML or JSON file, a job's arguments). pydantic
  checks and coerces every field against its annotation (YAML's ``"1e-4"`` becomes a float,
  ``Literal`` fields take one of their values, nested settings come from mappings), unknown keys are
  refused, and the class's own ``__post_init__`` then checks ranges and relations between fields.
  Every error is a :class:`ConfigError` naming the field (``lora.r``) and the file.
* :func:`add_flags` adds one command-line flag per field to an :mod:`argparse` parser:
  ``chunk_tokens`` becomes ``--chunk-tokens``, the comment is its help and the default is shown;
  ``Literal`` fields get choices, ``bool`` fields ``--x`` / ``--no-x``, lists several values (commas
  work too), mappings ``KEY=VALUE`` pairs. :func:`add_config_flags` adds ``--config FILE`` and
  ``--print-config``.
* :func:`from_args` merges, in order: the class defaults < ``--config`` file < the flags given.

A field may tune its flag through ``dataclasses.field(metadata=...)``: ``flags`` (the option
strings, e.g. ``("--storage-option",)``), ``cli=False`` (settable from files only), ``metavar``,
``choices`` (for a text field whose values a constant of the library lists).
The library never imports argparse at module level; the jobs and the CLI call these functions.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import re
import sys
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


# --------------------------------------------------------------------------------------------
# documentation: the ``#:`` comments above each field


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: documentation}`` from the ``#:`` comments above the fields (a trailing ``# ...`` too).

    The comments of base classes count (a subclass's own win). Classes whose source is not
    available (a frozen application) have no documentation, not an error.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            lines, _ = inspect.getsourcelines(klass)
        except (OSError, TypeError):
            continue
        source = textwrap.dedent("".join(lines))
        src_lines = source.splitlines()
        tree = ast.parse(source)
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node in body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above: list[str] = []
            i = node.lineno - 2
            while i >= 0 and src_lines[i].strip().startswith("#:"):
                above.insert(0, src_lines[i].strip()[2:].strip())
                i -= 1
            text = " ".join(above)
            if not text:
                line = src_lines[node.lineno - 1]
                # a trailing comment: ``min_coverage: float = 0.8  # share of ...`` (not ``#`` inside a string)
                m = re.search(r"""\s#\s*([^'"]*)$""", line)
                text = m.group(1).strip() if m else ""
            if text:
                docs[node.target.id] = text
    return docs


def _plain(text: str) -> str:
    """reStructuredText roles and literals as plain text, for ``--help``."""
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w]+)`", r"\1", text)
    return text.replace("``", "")


# --------------------------------------------------------------------------------------------
# types


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], optional
        # ``str | Path``: a path given as text
        if all(a in (str, Path) for a in args):
            return str, optional
        return tp, optional
    return tp, False


def _is_settings(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


# --------------------------------------------------------------------------------------------
# loading


def read_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file as a mapping (``ConfigError`` naming the file if it is not one)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of field: value, got {type(data).__name__}")
    return data


def _unknown(cls: type, data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Keys of ``data`` (and of nested settings' mappings) that are not fields."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    bad = [f"{prefix}{k}" for k in data if k not in names]
    for f in dataclasses.fields(cls):
        tp, _ = _strip_optional(hints.get(f.name))
        if _is_settings(tp) and isinstance(data.get(f.name), Mapping):
            bad += _unknown(tp, data[f.name], f"{prefix}{f.name}.")
    return bad


@cache
def _adapter(cls: type) -> Any:
    """pydantic's validator of ``cls``, built once per class (a model load reads its config through it)."""
    from pydantic import TypeAdapter

    return TypeAdapter(cls)


def load(cls: type[T], data: Mapping[str, Any] | None = None, *, source: str | None = None) -> T:
    """``cls`` built from ``data``, every field checked.

    Raises :class:`ConfigError` naming the field and ``source`` (the file the data came from).
    """
    from pydantic import ValidationError

    where = f"{source}: " if source else ""
    if not isinstance(data, Mapping | None):
        raise ConfigError(f"{where}expected a mapping of field: value, got {type(data).__name__}")
    data = dict(data or {})
    bad = _unknown(cls, data)
    if bad:
        known = ", ".join(f.name for f in dataclasses.fields(cls) if f.init)
        raise ConfigError(f"{where}unknown field(s) {', '.join(bad)} (the fields of {cls.__name__}: {known})")
    hints = _hints(cls)
    for name, value in list(data.items()):  # ``data: x.jsonl`` in a file means a list of one
        tp, _ = _strip_optional(hints.get(name))
        if isinstance(value, (str, Path)) and typing.get_origin(tp) in (list, tuple, Sequence):
            data[name] = [str(value)]
    try:
        return _adapter(cls).validate_python(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            exc = (err.get("ctx") or {}).get("error")
            if isinstance(exc, ValueError):  # raised by a __post_init__: already names its field
                problems.append(str(exc))
                continue
            path = ".".join(str(p) for p in err["loc"])
            msg = err["msg"]
            if err["type"] == "missing":
                problems.append(f"{path}: required, not given")
            else:
                problems.append(f"{path}: {msg[:1].lower() + msg[1:]}, got {err.get('input')!r}")
        raise ConfigError(where + "; ".join(problems)) from None
    except (ValueError, TypeError) as e:  # a __post_init__ check outside pydantic's reach
        raise ConfigError(f"{where}{e}") from None


def dump(obj: Any) -> dict[str, Any]:
    """A settings object as plain data (what :func:`load` reads back): paths and tuples as text and lists."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(obj))


# --------------------------------------------------------------------------------------------
# command line


def _key_text(text: str) -> tuple[str, str]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, raw


def _key_value(text: str) -> tuple[str, Any]:
    import yaml

    key, raw = _key_text(text)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _flag_kwargs(tp: Any) -> dict[str, Any] | None:
    """argparse keyword arguments for a field of type ``tp``; ``None`` if it has no flag."""
    tp, _ = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        choices = list(typing.get_args(tp))
        return {"choices": choices, "type": type(choices[0])}
    if tp in (int, float, str) or tp is Path:
        return {"type": str if tp is Path else tp}
    if origin in (list, tuple, Sequence):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item = args[0] if args else str
        item, _ = _strip_optional(item)
        # items stay text here (commas split them in from_args); pydantic converts them to the item type
        if typing.get_origin(item) is Literal:
            choices = typing.get_args(item)
            return {"nargs": "+", "action": "extend", "type": str,
                    "metavar": "{" + ",".join(map(str, choices)) + "}"}
        if item in (int, float, str) or item is Path:
            return {"nargs": "+", "action": "extend", "type": str}
        return None
    if origin in (dict, Mapping):
        values = typing.get_args(tp)[1:] or (Any,)
        parse = _key_text if values[0] is str else _key_value  # text stays text; other values read as YAML
        return {"nargs": "+", "action": "extend", "type": parse, "metavar": "KEY=VALUE"}
    return None


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
              exclude: Sequence[str] = (), only: Sequence[str] | None = None,
              required: Sequence[str] = (), _prefix: str = "") -> list[str]:
    """One flag per field of ``cls`` (see the module's docstring); returns the fields that got one.

    A field holding nested settings with ``metadata={"flatten": True}`` contributes its own fields'
    flags, unprefixed (``eval: EvalSettings`` gives ``--top-k``, read back into ``eval.top_k``).

    ``required``: fields the command line must give (marked so in the help; checked by
    :func:`from_args`, since a ``--config`` file may give them too).
    """
    docs = field_docs(cls)
    hints = _hints(cls)
    added = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in exclude or (only is not None and f.name not in only):
            continue
        if f.metadata.get("cli", True) is False:
            continue
        nested, _ = _strip_optional(hints[f.name])
        if _is_settings(nested) and f.metadata.get("flatten"):
            added += add_flags(parser, nested, _prefix=f"{_prefix}{f.name}.")
            continue
        kwargs = _flag_kwargs(hints[f.name])
        if kwargs is None:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        help_text = _plain(f.metadata.get("help") or docs.get(f.name, ""))
        if _prefix + f.name in required:
            help_text = (help_text + " (required)").strip()
        elif default is not dataclasses.MISSING and default is not None and default != {} and default != []:
            shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            if isinstance(default, bool) or shown != "":
                help_text = f"{help_text} (default: {shown})".strip()
        flags = f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)
        for key in ("metavar", "choices"):
            if key in f.metadata:
                kwargs[key] = f.metadata[key]
        if "choices" not in kwargs and kwargs.get("action") is not argparse.BooleanOptionalAction:
            kwargs.setdefault("metavar", f.name.upper())
        parser.add_argument(*flags, dest=_prefix + f.name, default=argparse.SUPPRESS, help=help_text or None,
                            **kwargs)
        added.append(_prefix + f.name)
    return added


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` (YAML or JSON with the settings' fields) and ``--print-config``."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML or JSON file of settings (field: value); flags given on the command line win")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved settings as YAML (a file --config reads back) and stop")


def from_args(cls: type[T], args: argparse.Namespace | Mapping[str, Any], *, config: str | Path | None = None,
              base: Mapping[str, Any] | None = None, required: Sequence[str] = (),
              source: str | None = None) -> T:
    """``cls`` from the class defaults < ``base`` < the ``config`` file < the flags given in ``args``.

    ``args`` is the namespace of a parser built with :func:`add_flags` (only flags given on the
    command line are in it). ``required`` fields must be given by a flag or the file. ``source``
    names where ``base`` came from in error messages (default: the ``config`` file).
    """
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    config = config if config is not None else given.get("config")
    data: dict[str, Any] = dict(base or {})
    if config:
        data.update(read_file(config))
    _merge_flags(cls, given, data, "")

    def value(name: str) -> Any:  # ``derive.stage``: a field of nested settings
        node: Any = data
        for part in name.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        return node

    missing = [name for name in required if value(name) in (None, "")]
    if missing:
        flags = ", ".join("--" + m.rsplit(".", 1)[-1].replace("_", "-") for m in missing)
        raise ConfigError(f"{flags}: required (on the command line or in --config)")
    return load(cls, data, source=source or (str(config) if config else None))


def _merge_flags(cls: type, given: Mapping[str, Any], data: dict[str, Any], prefix: str) -> None:
    """Write the flags given for ``cls``'s fields (``dest`` = ``prefix + name``) into ``data``."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _strip_optional(hints[f.name])
        if _is_settings(tp) and f.metadata.get("flatten"):
            sub = dict(data.get(f.name) or {})
            _merge_flags(tp, given, sub, f"{prefix}{f.name}.")
            if sub:
                data[f.name] = sub
            continue
        if prefix + f.name not in given:
            continue
        value = given[prefix + f.name]
        origin = typing.get_origin(tp)
        if origin in (dict, Mapping) and isinstance(value, list):
            merged = dict(data.get(f.name) or {})
            merged.update(dict(value))
            value = merged
        elif origin in (list, tuple, Sequence) and isinstance(value, list):
            value = [part.strip() for item in value for part in str(item).split(",") if part.strip()]
        data[f.name] = value


def settings_for_main(cls: type[T], args: argparse.Namespace, **kwargs: Any) -> T | None:
    """:func:`from_args` for a command's ``main``: a bad setting exits with ``error: <field>: <problem>``;
    with ``--print-config`` the settings are printed and ``None`` is returned (the command stops)."""
    try:
        s = from_args(cls, args, **kwargs)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    if getattr(args, "print_config", False):
        print_config(s)
        return None
    return s


def print_config(obj: Any, file: Any = None) -> None:
    """Write ``obj``'s settings as YAML (what ``--config`` reads back)."""
    import yaml

    yaml.safe_dump(dump(obj), file or sys.stdout, sort_keys=False)
