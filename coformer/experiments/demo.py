"""``coformer demo``: the main job end to end on an embedded default model and data set.

Fine-tune the teacher's task head (cached), decompose into one sub-model per device (sized in
proportion to device compute, or from a ``coformer plan`` directory), calibrate by progressive
boosting distillation, train the aggregator, run the test split through an in-process cluster,
and report teacher / each sub-model / CoFormer side by side. The same flow with N = 1 builds
the ``compressed`` alternative (:mod:`coformer.offline.compressed`), packaged in ``<out>/compressed/``.

The plan directory records the teacher it was calibrated from (``plan.json``'s ``teacher``:
sha256 of the saved teacher, data set, path), which ``coformer bench`` checks.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from coformer import defaults, open_transport, registry
from coformer.artifacts import submodel_artifact
from coformer.backbone import Batch
from coformer.offline.booster import BoosterConfig
from coformer.offline.calibrate import (
    DEFAULT_DEVICES,
    Calibrated,
    calibrate_compressed,
    calibrate_policy,
    calibrate_stage,
    package_stage,
    plan_record,
    searched_plan,
    text_or_image_options,
)
from coformer.offline.compressed import COMPRESSED_DIR
from coformer.data import RawDataset
from coformer.offline.data_choice import choose_dataset
from coformer.measure import count_flops, count_params
from coformer.offline.pipeline import Figures, Teacher, accuracy, median_latency_ms, prepare_teacher, teacher_figures
from coformer.online.coordinator import Coordinator
from coformer.spec import Policy

__all__ = ["DEFAULT_DEVICES", "Calibrated", "DemoResult", "DemoUnavailableError", "calibrate_policy",
           "default_dataset", "load_plan_importance", "load_policy", "render", "run_demo"]

#: Tokens kept per text in the demo: BBC articles are long, and 64 tokens (headline and lead)
#: keep the whole run within minutes on two CPU cores.
DEMO_MAX_LENGTH = 64
#: Pixels per side of the image demo's inputs: Fashion-MNIST's 28 px upsampled to 56 (4×4 patches
#: of 14 for the ViT-S/14) instead of timm's 224, 16× fewer tokens to run through on a CPU.
DEMO_IMG_SIZE = 56
#: Stratified train / val / test subset of Fashion-MNIST for the image demo (the full 54k / 6k /
#: 10k through a ViT-S would take hours on two CPU cores).
DEMO_IMAGE_SPLIT = (2000, 200, 1000)


class DemoUnavailableError(RuntimeError):
    """The chosen backbone has no embedded default model; the message says what to pass instead."""


def default_dataset(modality: str, data: str | None = None) -> RawDataset:
    """``data`` (a name or URI), else the demo's data set for a modality: the one its plugin declares the
    default, capped to :data:`DEMO_IMAGE_SPLIT` for images."""
    caps = dict(zip(("train_size", "val_size", "test_size"), DEMO_IMAGE_SPLIT)) if modality == "image" else {}
    return choose_dataset(data, modality, **caps)


def load_policy(plan_dir: str | Path) -> Policy:
    """The policy in a ``coformer plan`` directory's ``plan.json``."""
    return Policy.from_dict(searched_plan(plan_dir)["policy"])


def load_plan_importance(plan_dir: str | Path) -> Any:
    """The unit importance the plan was searched with (``None`` for plans that predate it)."""
    from coformer.offline.importance import plan_importance

    return plan_importance(searched_plan(plan_dir))


