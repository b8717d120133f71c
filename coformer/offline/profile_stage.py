"""The profile stage (``coformer profile``): time a pool of sub-model shapes on one device, then
train its latency predictor and report the predictor's held-out error."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from coformer import defaults, registry
from coformer.backbone import Backbone
from coformer.offline.data_choice import choose_dataset
from coformer.offline.predictor import train_and_score
from coformer.offline.profiler import (
    Profile,
    load_teacher,
    profile_cpu_quota,
    profile_local,
    profile_remote,
    reference_input,
    sample_shapes,
)


@dataclass(frozen=True)
class ProfileSettings:
    """Everything ``coformer profile`` takes; a recipe's ``[profile]`` sets the same fields per device."""

    device_name: str
    backbone: str = defaults.BACKBONE
    source: str | None = None
    cpu_quota: float | None = None
    worker: str | None = None
    threads: int | None = None
    shapes: int = 50
    repeats: int = 5
    warmup: int = 2
    statistic: str = "median"
    train: bool = True
    max_length: int = 64
    data: str | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class ProfileOutcome:
    """What the profile stage wrote: the profile (.json and .csv), and the predictor with its held-out report."""

    profile: Profile
    profile_json: Path
    profile_csv: Path
    predictor: Path | None = None
    report: dict[str, Any] | None = None


def run_profile(settings: ProfileSettings, out: str | Path, *, progress: bool = False) -> ProfileOutcome:
    """Measure ``settings.shapes`` shapes on one device (this host, under a CPU quota, or a remote worker);
    write the profile to ``out`` (.json, and a .csv beside it) and, with ``train``, the predictor beside it."""
    s = settings
    if s.cpu_quota is not None and s.worker is not None:
        raise ValueError("cpu_quota and worker are exclusive: a quota applies to this host only")
    backbone: Backbone = registry.create("backbone", s.backbone)
    teacher = load_teacher(backbone, s.source, **({"max_length": s.max_length} if backbone.modality == "text" else {}))
    specs = sample_shapes(backbone.shape(teacher), s.shapes, s.seed)
    batch = reference_input(backbone, teacher, choose_dataset(s.data, backbone.modality) if s.data else None)
    timing: dict[str, Any] = {"device": s.device_name, "warmup": s.warmup, "repeats": s.repeats, "batch": batch,
                              "progress": progress, "statistic": s.statistic}
    if s.cpu_quota is not None:
        prof = profile_cpu_quota(s.backbone, s.source, specs, s.cpu_quota, **timing)
    elif s.worker is not None:
        prof = profile_remote(backbone, teacher, specs, s.worker, **timing)
    else:
        prof = profile_local(backbone, teacher, specs, threads=s.threads, **timing)
    js, cs = prof.save(out)
    outcome = ProfileOutcome(prof, Path(js), Path(cs))
    if s.train:
        pred, report = train_and_score(prof.records, s.device_name, seed=s.seed)
        pred.call_overhead_ms = float(prof.meta.get("call_overhead_ms", 0.0))
        outcome.predictor = Path(pred.save(Path(js).with_name(f"{s.device_name}-predictor")))
        outcome.report = report
        Path(js).with_name(f"{s.device_name}-predictor-report.json").write_text(json.dumps(
            {"device": s.device_name, "profile": str(js), **report}, indent=2))
    return outcome
