"""The hook specifications every CoFormer plugin implements a subset of.

A plugin is a module (or object) with functions decorated by :data:`hookimpl` whose
names match the specs below. Built-in plugins and third-party ones are registered the
same way: through the ``coformer`` entry-point group.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

hookspec = pluggy.HookspecMarker("coformer")
hookimpl = pluggy.HookimplMarker("coformer")

#: ``register(name, factory)``: the callable passed to the ``register_*`` hooks.
Register = Callable[[str, Callable[..., Any]], None]


@hookspec
def register_backbones(register: Register) -> None:
    """Register backbone families.

    Called once when the plugin manager loads. Call ``register(name, factory)`` for each
    architecture family; ``factory()`` returns a :class:`coformer.backbone.Backbone`.
    """


@hookspec
def register_aggregators(register: Register) -> None:
    """Register aggregators that fuse sub-model features at the central node.

    ``factory(feature_dims=..., embed_dim=..., task_head=..., student_heads=...)`` returns a
    :class:`coformer.aggregator.Aggregator`.
    """


@hookspec
def register_search_strategies(register: Register) -> None:
    """Register decomposition-policy search strategies.

    ``factory(**options)`` returns a :class:`coformer.offline.search.SearchStrategy`.
    """


@hookspec
def register_transports(register: Register) -> None:
    """Register transports by URI scheme: ``register(scheme, transport)``.

    ``transport`` is a :class:`coformer.transport.Transport` instance: ``connect(uri)`` returns a
    :class:`coformer.transport.WorkerClient` connected to the worker that ``uri`` names. A
    transport that can also serve workers (``coformer worker --transport SCHEME``, the testbed)
    is a :class:`coformer.online.serve.ServingTransport`: ``serve(listen, worker, options)`` and
    ``worker_uri(host, port)``. A bare ``factory(uri)`` callable is still accepted as a
    connect-only transport.
    """


@hookspec
def register_datasets(register: Register) -> None:
    """Register data sets, by name (``bbc_news``) or by URI scheme (``csv`` for ``csv:PATH?text=..``).

    ``factory(**options)`` returns a :class:`coformer.data.DatasetSource`; its typed
    parameters are the options a URI's query may set (``name?max_size=500``), and a
    ``location`` parameter takes what follows ``name:``. Load it with
    :func:`coformer.load_dataset`.
    """


@hookspec
def register_commands(cli: Any) -> None:
    """Add sub-commands to the ``coformer`` command line.

    ``cli`` is the root :class:`click.Group`; decorate new functions with ``@cli.command()``.
    Called once when the CLI is built.
    """


@hookspec
def search_trial_started(strategy: str, trial: int, policy: Any) -> None:
    """Notification: a search strategy is about to evaluate ``policy`` as trial ``trial``."""


@hookspec
def search_trial_finished(strategy: str, trial: int, policy: Any, result: Any) -> None:
    """Notification: trial ``trial`` finished; ``result`` is a :class:`coformer.offline.evaluator.Evaluation`."""


@hookspec
def calibration_step(submodel: int, epoch: int, step: int, loss: float) -> None:
    """Notification: one optimisation step of calibrating sub-model ``submodel`` finished."""


@hookspec
def calibration_finished(submodel: int, sample_weights: Any) -> None:
    """Notification: sub-model ``submodel`` is calibrated; ``sample_weights`` go to the next one."""
