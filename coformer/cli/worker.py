"""``coformer infer`` (coordinate a plan over any transport) and ``coformer testbed`` (emulated devices).

``coformer worker`` (serve a device's sub-models) is in :mod:`coformer.cli.serve`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import click

from coformer.cli.app import cli, console
from coformer.defaults import TRANSPORT


def _load_input(plan: Any, input_file: str | None, texts: Sequence[str]) -> dict[str, Any]:
    """The request batch: a safetensors batch file, or texts tokenised by the plan's backbone."""
    from coformer.transport import decode_batch

    if input_file:
        return decode_batch(Path(input_file).read_bytes())
    if not texts:
        raise click.UsageError("give the input: --input FILE (a safetensors batch) or --text '...' (repeatable)")
    backbone_meta = plan.meta.get("backbone")
    name = backbone_meta.get("name") if isinstance(backbone_meta, dict) else backbone_meta
    name = name or plan.artifacts[0].config.get("backbone")
    source = (backbone_meta.get("source") if isinstance(backbone_meta, dict) else None) or plan.meta.get("source")
    import coformer

    backbone = coformer.create_backbone(name)
    if backbone.modality != "text":
        raise click.UsageError(f"backbone {name!r} takes {backbone.modality} input; pass --input FILE instead")
    teacher = backbone.load(source, **(plan.meta.get("load_options") or {}))
    return backbone.prepare(teacher, list(texts))


def _labels(plan: Any) -> list[str] | None:
    """Class names recorded in the plan, if any (top level or under ``data``/``dataset``)."""
    sources = [plan.meta] + [plan.meta[k] for k in ("data", "dataset") if isinstance(plan.meta.get(k), dict)]
    for src in sources:
        for key in ("labels", "class_names", "classes"):
            if isinstance(src.get(key), list):
                return [str(v) for v in src[key]]
    return None


def plan_memory_limits(plan: Any) -> list[int | None]:
    """Each sub-model's device memory (bytes) from the plan's policy, where the plan records it."""
    policy = plan.meta.get("policy")
    devices = policy.get("devices") if isinstance(policy, dict) else None
    out: list[int | None] = []
    for n in range(len(plan.artifacts)):
        dev = devices[n] if isinstance(devices, list) and n < len(devices) else None
        gb = dev.get("memory_gb") if isinstance(dev, dict) else None
        out.append(int(gb * 2**30) if isinstance(gb, (int, float)) and gb > 0 else None)
    return out


def deploy(plan: Any, uris: Sequence[str], *, timeout: float = 120.0) -> tuple[list[Any], dict[str, str]]:
    """Open a client per URI and load each plan sub-model on its worker (cached by sha256).

    Each worker admits its sub-model against its own budget and the plan's memory for that
    device. Returns the clients and ``{uri: error}`` for workers that could not be loaded (they
    are kept so each request names them as missing, and the coordinator keeps retrying them).
    """
    import coformer

    if len(uris) != len(plan.artifacts):
        raise click.UsageError(f"the plan has {len(plan.artifacts)} sub-models but {len(uris)} workers were given; "
                               f"pass one URI per sub-model, in order")
    clients, failed = [], {}
    for uri, art, limit in zip(uris, plan.artifacts, plan_memory_limits(plan)):
        client = coformer.open_transport(uri)
        try:
            cached = client.load(art, timeout=timeout, **({"memory_limit_bytes": limit} if limit else {}))
            click.echo(f"deployed {art.sha256[:12]}… to {uri} ({'cached, nothing sent' if cached else 'sent'})",
                       err=True)
        except Exception as exc:  # noqa: BLE001 - a lost worker is left out, not fatal
            failed[uri] = f"{type(exc).__name__}: {exc}"
            click.echo(f"deploy to {uri} failed: {failed[uri]}", err=True)
        clients.append(client)
    if len(failed) == len(uris):
        raise click.ClickException("no worker accepted its sub-model; nothing can answer")
    return clients, failed


