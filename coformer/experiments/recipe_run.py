"""``coformer run``: every stage of a recipe, skipping a stage whose inputs have not changed.

Each stage writes its outputs under ``<out>/<stage>/`` and, last, ``stage.json`` with the
sha256 of its inputs: its settings, the key of the stage before it, and the content of the
files it reads (the data set's file, a local checkpoint, a devices file). A stage whose
``stage.json`` holds the same key is skipped; an interrupted stage has none, so it re-runs.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

from coformer.dataset_uri import parse_dataset_uri
from coformer.experiments.bench_stage import BenchSettings, run_bench_stage
from coformer.experiments.recipe import Recipe
from coformer.offline.calibrate import run_calibrate
from coformer.offline.data_choice import choose_dataset
from coformer.offline.plan_stage import PlanSettings, run_plan
from coformer.offline.profile_stage import ProfileSettings, run_profile

STAGE_RECORD = "stage.json"
Log = Callable[[str], None]


@dataclass
class StageOutcome:
    """One stage of a run: its output directory, whether it ran or was skipped, and how long it took."""

    stage: str
    out: Path
    key: str
    ran: bool
    seconds: float = 0.0


def fingerprint(path: str | Path | None) -> str | None:
    """A content fingerprint of a file (sha256) or a directory (names, sizes and modification times)."""
    if not path or not Path(path).exists():
        return None
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        with p.open("rb") as stream:
            while block := stream.read(1 << 20):
                h.update(block)
        return h.hexdigest()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _data_location(uri: str | None) -> str | None:
    return parse_dataset_uri(uri)[1] if uri else None


def stage_key(stage: str, settings: dict[str, Any], upstream: str | None, files: dict[str, str | None]) -> str:
    """The sha256 of everything a stage's outputs depend on."""
    doc = {"stage": stage, "settings": settings, "upstream": upstream, "files": files,
           "coformer": version("coformer")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _is_done(out: Path, key: str) -> bool:
    record = out / STAGE_RECORD
    try:
        return json.loads(record.read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def _record(out: Path, stage: str, key: str, settings: dict[str, Any], seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / STAGE_RECORD).write_text(json.dumps({"stage": stage, "key": key, "settings": settings,
                                                "seconds": round(seconds, 1),
                                                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                               indent=2, default=str))


class RecipeRun:
    """Runs a recipe's stages in order (profile → plan → calibrate → bench), each at most once per input."""

    def __init__(self, recipe: Recipe, *, force: bool = False, log: Log = print):
        self.recipe, self.force, self.log = recipe, force, log
        self.outcomes: list[StageOutcome] = []
        r = recipe
        self.files = {"source": fingerprint(r.model["source"]), "data": fingerprint(_data_location(r.data["uri"])),
                      "devices": fingerprint(r.devices["file"])}

    def _stage(self, stage: str, settings: dict[str, Any], upstream: str | None, work: Callable[[Path], None]) -> str:
        out = self.recipe.out / stage
        key = stage_key(stage, settings, upstream, self.files)
        if not self.force and _is_done(out, key):
            self.log(f"{stage}: inputs unchanged, skipped ({out})")
            self.outcomes.append(StageOutcome(stage, out, key, ran=False))
            return key
        self.log(f"{stage}: running → {out}")
        (out / STAGE_RECORD).unlink(missing_ok=True)
        started = time.perf_counter()
        work(out)
        seconds = time.perf_counter() - started
        _record(out, stage, key, settings, seconds)
        self.log(f"{stage}: done in {seconds:.0f} s")
        self.outcomes.append(StageOutcome(stage, out, key, ran=True, seconds=seconds))
        return key

    def profile(self, upstream: str | None) -> str:
        """Profile every device and train its predictor (``<out>/profile/<device>.json``)."""
        r, p = self.recipe, self.recipe.profile or {}
        settings = {"model": r.model, "data": r.data["uri"], "devices": r.device_spec, **p}

        def work(out: Path) -> None:
            for name in r.device_names:
                done = run_profile(ProfileSettings(
                    device_name=name, backbone=r.model["backbone"], source=r.model["source"],
                    cpu_quota=p["cpu_quota"].get(name), worker=p["workers"].get(name), threads=p["threads"],
                    shapes=p["shapes"], repeats=p["repeats"], warmup=p["warmup"], statistic=p["statistic"],
                    max_length=r.model["max_length"], data=r.data["uri"], seed=p["seed"]), out / name)
                mape = (done.report or {}).get("predictor", {}).get("mape_pct")
                self.log(f"  {name}: {len(done.profile.records)} shapes, predictor held-out MAPE {mape:.1f}%")

        return self._stage("profile", settings, upstream, work)

    def plan(self, upstream: str | None) -> str:
        """Search the policy (``<out>/search/plan.json``), with the profiled predictors when profiled."""
        r, s = self.recipe, self.recipe.search or {}
        predictors = str(r.out / "profile") if r.profile is not None else None
        settings = PlanSettings(backbone=r.model["backbone"], source=r.model["source"], devices=r.device_spec,
                                predictors=predictors, link_mbps=r.devices["link_mbps"], delta=s["delta"],
                                trials=s["trials"], strategy=s["strategy"], data=r.data["uri"],
                                val_docs=s["val_docs"], train_docs=s["train_docs"], proxy=s["proxy"],
                                topology=s["topology"], max_length=r.model["max_length"], seed=s["seed"])

        def work(out: Path) -> None:
            doc = run_plan(settings, out)
            self.log(f"  best Ψ {doc['predicted']['psi']:.4f} after {doc['model_evaluations']} evaluations")

        return self._stage("search", settings.to_dict(), upstream, work)

    def calibrate(self, upstream: str | None) -> str:
        """Calibrate and package the policy (``<out>/calibrate/``: a deployable plan directory)."""
        r, c = self.recipe, self.recipe.calibrate
        plan_dir = r.out / "search" if r.search is not None else None
        settings = {"model": r.model, "data": r.data["uri"], "devices": r.device_spec, **c,
                    "plan": str(plan_dir) if plan_dir else None}

        def work(out: Path) -> None:
            data = choose_dataset(r.data["uri"], _modality(r.model["backbone"]))
            run_calibrate(data=data, out=out, backbone_name=r.model["backbone"], plan=plan_dir,
                          source=r.model["source"], devices=r.device_spec, aggregator_name=c["aggregator"],
                          booster_overrides=c["booster"], max_length=r.model["max_length"],
                          img_size=r.model["img_size"], layers=c["layers"], seed=c["seed"],
                          compressed=c["compressed"])
            figures = json.loads((out / "plan.json").read_text())["figures"]
            self.log(f"  CoFormer validation accuracy {figures['coformer']['val_accuracy']:.2f}% "
                     f"(teacher {figures['teacher']['val_accuracy']:.2f}%)")

        return self._stage("calibrate", settings, upstream, work)

    def bench(self, upstream: str | None) -> str:
        """Bench the packaged plan (``<out>/bench/``: bench.json, the table and plots)."""
        r, b = self.recipe, self.recipe.bench or {}
        settings = BenchSettings(plan=str(r.out / "calibrate"), testbed=bool(b["testbed"]),
                                 workers=tuple(b["workers"]), data=r.data["uri"],
                                 link_mbps=tuple(float(x) for x in b["link_mbps"]), requests=b["requests"],
                                 warmup=b["warmup"], batch_size=b["batch_size"], max_seconds=b["max_seconds"],
                                 accuracy_limit=b["accuracy_limit"], cores=b["cores"])

        def work(out: Path) -> None:
            paths = run_bench_stage(settings, out, log=self.log)
            self.log(f"  bench table: {paths['table']}")

        return self._stage("bench", settings.to_dict(), upstream, work)

    def run(self) -> list[StageOutcome]:
        """Every stage the recipe has, in order; returns what ran and what was skipped."""
        steps = {"profile": self.profile, "search": self.plan, "calibrate": self.calibrate, "bench": self.bench}
        key: str | None = None
        for stage in self.recipe.stages:
            key = steps[stage](key)
        return self.outcomes


def _modality(backbone_name: str) -> str:
    from coformer import registry

    return str(registry.create("backbone", backbone_name).modality)