@dataclass
class DemoResult:
    """Everything the demo measured, plus where the plan directory went."""

    teacher: Figures
    submodels: list[Figures]
    coformer: Figures
    plan_dir: Path
    seconds: float
    meta: dict[str, Any]
    compressed: Figures | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document: keys ``teacher``, ``submodels``, ``coformer``, ``compressed`` (+ ``meta``)."""
        return {"teacher": self.teacher.to_dict(), "submodels": [s.to_dict() for s in self.submodels],
                "coformer": self.coformer.to_dict(),
                "compressed": self.compressed.to_dict() if self.compressed else None,
                "seconds": round(self.seconds, 1), "meta": self.meta}


def _compressed_figures(cal: Calibrated, teacher: Teacher, repeats: int) -> Figures:
    one = teacher.test.batch([0])
    (m,) = cal.submodels
    with torch.inference_mode():
        acc = accuracy(cal.aggregator(cal.test_features), teacher.test.labels)
        val_acc = accuracy(cal.aggregator(cal.val_features), teacher.val.labels)
    fwd = lambda: cal.aggregator([m(**one)])  # noqa: E731
    return Figures(f"compressed ({cal.policy.devices[0].name})", acc,
                   cal.costs[0].params + count_params(cal.aggregator), float(count_flops(fwd)),
                   median_latency_ms(fwd, repeats=repeats),
                   {"val_accuracy": round(val_acc, 2), "device": cal.policy.devices[0].name,
                    "spec": cal.policy.specs[0].to_dict(), "policy_source": cal.policy.meta.get("source")})


def _submodel_figures(cal: Calibrated, teacher: Teacher, one: Batch, repeats: int) -> list[Figures]:
    """Each calibrated sub-model with its student head: test and validation accuracy, cost, latency."""
    figs = []
    for n, (m, head) in enumerate(zip(cal.submodels, cal.students)):
        with torch.inference_mode():
            acc = accuracy(head(cal.test_features[n]), teacher.test.labels)
            val_acc = accuracy(head(cal.val_features[n]), teacher.val.labels)
        fwd = lambda m=m, head=head: head(m(**one))  # noqa: E731
        device = cal.policy.devices[n].name
        figs.append(Figures(f"sub-model {n} ({device})", acc, cal.costs[n].params, float(count_flops(fwd)),
                            median_latency_ms(fwd, repeats=repeats),
                            {"val_accuracy": round(val_acc, 2), "device": device,
                             "spec": cal.policy.specs[n].to_dict()}))
    return figs


def _coformer_figures(cal: Calibrated, teacher: Teacher, one: Batch, repeats: int,
                      extra: dict[str, Any]) -> Figures:
    """The whole decomposition: accuracy from the aggregator, latency through an in-process cluster."""
    with torch.inference_mode():
        acc = accuracy(cal.aggregator(cal.test_features), teacher.test.labels)
        val_acc = accuracy(cal.aggregator(cal.val_features), teacher.val.labels)
    clients = [open_transport(f"{defaults.LOCAL_TRANSPORT}://demo-{n}") for n in range(len(cal.submodels))]
    coord = Coordinator.deploy(clients, [submodel_artifact(m) for m in cal.submodels], cal.aggregator,
                               names=[d.name for d in cal.policy.devices])
    latency = median_latency_ms(lambda: coord.infer(one), repeats=repeats)
    coord.close()
    agg_flops = float(count_flops(lambda: cal.aggregator([f[:1] for f in cal.test_features])))
    return Figures("CoFormer", acc, sum(c.params for c in cal.costs) + count_params(cal.aggregator),
                   sum(c.flops for c in cal.costs) + agg_flops, latency, {"val_accuracy": round(val_acc, 2), **extra})


class _Stopwatch:
    """Prints each finished stage with the time since the run started."""

    def __init__(self, console: Console, started: float):
        self.console, self.started = console, started

    def __call__(self, message: str) -> None:
        self.console.print(f"[dim]{time.perf_counter() - self.started:6.0f} s[/dim]  {message}")


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def run_demo(
    *,
    backbone_name: str = defaults.BACKBONE,
    source: str | None = None,
    plan: str | Path | None = None,
    devices: Sequence[str] | str = DEFAULT_DEVICES,
    aggregator_name: str = defaults.AGGREGATOR,
    config: BoosterConfig | None = None,
    booster_overrides: dict[str, Any] | None = None,
    out: str | Path = "coformer-demo",
    seed: int = 0,
    dataset: RawDataset | None = None,
    data_uri: str | None = None,
    max_length: int | None = DEMO_MAX_LENGTH,
    img_size: int | None = DEMO_IMG_SIZE,
    layers: int | None = None,
    load_options: dict[str, Any] | None = None,
    latency_repeats: int = 30,
    compressed: bool = True,
    console: Console | None = None,
) -> DemoResult:
    """Run the demo flow and return its figures (see module docstring).

    ``max_length`` (text) and ``img_size`` (images) bound the input size, which sets the run time.
    ``layers`` makes each sub-model of the proportional policy keep only that many of the
    teacher's layers (its most important ones): fewer layers, faster sub-models.
    Calibration uses ``config`` when given, otherwise the backbone's ``calibration_defaults``
    with ``booster_overrides`` on top (:meth:`BoosterConfig.for_backbone`).
    ``compressed`` also builds the single-model alternative (same rule with N = 1, same
    calibration budget) into ``<out>/compressed/`` for ``coformer bench``.
    The data set is ``dataset``, else ``data_uri`` (a name or URI), else the modality's default.

    (About 90 lines, over the layout's 60: this is the demo's script, the stages called in order
    with what each reports; the figures are computed by helpers.)
    """
    if plan is not None and layers is not None:
        raise ValueError("layers applies to the proportional policy; a plan directory already fixes each "
                         "sub-model's layers — pass one or the other")
    console = console or Console()
    started = time.perf_counter()
    torch.manual_seed(seed)
    backbone = registry.create("backbone", backbone_name)
    data = dataset or default_dataset(backbone.modality, data_uri)
    load_options = text_or_image_options(backbone, load_options, max_length=max_length, img_size=img_size)
    config = config or BoosterConfig.for_backbone(backbone, **{"seed": seed, **(booster_overrides or {})})

    with _progress(console) as prog:
        tasks: dict[str, Any] = {}

        def report(desc: str, done: int, total: int) -> None:
            if desc not in tasks:
                tasks[desc] = prog.add_task(desc, total=total)
            prog.update(tasks[desc], completed=done)

        teacher = prepare_teacher(backbone, data, source=source, seed=seed, load_options=load_options,
                                  progress=report)
    stage = _Stopwatch(console, started)
    stage(f"teacher {backbone_name} {'loaded from cache' if teacher.cached else 'fine-tuned'} ({teacher.path})")

    one = teacher.test.batch([0])
    cal = calibrate_stage(backbone, teacher, config=config, plan=plan, devices=devices, layers=layers,
                          aggregator_name=aggregator_name)
    policy = cal.policy
    distil = f", feature distillation β={config.feature_weight:g}" if config.feature_weight else ""
    stage(f"decomposed into {len(cal.submodels)} sub-models ({policy.meta.get('source', 'planned policy')}), "
          f"calibrated ({config.epochs} epoch(s) per sub-model, {config.weight_rule} weight rule{distil}), "
          f"aggregator {aggregator_name} trained")

    t_fig = teacher_figures(backbone, teacher, one, latency_repeats)
    t_fig.extra["val_accuracy"] = round(accuracy(teacher.val_logits, teacher.val.labels), 2)
    sub_figs = _submodel_figures(cal, teacher, one, latency_repeats)
    co_fig = _coformer_figures(cal, teacher, one, latency_repeats,
                               {"aggregator": aggregator_name, "weight_rule": config.weight_rule})

    c_fig = None
    plan_meta = plan_record(backbone_name, source, load_options, data, teacher)
    record = plan_meta["teacher"]
    shutil.rmtree(Path(out) / COMPRESSED_DIR, ignore_errors=True)  # never leave a stale one beside a new plan
    if compressed:
        c_cal = calibrate_compressed(backbone, teacher, cal, config, aggregator_name, layers=layers)
        c_fig = _compressed_figures(c_cal, teacher, latency_repeats)
        package_stage(Path(out) / COMPRESSED_DIR, backbone, teacher, c_cal,
                      {**plan_meta, "figures": {"compressed": c_fig.to_dict()}})
        stage(f"compressed alternative calibrated ({c_cal.policy.meta.get('source')}) for {c_fig.extra['device']}")

    meta = {"backbone": backbone_name, "dataset": data.name, "classes": data.classes, "load_options": load_options,
            "test_size": len(teacher.test.labels), "policy": policy.to_dict(), "seed": seed, "teacher": record,
            "booster": {k: str(v) for k, v in vars(config).items()}}
    figures = {"teacher": t_fig.to_dict(), "submodels": [s.to_dict() for s in sub_figs], "coformer": co_fig.to_dict()}
    if c_fig is not None:
        figures["compressed"] = c_fig.to_dict()
    plan_dir = package_stage(out, backbone, teacher, cal, {**plan_meta, "figures": figures})
    return DemoResult(t_fig, sub_figs, co_fig, plan_dir, time.perf_counter() - started, meta, c_fig)


def render(result: DemoResult, console: Console) -> None:
    """Print the demo's side-by-side table."""
    table = Table(title=f"CoFormer demo — {result.meta['backbone']} on {result.meta['dataset']} "
                        f"(test split, {result.meta['test_size']} samples; choose settings on val.)")
    for col in ("model", "accuracy %", "val. accuracy %", "params (M)", "GFLOPs", "median latency (ms)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    rows = [result.teacher, *result.submodels, result.coformer, *([result.compressed] if result.compressed else [])]
    for fig in rows:
        style = "bold green" if fig is result.coformer else None
        val = fig.extra.get("val_accuracy")
        table.add_row(fig.name, f"{fig.accuracy:.2f}", "-" if val is None else f"{val:.2f}", f"{fig.params / 1e6:.2f}", f"{fig.flops / 1e9:.3f}",
                      f"{fig.latency_ms:.1f}", style=style)
    console.print(table)
    console.print(f"plan directory: {result.plan_dir}   total time: {result.seconds:.0f} s")
    console.print("[dim]Latency is batch 1 on this machine, in-process; CoFormer runs its sub-models "
                  "concurrently on the same cores, so see `coformer bench` for the emulated cluster.[/dim]")
