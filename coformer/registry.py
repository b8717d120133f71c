"""Name → factory registries for each plugin kind, filled by the ``register_*`` hooks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from coformer.plugins import distribution_of, get_plugin_manager

KINDS: dict[str, str] = {
    "backbone": "register_backbones",
    "aggregator": "register_aggregators",
    "search": "register_search_strategies",
    "transport": "register_transports",
}


class UnknownPluginError(KeyError):
    """Raised for a name no plugin registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


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


def _build(kind: str) -> dict[str, PluginInfo]:
    pm = get_plugin_manager()
    hook = getattr(pm.hook, KINDS[kind])
    table: dict[str, PluginInfo] = {}
    # Call each implementation separately so every name is attributed to its plugin.
    for impl in hook.get_hookimpls():
        plugin_name = impl.plugin_name
        dist, version = distribution_of(plugin_name)

        def register(name: str, factory: Callable[..., Any], _p: str = plugin_name,
                     _d: str = dist, _v: str = version) -> None:
            if name in table and table[name].plugin != _p:
                raise ValueError(
                    f"{kind} {name!r} is registered by both {table[name].plugin!r} and {_p!r}"
                )
            table[name] = PluginInfo(kind, name, factory, _p, _d, _v)

        impl.function(register=register)
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


def create(kind: str, name: str, /, **options: Any) -> Any:
    """Instantiate the registered ``name`` of ``kind`` with ``options``."""
    return get(kind, name).factory(**options)
