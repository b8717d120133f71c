"""The bench stage (``coformer bench``): a packaged plan's methods over real workers, per link rate.

Teacher alone, CoFormer, compressed (the plan's ``compressed/`` directory), pipeline and
tensor-parallel run over the same workers — given by URI, or brought up as the emulated testbed
(root) — at each link rate; :func:`coformer.experiments.bench.run_bench` measures, this module
resolves the plan, teacher, data and workers around it.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from coformer import open_transport, registry
from coformer.artifacts import Plan, load_plan
from coformer.backbone import Backbone
from coformer.experiments import testbed as tb
from coformer.experiments.bench import BenchConfig, BenchSetup, device_count_run, make_sample, run_bench
from coformer.experiments.bench_report import write_outputs
from coformer.offline.data_choice import choose_dataset
from coformer.offline.pipeline import TeacherMismatchError, check_teacher, encode, find_teacher, teacher_sha256
from coformer.spec import DeviceProfile, Policy

Log = Callable[[str], None]


class BenchError(ValueError):
    """The bench cannot run as asked; the message names the problem and the fix."""


@dataclass(frozen=True)
class BenchSettings:
    """Everything ``coformer bench`` takes; a recipe's ``[bench]`` sets the same fields."""

    plan: str
    testbed: bool = False
    workers: tuple[str, ...] = ()
    teacher: str | None = None
    data: str | None = None
    link_mbps: tuple[float, ...] = (2.0, 100.0, 500.0, 1000.0)
    requests: int = 20
    warmup: int = 3
    batch_size: int = 1
    max_seconds: float = 120.0
    accuracy_limit: int | None = None
    device_plans: tuple[str, ...] = ()
    device_count_rate: float | None = None
    cores: float = 1.0
    state_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    def check(self) -> None:
        """Raise :class:`BenchError` for settings that cannot run."""
        if self.testbed == bool(self.workers):
            raise BenchError("give exactly one of --testbed (emulated cluster, root) or --workers URI,...")
        if not self.link_mbps or any(r <= 0 for r in self.link_mbps):
            raise BenchError("link rates must be positive numbers, e.g. 2,100,500,1000")
        if self.requests < 1 or self.warmup < 0 or self.batch_size < 1:
            raise BenchError("requests and batch size must be ≥ 1 and warm-up ≥ 0")


def resolve_teacher(backbone: Backbone, plan: Plan, teacher_dir: str | None, log: Log) -> tuple[Any, dict[str, Any]]:
    """The teacher the plan was calibrated from, and what bench.json records about it.

    ``plan.json`` records the teacher's sha256 and data set. Without ``teacher_dir`` the cached
    teacher with that hash is used; ``teacher_dir`` must have it too. A plan without a record
    (written before teachers were recorded) needs ``teacher_dir`` and is benched unchecked.
    """
    record = plan.meta.get("teacher")
    if record is None:
        if not teacher_dir:
            raise BenchError(f"{plan.path}/plan.json does not record the teacher it was calibrated from "
                             f"(written by an older coformer); re-run `coformer demo` to re-create it, or "
                             f"pass --teacher DIR to bench it with that teacher unchecked")
        log(f"warning: the plan records no teacher; {teacher_dir} is used unchecked")
        return backbone.load(teacher_dir), {"path": teacher_dir, "sha256": teacher_sha256(teacher_dir),
                                            "check": "unchecked: the plan records no teacher"}
    try:
        if teacher_dir:
            check_teacher(record, teacher_dir)
            chosen = Path(teacher_dir)
        else:
            chosen = find_teacher(record)
    except TeacherMismatchError as exc:
        raise BenchError(str(exc)) from exc
    log(f"teacher: {chosen} (sha256 {record['sha256'][:12]}…, the plan's)")
    return backbone.load(chosen), {**record, "path": str(chosen), "check": "sha256 equals the plan's record"}


def process_peak_rss(pids: dict[str, int | None]) -> Callable[[], dict[str, int]]:
    """A reader of each named process's peak resident memory (VmHWM, bytes) from ``/proc``."""
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


def reshape_links(bed: tb.Testbed, rate_mbps: float) -> None:
    """Change every testbed link (both ends) to ``rate_mbps`` by replacing its tbf qdisc."""
    rate = tb.parse_rate(rate_mbps)
    tbf = tb.tbf_qdisc(rate)
    for w in bed.workers:
        for cmd in (["tc", "qdisc", "replace", "dev", w.host_if, "root", *tbf],
                    ["ip", "netns", "exec", w.namespace, "tc", "qdisc", "replace", "dev", w.ns_if, "root", *tbf]):
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise BenchError(f"`{' '.join(cmd)}` failed: {res.stderr.strip()}")
        w.rate = rate


Body = Callable[[list[Any], Callable[[float], None] | None, Callable[[], dict[str, int]] | None], Any]