def answer_record(answer: Any, labels: list[str] | None) -> dict[str, Any]:
    """A JSON-ready record of one coordinator answer."""
    pred = answer.logits.argmax(-1).tolist()

    def num(x: float) -> float | None:
        return None if math.isnan(x) else round(x, 3)

    return {
        "prediction": pred, "labels": [labels[p] for p in pred] if labels else None,
        "answered": answer.answered, "missing": answer.missing, "errors": answer.errors,
        "retried": answer.retried, "chunks": answer.chunks,
        "devices": [{"device": t.device, "t1_ms": num(t.t1_compute_ms), "t2_ms": num(t.t2_transfer_ms),
                     "round_trip_ms": num(t.round_trip_ms), "ok": t.ok} for t in answer.timings],
        "t3_ms": round(answer.t3_aggregate_ms, 3), "total_ms": round(answer.total_ms, 3),
    }


@cli.command("infer")
@click.option("--plan", "plan_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Plan directory (plan.json + safetensors); hashes are verified.")
@click.option("--workers", required=True, help="Comma-separated worker URIs, one per sub-model, in order.")
@click.option("--input", "input_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Input batch as a safetensors file of named tensors.")
@click.option("--text", "texts", multiple=True, help="Input text (repeatable; one batch row each).")
@click.option("--repeat", type=int, default=1, show_default=True, help="Send the request this many times.")
@click.option("--deadline", type=float, default=10.0, show_default=True,
              help="Seconds to wait for each worker; late ones are left out and named.")
@click.option("--max-inflight", type=int, default=32, show_default=True,
              help="Requests the coordinator runs at once.")
@click.option("--retries", type=int, default=2, show_default=True,
              help="Extra attempts for a device that fails, with backoff, within the deadline.")
@click.option("--json", "as_json", is_flag=True, help="One JSON record per request on stdout.")
def infer_cmd(plan_dir: str, workers: str, input_file: str | None, texts: tuple[str, ...], repeat: int,
              deadline: float, max_inflight: int, retries: int, as_json: bool) -> None:
    """Deploy a plan to workers and answer requests, with the t1/t2/t3 breakdown per device."""
    from coformer.artifacts import ArtifactError, load_plan
    from coformer.online.coordinator import Coordinator, RecoveryPolicy

    try:
        plan = load_plan(plan_dir)
    except ArtifactError as exc:
        raise click.ClickException(str(exc)) from exc
    uris = [u.strip() for u in workers.split(",") if u.strip()]
    batch = _load_input(plan, input_file, texts)
    clients, failed = deploy(plan, uris)
    labels = _labels(plan)
    try:
        coord = Coordinator(clients, [a.sha256 for a in plan.artifacts], plan.aggregator, names=uris,
                            deadline_s=deadline, max_inflight=max_inflight, recovery=RecoveryPolicy(retries=retries),
                            artifacts=plan.artifacts, memory_limits=plan_memory_limits(plan))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    for i, uri in enumerate(uris):
        if uri in failed:  # not loaded: left out until the prober re-admits it
            coord.mark_down(i, failed[uri])
    failures = 0
    try:
        for i in range(repeat):
            try:
                answer = coord.infer(batch)
            except Exception as exc:  # noqa: BLE001 - e.g. nobody answered
                failures += 1
                click.echo(f"request {i}: no answer: {exc}", err=True)
                continue
            rec = answer_record(answer, labels)
            if as_json:
                click.echo(json.dumps({"request": i, **rec}))
            else:
                _print_answer(i, rec)
    finally:
        coord.close()
    if failures:
        raise SystemExit(1)


def _print_answer(i: int, rec: dict[str, Any]) -> None:
    from rich.table import Table

    shown = rec["labels"] or rec["prediction"]
    if len(shown) > 8:
        shown = f"{shown[:8]}… ({len(shown)} rows)"
    status = "[yellow]degraded[/yellow]" if rec["missing"] else "complete"
    table = Table(title=f"request {i}: answer {shown} ({status}, total {rec['total_ms']:.1f} ms, "
                        f"t3 aggregate {rec['t3_ms']:.2f} ms)")
    table.add_column("worker", no_wrap=True)
    for col in ("ok", "t1 ms", "t2 ms", "rtt ms"):
        table.add_column(col, justify="right")
    table.add_column("error")
    for d in rec["devices"]:
        err = rec["errors"].get(d["device"], "")
        table.add_row(d["device"], "yes" if d["ok"] else "[red]no[/red]", _fmt(d["t1_ms"]), _fmt(d["t2_ms"]),
                      _fmt(d["round_trip_ms"]), err)
    console.print(table)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


