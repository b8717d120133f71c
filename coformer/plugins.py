"""The plugin manager: loads the modules of the ``coformer`` entry-point group.

A plugin that fails to import, implements a hook that does not exist (a misspelling) or
whose hook implementations do not match the specs is recorded (see :func:`load_failures`)
and reported by name; the others still load. ``COFORMER_LOAD_PLUGINS`` (a comma list of
entry-point names) selects which entry-point plugins load; unset loads them all.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
from dataclasses import dataclass
import pluggy

from coformer import hookspecs

ENTRY_POINT_GROUP = "coformer"
#: Comma list of entry-point names to load; unset loads every installed plugin, empty loads none.
LOAD_PLUGINS_ENV = "COFORMER_LOAD_PLUGINS"


@dataclass(frozen=True)
class LoadFailure:
    """A plugin that could not be used: its import, its hooks, or a ``register_*`` call failed."""

    name: str
    value: str
    distribution: str
    error: str


_pm: pluggy.PluginManager | None = None
_failures: list[LoadFailure] = []
_hook_failures: list[LoadFailure] = []
_dists: dict[str, tuple[str, str]] = {}


def selected_plugins() -> set[str] | None:
    """Entry-point names chosen by ``COFORMER_LOAD_PLUGINS``, or ``None`` when it is unset (load all)."""
    value = os.environ.get(LOAD_PLUGINS_ENV)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> list[str]:
    """Names of ``plugin``'s hook implementations that match no hook spec, each with a suggestion."""
    specs = [name for name in vars(hookspecs) if hasattr(getattr(hookspecs, name), "coformer_spec")]
    problems = []
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.spec is not None:
            continue
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin and not impl.optionalhook:
                close = difflib.get_close_matches(caller.name, specs, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; the hooks are: {', '.join(specs)}"
                problems.append(f"{caller.name!r} is not a coformer hook{hint}")
    return problems


def checked_register(pm: pluggy.PluginManager, plugin: object, name: str | None) -> str:
    """Register ``plugin``; raise ``ValueError`` (leaving nothing registered) if its hooks are wrong."""
    try:
        registered = pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise ValueError(f"plugin {name!r}: {exc}") from None
    if registered is None:
        raise ValueError(f"plugin {name!r} is already registered or blocked")
    problems = unknown_hooks(pm, plugin)
    if problems:
        pm.unregister(plugin)
        raise ValueError(f"plugin {registered!r}: " + "; ".join(problems))
    return registered


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    selected = selected_plugins()
    eps = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    for ep in eps:
        if selected is not None and ep.name not in selected:
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        dist = ep.dist.metadata["name"] if ep.dist is not None else "unknown"
        version = ep.dist.version if ep.dist is not None else "unknown"
        try:
            checked_register(pm, ep.load(), ep.name)
        except Exception as exc:  # noqa: BLE001 - one broken plugin must not break the rest
            _failures.append(LoadFailure(ep.name, ep.value, dist, f"{type(exc).__name__}: {exc}"))
            continue
        _dists[ep.name] = (dist, version)
    for name in sorted((selected or set()) - {ep.name for ep in eps}):
        _failures.append(LoadFailure(name, LOAD_PLUGINS_ENV, "-",
                                     f"no installed plugin is called {name!r}; installed: "
                                     f"{', '.join(sorted(ep.name for ep in eps))}"))


def get_plugin_manager() -> pluggy.PluginManager:
    """Return the process-wide plugin manager, loading entry points on first use."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("coformer")
        pm.add_hookspecs(hookspecs)
        _load_entry_points(pm)
        pm.check_pending()  # misspelled hooks were already reported and their plugins left out
        _pm = pm
    return _pm


def record_hook_failure(failure: LoadFailure) -> None:
    """Report a plugin whose hook call failed (the registry calls this), like an import failure."""
    if failure not in _hook_failures:
        _hook_failures.append(failure)


def clear_hook_failures() -> None:
    """Forget hook failures, before the registries are rebuilt and call the hooks again."""
    _hook_failures.clear()


def load_failures() -> list[LoadFailure]:
    """Plugins that failed to load, and those whose ``register_*`` hooks failed so far."""
    get_plugin_manager()
    return [*_failures, *_hook_failures]


def distribution_of(plugin_name: str) -> tuple[str, str]:
    """``(distribution, version)`` that provides a plugin; runtime plugins report ``("-", "-")``."""
    get_plugin_manager()
    return _dists.get(plugin_name, ("-", "-"))

