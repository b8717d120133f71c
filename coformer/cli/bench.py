"""``coformer bench``: teacher, CoFormer, compressed, pipeline and tensor-parallel over the same workers, per link rate."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import click

from coformer.cli.app import cli, console


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{what} must be comma-separated numbers, e.g. 2,100,500,1000") from None
    if not values or any(v <= 0 for v in values):
        raise click.BadParameter(f"{what} needs at least one positive number")
    return values


def resolve_teacher(backbone: Any, plan: Any, teacher_dir: str | None) -> tuple[Any, dict[str, Any]]:
    """The teacher the plan was calibrated from, and what bench.json records about it.

    ``plan.json`` records the teacher's sha256 and data set (``coformer demo`` writes it). Without
    ``--teacher`` the cached teacher with that hash is used; ``--teacher DIR`` must have it too.
    A plan without a record (written before teachers were recorded) needs ``--teacher`` and is
    benched unchecked, with a warning.
    """
    from coformer.offline.pipeline import TeacherMismatchError, check_teacher, find_teacher, teacher_sha256

    record = plan.meta.get("teacher")
    if record is None:
        if not teacher_dir:
            raise click.UsageError(f"{plan.path}/plan.json does not record the teacher it was calibrated from "
                                   f"(written by an older coformer); re-run `coformer demo` to re-create it, or "
                                   f"pass --teacher DIR to bench it with that teacher unchecked")
        console.print(f"[yellow]warning: the plan records no teacher; {teacher_dir} is used unchecked[/yellow]")
        return backbone.load(teacher_dir), {"path": teacher_dir, "sha256": teacher_sha256(teacher_dir),
                                            "check": "unchecked: the plan records no teacher"}
    try:
        if teacher_dir:
            check_teacher(record, teacher_dir)
            chosen = Path(teacher_dir)
        else:
            chosen = find_teacher(record)
    except TeacherMismatchError as exc:
        raise click.ClickException(str(exc)) from exc
    console.print(f"teacher: {chosen} (sha256 {record['sha256'][:12]}…, the plan's)")
    return backbone.load(chosen), {**record, "path": str(chosen), "check": "sha256 equals the plan's record"}


def _process_peak_rss(pids: dict[str, int | None]) -> Callable[[], dict[str, int]]:
    def read() -> dict[str, int]:
        out = {}
        for name, pid in pids.items():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        out[name] = int(line.split()[1]) * 1024
            except OSError:
                continue
        return out

    return read


def reshape_links(bed: Any, rate_mbps: float) -> None:
    """Change every testbed link (both ends) to ``rate_mbps`` by replacing its tbf qdisc."""
    import subprocess

    from coformer.experiments.testbed import parse_rate, rate_bits

    rate = parse_rate(rate_mbps)
    # as in coformer.experiments.testbed: the burst must hold one timer tick of traffic and a full-size packet
    burst = str(max(16 * 1024, int(rate_bits(rate) / 8 / 100)))
    tbf = ["tbf", "rate", rate, "burst", burst, "latency", "200ms"]
    for w in bed.workers:
        for cmd in (["tc", "qdisc", "replace", "dev", w.host_if, "root", *tbf],
                    ["ip", "netns", "exec", w.namespace, "tc", "qdisc", "replace", "dev", w.ns_if, "root", *tbf]):
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise click.ClickException(f"`{' '.join(cmd)}` failed: {res.stderr.strip()}")
        w.rate = rate


@cli.command("bench")
@click.option("--plan", "plan_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Plan directory from `coformer demo --out DIR` (or `coformer plan`).")
@click.option("--testbed", is_flag=True, help="Bring up the emulated testbed (root) with the plan's devices.")
@click.option("--workers", default=None, help="Comma-separated worker URIs, one per plan device, in order.")
@click.option("--teacher", "teacher_dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Fine-tuned teacher directory (default: the demo's cached teacher).")
@click.option("--data", "data_uri", default=None,
              help="Data set whose test split the accuracy is measured on (default: the one the plan records).")
@click.option("--link-mbps", default="2,100,500,1000", show_default=True, help="Link rates in Mbit/s.")
@click.option("--requests", type=int, default=20, show_default=True, help="Timed requests per method and rate.")
@click.option("--warmup", type=int, default=3, show_default=True, help="Untimed requests first.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Test examples per request.")
@click.option("--max-seconds", type=float, default=120.0, show_default=True,
              help="Stop a method early (after ≥3 timed requests) when its requests took this long.")
@click.option("--accuracy-limit", type=int, default=None, help="Use only the first N test examples for accuracy.")
@click.option("--recompute-accuracy", is_flag=True, hidden=True,
              help="Deprecated, no effect: CoFormer's accuracy is always measured through the runtime.")
@click.option("--device-plans", default=None,
              help="Comma-separated extra plan directories (e.g. 1, 2 and 4 devices) for the device-count table.")
@click.option("--device-count-rate", type=float, default=None, help="Link rate for the device-count table "
              "(default: the largest --link-mbps).")
@click.option("--cores", type=float, default=1.0, show_default=True, help="Testbed: CPUs of the strongest device.")
@click.option("--state", "state_file", default=None, help="Testbed state file (default: a temporary file).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
def bench_cmd(plan_dir: str, testbed: bool, workers: str | None, teacher_dir: str | None, data_uri: str | None,
              link_mbps: str,
              requests: int, warmup: int, batch_size: int, max_seconds: float, accuracy_limit: int | None,
              recompute_accuracy: bool,
              device_plans: str | None, device_count_rate: float | None, cores: float, state_file: str | None,
              out_dir: str) -> None:
    """Teacher alone, CoFormer, compressed, pipeline and tensor-parallel: latency, bytes, memory, energy, accuracy.

    The plan's ``compressed/`` directory (written by ``coformer demo``) is the single-model alternative.
    """
    import coformer
    from coformer.artifacts import ArtifactError, load_plan
    from coformer.experiments.bench import BenchConfig, BenchSetup, device_count_run, make_sample, run_bench, write_outputs
    from coformer.offline.data_choice import choose_dataset
    from coformer.offline.pipeline import encode
    from coformer.spec import Policy

    if testbed == bool(workers):
        raise click.UsageError("give exactly one of --testbed (emulated cluster, root) or --workers URI,...")
    rates = _floats(link_mbps, "--link-mbps")
    if requests < 1 or warmup < 0 or batch_size < 1:
        raise click.BadParameter("--requests and --batch-size must be ≥ 1 and --warmup ≥ 0")
    try:
        plan = load_plan(plan_dir)
        extra_plans = [load_plan(p.strip()) for p in device_plans.split(",")] if device_plans else []
        compressed = load_plan(Path(plan_dir) / "compressed") if (Path(plan_dir) / "compressed").is_dir() else None
    except ArtifactError as exc:
        raise click.ClickException(str(exc)) from exc
    if "policy" not in plan.meta:
        raise click.ClickException(f"{plan_dir}/plan.json has no 'policy': the bench needs the plan's devices")
    devices = Policy.from_dict(plan.meta["policy"]).devices
    uris = [u.strip() for u in workers.split(",") if u.strip()] if workers else []
    if workers and len(uris) != len(devices):
        raise click.UsageError(f"the plan has {len(devices)} devices ({', '.join(d.name for d in devices)}) but "
                               f"{len(uris)} workers were given; pass one URI per sub-model, in order")
    backbone_name = plan.meta.get("backbone") or plan.artifacts[0].config["backbone"]
    backbone = coformer.create_backbone(backbone_name if isinstance(backbone_name, str) else backbone_name["name"])
    teacher, teacher_info = resolve_teacher(backbone, plan, teacher_dir)
    data = choose_dataset(data_uri or plan.meta.get("dataset"), backbone.modality)
    test = encode(backbone, teacher, data.test)
    cfg = BenchConfig(rates_mbps=rates, requests=requests, warmup=warmup, batch_size=batch_size,
                      max_seconds_per_method=max_seconds)
    log = console.print

    def with_workers(devs: list[Any], body: Callable[[list[Any], Callable[[float], None] | None,
                                                      Callable[[], dict[str, int]] | None], Any]) -> Any:
        if not testbed:
            clients = [coformer.open_transport(u) for u in uris[: len(devs)]]
            try:
                return body(clients, None, None)
            finally:
                for c in clients:
                    c.close()
        from coformer.experiments import testbed as tb

        state = state_file or os.path.join(tempfile.mkdtemp(prefix="coformer-bench-"), "testbed.json")
        log(f"testbed: bringing up {', '.join(d.name for d in devs)} (state {state})")
        try:
            # up at the fastest rate: sub-model weights (tens of MB) are deployed before the links are reshaped
            bed = tb.up(devs, [max(rates)], prefix="cb", state_file=state, subnet=214, cores=cores)
        except (tb.TestbedError, ValueError) as exc:
            raise click.ClickException(f"testbed: {exc}") from exc
        clients = []
        try:
            clients = [coformer.open_transport(u) for u in bed.uris]
            return body(clients, lambda r: reshape_links(bed, r),
                        _process_peak_rss({w.device: w.pid for w in bed.workers}))
        finally:
            for c in clients:
                c.close()
            tb.down(state)

    def main_body(clients: list[Any], shaper: Any, rss: Any) -> dict[str, Any]:
        setup = BenchSetup(backbone, teacher, plan, devices, clients, test, shape_links=shaper,
                           process_memory=rss, compressed=compressed, teacher_info=teacher_info)
        return run_bench(setup, cfg, accuracy_limit=accuracy_limit, log=log)

    doc = with_workers(devices, main_body)
    if extra_plans:
        dc_rate = device_count_rate or max(rates)
        sample = make_sample(test, max(requests, warmup, 1), batch_size)
        rows = []
        for p in [plan, *extra_plans]:
            devs = Policy.from_dict(p.meta["policy"]).devices
            if not testbed and len(devs) > len(uris):
                raise click.UsageError(f"a {len(devs)}-device plan needs {len(devs)} workers; {len(uris)} given")
            acc = (p.figures.get("coformer") or {}).get("accuracy")

            def dc_body(clients: list[Any], shaper: Any, _rss: Any, p: Any = p, devs: Any = devs,
                        acc: Any = acc) -> dict[str, Any]:
                if shaper is not None:
                    shaper(dc_rate)
                return device_count_run(p, clients, devs, sample, dc_rate, cfg, shaped=shaper is not None,
                                        accuracy=acc)

            log(f"device count: {len(devs)} device(s) at {dc_rate:g} Mbit/s")
            rows.append(with_workers(devs, dc_body))
        doc["device_count"] = sorted(rows, key=lambda r: len(r["devices"]))
    doc["command"] = {"plan": str(plan_dir), "data": data.name, "testbed": testbed, "workers": uris, "link_mbps": rates,
                      "requests": requests, "warmup": warmup, "batch_size": batch_size}
    paths = write_outputs(doc, out_dir)
    console.print(paths["table"].read_text())
    for k, p in paths.items():
        console.print(f"{k}: {p}")
