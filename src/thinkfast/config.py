"""Loading and checking pipeline configuration.

One YAML file describes a whole pipeline; each stage owns a config dataclass.
This module turns ``YAML + key=value overrides`` into those dataclasses and
makes every mistake point at its source::

    data, lines = load_yaml("configs/nano.yaml")
    overrides = ["pretrain.lr=1e-3"]
    data = apply_overrides(data, overrides)
    cfg = from_dict(PretrainConfig, data.get("pretrain"), where="configs/nano.yaml",
                    lines=lines, prefix="pretrain", overridden=override_locations(overrides))

Errors are :class:`ConfigError` with messages such as
``configs/nano.yaml line 12: unknown key 'pretrain.lrr' (known keys: ...); did you mean 'pretrain.lr'?``,
or, for a value given on the command line, ``override pretrain.lr=fast: 'pretrain.lr' must be float, ...``.
Dataclasses validate their own values in ``__post_init__``; any exception raised
there (a ``ValueError``, or a ``ZeroDivisionError`` from a zero) is re-raised as a
``ConfigError`` that names the file or override and the section.
"""

from __future__ import annotations

import dataclasses
import difflib
import copy
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "load_yaml", "apply_overrides", "override_locations", "from_dict", "to_dict",
           "config_hash"]


class ConfigError(ValueError):
    """A configuration mistake; the message names the file (and line when known) and the key."""


# --------------------------------------------------------------------------- YAML

