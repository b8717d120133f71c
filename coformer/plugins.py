"""The plugin manager: loads every module in the ``coformer`` entry-point group.

A plugin that fails to import is recorded (see :func:`load_failures`) and reported by
name; the others still load.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pluggy

from coformer import hookspecs

ENTRY_POINT_GROUP = "coformer"


@dataclass(frozen=True)
class LoadFailure:
    """An entry point whose module could not be imported."""

    name: str
    value: str
    distribution: str
    error: str


_pm: pluggy.PluginManager | None = None
_failures: list[LoadFailure] = []
_dists: dict[str, tuple[str, str]] = {}


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        dist = ep.dist.metadata["name"] if ep.dist is not None else "unknown"
        version = ep.dist.version if ep.dist is not None else "unknown"
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import error must not break the rest
            _failures.append(LoadFailure(ep.name, ep.value, dist, f"{type(exc).__name__}: {exc}"))
            continue
        pm.register(plugin, name=ep.name)
        _dists[ep.name] = (dist, version)


def get_plugin_manager() -> pluggy.PluginManager:
    """Return the process-wide plugin manager, loading entry points on first use."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("coformer")
        pm.add_hookspecs(hookspecs)
        _load_entry_points(pm)
        _pm = pm
    return _pm


def register_plugin(plugin: ModuleType | Any, name: str | None = None) -> str:
    """Register a plugin object at runtime (scripts, tests, notebooks).

    Returns the name it was registered under. Registries are rebuilt on next use so the
    plugin's backbones, aggregators, strategies and transports become visible at once.
    """
    from coformer import registry

    pm = get_plugin_manager()
    registered = pm.register(plugin, name=name)
    if registered is None:
        raise ValueError(f"plugin {name!r} is already registered or blocked")
    registry.invalidate()
    return registered


def unregister_plugin(name: str) -> None:
    """Remove a runtime-registered plugin by name."""
    from coformer import registry

    get_plugin_manager().unregister(name=name)
    registry.invalidate()


def load_failures() -> list[LoadFailure]:
    """Entry points that failed to import, with the error each raised."""
    get_plugin_manager()
    return list(_failures)


def distribution_of(plugin_name: str) -> tuple[str, str]:
    """``(distribution, version)`` that provides a plugin; runtime plugins report ``("-", "-")``."""
    get_plugin_manager()
    return _dists.get(plugin_name, ("-", "-"))
