"""``coformer worker``: serve one device's sub-models over gRPC (added through ``register_commands``)."""

from __future__ import annotations

import signal
import sys
import threading

import click
from click.core import ParameterSource

from coformer_transports.grpc_transport import is_loopback, serve, split_hostport


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
                  help="Largest request/response accepted, in MiB (sub-model weights are tens of MB); "
                       "clients raise theirs with ?max_message_mb=N in the worker URI.")
    @click.option("--rpc-threads", type=int, default=8, show_default=True, help="Concurrent requests served.")
    @click.pass_context
    def worker_cmd(ctx: click.Context, listen: str, threads: int | None, name: str | None, token: str | None,
                   tls_cert: str | None, tls_key: str | None, max_message_mb: int, rpc_threads: int) -> None:
        """Serve sub-models over gRPC until interrupted; prints the bound grpc:// address."""
    
        explicit = ctx.get_parameter_source("listen") is not ParameterSource.DEFAULT
        try:
            host, _ = split_hostport(listen)
            server = serve(listen, name=name, threads=threads, token=token, tls_cert=tls_cert, tls_key=tls_key,
                           allow_remote=explicit, max_message_bytes=max_message_mb * 1024 * 1024,
                           max_workers=rpc_threads)
        except (ValueError, OSError) as exc:
            raise click.UsageError(str(exc)) from exc
        missing = [what for what, given in (("a token", token), ("TLS", tls_cert)) if not given]
        if not is_loopback(host) and missing:
            click.echo(f"warning: {listen} is reachable from other machines without {' and '.join(missing)}; "
                       f"use it only on a trusted network", err=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        click.echo(f"coformer worker {server.state.name} listening on {server.uri} "
                   f"(threads={threads or 'default'}, tls={'on' if server.tls else 'off'}, "
                   f"token={'on' if token else 'off'})", nl=True)
        sys.stdout.flush()
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        server.stop(1.0)
