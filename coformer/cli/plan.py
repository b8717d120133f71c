"""``coformer profile`` and ``coformer plan``: measure devices, then search a decomposition policy.

The work is done by :mod:`coformer.offline.profile_stage` and :mod:`coformer.offline.plan_stage`;
these commands parse options and print.
"""

from __future__ import annotations

from typing import Any

import click

from coformer import defaults
from coformer.cli.app import DATA_HELP, cli, console


@cli.command("profile")
@click.option("--backbone", "backbone_name", default=defaults.BACKBONE, show_default=True)
@click.option("--source", default=None, help="Teacher directory (default: the embedded model; 'tiny' for a test model).")
@click.option("--device-name", required=True, help="Name this profile (and its predictor) is stored under.")
@click.option("--cpu-quota", type=float, default=None, help="Measure in a cgroup limited to this many cores (root).")
@click.option("--worker", "worker_uri", default=None, help="Measure on a remote worker, by the URI `coformer worker` printed.")
@click.option("--threads", type=int, default=None, help="Torch threads for a local measurement.")
@click.option("--shapes", type=int, default=50, show_default=True, help="How many sub-model shapes.")
@click.option("--repeats", type=int, default=5, show_default=True)
@click.option("--warmup", type=int, default=2, show_default=True)
@click.option("--statistic", type=click.Choice(defaults.TIMING_STATISTICS), default=defaults.TIMING_STATISTICS[0],
              show_default=True, help="How the repeats are summarised; `mean` for a device under a CPU quota.")
@click.option("--train/--no-train", default=True, show_default=True,
              help="Also train the latency predictor and report held-out error.")
@click.option("--max-length", type=int, default=64, show_default=True,
              help="Tokens per text input (the demo, plan and bench use 64).")
@click.option("--data", "data_uri", default=None, help=DATA_HELP + " Its first validation example is the "
              "reference input.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Profile file (.json; a .csv is written too).")
def profile_cmd(backbone_name: str, source: str | None, device_name: str, cpu_quota: float | None,
                worker_uri: str | None, threads: int | None, shapes: int, repeats: int, warmup: int, statistic: str,
                train: bool, max_length: int, data_uri: str | None, seed: int, out: str) -> None:
    """Measure the latency of a pool of sub-model shapes on one device; optionally train its predictor."""
    from coformer.offline.profile_stage import ProfileSettings, run_profile

    if cpu_quota is not None and worker_uri is not None:
        raise click.UsageError("--cpu-quota and --worker are exclusive: a quota applies to this host only")
    settings = ProfileSettings(device_name=device_name, backbone=backbone_name, source=source, cpu_quota=cpu_quota,
                               worker=worker_uri, threads=threads, shapes=shapes, repeats=repeats, warmup=warmup,
                               statistic=statistic, train=train, max_length=max_length, data=data_uri, seed=seed)
    done = run_profile(settings, out, progress=True)
    console.print(f"profile of {len(done.profile.records)} shapes on {device_name!r}: {done.profile_json} and "
                  f"{done.profile_csv}")
    if done.report is not None:
        p, b = done.report["predictor"], done.report["flops_baseline"]
        console.print(f"predictor {done.predictor}: held-out ({done.report['held_out_shapes']} shapes) RMSE "
                      f"{p['rmse_ms']:.3f} ms, MAPE {p['mape_pct']:.1f}%; FLOPs-proportional baseline RMSE "
                      f"{b['rmse_ms']:.3f} ms, MAPE {b['mape_pct']:.1f}%")


@cli.command("plan")
@click.option("--backbone", "backbone_name", default=defaults.BACKBONE, show_default=True)
@click.option("--source", default=None, help="Teacher directory (default: the embedded model).")
@click.option("--teacher", "teacher_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="A teacher saved with its task head (Backbone.save); otherwise a linear head is fitted.")
@click.option("--devices", default=",".join(defaults.DEVICES), show_default=True,
              help="Built-in device names, comma-separated, or a .toml/.json file of device profiles.")
@click.option("--predictors", "predictor_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Directory of latency predictors (by device name); others use FLOPs / GFLOPS estimates.")
@click.option("--link-mbps", type=float, default=None, help="Link rate for every device (default: each device's).")
@click.option("--delta", type=float, default=0.5, show_default=True, help="δ in Ψ = L_val + δ·T (T in ms).")
@click.option("--trials", type=int, default=30, show_default=True, help="Evaluated (feasible) policies.")
@click.option("--strategy", default=defaults.SEARCH_STRATEGY, show_default=True)
@click.option("--data", "data_uri", default=None, help=DATA_HELP + " Its validation split is L_val's task.")
@click.option("--val-docs", type=int, default=64, show_default=True)
@click.option("--train-docs", type=int, default=160, show_default=True,
              help="Training docs the probe proxy (and the fitted linear head) is fitted on.")
@click.option("--proxy", type=click.Choice(["probe", "uncalibrated"]), default="probe", show_default=True,
              help="L_val: linear probe on the sub-models' features, or the seed's uncalibrated-slice CE.")
@click.option("--topology", default="coordinator", show_default=True,
              help="'coordinator' (a separate node aggregates, as the runtime and bench run) or 'device:INDEX'.")
@click.option("--max-length", type=int, default=64, show_default=True,
              help="Tokens per text (the demo and bench use 64).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False))
def plan_cmd(backbone_name: str, source: str | None, teacher_dir: str | None, devices: str,
             predictor_dir: str | None, link_mbps: float | None, delta: float, trials: int, strategy: str,
             data_uri: str | None, val_docs: int, train_docs: int, proxy: str, topology: str, max_length: int, seed: int,
             out: str) -> None:
    """Search a decomposition policy minimising Ψ; writes OUT/plan.json and OUT/convergence.png."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from coformer.offline.plan_stage import PlanSettings, parse_topology, run_plan
    from coformer.offline.search import TrialRecord

    try:
        parse_topology(topology)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--topology") from None
    settings = PlanSettings(backbone=backbone_name, source=source, teacher=teacher_dir, devices=devices,
                            predictors=predictor_dir, link_mbps=link_mbps, delta=delta, trials=trials,
                            strategy=strategy, data=data_uri, val_docs=val_docs, train_docs=train_docs, proxy=proxy,
                            topology=topology, max_length=max_length, seed=seed)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("best Ψ {task.fields[best]}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(f"plan ({strategy})", total=trials, best="-")
        best = [float("inf")]

        def on_trial(rec: TrialRecord) -> None:
            if rec.feasible and rec.psi is not None:
                best[0] = min(best[0], rec.psi)
                bar.update(task, advance=1, best=f"{best[0]:.4f}")

        doc = run_plan(settings, out, on_trial=on_trial)
    render_plan(doc, out)


def render_plan(doc: dict[str, Any], out: str) -> None:
    """Print a searched plan's Ψ and its per-device terms."""
    comp = doc["predicted"]
    console.print(f"best Ψ {comp['psi']:.4f} = L_val {comp['L_val']:.4f} + {doc['delta']}·T {comp['T_ms']:.3f} ms "
                  f"after {doc['model_evaluations']} evaluations ({len(doc['trials'])} proposals)")
    for d in comp["devices"]:
        console.print(f"  [{d['index']}] {d['name']}: t0 {d.get('t0_ms', 0.0):.3f} ms, t1 {d['t1_ms']:.3f} ms "
                      f"({d['t1_source']}), t2 {d['t2_ms']:.4f} ms, L_val {d['L_val']:.4f}, {d['gflops']:.3f} GFLOPs")
    console.print(f"wrote {out}/plan.json and {out}/convergence.png")
