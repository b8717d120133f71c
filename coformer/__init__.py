"""CoFormer: run one pretrained transformer across several small heterogeneous devices in parallel.

Public API (kept stable; change only with a deprecation path)::

    coformer.list_plugins(kind)
    coformer.create_backbone(name) / create_aggregator(name, ...) / create_search_strategy(name, ...)
    coformer.open_transport(uri)
    coformer.create_dataset(name_or_uri) / load_dataset(name_or_uri)
    ModelShape, SubModelSpec, Policy, DeviceProfile
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from coformer.data import (DatasetError, DatasetFormatError, DatasetOptionError, DatasetSource,
                           DatasetUnavailableError, RawDataset, RawSplit)
from coformer.hookspecs import hookimpl
from coformer.registry import PluginInfo, PluginTypeError, UnknownPluginError, register_plugin, unregister_plugin
from coformer.registry import list_plugins as _list_plugins
from coformer.registry import load_failures as _load_failures
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

if TYPE_CHECKING:
    from coformer.aggregator import Aggregator
    from coformer.backbone import Backbone
    from coformer.plugins import LoadFailure
    from coformer.offline.search import SearchStrategy
    from coformer.transport import WorkerClient


def list_plugins(kind: str | None = None) -> list[PluginInfo]:
    """Registered plugins of ``kind`` ("backbone", "aggregator", "search", "transport", "dataset") or all kinds."""
    return _list_plugins(kind)


def load_failures() -> list[LoadFailure]:
    """Plugins that could not be used (import, hook or ``register_*`` failures), with the error of each."""
    return _load_failures()


def create_backbone(name: str, **options: Any) -> Backbone:
    """Instantiate the backbone plugin registered as ``name``."""
    from coformer.backbone import Backbone
    from coformer.registry import create

    backbone: Backbone = create("backbone", name, expected=Backbone, **options)
    return backbone


def create_aggregator(name: str, **options: Any) -> Aggregator:
    """Instantiate the aggregator registered as ``name`` (see :class:`coformer.aggregator.Aggregator`)."""
    from coformer.aggregator import Aggregator
    from coformer.registry import create

    aggregator: Aggregator = create("aggregator", name, expected=Aggregator, **options)
    return aggregator


def create_search_strategy(name: str, **options: Any) -> SearchStrategy:
    """Instantiate the search strategy registered as ``name``."""
    from coformer.registry import create
    from coformer.offline.search import SearchStrategy

    strategy: SearchStrategy = create("search", name, expected=SearchStrategy, **options)
    return strategy


def open_transport(uri: str) -> WorkerClient:
    """Connect to the worker at ``uri`` with the transport registered for its scheme."""
    from coformer.registry import create
    from coformer.transport import WorkerClient, scheme_of

    client: WorkerClient = create("transport", scheme_of(uri), expected=WorkerClient, uri=uri)
    return client


def create_dataset(name_or_uri: str, **options: Any) -> DatasetSource:
    """The data set a name or URI chooses, configured but not read yet (``.load()`` reads it).

    ``bbc_news``, ``wordnet_supersense?pos=noun&max_size=5000``, ``csv:PATH?text=COL&label=COL``,
    ``jsonl:PATH?text=KEY&label=KEY``, ``imagefolder:DIR``, ``hf:DIR?text=COL&label=COL``;
    keyword ``options`` are the same options, typed.
    """
    from coformer.dataset_uri import create_source

    return create_source(name_or_uri, **options)


def load_dataset(name_or_uri: str, **options: Any) -> RawDataset:
    """Read the data set a name or URI chooses: train/val/test splits and class names."""
    return create_dataset(name_or_uri, **options).load()


__all__ = [
    "BUILTIN_DEVICES", "ConstraintError", "DatasetError", "DatasetFormatError", "DatasetOptionError",
    "DatasetSource", "DatasetUnavailableError", "DeviceProfile", "ModelShape", "Policy", "PluginInfo",
    "PluginTypeError", "RawDataset", "RawSplit", "SubModelCost", "SubModelSpec", "UnitSelection",
    "UnknownPluginError", "__version__", "create_aggregator", "create_backbone", "create_dataset",
    "create_search_strategy", "hookimpl", "list_plugins", "load_dataset", "load_failures", "open_transport",
    "register_plugin", "unregister_plugin",
]
