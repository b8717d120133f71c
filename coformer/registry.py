"""Name → factory registries for each plugin kind, filled by the ``register_*`` hooks.

The registered key is the only name of a plugin's object: :func:`create` gives the object
that name. A plugin whose ``register_*`` hook raises, or that registers a name twice (or a
name another plugin already holds), contributes nothing to that kind and is reported with
the import failures (``coformer plugins``); every other plugin is unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

from coformer.plugins import (LoadFailure, checked_register, clear_hook_failures, distribution_of,
                              get_plugin_manager, record_hook_failure)
from coformer.plugins import load_failures as _failures_so_far

KINDS: dict[str, str] = {
    "backbone": "register_backbones",
    "aggregator": "register_aggregators",
    "search": "register_search_strategies",
    "transport": "register_transports",
    "dataset": "register_datasets",
}


class UnknownPluginError(KeyError):
    """Raised for a name no plugin registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class PluginTypeError(TypeError):
    """A plugin's factory returned an object of the wrong type for its kind."""


@dataclass(frozen=True)
class PluginInfo:
    """One registered name: what kind it is, which plugin and distribution provide it."""

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    distribution: str
    version: str


_cache: dict[str, dict[str, PluginInfo]] = {}


def invalidate() -> None:
    """Forget the registries so they are rebuilt from the plugin manager on next use."""
    _cache.clear()
    clear_hook_failures()


def _registrations(kind: str, impl: Any) -> dict[str, Callable[..., Any]]:
    """What one plugin's ``register_*`` hook registers; raises if it calls ``register`` badly."""
    names: dict[str, Callable[..., Any]] = {}

    def register(name: str, factory: Callable[..., Any]) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"registered a {kind} under {name!r}; names are non-empty strings")
        if not callable(factory):
            raise ValueError(f"registered {kind} {name!r} with {factory!r}, which is not callable")
        if name in names:
            raise ValueError(f"registers {kind} {name!r} twice")
        names[name] = factory

    impl.function(register=register)
    return names


def _build(kind: str) -> dict[str, PluginInfo]:
    hook_name = KINDS[kind]
    table: dict[str, PluginInfo] = {}
    # Registration order: built-ins (entry points) before runtime plugins, so an earlier holder keeps a name.
    for impl in getattr(get_plugin_manager().hook, hook_name).get_hookimpls():
        dist, version = distribution_of(impl.plugin_name)
        try:
            names = _registrations(kind, impl)
            taken = {n: table[n].plugin for n in names if n in table}
            if taken:
                raise ValueError("; ".join(f"{kind} {n!r} is already registered by {p!r}" for n, p in taken.items()))
        except Exception as exc:  # noqa: BLE001 - a broken plugin is reported, the others still work
            record_hook_failure(LoadFailure(impl.plugin_name, f"{hook_name}()", dist, f"{type(exc).__name__}: {exc}"))
            continue
        for name, factory in names.items():
            table[name] = PluginInfo(kind, name, factory, impl.plugin_name, dist, version)
    return table


def _table(kind: str) -> dict[str, PluginInfo]:
    if kind not in KINDS:
        raise UnknownPluginError(f"unknown plugin kind {kind!r}; known kinds: {', '.join(KINDS)}")
    if kind not in _cache:
        _cache[kind] = _build(kind)
    return _cache[kind]


def list_plugins(kind: str | None = None) -> list[PluginInfo]:
    """Every registered plugin of ``kind`` (or of every kind), sorted by kind then name."""
    kinds = [kind] if kind else list(KINDS)
    return [info for k in kinds for _, info in sorted(_table(k).items())]


def get(kind: str, name: str) -> PluginInfo:
    """Look up one registered name; an unknown name raises listing the known ones."""
    table = _table(kind)
    if name not in table:
        known = ", ".join(sorted(table)) or "(none)"
        raise UnknownPluginError(
            f"unknown {kind} {name!r}; known {kind}s: {known}. "
            f"Install a plugin that provides it or check the spelling (`coformer plugins`)."
        )
    return table[name]


def create(kind: str, name: str, /, *, expected: type | None = None, **options: Any) -> Any:
    """Instantiate the registered ``name`` of ``kind`` with ``options``.

    The object is given the registered key as its ``name`` (where it has one), so a config
    it saves names exactly what rebuilds it. With ``expected``, an object of another type
    raises :class:`PluginTypeError` naming the plugin.
    """
    info = get(kind, name)
    obj = info.factory(**options)
    if expected is not None and not isinstance(obj, expected):
        raise PluginTypeError(
            f"{kind} {name!r} from plugin {info.plugin!r} returned a {type(obj).__name__}, not a "
            f"{expected.__module__}.{expected.__qualname__}; fix the factory the plugin registers")
    if isinstance(getattr(obj, "name", None), str):
        setattr(obj, "name", name)
    return obj


def load_failures() -> list[LoadFailure]:
    """Every plugin failure: imports, misspelled or mismatched hooks, and ``register_*`` hooks that failed."""
    for kind in KINDS:
        _table(kind)
    return _failures_so_far()


def register_plugin(plugin: ModuleType | Any, name: str | None = None) -> str:
    """Register a plugin object at runtime (scripts, tests, notebooks).

    Returns the name it was registered under. A plugin implementing a hook that does not
    exist (a misspelling) is refused with a ``ValueError`` naming the hook. Registries are
    rebuilt on next use so its contributions become visible at once.
    """
    registered = checked_register(get_plugin_manager(), plugin, name)
    invalidate()
    return registered


def unregister_plugin(name: str) -> None:
    """Remove a runtime-registered plugin by name."""
    get_plugin_manager().unregister(name=name)
    invalidate()