# PyYAML implements YAML 1.1, where a float needs a dot: ``1e-3`` and ``3e4`` load
# as strings. This loader also accepts exponent-only forms (as YAML 1.2 does).
_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` / ``3e4`` as floats."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))


def _parse_yaml(text: str, name: str) -> tuple[Any, yaml.Node | None]:
    """Parse ``text`` into (data, root node); syntax errors become ConfigError naming ``name``."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{name} line {mark.line + 1}" if mark is not None else name
        problem = " ".join(p for p in (e.context, e.problem) if p)
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: YAML error: {e}") from None
    finally:
        loader.dispose()
    return data, node


def _record_lines(node: yaml.Node, prefix: str, lines: dict[str, int], name: str) -> None:
    """Fill ``lines`` with dotted key path -> 1-based line; reject duplicate keys."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = str(key_node.value)
            path = f"{prefix}.{key}" if prefix else key
            line = key_node.start_mark.line + 1
            if path in lines:
                raise ConfigError(
                    f"{name} line {line}: duplicate key '{path}' (first at line {lines[path]})"
                )
            lines[path] = line
            _record_lines(value_node, path, lines, name)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}[{i}]"
            lines[path] = item.start_mark.line + 1
            _record_lines(item, path, lines, name)


def load_yaml(path: str | Path) -> tuple[dict, dict[str, int]]:
    """Load a YAML mapping from ``path``.

    Returns ``(data, lines)`` where ``lines`` maps dotted key paths (``"pretrain.lr"``;
    list items as ``"stages[0]"``) to their 1-based line numbers. An empty file is an
    empty mapping. Missing files, syntax errors, duplicate keys and a top level that
    is not a mapping raise :class:`ConfigError` naming the file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    data, node = _parse_yaml(text, str(path))
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        line = node.start_mark.line + 1 if node is not None else 1
        raise ConfigError(
            f"{path} line {line}: top level must be a mapping of keys to values, "
            f"got {_given(data)}"
        )
    lines: dict[str, int] = {}
    _record_lines(node, "", lines, str(path))
    return data, lines


# ---------------------------------------------------------------------- overrides


def _parse_value(text: str, override: str, source: str) -> Any:
    """Parse an override's value as YAML (with ``1e-3`` as float); ``""`` stays ``""``."""
    if text.strip() == "":
        return ""
    try:
        value, node = _parse_yaml(text, "\0")
        if node is not None:
            _record_lines(node, "", {}, "\0")  # a mapping value with a key twice is a mistake too
    except ConfigError as e:
        # "\0 line 1: YAML syntax error: ..." -> "YAML syntax error: ..." (a line of the value means little)
        problem = str(e).partition(": ")[2] if str(e).startswith("\0") else str(e)
        problem = re.sub(r" \(first at line \d+\)$", "", problem)
        raise ConfigError(f"{source}: cannot parse value of override {override!r}: {problem}") from None
    return value


def _split_override(override: str, source: str) -> tuple[list[str], str]:
    """``"a.b=1"`` -> (``["a", "b"]``, ``"1"``); ConfigError naming ``override`` when malformed."""
    if not isinstance(override, str):
        raise ConfigError(f"{source}: override {override!r} is not a string (expected dotted.key=value)")
    key, sep, raw = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not p.strip() for p in parts):
        raise ConfigError(f"{source}: malformed override {override!r} (expected dotted.key=value)")
    return [p.strip() for p in parts], raw


def override_locations(overrides: list[str], source: str = "command line") -> dict[str, str]:
    """Map each overridden dotted key to its override, for :func:`from_dict`'s ``overridden``.

    >>> override_locations(["pretrain.lr=1e-3", " eval.n = 2", "pretrain.lr=0.1"])
    {'eval.n': 'eval.n = 2', 'pretrain.lr': 'pretrain.lr=0.1'}

    A key given twice maps to the later override (the one :func:`apply_overrides` applied last).
    Malformed overrides raise ConfigError as in :func:`apply_overrides`.
    """
    out: dict[str, str] = {}
    for override in overrides:
        parts, _ = _split_override(override, source)
        key = ".".join(parts)
        out.pop(key, None)  # keep insertion order = order applied
        out[key] = override.strip()
    return out


def apply_overrides(cfg: dict, overrides: list[str], source: str = "command line") -> dict:
    """Return a copy of ``cfg`` with each ``dotted.key=value`` override applied.

    Values are parsed as YAML: ``lr=1e-3`` is a float, ``sizes=[1,2]`` a list,
    ``x=null`` is None and ``name=`` the empty string. Keys need not exist yet
    (dataclass defaults are often not written out); missing sections are created.
    Checking that keys are known is left to :func:`from_dict`. Malformed overrides
    (no ``=``, empty key or key part, a key inside a non-mapping) raise ConfigError.
    """
    out = copy.deepcopy(cfg)
    for override in overrides:
        parts, raw = _split_override(override, source)
        value = _parse_value(raw, override, source)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                section = ".".join(parts[: i + 1])
                raise ConfigError(
                    f"{source}: override {override!r}: '{section}' is a {_given(child)}, "
                    f"not a section with keys"
                )
            node = child
        node[parts[-1]] = value
    return out


# ------------------------------------------------------------------ from_dict


def _given(value: Any) -> str:
    """Human name of a YAML value's type."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def _type_name(tp: Any) -> str:
    """Human name of a type annotation, e.g. ``float | None`` or ``list[int]``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        base = getattr(origin, "__name__", str(origin))
        if args:
            return f"{base}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
        return base
    return getattr(tp, "__name__", str(tp))


def _parent_key(key: str) -> str:
    """``a.b[2]`` -> ``a.b``, ``a.b`` -> ``a``, ``a.d (key 'x')`` -> ``a.d``, ``a`` -> ``""``."""
    if " (key " in key:
        return key[: key.index(" (key ")]
    if key.endswith("]") and "[" in key:
        return key[: key.rindex("[")]
    return key.rpartition(".")[0]


class _Ctx:
    """Where a value came from: file name + line map + overrides, used to format messages."""

    def __init__(self, where: str, lines: dict[str, int] | None, overridden: dict[str, str] | None = None):
        self.where = where
        self.lines = lines or {}
        self.overridden = overridden or {}

    def override_of(self, key: str) -> str | None:
        """The override that set ``key`` or a section / list holding it, if any."""
        probe = key
        while probe:
            if probe in self.overridden:
                return self.overridden[probe]
            probe = _parent_key(probe)
        return None

    def overrides_under(self, prefix: str, fields: list[str]) -> list[str]:
        """Overrides that set ``prefix`` or anything inside it (for ``prefix=""``: inside ``fields``)."""
        found = []
        for key, text in self.overridden.items():
            if prefix:
                inside = key == prefix or key.startswith(prefix + ".") or key.startswith(prefix + "[")
            else:
                inside = key.partition(".")[0].partition("[")[0] in fields
            if inside and text not in found:
                found.append(text)
        return found

    def loc(self, key: str) -> str:
        """``override a.b=1`` when ``key`` (or a section holding it) came from an override, else
        ``file line N`` for ``key`` (or the nearest list it sits in), else ``file``."""
        override = self.override_of(key)
        if override is not None:
            return f"override {override}"
        probe = key
        while probe:
            if probe in self.lines:
                return f"{self.where} line {self.lines[probe]}"
            if not probe.endswith("]"):
                break
            probe = probe[: probe.rindex("[")]
        return self.where

    def type_error(self, key: str, tp: Any, value: Any) -> ConfigError:
        return ConfigError(
            f"{self.loc(key)}: '{key}' must be {_type_name(tp)}, got {_given(value)} ({value!r})"
        )


def _coerce(value: Any, tp: Any, key: str, ctx: _Ctx) -> Any:
    """Check ``value`` against annotation ``tp`` and convert it (int->float, str->Path, ...)."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is type(None):
        if value is not None:
            raise ctx.type_error(key, tp, value)
        return None
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:
            if value is None:
                raise ctx.type_error(key, tp, value)
            arm = arms[0]
            try:
                return _coerce(value, arm, key, ctx)
            except ConfigError:
                if typing.get_origin(arm) is None and not dataclasses.is_dataclass(arm):
                    raise ctx.type_error(key, tp, value) from None  # say "int | null"
                raise  # keep the precise message from inside a list/dict/dataclass/Literal
        for arm in arms:  # first arm that accepts the value wins
            try:
                return _coerce(value, arm, key, ctx)
            except ConfigError:
                continue
        raise ctx.type_error(key, tp, value)
    if origin is typing.Literal:
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return allowed
        raise ConfigError(
            f"{ctx.loc(key)}: '{key}' must be one of "
            f"{', '.join(repr(a) for a in args)} (got {value!r})"
        )
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_dict(tp, value, where=ctx.where, lines=ctx.lines, prefix=key, overridden=ctx.overridden)
    if tp is bool:
        if not isinstance(value, bool):
            raise ctx.type_error(key, tp, value)
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ctx.type_error(key, tp, value)
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ctx.type_error(key, tp, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ctx.type_error(key, tp, value)
        return value
    if isinstance(tp, type) and issubclass(tp, Path):
        if isinstance(value, Path):
            return value
        if not isinstance(value, str) or not value:
            raise ctx.type_error(key, "a path (non-empty str)", value)
        return Path(value)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ctx.type_error(key, tp, value)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(
                    f"{ctx.loc(key)}: '{key}' must have {len(args)} items "
                    f"({_type_name(tp)}), got {len(value)}"
                )
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(value)
        items = [_coerce(v, t, f"{key}[{i}]", ctx) for i, (v, t) in enumerate(zip(value, item_types))]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ctx.type_error(key, tp, value)
        key_type, value_type = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            k = _coerce(k, key_type, f"{key} (key {k!r})", ctx)
            out[k] = _coerce(v, value_type, f"{key}.{k}", ctx)
        return out
    if isinstance(tp, type):  # any other plain class: isinstance check only
        if not isinstance(value, tp):
            raise ctx.type_error(key, tp, value)
        return value
    return value  # annotation we cannot check (TypeVar, Callable, ...)


def from_dict(
    cls: type,
    data: dict | None,
    *,
    where: str,
    lines: dict[str, int] | None = None,
    prefix: str = "",
    overridden: dict[str, str] | None = None,
):
    """Build dataclass ``cls`` from mapping ``data``, checking keys and types.

    ``where`` names the source (usually the YAML file) and ``lines`` is the map from
    :func:`load_yaml`; ``prefix`` is the dotted path of ``data`` inside that file
    (``"pretrain"``), so messages name the full key. ``overridden`` is the map from
    :func:`override_locations`: a mistake in a value that an override set (or in a
    section an override replaced) names that override instead of a line of the file.
    ``None`` counts as an empty section. Nested dataclass fields are built recursively.
    Raises ConfigError for unknown keys, wrong types, missing required keys and any
    exception ``__post_init__`` raises.
    """
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    ctx = _Ctx(where, lines, overridden)
    section = f"section '{prefix}'" if prefix else "top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{ctx.loc(prefix)}: {section} must be a mapping, got {_given(data)} ({data!r})")

    def dotted(name: str) -> str:
        return f"{prefix}.{name}" if prefix else str(name)

    fields = [f for f in dataclasses.fields(cls) if f.init]
    known = [f.name for f in fields]
    for name in data:
        if name not in known:
            key = dotted(name)
            msg = f"{ctx.loc(key)}: unknown key '{key}' (known keys: {', '.join(known) or 'none'})"
            close = difflib.get_close_matches(str(name), known, n=1)
            if close:
                msg += f"; did you mean '{dotted(close[0])}'?"
            raise ConfigError(msg)

    missing = [
        dotted(f.name)
        for f in fields
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"{ctx.loc(prefix)}: missing required key(s) {', '.join(repr(m) for m in missing)}"
        )

    hints = typing.get_type_hints(cls)
    kwargs = {
        f.name: _coerce(data[f.name], hints.get(f.name, Any), dotted(f.name), ctx)
        for f in fields
        if f.name in data
    }
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{_section_loc(ctx, prefix, data, known)}: invalid {section}: {e}") from e
    except Exception as e:  # a check that tripped over a value, e.g. ZeroDivisionError from a 0
        msg = f"{_section_loc(ctx, prefix, data, known)}: invalid {section}: {type(e).__name__}: {e}"
        small = [f"{k}={v!r}" for k, v in kwargs.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0]
        msg += f" (while checking its values; zero or negative: {', '.join(small)})" if small else \
            " (while checking its values)"
        raise ConfigError(msg) from e


def _section_loc(ctx: _Ctx, prefix: str, data: dict, fields: list[str]) -> str:
    """Where a whole section came from, for errors of its ``__post_init__``: the file (and line),
    or the override(s) that set values in it, plus the file when other values in it come from there."""
    overrides = ctx.overrides_under(prefix, fields)
    if not overrides:
        return ctx.loc(prefix)
    text = ", ".join(f"override {o}" for o in overrides)
    dotted = (lambda name: f"{prefix}.{name}") if prefix else str
    if ctx.override_of(prefix) is None and any(ctx.override_of(dotted(k)) is None for k in data):
        where = f"section '{prefix}'" if prefix else "the top level"
        text += f" (the rest of {where} from {ctx.where})"
    return text


# ------------------------------------------------------------ to_dict / hashing


def _plain(obj: Any) -> Any:
    """Convert to JSON-able builtins: dataclasses -> dict, Path -> str, tuple -> list."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k) if isinstance(k, Path) else k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def to_dict(obj: Any) -> dict:
    """Dataclass instance -> plain dict of JSON-able values (Paths as str, tuples as lists).

    Only ``init`` fields are included, so ``from_dict(type(obj), to_dict(obj))``
    round-trips.
    """
    out = _plain(obj)
    if not isinstance(out, dict):
        raise TypeError(f"to_dict needs a dataclass instance or dict, got {type(obj).__name__}")
    return out


def config_hash(obj: Any) -> str:
    """Stable 16-hex-char sha256 of a config (dataclass or dict), independent of key order."""
    canonical = json.dumps(
        _plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