@cli.group("testbed")
def testbed_group() -> None:
    """An emulated cluster on this machine: workers in network namespaces, shaped links, CPU quotas (root)."""


_STATE_OPT = click.option("--state", "state_file", type=click.Path(dir_okay=False),
                          default=lambda: os.environ.get("COFORMER_TESTBED_STATE", "/run/coformer/testbed.json"),
                          show_default="/run/coformer/testbed.json or $COFORMER_TESTBED_STATE",
                          help="JSON file recording what `up` created.")


@testbed_group.command("up")
@click.option("--devices", default="jetson-tx2,orin-nano,jetson-nano", show_default=True,
              help="Comma-separated built-in device profiles, one worker each.")
@click.option("--rate", "rates", default="1000mbit", show_default=True,
              help="Link rate for all workers, or comma-separated one per worker (2mbit, 100mbit, 500mbit, 1000mbit).")
@click.option("--cores", type=float, default=1.0, show_default=True, help="CPUs given to the strongest device.")
@click.option("--port", type=int, default=50051, show_default=True)
@click.option("--prefix", default="cf", show_default=True, help="Name prefix for namespaces, links and cgroups.")
@click.option("--subnet", type=int, default=213, show_default=True, help="Workers get 10.SUBNET.i.2.")
@click.option("--token", envvar="COFORMER_TOKEN", default=None, help="Shared token for every worker.")
@click.option("--transport", default=TRANSPORT, show_default=True,
              help="Transport the workers serve with (`coformer worker --transport`).")
@_STATE_OPT
def testbed_up(devices: str, rates: str, cores: float, port: int, prefix: str, subnet: int, token: str | None,
               transport: str, state_file: str) -> None:
    """Create the namespaces, shaped veth links, cgroups and workers; print their URIs."""
    from coformer.experiments.testbed import TestbedError, up
    from coformer.registry import UnknownPluginError

    try:
        bed = up([d.strip() for d in devices.split(",")], [r.strip() for r in rates.split(",")], prefix=prefix,
                 state_file=state_file, subnet=subnet, cores=cores, token=token, port=port, transport=transport)
    except (TestbedError, ValueError, UnknownPluginError) as exc:
        raise click.ClickException(str(exc)) from exc
    for w in bed.workers:
        console.print(f"{w.name}: {w.device} at {w.uri}, link {w.rate}, cpu {w.quota_us / w.period_us:.3f} "
                      f"cores, {w.threads} thread(s), pid {w.pid}")
    click.echo("--workers " + ",".join(bed.uris))


@testbed_group.command("down")
@_STATE_OPT
def testbed_down(state_file: str) -> None:
    """Stop the workers and remove every namespace, link, qdisc and cgroup `up` created."""
    from coformer.experiments.testbed import TestbedError, down

    try:
        down(state_file)
    except TestbedError as exc:
        raise click.ClickException(str(exc)) from exc
    console.print("testbed removed; nothing left behind")


@testbed_group.command("status")
@_STATE_OPT
def testbed_status(state_file: str) -> None:
    """Each worker's device, link, CPU quota, process and health."""
    from coformer.experiments.testbed import TestbedError, status

    try:
        rows = status(state_file)
    except TestbedError as exc:
        raise click.ClickException(str(exc)) from exc
    for r in rows:
        h = r["health"]
        state = f"ok, models {len(h['models'])}, requests {h['requests']}" if h.get("ok") else h.get("error")
        console.print(f"{r['name']}: {r['device']} {r['uri']} link {r['rate']} cpu {r['cpu']} "
                      f"pid {r['pid']} {'alive' if r['alive'] else 'dead'}: {state}")
