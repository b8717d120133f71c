"""CoFormer: run one pretrained transformer across several small heterogeneous devices in parallel.

Public API (kept stable; change only with a deprecation path)::

    coformer.list_plugins(kind)
    coformer.create_backbone(name) / create_aggregator(name, ...) / create_search_strategy(name, ...)
    coformer.open_transport(uri)
    ModelShape, SubModelSpec, Policy, DeviceProfile
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from coformer.hookspecs import hookimpl
from coformer.plugins import load_failures, register_plugin, unregister_plugin
from coformer.registry import PluginInfo, UnknownPluginError
from coformer.registry import list_plugins as _list_plugins
from coformer.spec import (
    BUILTIN_DEVICES,
    ConstraintError,
    DeviceProfile,
    ModelShape,
    Policy,
    SubModelCost,
    SubModelSpec,
    UnitSelection,
)


def list_plugins(kind: str | None = None) -> list[PluginInfo]:
    """Registered plugins of ``kind`` ("backbone", "aggregator", "search", "transport") or all kinds."""
    return _list_plugins(kind)


def create_backbone(name: str, **options: Any):
    """Instantiate the backbone plugin registered as ``name``."""
    from coformer.registry import create

    return create("backbone", name, **options)


def create_aggregator(name: str, **options: Any):
    """Instantiate the aggregator registered as ``name`` (see :class:`coformer.aggregator.Aggregator`)."""
    from coformer.registry import create

    return create("aggregator", name, **options)


def create_search_strategy(name: str, **options: Any):
    """Instantiate the search strategy registered as ``name``."""
    from coformer.registry import create

    return create("search", name, **options)


def open_transport(uri: str):
    """Connect to the worker at ``uri`` with the transport registered for its scheme."""
    from coformer.registry import create
    from coformer.transport import scheme_of

    return create("transport", scheme_of(uri), uri=uri)


__all__ = [
    "BUILTIN_DEVICES", "ConstraintError", "DeviceProfile", "ModelShape", "Policy", "PluginInfo",
    "SubModelCost", "SubModelSpec", "UnitSelection", "UnknownPluginError", "__version__",
    "create_aggregator", "create_backbone", "create_search_strategy", "hookimpl", "list_plugins",
    "load_failures", "open_transport", "register_plugin", "unregister_plugin",
]
