"""Device profiling: measured latency of a pool of sub-model shapes, the predictor's training data.

Each shape is built for real by slicing the teacher with a first-k :class:`UnitSelection` of
that size (latency depends on sizes, not on which units are kept), then timed at batch 1:
warm-up runs, then the median of ``repeats`` runs. Three places to measure:

* this host (``threads`` torch threads);
* this host under a CPU quota: a child process placed in a cgroup v1 ``cpu`` controller
  (``/sys/fs/cgroup/cpu``, ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``) with torch threads
  matched to the quota (needs root);
* a remote worker through any transport (``coformer.open_transport(uri)``): the sub-model is
  shipped as an artifact and the compute time the worker reports is used.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, cast

import torch
from torch import nn

from coformer import defaults
from coformer.backbone import Backbone, Batch, SubModel
from coformer.cpu_quota import CGROUP_CPU_ROOT, cfs_limit
from coformer.data import RawDataset
from coformer.spec import ModelShape, SubModelSpec, UnitSelection


@dataclass
class ProfileRecord:
    """One profiled shape: its spec, measured FLOPs and median latency (ms) on one device."""

    spec: SubModelSpec
    flops: float
    latency_ms: float
    device: str
    samples_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (predictor inputs flattened alongside the full spec)."""
        return {"device": self.device, "layers": self.spec.layers, "embed_dim": self.spec.embed_dim,
                "mean_heads": self.spec.mean_heads, "mean_mlp": self.spec.mean_mlp, "flops": self.flops,
                "latency_ms": self.latency_ms, "spec": self.spec.to_dict(), "samples_ms": self.samples_ms}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProfileRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(SubModelSpec.from_dict(data["spec"]), float(data["flops"]), float(data["latency_ms"]),
                   data["device"], list(data.get("samples_ms", [])))


@dataclass
class Profile:
    """A device's latency dataset plus how it was measured."""

    device: str
    backbone: str
    records: list[ProfileRecord]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"kind": "coformer-profile", "device": self.device, "backbone": self.backbone,
                "meta": self.meta, "records": [r.to_dict() for r in self.records]}

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``<stem>.json`` and ``<stem>.csv``; returns both paths."""
        p = Path(path)
        base = p.with_suffix("") if p.suffix in {".json", ".csv"} else p
        base.parent.mkdir(parents=True, exist_ok=True)
        js, cs = Path(f"{base}.json"), Path(f"{base}.csv")
        js.write_text(json.dumps(self.to_dict(), indent=2))
        cols = ["device", "layers", "embed_dim", "mean_heads", "mean_mlp", "flops", "latency_ms"]
        with cs.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in self.records:
                d = r.to_dict()
                w.writerow([d[c] for c in cols])
        return js, cs

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile written by :meth:`save` (the ``.json`` file or its stem)."""
        p = Path(path)
        p = p if p.suffix == ".json" else Path(f"{p.with_suffix('') if p.suffix == '.csv' else p}.json")
        if not p.exists():
            raise FileNotFoundError(f"{p} not found; create it with `coformer profile ... --out {p}`")
        data = json.loads(p.read_text())
        if data.get("kind") != "coformer-profile":
            raise ValueError(f"{p} is not a CoFormer profile (kind={data.get('kind')!r})")
        return cls(data["device"], data["backbone"], [ProfileRecord.from_dict(r) for r in data["records"]],
                   data.get("meta", {}))


def first_k_selection(shape: ModelShape, spec: SubModelSpec) -> UnitSelection:
    """The selection keeping the first units of each kind so that it has the sizes of ``spec``."""
    if spec.layers > shape.layers or spec.embed_dim > shape.embed_dim:
        raise ValueError(f"spec {spec.to_dict()} does not fit the teacher shape {shape.to_dict()}")
    for k in range(spec.layers):
        if spec.heads[k] > shape.heads[k] or spec.mlp[k] > shape.mlp[k]:
            raise ValueError(f"spec layer {k}: {spec.heads[k]} heads / {spec.mlp[k]} MLP neurons exceed the "
                             f"teacher's {shape.heads[k]} / {shape.mlp[k]}")
    return UnitSelection(tuple(range(spec.layers)), tuple(range(spec.embed_dim)),
                         tuple(tuple(range(h)) for h in spec.heads), tuple(tuple(range(m)) for m in spec.mlp))


