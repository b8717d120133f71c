"""Data set URIs: ``NAME``, ``NAME?opt=value&...`` or ``SCHEME:LOCATION?opt=value&...``.

The name (or scheme) picks a registered data set; the query sets its typed options
(strings from a URI are converted by the factory's type hints); ``LOCATION`` goes to its
``location`` parameter. ``csv:reviews.csv?text=body&label=stars``, ``digits?seed=1``.
"""

from __future__ import annotations

import inspect
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Union
from urllib.parse import parse_qsl, urlencode

from coformer.data import DatasetOptionError, DatasetSource
from coformer.registry import create, get

_NONE = {"", "none", "null"}
_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def parse_dataset_uri(uri: str) -> tuple[str, str | None, dict[str, str]]:
    """``(name, location or None, options)`` of a data set URI; a repeated option is an error."""
    if not isinstance(uri, str) or not uri.strip():
        raise DatasetOptionError(f"a data set is a name or URI such as 'bbc_news' or 'csv:PATH?text=COL&label=COL', "
                                 f"got {uri!r}")
    head, _, query = uri.strip().partition("?")
    name, colon, location = head.partition(":")
    pairs = parse_qsl(query, keep_blank_values=True)
    options: dict[str, str] = {}
    for key, value in pairs:
        if key in options:
            raise DatasetOptionError(f"{uri!r} sets option {key!r} twice")
        options[key] = value
    return name, (location if colon else None), options


def _options_of(factory: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    params = {n: p for n, p in inspect.signature(factory).parameters.items()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    hints: dict[str, Any] = {}
    targets: list[Any] = [getattr(factory, "__init__"), factory] if isinstance(factory, type) else [factory]
    for target in targets:  # a dataclass's own annotations last: they win
        try:
            hints.update(typing.get_type_hints(target))
        except Exception:  # noqa: BLE001 - unresolvable hints: those options are passed as strings
            continue
    return params, hints


def _coerce(text: str, hint: Any, option: str, dataset: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if origin in (Union, types.UnionType):
            if type(None) in args and text.strip().lower() in _NONE:
                return None
            return _coerce(text, next(a for a in args if a is not type(None)), option, dataset)
        if origin is Literal:
            if text not in args:
                raise ValueError(f"choose one of {', '.join(map(str, args))}")
            return text
        if origin is tuple:
            parts = [p for p in text.split(",") if p.strip()]
            kinds = [args[0]] * len(parts) if len(args) == 2 and args[1] is Ellipsis else list(args)
            if len(parts) != len(kinds):
                raise ValueError(f"give {len(kinds)} comma-separated values")
            return tuple(_coerce(p.strip(), k, option, dataset) for k, p in zip(kinds, parts))
        if hint is bool:
            if text.strip().lower() not in _BOOLS:
                raise ValueError("give true or false")
            return _BOOLS[text.strip().lower()]
        if hint in (int, float, Path):
            return hint(text)
    except ValueError as exc:
        raise DatasetOptionError(f"data set {dataset!r}: option {option}={text!r} is not valid: {exc}") from None
    return text


def create_source(uri: str, **options: Any) -> DatasetSource:
    """The registered data set that ``uri`` names, configured by its query and ``options``."""
    name, location, query = parse_dataset_uri(uri)
    info = get("dataset", name)
    params, hints = _options_of(info.factory)
    clash = sorted(set(query) & set(options))
    if clash:
        raise DatasetOptionError(f"{uri!r}: option(s) {clash} given both in the URI and as arguments; give each once")
    if "location" in query or "location" in options:
        raise DatasetOptionError(f"data set {name!r}: give the location after the colon ({name}:LOCATION), "
                                 f"not as an option")
    accepted = sorted(n for n in params if n != "location")
    unknown = sorted((set(query) | set(options)) - set(accepted))
    if unknown:
        raise DatasetOptionError(f"data set {name!r} has no option(s) {unknown}; its options: {', '.join(accepted)}")
    kwargs: dict[str, Any] = {k: _coerce(v, hints.get(k, str), k, name) for k, v in query.items()}
    kwargs.update({k: _coerce(v, hints.get(k, str), k, name) if isinstance(v, str) else v for k, v in options.items()})
    if location is not None:
        if "location" not in params:
            raise DatasetOptionError(f"data set {name!r} takes no location; use {name!r} or {name}?OPTION=VALUE, "
                                     f"not {uri!r}")
        kwargs["location"] = _coerce(location, hints.get("location", str), "location", name)
    missing = [n for n, p in params.items() if p.default is p.empty and n not in kwargs]
    if missing:
        usage = getattr(info.factory, "usage", f"{name}:LOCATION" if "location" in missing else name)
        raise DatasetOptionError(f"data set {name!r} needs {', '.join(missing)}: e.g. {usage}")
    source = create("dataset", name, expected=DatasetSource, **kwargs)
    source.uri = canonical_uri(name, kwargs, params)
    return source


def canonical_uri(name: str, values: dict[str, Any], params: dict[str, inspect.Parameter]) -> str:
    """The one spelling of a configured data set: resolved location, only non-default options, sorted."""
    out = name
    location = values.get("location")
    if location is not None:
        out += ":" + str(Path(location).resolve() if isinstance(location, Path) else location)
    changed = {k: _text(v) for k, v in sorted(values.items())
               if k != "location" and (k not in params or v != params[k].default)}
    return out + ("?" + urlencode(changed, safe=",/:") if changed else "")


def _text(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)
