"""``coformer worker``: serve one device's sub-models over gRPC (added through ``register_commands``)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import click
from click.core import ParameterSource

from coformer.admission import mb, warm_up
from coformer.limits import RequestLimits
from coformer_transports.grpc_transport import WorkerServer, is_loopback, serve, split_hostport

#: Seconds of the shutdown grace kept for the process's own teardown (at most a quarter of the grace):
#: waking the main thread among busy compute threads and unmapping the process took ~0.25 s on 2 cores.
EXIT_RESERVE_S = 0.5


def add_worker_command(cli: click.Group) -> None:
    """Attach ``coformer worker`` to the root command group."""

    @cli.command("worker")
    @click.option("--listen", default="127.0.0.1:50051", show_default=True,
                  help="HOST:PORT to bind (port 0 picks a free one). Loopback unless you name another address here.")
    @click.option("--threads", type=int, default=None, help="torch threads for the sub-model (default: torch's).")
    @click.option("--name", default=None, help="Worker name reported to the coordinator (default: worker@ADDRESS).")
    @click.option("--token", envvar="COFORMER_TOKEN", default=None,
                  help="Shared secret every call must carry (or set COFORMER_TOKEN).")
    @click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None, help="PEM certificate.")
    @click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None, help="PEM private key.")
    @click.option("--max-message-mb", type=int, default=256, show_default=True,
                  help="Largest single message accepted, in MiB (weights are streamed in chunks below it, so "
                       "models of any size load); clients raise theirs with ?max_message_mb=N in the worker URI.")
    @click.option("--rpc-threads", type=int, default=8, show_default=True, help="Concurrent requests served.")
    @click.option("--max-inflight", type=int, default=64, show_default=True,
                  help="Calls admitted at once; more are refused with RESOURCE_EXHAUSTED.")
    @click.option("--max-memory-mb", type=int, default=None,
                  help="Memory budget for sub-models, in MiB; a load over it is refused before allocation "
                       "[default: half the memory available when the worker starts].")
    @click.option("--max-batch", type=int, default=RequestLimits.max_batch, show_default=True,
                  help="Most examples per request.")
    @click.option("--max-tokens", type=int, default=RequestLimits.max_tokens, show_default=True,
                  help="Most tokens per example (also capped by the sub-model's positions).")
    @click.option("--max-pixels", type=int, default=RequestLimits.max_pixels, show_default=True,
                  help="Most pixels (H x W) per example.")
    @click.option("--max-input-mb", type=int, default=RequestLimits.max_input_bytes // 2**20, show_default=True,
                  help="Most input bytes per request, in MiB.")
    @click.option("--grace", type=float, default=10.0, show_default=True,
                  help="On SIGTERM/SIGINT, seconds in-flight calls get to finish; exit code 3 if any were cut. "
                       "A second signal exits at once (code 130).")
    @click.pass_context
    def worker_cmd(ctx: click.Context, listen: str, threads: int | None, name: str | None, token: str | None,
                   tls_cert: str | None, tls_key: str | None, max_message_mb: int, rpc_threads: int,
                   max_inflight: int, max_memory_mb: int | None, max_batch: int, max_tokens: int, max_pixels: int,
                   max_input_mb: int, grace: float) -> None:
        """Serve sub-models over gRPC until SIGTERM/SIGINT; prints the bound grpc:// address."""
        explicit = ctx.get_parameter_source("listen") is not ParameterSource.DEFAULT
        try:
            if grace < 0:
                raise ValueError(f"--grace must be >= 0 seconds, got {grace}")
            if max_memory_mb is not None and max_memory_mb < 1:
                raise ValueError(f"--max-memory-mb must be at least 1, got {max_memory_mb}")
            limits = RequestLimits(max_batch=max_batch, max_tokens=max_tokens, max_pixels=max_pixels,
                                   max_input_bytes=max_input_mb * 2**20)
            host, _ = split_hostport(listen)
            warm_up()  # before announcing: the first load after a restart is then fast
            server = serve(listen, name=name, threads=threads, token=token, tls_cert=tls_cert, tls_key=tls_key,
                           allow_remote=explicit, max_message_bytes=max_message_mb * 1024 * 1024,
                           max_workers=rpc_threads, limits=limits, max_inflight=max_inflight,
                           max_memory_bytes=None if max_memory_mb is None else max_memory_mb * 2**20)
        except (ValueError, OSError) as exc:
            raise click.UsageError(str(exc)) from exc
        missing = [what for what, given in (("a token", token), ("TLS", tls_cert)) if not given]
        if not is_loopback(host) and missing:
            click.echo(f"warning: {listen} is reachable from other machines without {' and '.join(missing)}; "
                       f"use it only on a trusted network", err=True)
        code = serve_until_signalled(server, grace, announce=(
            f"coformer worker {server.state.name} listening on {server.uri} "
            f"(threads={threads or 'default'}, tls={'on' if server.tls else 'off'}, "
            f"token={'on' if token else 'off'}, memory budget {mb(server.state.max_memory_bytes)})"))
        os._exit(code)


def serve_until_signalled(server: WorkerServer, grace: float, *, announce: str) -> int:
    """Block until SIGTERM/SIGINT, then drain within ``grace``; returns the exit code (0 clean, 3 calls cut).

    A second signal while draining exits at once with 130. The caller exits with ``os._exit``
    so threads still computing a cut call cannot hold the process past the grace period.
    """
    stop = threading.Event()
    signalled_at = [0.0]

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            sys.stderr.write(f"second signal ({signal.Signals(signum).name}): exiting now\n")
            sys.stderr.flush()
            os._exit(130)
        signalled_at[0] = time.monotonic()
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    click.echo(announce)
    sys.stdout.flush()
    while not stop.wait(0.5):
        pass
    started = server.inflight
    # the grace is counted from the signal to the process's exit: keep a little of it for teardown
    reserve = min(EXIT_RESERVE_S, grace / 4)
    cut = server.drain(max(0.0, grace - reserve - (time.monotonic() - signalled_at[0])))
    try:  # whoever started the worker may have closed its pipes: the exit code must not depend on that
        if cut:
            click.echo(f"worker stopped: {cut} of {started} in-flight call(s) cut after the {grace:g}s grace",
                       err=True)
        else:
            click.echo(f"worker stopped cleanly: {started} in-flight call(s) finished", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        pass
    return 3 if cut else 0
