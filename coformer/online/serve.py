"""Serve one device's worker to other processes over any transport that can (``coformer worker``).

A transport that serves subclasses :class:`ServingTransport`: it puts a
:class:`~coformer.online.worker_state.WorkerState` on the wire (:meth:`ServingTransport.serve`) and
says what URI reaches a worker at an address (:meth:`ServingTransport.worker_uri`). Everything
around the wire is here, once for every transport: the worker's state and threads, warm-up before
the worker announces itself, the announce line, signals, the grace period, draining and the
process's exit code (:data:`EXIT_CLEAN`, :data:`EXIT_CALLS_CUT`, :data:`EXIT_SECOND_SIGNAL`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from coformer.admission import mb, warm_up
from coformer.limits import RequestLimits
from coformer.online.worker_state import WorkerState
from coformer.registry import list_plugins
from coformer.transport import Transport, as_transport, get_transport, is_loopback, split_hostport

#: Exit code: every in-flight call finished within the grace period.
EXIT_CLEAN = 0
#: Exit code: the grace period ran out with calls still in flight; they were cut.
EXIT_CALLS_CUT = 3
#: Exit code: a second SIGTERM/SIGINT arrived while draining; the process left at once.
EXIT_SECOND_SIGNAL = 130
#: Seconds of the shutdown grace kept for the process's own teardown (at most half the grace):
#: unmapping a worker busy with a large request took 0.1-0.25 s on 2 cores.
EXIT_RESERVE_S = 0.5


class ServeUnsupportedError(ValueError):
    """The named transport cannot serve a worker to other processes (it only connects)."""


@dataclass(frozen=True)
class ServeOptions:
    """How a transport exposes a worker on the wire (``coformer worker`` flags of the same names).

    A transport refuses, with a ``ValueError``, an option it cannot honour (e.g. TLS on a
    transport without it). ``allow_remote`` permits a non-loopback ``listen`` address;
    ``max_message_bytes`` ``None`` means the transport's own default.
    """

    token: str | None = None
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    allow_remote: bool = False
    max_message_bytes: int | None = None
    request_threads: int = 8
    max_inflight: int = 64
    spool_dir: str | Path | None = None


class ServedWorker(ABC):
    """A worker a transport is serving (running, non-blocking): its state, address and shutdown."""

    #: The worker being served.
    state: WorkerState
    #: Whether the wire is encrypted.
    tls: bool = False

    @property
    @abstractmethod
    def uri(self) -> str:
        """The URI a client passes to :func:`coformer.open_transport` to reach this worker."""

    @property
    @abstractmethod
    def inflight(self) -> int:
        """Calls being served now."""

    @abstractmethod
    def drain(self, grace: float) -> int:
        """Stop accepting calls, cancel loads, wait up to ``grace`` s for in-flight calls; returns how many were cut."""

    @abstractmethod
    def stop(self, grace: float | None = 0.5) -> None:
        """Stop serving; in-flight calls get ``grace`` seconds to finish."""


class ServingTransport(Transport):
    """A transport that also serves workers: ``coformer worker --transport NAME`` and the testbed use it."""

    @abstractmethod
    def serve(self, listen: str, worker: WorkerState, options: ServeOptions) -> ServedWorker:
        """Put ``worker`` on the wire at ``listen`` (``HOST:PORT``; port 0 picks a free one) and return it running.

        A non-loopback ``listen`` is refused unless ``options.allow_remote``.
        """

    @abstractmethod
    def worker_uri(self, host: str, port: int) -> str:
        """The URI that reaches a worker this transport serves at ``host:port`` (without TLS or other options)."""


def serving_transports() -> list[str]:
    """Names of the registered transports that can serve a worker, sorted."""
    return [info.name for info in list_plugins("transport") if isinstance(as_transport(info.factory), ServingTransport)]


def serving_transport(name: str) -> ServingTransport:
    """The transport ``name`` if it can serve; otherwise :class:`ServeUnsupportedError` naming those that can."""
    transport = get_transport(name)
    if not isinstance(transport, ServingTransport):
        able = ", ".join(serving_transports()) or "(none installed)"
        raise ServeUnsupportedError(
            f"transport {name!r} cannot serve a worker to other processes (it only connects); "
            f"transports that can serve: {able}")
    return transport


def start_serving(transport: str, listen: str, *, name: str | None = None, threads: int | None = None,
                  limits: RequestLimits | None = None, max_memory_bytes: int | None = None,
                  options: ServeOptions = ServeOptions()) -> ServedWorker:
    """Build a worker, warm it up and serve it with ``transport`` at ``listen``; returns it running.

    The name defaults to ``worker@LISTEN``. Warm-up comes before binding, so a worker that
    announces itself loads at once. A transport that cannot serve raises
    :class:`ServeUnsupportedError` before anything is built.
    """
    serving = serving_transport(transport)
    split_hostport(listen)
    if threads:
        torch.set_num_threads(threads)
    worker = WorkerState(name or f"worker@{listen}", threads=threads, limits=limits, max_memory_bytes=max_memory_bytes)
    warm_up()
    return serving.serve(listen, worker, options)


def exposure_warning(listen: str, options: ServeOptions) -> str | None:
    """A warning when ``listen`` is reachable from other machines without a token or TLS, else ``None``."""
    host, _ = split_hostport(listen)
    missing = [what for what, given in (("a token", options.token), ("TLS", options.tls_cert)) if not given]
    if is_loopback(host) or not missing:
        return None
    return (f"warning: {listen} is reachable from other machines without {' and '.join(missing)}; "
            f"use it only on a trusted network")


def announcement(server: ServedWorker, options: ServeOptions) -> str:
    """The line a worker prints once it serves: ``coformer worker NAME listening on URI (...)``."""
    state = server.state
    return (f"coformer worker {state.name} listening on {server.uri} "
            f"(threads={state.threads or 'default'}, tls={'on' if server.tls else 'off'}, "
            f"token={'on' if options.token else 'off'}, memory budget {mb(state.max_memory_bytes)})")


def serve_until_signalled(server: ServedWorker, grace: float, *, announce: str) -> int:
    """Print ``announce``, block until SIGTERM/SIGINT, then drain within ``grace``; returns the exit code.

    :data:`EXIT_CLEAN` when every in-flight call finished, :data:`EXIT_CALLS_CUT` when some were
    cut; a second signal while draining exits at once with :data:`EXIT_SECOND_SIGNAL`. The
    caller exits with ``os._exit`` so threads still computing a cut call cannot hold the process
    past the grace period. Installs signal handlers: call it from the main thread.
    """
    stop = threading.Event()
    signalled_at = [0.0]

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            sys.stderr.write(f"second signal ({signal.Signals(signum).name}): exiting now\n")
            sys.stderr.flush()
            os._exit(EXIT_SECOND_SIGNAL)
        signalled_at[0] = time.monotonic()
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(announce, flush=True)
    # the kernel may deliver the signal to a transport's or torch's thread; the main thread then runs the
    # handler only when its wait times out, so the poll period is the delay before draining starts
    while not stop.wait(0.05):
        pass
    started = server.inflight
    # the grace is counted from the signal to the process's exit: keep a little of it for teardown
    reserve = min(EXIT_RESERVE_S, grace / 2)
    cut = server.drain(max(0.0, grace - reserve - (time.monotonic() - signalled_at[0])))
    try:  # whoever started the worker may have closed its pipes: the exit code must not depend on that
        if cut:
            print(f"worker stopped: {cut} of {started} in-flight call(s) cut after the {grace:g}s grace",
                  file=sys.stderr)
        else:
            print(f"worker stopped cleanly: {started} in-flight call(s) finished", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        pass
    return EXIT_CALLS_CUT if cut else EXIT_CLEAN
