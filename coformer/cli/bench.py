"""``coformer bench``: teacher, CoFormer, compressed, pipeline and tensor-parallel over the same workers, per link rate.

The work is done by :mod:`coformer.experiments.bench_stage`; this command parses options and prints.
"""

from __future__ import annotations

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


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


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
              link_mbps: str, requests: int, warmup: int, batch_size: int, max_seconds: float,
              accuracy_limit: int | None, recompute_accuracy: bool, device_plans: str | None,
              device_count_rate: float | None, cores: float, state_file: str | None, out_dir: str) -> None:
    """Teacher alone, CoFormer, compressed, pipeline and tensor-parallel: latency, bytes, memory, energy, accuracy.

    The plan's ``compressed/`` directory (written by ``coformer demo``) is the single-model alternative.
    """
    from coformer.experiments.bench_stage import BenchError, BenchSettings, run_bench_stage

    settings = BenchSettings(plan=plan_dir, testbed=testbed, workers=_names(workers), teacher=teacher_dir,
                             data=data_uri, link_mbps=tuple(_floats(link_mbps, "--link-mbps")), requests=requests,
                             warmup=warmup, batch_size=batch_size, max_seconds=max_seconds,
                             accuracy_limit=accuracy_limit, device_plans=_names(device_plans),
                             device_count_rate=device_count_rate, cores=cores, state_file=state_file)
    try:
        paths = run_bench_stage(settings, out_dir, log=console.print)
    except BenchError as exc:
        raise click.ClickException(str(exc)) from exc
    console.print(paths["table"].read_text())
    for k, p in paths.items():
        console.print(f"{k}: {p}")
