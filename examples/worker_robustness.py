"""Measure issue #14's four worker-robustness targets on loopback; print and write JSON.

1. fuzz: N seeded fuzzed requests (default 10,000) against one worker process holding a
   sub-model: worker deaths, changed answers (bit-level), and the worker's peak RSS during the
   fuzzing against the bound ``loaded RSS + fixed margin`` (the worker runs with
   ``--max-memory-mb FUZZ_BUDGET_MB``; fuzz-accepted configs are real models in its LRU cache,
   so the margin is that budget plus allocator and gRPC slack, see ``RSS_MARGIN_BYTES``).
2. kill/restart: 3 worker processes, requests in a loop; one worker is SIGKILLed, restarted empty
   on the same port; time from its restart to re-admission (with its model reloaded), requests
   failed outright, and degraded answers counted and named.
3. concurrency: 2,000 requests at concurrency 32 across 3 workers: errors, degraded, p50/p99.
4. shutdown: SIGTERM on a busy worker, 20 runs (half with a call longer than the grace):
   exit time after the signal vs ``--grace``, and exit codes.

Usage: ``python examples/worker_robustness.py [--model minilm|tiny] [--fuzz-requests 10000] [--out FILE]``.
Sub-models come from the embedded all-MiniLM-L6-v2 (``--model minilm``, the default) cut 3:2:1.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

import coformer
from coformer.artifacts import submodel_artifact
from coformer.offline.decompose import proportional_specs
from coformer.heads import StudentHead
from coformer.online.coordinator import Coordinator, RecoveryPolicy
from coformer_transports.fuzz import PHASES, WorkerFuzzer
from coformer_transports.grpc_transport import GrpcClient
from coformer_transports.worker_process import peak_rss_bytes, reset_peak_rss, rss_bytes, start_worker, stop_worker

MB = 2**20
#: The fuzzed worker's model budget (``--max-memory-mb``): its model cache never holds more.
FUZZ_BUDGET_MB = 16
#: The fixed margin of the RSS target, over the loaded and warmed-up worker's RSS: the model
#: budget plus 48 MB of allocator and gRPC slack for requests in flight.
RSS_MARGIN_BYTES = FUZZ_BUDGET_MB * MB + 48 * MB
TEXTS = ["The markets rallied after the central bank's decision.", "The striker scored twice in the final.",
         "A new phone with a folding screen was announced.", "Parliament debated the budget late into the night."]


def _setup(model: str) -> dict[str, Any]:
    torch.manual_seed(0)
    backbone = coformer.create_backbone("bert")
    teacher = backbone.load(None, num_labels=5) if model == "minilm" else backbone.tiny(num_labels=5)
    batch = backbone.prepare(teacher, TEXTS) if model == "minilm" else backbone.example_batch(teacher, 4)
    subs = [s.eval() for s in backbone.decompose(teacher, proportional_specs(backbone.shape(teacher), [3, 2, 1]),
                                                 batch=batch)]
    head = backbone.task_head(teacher)
    students = [StudentHead(s.feature_dim, head.cfg["in_dim"], head) for s in subs]
    agg = coformer.create_aggregator("averaging", feature_dims=[s.feature_dim for s in subs],
                                     embed_dim=head.cfg["in_dim"], task_head=head, student_heads=students).eval()
    cfg = subs[0].config
    # config fuzzing sends a fresh copy of the spare's weights each time: a small one keeps that cheap
    tiny = backbone.tiny(num_labels=5)
    spare = backbone.decompose(tiny, proportional_specs(backbone.shape(tiny), [1]),
                               batch=backbone.example_batch(tiny, 2))[0]
    return {"arts": [submodel_artifact(s) for s in subs], "agg": agg, "batch": dict(batch),
            "spare": submodel_artifact(spare.eval()), "vocab": cfg["vocab_size"],
            "positions": cfg["max_positions"]}


def fuzz(setup: dict[str, Any], requests: int, seed: int) -> dict[str, Any]:
    """Target 1."""
    loaded, spare = setup["arts"][0], setup["spare"]
    proc, uri = start_worker("--threads", "1", "--max-batch", "64", "--max-memory-mb", str(FUZZ_BUDGET_MB))
    try:
        idle = rss_bytes(proc.pid)
        client = GrpcClient(uri)
        client.load(loaded)
        footprint = client.info()["used_memory_bytes"]
        reference = client.infer(loaded.sha256, setup["batch"]).features
        for _ in range(20):
            client.infer(loaded.sha256, setup["batch"])
        loaded_rss = rss_bytes(proc.pid)
        reset_peak_rss(proc.pid)
        fuzzer = WorkerFuzzer(client, loaded, spare, setup["batch"], seed=seed, vocab_size=setup["vocab"],
                              max_tokens=setup["positions"])
        per_phase = requests // len(PHASES)
        phases, changed, deaths, faults = {}, 0, 0, []
        start = time.monotonic()
        for phase in PHASES:
            for _ in range(10):  # in tenths, checking the answer between them
                r = fuzzer.run(phase, per_phase // 10)
                faults += r.faults
                if proc.poll() is not None:
                    deaths += 1
                    break
                changed += int(not torch.equal(client.infer(loaded.sha256, setup["batch"]).features, reference))
                ph = phases.setdefault(phase, {"sent": 0, "accepted": 0, "refused": {}})
                ph["sent"] += r.sent
                ph["accepted"] += r.accepted
                for k, v in r.refused.items():
                    ph["refused"][k] = ph["refused"].get(k, 0) + v
        peak = peak_rss_bytes(proc.pid)
        health = client.health()
        bound = loaded_rss + RSS_MARGIN_BYTES
        return {"requests": sum(p["sent"] for p in phases.values()), "seconds": round(time.monotonic() - start, 1),
                "phases": phases, "worker_deaths": deaths, "changed_answers": changed, "faults": faults[:5],
                "model_footprint_mb": round(footprint / MB, 1), "idle_worker_rss_mb": round(idle / MB, 1),
                "loaded_rss_mb": round(loaded_rss / MB, 1), "peak_rss_during_fuzz_mb": round(peak / MB, 1),
                "peak_over_loaded_mb": round((peak - loaded_rss) / MB, 1), "model_budget_mb": FUZZ_BUDGET_MB,
                "models_held_at_end": len(health["models"]),
                "rss_bound_mb": round(bound / MB, 1), "rss_margin_mb": RSS_MARGIN_BYTES // MB,
                "rss_within_bound": peak <= bound}
    finally:
        stop_worker(proc)


def _coordinator(uris: list[str], setup: dict[str, Any], **kw: Any) -> Coordinator:
    return Coordinator.deploy([GrpcClient(u) for u in uris], setup["arts"], setup["agg"],
                              names=[f"w{i}" for i in range(len(uris))], **kw)


def kill_restart(setup: dict[str, Any], run_s: float = 12.0) -> dict[str, Any]:
    """Target 2."""
    procs = [start_worker("--threads", "1") for _ in range(3)]
    uris = [u for _, u in procs]
    coord = _coordinator(uris, setup, deadline_s=10.0,
                         recovery=RecoveryPolicy(retries=2, backoff_s=0.05, probe_interval_s=0.25))
    stats = {"requests": 0, "failed": 0, "degraded": 0, "degraded_by_device": {}, "retried_by_device": {}}
    stop = threading.Event()

    def loop() -> None:
        end = time.monotonic() + run_s + 60
        while not stop.is_set() and time.monotonic() < end:
            stats["requests"] += 1
            try:
                ans = coord.infer(setup["batch"])
            except Exception:  # noqa: BLE001 - counted: a request that failed outright
                stats["failed"] += 1
                continue
            if ans.degraded:
                stats["degraded"] += 1
                for n in ans.missing:
                    stats["degraded_by_device"][n] = stats["degraded_by_device"].get(n, 0) + 1
            for n, k in ans.retried.items():
                stats["retried_by_device"][n] = stats["retried_by_device"].get(n, 0) + k

    t = threading.Thread(target=loop)
    t.start()
    try:
        time.sleep(2.0)
        victim, port = procs[1][0], uris[1].rsplit(":", 1)[1]
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        time.sleep(2.0)
        new_proc, _ = start_worker("--threads", "1", listen=f"127.0.0.1:{port}")
        procs[1] = (new_proc, uris[1])
        back = time.monotonic()
        while coord.is_down(1) and time.monotonic() - back < 30:
            time.sleep(0.01)
        readmit_s = time.monotonic() - back
        time.sleep(max(0.0, run_s - 4.0 - readmit_s))
        stop.set()
        t.join(60)
        holds = setup["arts"][1].sha256 in GrpcClient(uris[1]).health()["models"]
        return {**stats, "readmitted_after_restart_s": round(readmit_s, 3), "model_reloaded": holds,
                "readmissions": coord.readmissions()}
    finally:
        stop.set()
        coord.close()
        for p, _ in procs:
            stop_worker(p)


def concurrency(setup: dict[str, Any], requests: int = 2000, clients: int = 32) -> dict[str, Any]:
    """Target 3."""
    procs = [start_worker("--threads", "1") for _ in range(3)]
    coord = _coordinator([u for _, u in procs], setup, deadline_s=30.0, max_inflight=clients)
    lat: list[float] = []
    errors, degraded = [], 0
    lock = threading.Lock()

    def one(_: int) -> None:
        nonlocal degraded
        t0 = time.perf_counter()
        try:
            ans = coord.infer(setup["batch"])
            with lock:
                lat.append((time.perf_counter() - t0) * 1000)
                degraded += int(ans.degraded)
        except Exception as exc:  # noqa: BLE001 - counted
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])

    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(requests)))
        wall = time.perf_counter() - start
        lat.sort()

        def pct(p: float) -> float:
            return round(lat[min(len(lat) - 1, math.ceil(p * len(lat)) - 1)], 2) if lat else float("nan")

        return {"requests": requests, "concurrency": clients, "workers": 3, "errors": len(errors),
                "error_examples": errors[:3], "degraded": degraded, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
                "max_ms": round(lat[-1], 2) if lat else None, "throughput_rps": round(requests / wall, 1)}
    finally:
        coord.close()
        for p, _ in procs:
            stop_worker(p)


def shutdown(setup: dict[str, Any], runs: int = 20, grace: float = 2.0) -> dict[str, Any]:
    """Target 4: the worker is busy at every signal; in the odd runs with calls that outlast the grace."""
    art = setup["arts"][0]
    # 4096 x max positions per call, 6 at once (of the 8 RPC threads, so Health still answers): far
    # longer than the grace on 2 cores
    slow = {k: (torch.randint(0, setup["vocab"], (4096, setup["positions"])) if k == "input_ids"
                else torch.ones(4096, setup["positions"], dtype=v.dtype)) for k, v in setup["batch"].items()}
    rows = []
    for r in range(runs):
        long_call = r % 2 == 0
        proc, uri = start_worker("--threads", "1", "--grace", str(grace), "--max-batch", "4096",
                                 "--max-message-mb", "64", "--max-input-mb", "64")
        try:
            client = GrpcClient(uri + "?max_message_mb=64")
            client.load(art)
            batch = slow if long_call else setup["batch"]
            busy = [threading.Thread(target=_quiet_infer, args=(uri, art.sha256, batch, not long_call))
                    for _ in range(6 if long_call else 4)]
            for b in busy:
                b.start()
            end = time.monotonic() + 10
            while (inflight := client.health(timeout=10)["inflight"]) == 0 and time.monotonic() < end:
                time.sleep(0.005)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(grace + 30)
            took = time.monotonic() - t0
            for b in busy:
                b.join(30)
            rows.append({"run": r, "long_call": long_call, "inflight_at_signal": inflight, "exit_code": code,
                         "exit_s": round(took, 3)})
        finally:
            stop_worker(proc)
    worst = max(x["exit_s"] for x in rows)
    return {"runs": runs, "grace_s": grace, "max_exit_s": worst, "all_within_grace": worst <= grace,
            "busy_at_signal": sum(x["inflight_at_signal"] > 0 for x in rows),
            "runs_with_calls_cut": sum(x["exit_code"] == 3 for x in rows),
            "exit_codes": sorted({x["exit_code"] for x in rows}), "runs_detail": rows}


def _quiet_infer(uri: str, digest: str, batch: dict[str, torch.Tensor], repeat: bool = False) -> None:
    """One call (or, with ``repeat``, calls until the worker goes), so the worker is busy at the signal."""
    client = GrpcClient(uri + "?max_message_mb=64")
    try:
        while True:
            client.infer(digest, batch, timeout=60)
            if not repeat:
                return
    except Exception:  # noqa: BLE001 - calls cut by shutdown are expected here
        pass
    finally:
        client.close()


def main() -> None:
    """Run the four measurements and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["minilm", "tiny"], default="minilm")
    ap.add_argument("--fuzz-requests", type=int, default=10_000)
    ap.add_argument("--concurrent-requests", type=int, default=2000)
    ap.add_argument("--shutdown-runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--out", default="worker_robustness.json")
    args = ap.parse_args()
    t0 = time.monotonic()
    setup = _setup(args.model)
    result: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "model": args.model, "cpus": os.cpu_count(),
                              "submodel_mb": [round(len(a.weights) / MB, 1) for a in setup["arts"]]}
    for name, fn in (("fuzz", lambda: fuzz(setup, args.fuzz_requests, args.seed)),
                     ("kill_restart", lambda: kill_restart(setup)),
                     ("concurrency", lambda: concurrency(setup, args.concurrent_requests)),
                     ("shutdown", lambda: shutdown(setup, args.shutdown_runs))):
        s = time.monotonic()
        result[name] = fn()
        result[name]["elapsed_s"] = round(time.monotonic() - s, 1)
        print(json.dumps({name: {k: v for k, v in result[name].items() if k != "runs_detail"}}), flush=True)
    result["total_s"] = round(time.monotonic() - t0, 1)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} in {result['total_s']} s")


if __name__ == "__main__":
    main()