def sample_shapes(shape: ModelShape, n: int, seed: int = 0, *, include_full: bool = True) -> list[SubModelSpec]:
    """``n`` distinct random sub-model shapes of ``shape`` (uniform per layer), the full shape first.

    Embedding widths are multiples of 8 (or of the head size when it is smaller), heads come in
    whole key/value groups.
    """
    rng = random.Random(seed)
    g = shape.head_group
    step = min(8, shape.embed_dim)
    out: list[SubModelSpec] = [shape.full_spec()] if include_full else []
    seen = {s for s in out}
    tries = 0
    while len(out) < n and tries < 100 * n:
        tries += 1
        layers = rng.randint(1, shape.layers)
        d = rng.randint(1, shape.embed_dim // step) * step
        h = rng.randint(1, min(shape.heads[:layers]) // g) * g
        m = rng.randint(1, min(shape.mlp[:layers]))
        s = SubModelSpec.uniform(layers, d, h, m)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out[:n]


def time_call(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5) -> list[float]:
    """Wall-clock times (ms) of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1000)
    return out


def summarise(samples: Sequence[float], statistic: str = "median") -> float:
    """The median, mean or minimum of timing samples.

    ``mean`` is the expected latency where samples are bimodal: under a CPU quota a small request
    either finishes within the current scheduler tick or is throttled to the next period, and
    the median of a few samples flips between the two.
    """
    if statistic == "median":
        return statistics.median(samples)
    if statistic == "mean":
        return statistics.fmean(samples)
    if statistic == "min":
        return min(samples)
    raise ValueError(f"unknown timing statistic {statistic!r}; use one of {', '.join(defaults.TIMING_STATISTICS)}")


def _progress(total: int, description: str, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), disable=not enabled, transient=False)
    return progress, description


def _submodule(backbone: Backbone, teacher: nn.Module, spec: SubModelSpec) -> SubModel:
    sub = backbone.slice(teacher, first_k_selection(backbone.shape(teacher), spec))
    sub.eval()
    return sub


def profile_local(backbone: Backbone, teacher: nn.Module, specs: Sequence[SubModelSpec], *, device: str,
                  threads: int | None = None, warmup: int = 2, repeats: int = 5,
                  batch: Batch | None = None, progress: bool = False, statistic: str = "median") -> Profile:
    """Time each spec in this process (``threads`` torch threads; current setting when ``None``).

    ``statistic`` summarises the repeats (:func:`summarise`): ``"median"`` (default), ``"mean"``
    or ``"min"`` (robust on a machine shared with other work, where bursts of contention inflate
    even the median).
    """
    from coformer.measure import count_flops

    if threads:
        torch.set_num_threads(threads)
    batch = batch if batch is not None else backbone.example_batch(teacher, batch_size=1)
    records = []
    bar, desc = _progress(len(specs), f"profiling {device}", progress)
    with bar:
        task = bar.add_task(desc, total=len(specs))
        for spec in specs:
            sub = _submodule(backbone, teacher, spec)
            flops = float(count_flops(lambda: sub(**batch)))
            samples = time_call(lambda: sub(**batch), warmup=warmup, repeats=repeats)
            records.append(ProfileRecord(spec, flops, summarise(samples, statistic), device, samples))
            bar.advance(task)
    meta = {"where": "local", "threads": torch.get_num_threads(), "warmup": warmup, "repeats": repeats,
            "statistic": statistic,
            "batch_size": 1, "input_shapes": {k: list(v.shape) for k, v in batch.items()}}
    return Profile(device, backbone.name, records, meta)


def profile_remote(backbone: Backbone, teacher: nn.Module, specs: Sequence[SubModelSpec], uri: str, *,
                   device: str, warmup: int = 2, repeats: int = 5, batch: Batch | None = None,
                   progress: bool = False, statistic: str = "median") -> Profile:
    """Time each spec on the worker at ``uri``, using the compute time the worker reports.

    The rest of each round trip (serialisation and the RPC stack at both ends) is the runtime's
    fixed cost per call; its median over every call is ``meta["call_overhead_ms"]``, which the
    device's predictor carries into the plan's latency model (t0).
    """
    import coformer
    from coformer.artifacts import submodel_artifact
    from coformer.measure import count_flops

    client = coformer.open_transport(uri)
    batch = batch if batch is not None else backbone.example_batch(teacher, batch_size=1)
    records = []
    overhead_ms: list[float] = []  # round trip - the compute the worker reports: serialisation + RPC
    bar, desc = _progress(len(specs), f"profiling {device} via {uri}", progress)
    try:
        with bar:
            task = bar.add_task(desc, total=len(specs))
            for spec in specs:
                sub = _submodule(backbone, teacher, spec)
                flops = float(count_flops(lambda: sub(**batch)))
                art = submodel_artifact(sub)
                client.load(art)
                for _ in range(warmup):
                    client.infer(art.sha256, batch)
                samples = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    compute_ms = client.infer(art.sha256, batch).compute_ms
                    overhead_ms.append((time.perf_counter() - start) * 1000 - compute_ms)
                    samples.append(compute_ms)
                records.append(ProfileRecord(spec, flops, summarise(samples, statistic), device, samples))
                bar.advance(task)
    finally:
        client.close()
    meta = {"where": "remote", "uri": uri, "warmup": warmup, "repeats": repeats, "batch_size": 1,
            "statistic": statistic, "call_overhead_ms": statistics.median(overhead_ms),
            "input_shapes": {k: list(v.shape) for k, v in batch.items()}}
    return Profile(device, backbone.name, records, meta)


class CgroupUnavailableError(PermissionError):
    """A CPU quota needs root and the cgroup v1 ``cpu`` controller; the message says what is missing."""


def _check_cgroup() -> None:
    if os.geteuid() != 0:
        raise CgroupUnavailableError(
            "--cpu-quota places the measurement in a cgroup, which needs root; run as root, or profile "
            "without a quota / on a real device with --worker URI")
    if not (CGROUP_CPU_ROOT / "cpu.cfs_quota_us").exists():
        raise CgroupUnavailableError(
            f"{CGROUP_CPU_ROOT} is not a cgroup v1 cpu controller (no cpu.cfs_quota_us); mount it "
            f"(mount -t cgroup -o cpu,cpuacct none {CGROUP_CPU_ROOT}) or profile without --cpu-quota")


def threads_for_quota(quota: float) -> int:
    """Torch threads matched to a CPU quota in cores (at least one)."""
    return max(1, math.ceil(quota - 1e-9))


def profile_cpu_quota(backbone_name: str, source: str | None, specs: Sequence[SubModelSpec], quota: float, *,
                      device: str, warmup: int = 2, repeats: int = 5, batch: Batch | None = None,
                      progress: bool = False, statistic: str = "median") -> Profile:
    """Time each spec in a child process limited to ``quota`` CPU cores by a cgroup v1 ``cpu`` group.

    The child loads the teacher itself (from ``source``, or the embedded default), joins the
    cgroup before doing any work, and sets torch threads to ``ceil(quota)``. ``batch`` (handed
    over as a safetensors file) is the input timed; the backbone's example batch by default.
    """
    if quota <= 0:
        raise ValueError(f"--cpu-quota must be a positive number of cores, got {quota}")
    _check_cgroup()
    quota_us, period_us = cfs_limit(quota)
    group = CGROUP_CPU_ROOT / f"coformer-profile-{os.getpid()}-{int(time.time() * 1000)}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text(str(period_us))
        (group / "cpu.cfs_quota_us").write_text(str(quota_us))
        with tempfile.TemporaryDirectory() as tmp:
            job = Path(tmp) / "job.json"
            out = Path(tmp) / "profile.json"
            batch_file = None
            if batch is not None:
                from safetensors.torch import save_file

                batch_file = str(Path(tmp) / "batch.safetensors")
                save_file({k: v.contiguous() for k, v in batch.items()}, batch_file)
            job.write_text(json.dumps({
                "batch": batch_file,
                "backbone": backbone_name, "source": source, "specs": [s.to_dict() for s in specs],
                "device": device, "threads": threads_for_quota(quota), "warmup": warmup, "repeats": repeats,
                "statistic": statistic, "cgroup_tasks": str(group / "tasks"), "out": str(out), "progress": progress}))
            proc = subprocess.run([sys.executable, "-m", "coformer.offline.profiler", str(job)])
            if proc.returncode != 0 or not out.exists():
                raise RuntimeError(f"the quota-limited profiling child failed (exit {proc.returncode})")
            profile = Profile.load(out)
    finally:
        # the child has exited, so the group is empty and can be removed
        try:
            group.rmdir()
        except OSError:
            pass
    profile.meta.update({"where": "cgroup", "cpu_quota": quota, "cfs_period_us": period_us,
                         "cfs_quota_us": quota_us})
    return profile


def reference_input(backbone: Backbone, teacher: nn.Module, data: RawDataset | None = None) -> Batch:
    """The batch-1 input latencies and costs are measured on, the same for profiles and plans.

    The first validation example of ``data`` prepared by the teacher (text: its ``max_length``
    tokens, as the demo and the bench send them). Without ``data``: for text backbones the
    modality's default data set's, for others the backbone's example batch.
    """
    if data is None and backbone.modality == "text":
        from coformer.offline.data_choice import choose_dataset

        data = choose_dataset(None, backbone.modality)
    if data is not None:
        return backbone.prepare(teacher, cast(Sequence[Any], data.val.examples[:1]))
    return backbone.example_batch(teacher, batch_size=1)


def load_teacher(backbone: Backbone, source: str | None, **options: Any) -> nn.Module:
    """The teacher for profiling: ``source`` directory, the embedded default, or ``tiny`` (tests).

    ``options`` go to ``backbone.load`` (e.g. ``max_length``, which sets the profiled input size).
    """
    if source == "tiny":
        return backbone.tiny().eval()
    return backbone.load(source, **options).eval()


def _child(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    Path(job["cgroup_tasks"]).write_text(str(os.getpid()))
    import coformer

    backbone = coformer.create_backbone(job["backbone"])
    teacher = load_teacher(backbone, job["source"])
    specs = [SubModelSpec.from_dict(s) for s in job["specs"]]
    batch = None
    if job.get("batch"):
        from safetensors.torch import load_file

        batch = load_file(job["batch"])
    prof = profile_local(backbone, teacher, specs, device=job["device"], threads=job["threads"],
                         warmup=job["warmup"], repeats=job["repeats"], batch=batch, progress=job["progress"],
                         statistic=job["statistic"])
    prof.meta["cgroup"] = str(Path(job["cgroup_tasks"]).parent)
    Path(job["out"]).write_text(json.dumps(prof.to_dict()))


if __name__ == "__main__":  # the quota-limited child of profile_cpu_quota
    _child(sys.argv[1])
