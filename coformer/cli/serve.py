"""``coformer worker``: serve one device's sub-models over any transport that can serve (``--transport``)."""

from __future__ import annotations

import os

import click
from click.core import ParameterSource

from coformer.cli.app import cli
from coformer.defaults import TRANSPORT, WORKER_LISTEN
from coformer.limits import RequestLimits


@cli.command("worker")
@click.option("--transport", default=TRANSPORT, show_default=True,
              help="Registered transport to serve with (`coformer plugins` lists them; it must be one that serves).")
@click.option("--listen", default=WORKER_LISTEN, show_default=True,
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
              help="Calls admitted at once; more are refused at once, as over a limit.")
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
def worker_cmd(ctx: click.Context, transport: str, listen: str, threads: int | None, name: str | None,
               token: str | None, tls_cert: str | None, tls_key: str | None, max_message_mb: int, rpc_threads: int,
               max_inflight: int, max_memory_mb: int | None, max_batch: int, max_tokens: int, max_pixels: int,
               max_input_mb: int, grace: float) -> None:
    """Serve sub-models until SIGTERM/SIGINT; prints the URI that reaches this worker."""
    from coformer.online.serve import (ServeOptions, announcement, exposure_warning, serve_until_signalled,
                                       start_serving)
    from coformer.registry import UnknownPluginError

    options = ServeOptions(token=token, tls_cert=tls_cert, tls_key=tls_key,
                           allow_remote=ctx.get_parameter_source("listen") is not ParameterSource.DEFAULT,
                           max_message_bytes=max_message_mb * 2**20, request_threads=rpc_threads,
                           max_inflight=max_inflight)
    try:
        if grace < 0:
            raise ValueError(f"--grace must be >= 0 seconds, got {grace}")
        if max_memory_mb is not None and max_memory_mb < 1:
            raise ValueError(f"--max-memory-mb must be at least 1, got {max_memory_mb}")
        limits = RequestLimits(max_batch=max_batch, max_tokens=max_tokens, max_pixels=max_pixels,
                               max_input_bytes=max_input_mb * 2**20)
        server = start_serving(transport, listen, name=name, threads=threads, limits=limits,
                               max_memory_bytes=None if max_memory_mb is None else max_memory_mb * 2**20,
                               options=options)
    except (ValueError, OSError, UnknownPluginError) as exc:
        raise click.UsageError(str(exc)) from exc
    warning = exposure_warning(listen, options)
    if warning:
        click.echo(warning, err=True)
    os._exit(serve_until_signalled(server, grace, announce=announcement(server, options)))
