"""``coformer bench``: teacher, CoFormer, compressed, pipeline and tensor-parallel side by side, per link rate.

Every method runs over the same workers and transport (:mod:`coformer.experiments.baselines`). Per method
and link rate the bench records, over ``requests`` requests of ``batch_size`` test examples
each (1 by default) after ``warmup``:

* end-to-end latency (median, p90) and speed-up vs the teacher;
* a breakdown: compute on the critical path (worker-reported, slowest device per round, plus
  the coordinator's own compute), *modelled* wire time (payload bytes per round over the link
  rate; each device has its own link), and the rest — runtime overhead (serialization, RPC,
  scheduling, queueing in the shaper): overhead = end-to-end − compute − modelled wire;
* the runtime's own cost, *measured* per call: serialisation + RPC = round trip − worker compute
  of the device each round waited for, serialisation as the transport reports it (both ends),
  and its share of end-to-end (on loopback this is the issue's "runtime overhead");
* payload bytes per request (serialized request batches + fp16 responses, every round);
* module memory per device: weights + measured peak activations of one call (coformer.measure),
  and, on the testbed, each worker process's peak RSS (VmHWM) at the end (all methods loaded);
* accuracy: the teacher on the test split; CoFormer and ``compressed`` *measured through the
  deployed runtime* (coordinator + the bench's workers and transport) on the test split, never
  copied from the plan's figures; pipeline and tensor-parallel are exact, so their accuracy is the teacher's — *verified* by
  their agreement with the teacher's predictions on the requests actually sent (a backbone
  without pipeline stages or tensor-parallel shards is benched without that baseline, and the
  document's ``skipped_methods`` says why);
* an ENERGY ESTIMATE: Σ over devices of busy (compute) time × the device profile's power.

Links are either **shaped** (the emulated testbed's ``tc tbf`` qdiscs, reshaped per rate) or
**modelled** (in-process / given workers: the loopback run plus the modelled wire time at that
rate). JSON, a markdown table and PNG plots are written to the output directory.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from coformer.backbone import Backbone, Batch
from coformer.data import TensorDataset
from coformer.experiments.baselines import CoFormerMethod, Method, TeacherAlone, Trace
from coformer.experiments.split_baselines import PipelineSplit, TensorParallelSplit
from coformer.spec import DeviceProfile, strongest_index
from coformer.transport import WorkerClient

METHODS = ("teacher", "coformer", "compressed", "pipeline", "tensor-parallel")
#: examples per request when measuring accuracy through the runtime (latency uses ``batch_size``)
ACCURACY_BATCH = 32


@dataclass
class BenchConfig:
    """How much to measure."""

    rates_mbps: list[float] = field(default_factory=lambda: [2.0, 100.0, 500.0, 1000.0])
    requests: int = 20
    #: test examples per request
    batch_size: int = 1
    warmup: int = 3
    #: stop a method early (after at least 3 timed requests) once its timed requests took this long
    max_seconds_per_method: float = 120.0
    timeout_s: float = 300.0
    #: torch threads of the coordinator while timing: its own work (heads, aggregation) is tiny,
    #: and idle OpenMP threads spin, taking CPU from workers that share the host
    coordinator_threads: int = 1


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) by linear interpolation."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


@dataclass
class Sample:
    """The requests: consecutive test examples, ``batch_size`` per request, with their labels."""

    batches: list[Batch]
    labels: list[list[int]]


def make_sample(test: TensorDataset, n: int, batch_size: int = 1) -> Sample:
    """Up to ``n`` requests of ``batch_size`` consecutive test examples each (fewer if the split runs out)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(test) < batch_size:
        raise ValueError(f"a request of {batch_size} examples needs that many test examples; the split has {len(test)}")
    n = max(1, min(n, len(test) // batch_size))
    idx = [list(range(i * batch_size, (i + 1) * batch_size)) for i in range(n)]
    return Sample([test.batch(ix) for ix in idx], [[int(test.labels[i]) for i in ix] for ix in idx])


def _percent_equal(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """Percentage of equal entries between two lists of per-request prediction/label lists."""
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return 100.0 * sum(x == y for x, y in pairs) / len(pairs)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure_method(method: Method, sample: Sample, rate_bps: float | None, cfg: BenchConfig,
                   shaped: bool) -> dict[str, Any]:
    """Warm up, time the requests and summarise them (see the module docstring for each figure)."""
    with _torch_threads(cfg.coordinator_threads):
        return _measure(method, sample, rate_bps, cfg, shaped)


def _measure(method: Method, sample: Sample, rate_bps: float | None, cfg: BenchConfig,
             shaped: bool) -> dict[str, Any]:
    n = len(sample.batches)
    for i in range(cfg.warmup):
        method.infer(sample.batches[i % n], timeout=cfg.timeout_s)
    traces: list[Trace] = []
    preds: list[list[int]] = []
    started = time.perf_counter()
    for i in range(cfg.requests):
        trace = method.infer(sample.batches[i % n], timeout=cfg.timeout_s)
        traces.append(trace)
        preds.append([int(p) for p in trace.logits.argmax(-1)])
        if len(traces) >= 3 and time.perf_counter() - started > cfg.max_seconds_per_method:
            break
    power = {d.name: d.power_w for d in method.devices}
    wire = [t.wire_ms(rate_bps) for t in traces]
    measured = [t.total_ms for t in traces]
    # modelled links: the (unshaped) run plus the modelled wire time at this rate
    total = measured if shaped else [m + w for m, w in zip(measured, wire)]
    compute = [t.compute_ms for t in traces]
    overhead = [m - c - (w if shaped else 0.0) for m, c, w in zip(measured, compute, wire)]
    energy = [sum(ms / 1000 * power[d] for d, ms in t.busy_ms().items()) for t in traces]
    busy: dict[str, float] = {}
    for t in traces:
        for d, ms in t.busy_ms().items():
            busy[d] = busy.get(d, 0.0) + ms / len(traces)
    return {
        "method": method.name,
        "devices": method.used_devices(),
        "requests": len(traces),
        "rounds": len(traces[0].rounds),
        "latency_ms": {"median": _median(total), "p90": percentile(total, 90), "all": total},
        "measured_ms_median": _median(measured),
        "breakdown_ms": {"compute": _median(compute), "wire_modelled": _median(wire),
                         "overhead": _median(overhead), "transfer_measured": _median([t.transfer_ms for t in traces]),
                         "serialize": _median([t.serialize_ms for t in traces]),
                         "rpc": _median([t.transfer_ms - t.serialize_ms for t in traces])},
        "overhead_share": _median([o / m for o, m in zip(overhead, measured) if m > 0]),
        "runtime_share": _median([t.transfer_ms / t.total_ms for t in traces if t.total_ms > 0]),
        "bytes_per_request": _median([float(t.bytes) for t in traces]),
        "busy_ms_per_device": busy,
        "energy_j_estimate": _median(energy),
        "predictions": preds,
        "sample_accuracy": _percent_equal(preds, [sample.labels[i % n] for i in range(len(preds))]),
    }


def accuracy_of(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent."""
    return float((logits.argmax(-1) == labels).float().mean() * 100)


@torch.inference_mode()
def teacher_logits(backbone: Backbone, teacher: torch.nn.Module, data: TensorDataset, batch_size: int = 32) -> Tensor:
    """The teacher's logits over a dataset (locally, exact)."""
    head = backbone.task_head(teacher)
    return torch.cat([head(backbone.features(teacher, b)) for _, b in data.batches(batch_size)])


def runtime_accuracy(method: Method, data: TensorDataset, *, batch_size: int = ACCURACY_BATCH,
                     timeout: float = 300.0) -> float:
    """Top-1 accuracy (%) of a *deployed* method over ``data``: every example through its workers."""
    correct = 0
    for idx, batch in data.batches(batch_size):
        logits = method.infer(batch, timeout=timeout).logits
        correct += int((logits.argmax(-1) == data.labels[idx]).sum())
    return 100.0 * correct / len(data)


def compressed_method(compressed: Any, clients: Sequence[WorkerClient],
                      devices: Sequence[DeviceProfile]) -> CoFormerMethod:
    """The ``compressed`` plan's one sub-model alone on the strongest device's worker."""
    s = strongest_index(devices)
    planned = [d["name"] for d in compressed.meta["policy"]["devices"]]
    if len(compressed.artifacts) != 1 or planned != [devices[s].name]:
        raise ValueError(f"{compressed.path}: a compressed plan is one sub-model for the strongest device "
                         f"({devices[s].name}); it has {len(compressed.artifacts)} for {planned} — re-run "
                         f"`coformer demo` to rebuild it")
    method = CoFormerMethod(compressed.artifacts, compressed.aggregator, [clients[s]], [devices[s]])
    method.name = "compressed"
    return method


@dataclass
class BenchSetup:
    """What the bench needs: the teacher, the plan, the devices and a way to get the workers per rate."""

    backbone: Backbone
    teacher: torch.nn.Module
    plan: Any  # coformer.artifacts.Plan
    devices: list[DeviceProfile]
    clients: list[WorkerClient]
    test: TensorDataset
    #: reshape the links to a rate (Mbit/s), or None when links are modelled
    shape_links: Callable[[float], None] | None = None
    process_memory: Callable[[], dict[str, int]] | None = None
    #: the plan's ``compressed`` plan (one sub-model for the strongest device), when it has one
    compressed: Any = None
    #: what the bench records about the teacher (hash, data set, path, how it was checked)
    teacher_info: dict[str, Any] | None = None


def build_methods(setup: BenchSetup) -> tuple[dict[str, Method], dict[str, str]]:
    """The methods over the same clients, and the baselines skipped because the backbone cannot run them.

    Teacher and CoFormer run for every backbone; ``compressed`` when the plan directory carries one
    (``coformer demo`` builds it); the pipeline and tensor-parallel baselines need the
    backbone's ``pipeline_stage`` / ``tensor_shard`` hooks, and a backbone without them is benched
    without that baseline (its reason is recorded) instead of not at all.
    """
    methods: dict[str, Method] = {
        "teacher": TeacherAlone(setup.backbone, setup.teacher, setup.clients, setup.devices),
        "coformer": CoFormerMethod(setup.plan.artifacts, setup.plan.aggregator, setup.clients, setup.devices),
    }
    skipped: dict[str, str] = {}
    if setup.compressed is not None:
        methods["compressed"] = compressed_method(setup.compressed, setup.clients, setup.devices)
    else:
        skipped["compressed"] = ("the plan directory has no compressed/ plan; `coformer demo` builds one "
                                 "(the single-model alternative on the strongest device)")
    for name, baseline in (("pipeline", PipelineSplit), ("tensor-parallel", TensorParallelSplit)):
        try:
            methods[name] = baseline(setup.backbone, setup.teacher, setup.clients, setup.devices)
        except NotImplementedError as exc:
            skipped[name] = str(exc)
    return methods, skipped


def _notes(cfg: BenchConfig) -> dict[str, str]:
    """What each figure in bench.json means and how it was measured."""
    return {
        "latency": f"end-to-end per request of {cfg.batch_size} example(s) after warm-up; median and p90",
        "link": "shaped = tc tbf on the testbed; modelled = loopback run + payload bytes / rate per round",
        "bytes": "serialized request batches (safetensors) + fp16 responses, all rounds",
        "memory": "module memory = weights + measured peak activations of one call (coformer.measure)",
        "energy": "ESTIMATE: sum over devices of worker-reported compute time x device profile power (W); "
                  "idle and network power excluded",
        "overhead": "end-to-end - critical-path compute - modelled wire time; on shaped links it can be "
                    "negative: the tbf bucket (two full-size frames at low rates) passes a message that fits in it "
                    "at line rate, so bytes/rate overestimates a small transfer's wire time",
        "runtime": "serialisation + RPC, measured per call on the critical path: round trip - worker compute "
                   "of the device each round waited for; serialisation as reported by the transport (both "
                   "ends), RPC the rest (on shaped links it includes the wire); share = of end-to-end",
        "pipeline": "hidden states go device -> coordinator -> next device (the star network's path)",
    }


def _add_speedups(runs: list[dict[str, Any]], rates: Sequence[float]) -> None:
    """Each run's speed-up over the teacher at the same link rate."""
    for rate in rates:
        base = next(r for r in runs if r["rate_mbps"] == rate and r["method"] == "teacher")
        for r in runs:
            if r["rate_mbps"] == rate:
                r["speedup_vs_teacher"] = base["latency_ms"]["median"] / r["latency_ms"]["median"]


def _split_accuracy(runs: list[dict[str, Any]], teacher_acc: float, skipped: dict[str, str]) -> dict[str, Any]:
    """Pipeline and tensor-parallel are exact: the teacher's accuracy, once every request agreed with it."""
    out = {}
    for name in ("pipeline", "tensor-parallel"):
        if name in skipped:
            continue
        agree = [r["agreement_with_teacher"] for r in runs if r["method"] == name]
        verified = all(a == 100.0 for a in agree)
        out[name] = {"accuracy": teacher_acc if verified else float("nan"),
                     "source": ("exact: equals the teacher's; verified (100% agreement) on every request sent"
                                if verified else f"NOT verified: agreement with the teacher {agree}")}
    return out


def run_bench(setup: BenchSetup, cfg: BenchConfig, *, accuracy_limit: int | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every method at every rate; returns the JSON-ready document."""
    methods, skipped = build_methods(setup)
    for name, reason in skipped.items():
        log(f"skipping {name}: {reason}")
    sample = make_sample(setup.test, max(cfg.requests, cfg.warmup, 1), cfg.batch_size)
    test = setup.test if accuracy_limit is None else setup.test.subset(range(min(accuracy_limit, len(setup.test))))
    log(f"accuracy: teacher on {len(test)} test examples")
    t_logits = teacher_logits(setup.backbone, setup.teacher, test)
    teacher_acc = accuracy_of(t_logits, test.labels)
    teacher_sample_preds = [[int(x) for x in teacher_logits(setup.backbone, setup.teacher, TensorDataset(
        b, torch.tensor(lab))).argmax(-1)] for b, lab in zip(sample.batches, sample.labels)]
    memory = {}
    one = sample.batches[0]
    measured: dict[str, dict[str, Any]] = {}
    runs: list[dict[str, Any]] = []
    try:
        for name, m in methods.items():
            log(f"deploying {name} to {', '.join(m.used_devices())}")
            m.deploy(timeout=cfg.timeout_s)
            memory[name] = m.module_memory(one)
        for name in ("coformer", "compressed"):
            if name in methods:
                log(f"accuracy: {name} on {len(test)} test examples through the runtime")
                measured[name] = {
                    "accuracy": runtime_accuracy(methods[name], test, timeout=cfg.timeout_s),
                    "source": f"measured through the deployed runtime (coordinator + workers on "
                              f"{', '.join(methods[name].used_devices())}) on {len(test)} test examples"}
        for rate in cfg.rates_mbps:
            if setup.shape_links is not None:
                setup.shape_links(rate)
            for name, m in methods.items():
                log(f"{rate:g} Mbit/s: {name}")
                r = measure_method(m, sample, rate * 1e6, cfg, shaped=setup.shape_links is not None)
                r["rate_mbps"] = rate
                r["link"] = "shaped" if setup.shape_links is not None else "modelled"
                r["agreement_with_teacher"] = _percent_equal(
                    r["predictions"], [teacher_sample_preds[i % len(sample.batches)] for i in range(len(r["predictions"]))])
                r["module_memory_bytes"] = memory[name]
                runs.append(r)
    finally:
        for m in methods.values():
            m.close()
    _add_speedups(runs, cfg.rates_mbps)
    accuracy = {"teacher": {"accuracy": teacher_acc, "source": f"measured on {len(test)} test examples"},
                **measured, **_split_accuracy(runs, teacher_acc, skipped)}
    doc = {
        "devices": [d.to_dict() for d in setup.devices],
        "teacher": setup.teacher_info or {"check": "given in-process"},
        "config": {"rates_mbps": cfg.rates_mbps, "requests": cfg.requests, "warmup": cfg.warmup,
                   "batch_size": cfg.batch_size, "coordinator_threads": cfg.coordinator_threads,
                   "max_seconds_per_method": cfg.max_seconds_per_method},
        "accuracy": accuracy,
        "runs": runs,
        "skipped_methods": skipped,
        "notes": _notes(cfg),
    }
    if setup.process_memory is not None:
        doc["worker_peak_rss_bytes"] = setup.process_memory()
    return doc


def device_count_run(plan: Any, clients: Sequence[WorkerClient], devices: Sequence[DeviceProfile], sample: Sample,
                     rate_mbps: float, cfg: BenchConfig, *, shaped: bool, accuracy: float | None) -> dict[str, Any]:
    """CoFormer alone for one plan (the device-count table): latency, bytes and accuracy at one rate."""
    method = CoFormerMethod(plan.artifacts, plan.aggregator, clients, devices)
    method.deploy(timeout=cfg.timeout_s)
    try:
        r = measure_method(method, sample, rate_mbps * 1e6, cfg, shaped=shaped)
    finally:
        method.close()
    r["rate_mbps"] = rate_mbps
    r["link"] = "shaped" if shaped else "modelled"
    r["accuracy"] = accuracy if accuracy is not None else r["sample_accuracy"]
    r["accuracy_source"] = "plan figures" if accuracy is not None else "sample of the requests"
    r["calibrated"] = bool(plan.meta.get("calibrated", True))
    return r