def _with_workers(s: BenchSettings, devs: Sequence[DeviceProfile], body: Body, log: Log) -> Any:
    """Run ``body(clients, shaper, rss)`` on the given workers, or on a testbed brought up (and down) for it."""
    if not s.testbed:
        clients = [open_transport(u) for u in s.workers[: len(devs)]]
        try:
            return body(clients, None, None)
        finally:
            for c in clients:
                c.close()
    state = s.state_file or os.path.join(tempfile.mkdtemp(prefix="coformer-bench-"), "testbed.json")
    log(f"testbed: bringing up {', '.join(d.name for d in devs)} (state {state})")
    try:
        # up at the fastest rate: sub-model weights (tens of MB) are deployed before the links are reshaped
        bed = tb.up(list(devs), [max(s.link_mbps)], prefix="cb", state_file=state, subnet=214, cores=s.cores)
    except (tb.TestbedError, ValueError) as exc:
        raise BenchError(f"testbed: {exc}") from exc
    clients = []
    try:
        clients = [open_transport(u) for u in bed.uris]
        return body(clients, lambda r: reshape_links(bed, r), process_peak_rss({w.device: w.pid for w in bed.workers}))
    finally:
        for c in clients:
            c.close()
        tb.down(state)


def _device_count_rows(s: BenchSettings, plans: Sequence[Plan], test: Any, cfg: BenchConfig, log: Log) -> list[Any]:
    """The device-count table: each plan timed alone at one rate (the largest, unless set)."""
    rate = s.device_count_rate or max(s.link_mbps)
    sample = make_sample(test, max(s.requests, s.warmup, 1), s.batch_size)
    rows = []
    for p in plans:
        devs = Policy.from_dict(p.meta["policy"]).devices
        if not s.testbed and len(devs) > len(s.workers):
            raise BenchError(f"a {len(devs)}-device plan needs {len(devs)} workers; {len(s.workers)} given")
        acc = (p.figures.get("coformer") or {}).get("accuracy")

        def body(clients: list[Any], shaper: Any, _rss: Any, p: Plan = p, devs: Any = devs, acc: Any = acc) -> Any:
            if shaper is not None:
                shaper(rate)
            return device_count_run(p, clients, devs, sample, rate, cfg, shaped=shaper is not None, accuracy=acc)

        log(f"device count: {len(devs)} device(s) at {rate:g} Mbit/s")
        rows.append(_with_workers(s, devs, body, log))
    return sorted(rows, key=lambda r: len(r["devices"]))


def run_bench_stage(settings: BenchSettings, out_dir: str | Path, *, log: Log = print) -> dict[str, Path]:
    """Bench the plan as ``settings`` say; writes bench.json, the markdown table and plots to ``out_dir``."""
    s = settings
    s.check()
    plan = load_plan(s.plan)
    extra_plans = [load_plan(p) for p in s.device_plans]
    compressed = load_plan(Path(s.plan) / "compressed") if (Path(s.plan) / "compressed").is_dir() else None
    if "policy" not in plan.meta:
        raise BenchError(f"{s.plan}/plan.json has no 'policy': the bench needs the plan's devices")
    devices = Policy.from_dict(plan.meta["policy"]).devices
    if s.workers and len(s.workers) != len(devices):
        raise BenchError(f"the plan has {len(devices)} devices ({', '.join(d.name for d in devices)}) but "
                         f"{len(s.workers)} workers were given; pass one URI per sub-model, in order")
    name = plan.meta.get("backbone") or plan.artifacts[0].config["backbone"]
    backbone: Backbone = registry.create("backbone", name if isinstance(name, str) else name["name"])
    teacher, teacher_info = resolve_teacher(backbone, plan, s.teacher, log)
    data = choose_dataset(s.data or plan.meta.get("dataset"), backbone.modality)
    test = encode(backbone, teacher, data.test)
    cfg = BenchConfig(rates_mbps=list(s.link_mbps), requests=s.requests, warmup=s.warmup, batch_size=s.batch_size,
                      max_seconds_per_method=s.max_seconds)

    def main_body(clients: list[Any], shaper: Any, rss: Any) -> dict[str, Any]:
        setup = BenchSetup(backbone, teacher, plan, devices, clients, test, shape_links=shaper,
                           process_memory=rss, compressed=compressed, teacher_info=teacher_info)
        return run_bench(setup, cfg, accuracy_limit=s.accuracy_limit, log=log)

    doc = _with_workers(s, devices, main_body, log)
    if extra_plans:
        doc["device_count"] = _device_count_rows(s, [plan, *extra_plans], test, cfg, log)
    doc["command"] = {"plan": str(s.plan), "data": data.name, "testbed": s.testbed, "workers": list(s.workers),
                      "link_mbps": list(s.link_mbps), "requests": s.requests, "warmup": s.warmup,
                      "batch_size": s.batch_size}
    return write_outputs(doc, out_dir)
