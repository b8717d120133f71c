"""Regenerate every figure quoted in README.md and BENCHMARKS.md from the current code.

Each figure is one command (listed by ``--list``, and in ``OUT/reproduce.json`` with its exit
status, time and output files). Tiers:

* ``--quick``: the README's demo figures — ``coformer demo`` from an empty teacher cache
  (8 min 43 s on a quiet two-core CPU on 2026-12-02, the ``compressed`` alternative included);
* ``--full``: everything, in the order the figures depend on each other (the 2-layer plan
  before the bench that runs it, the demo's recorded teacher before the device-count plans).
  Hours on two cores; the testbed bench needs root (it is reported as skipped otherwise), the
  loopback benches start their own ``coformer worker`` processes.

``--check`` compares the quick demo's deterministic figures (accuracies, parameters, FLOPs; not
latencies) with the committed ones in ``examples/figures/demo-bert-bbc_news.json``;
``--update`` records this run's figures there (do it when the code is meant to change them,
and quote the new figures). The accuracies are deterministic on the pinned torch *on one kind of
CPU*: calibration rounds differently on other vector units (torch's CPU capability, e.g. AVX2 or
AVX512), and calibration's optimiser steps compound that into a few test articles.
So the file keeps one set of figures per CPU capability, and ``--check`` compares with the set for
this CPU; where none is committed it prints the differences from another set and says that they
are not a check. Every choice behind these figures was made on the validation split
(``coformer.data.SPLIT_SEED`` is the one split); the test split is only reported.

    python examples/reproduce.py --quick --check
    python examples/reproduce.py --full --out runs/reproduce
    python examples/reproduce.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "examples" / "figures" / "demo-bert-bbc_news.json"
#: the fields of a demo figure that are deterministic on the pinned torch and one CPU capability (latency is not)
DETERMINISTIC = ("accuracy", "val_accuracy", "params", "flops")


@dataclass
class Figure:
    """One quoted figure (or table) and the command that produces it."""

    id: str
    quoted_in: str
    command: str
    tier: str = "full"
    #: loopback worker ports to start (``coformer worker --listen 127.0.0.1:PORT``) for the command
    workers: list[int] = field(default_factory=list)
    worker_args: str = "--threads 1"
    needs_root: bool = False


def figures() -> list[Figure]:
    """Every figure, in run order; ``{out}`` is the output directory, ``{teacher}`` the demo's recorded teacher."""
    loop3 = "grpc://127.0.0.1:50061,grpc://127.0.0.1:50062,grpc://127.0.0.1:50063"
    big = "?max_message_mb=1024"
    llama3 = ",".join(f"grpc://127.0.0.1:{p}{big}" for p in (50071, 50072, 50073))
    figs = [
        Figure("demo", "README 'See it work'; BENCHMARKS 'coformer demo'",
               "coformer demo --out {out}/coformer-demo --json {out}/demo.json", tier="quick"),
        Figure("demo-layers-2", "README command list; BENCHMARKS layer table and bench",
               "coformer demo --layers 2 --out {out}/coformer-demo-2l --json {out}/demo-2l.json"),
        Figure("demo-layers-3", "BENCHMARKS layer table",
               "coformer demo --layers 3 --out {out}/coformer-demo-3l --json {out}/demo-3l.json"),
        Figure("demo-layers-4", "BENCHMARKS layer table",
               "coformer demo --layers 4 --out {out}/coformer-demo-4l --json {out}/demo-4l.json"),
        Figure("ablation", "BENCHMARKS 'Calibration and aggregation ablations'",
               "python examples/ablation.py --max-length 64 --out {out}/ablation"),
        Figure("bench-plans", "BENCHMARKS device-count table (plans)",
               "python examples/bench_devices.py --teacher {teacher} --layers 2 --out {out}/bench-plans"),
        Figure("bench-testbed", "README speed-up claim; BENCHMARKS 'coformer bench' table",
               "coformer bench --testbed --plan {out}/coformer-demo-2l --link-mbps 2,100,500,1000 --requests 40 "
               "--warmup 5 --max-seconds 60 --device-plans {out}/bench-plans/1dev,{out}/bench-plans/2dev,"
               "{out}/bench-plans/4dev --out {out}/bench", needs_root=True),
        *[Figure(f"bench-loopback-b{b}", "BENCHMARKS 'Runtime overhead on loopback'",
                 f"coformer bench --plan {{out}}/coformer-demo-2l --workers {loop3} --link-mbps 1000 --requests 20 "
                 f"--warmup 3 --batch-size {b} --max-seconds 30 --out {{out}}/loopback-b{b}",
                 workers=[50061, 50062, 50063]) for b in (1, 8, 32, 64)],
        Figure("search", "BENCHMARKS 'Search strategies'",
               "python examples/search_strategies.py --trials 50 --random-n 1000 --val-docs 8 --out {out}/search"),
        Figure("smollm2-perplexity", "BENCHMARKS 'Backbones with real weights'",
               "python examples/smollm2_perplexity.py --json {out}/ppl.json"),
        Figure("demo-llama", "BENCHMARKS 'Backbones with real weights' (SmolLM2)",
               "coformer demo --backbone llama --weight-rule seed-unweighted --out {out}/demo-llama "
               "--json {out}/demo-llama.json"),
        Figure("bench-loopback-llama", "BENCHMARKS runtime overhead, SmolLM2",
               f"coformer bench --plan {{out}}/demo-llama --workers {llama3} --link-mbps 1000 --requests 20 "
               f"--warmup 3 --batch-size 1 --max-seconds 30 --accuracy-limit 100 --out {{out}}/loopback-llama",
               workers=[50071, 50072, 50073], worker_args="--threads 1 --max-message-mb 1024"),
        *[Figure(f"fashion-mnist-teacher-{lr}-{ep}", "BENCHMARKS 2026-12-02 'Fashion-MNIST settings, re-decided on validation'",
                 f"python examples/fashion_mnist.py --train 2000 --validation-only --teacher-only --lr {lr} --epochs {ep} "
                 f"--out {{out}}/fmnist-teacher-{lr}-{ep}.json")
          for lr, ep in (("2e-5", 2), ("5e-5", 2), ("1e-4", 2), ("5e-5", 4))],
        *[Figure(f"fashion-mnist-calib-{lr}-{ep}", "BENCHMARKS 2026-12-02 'Fashion-MNIST settings, re-decided on validation'",
                 f"python examples/fashion_mnist.py --train 2000 --validation-only --calib-lr {lr} --calib-epochs {ep} "
                 f"--out {{out}}/fmnist-calib-{lr}-{ep}.json")
          for lr, ep in (("3e-4", 3), ("3e-4", 6), ("6e-4", 6), ("1e-3", 6))],
        Figure("fashion-mnist", "BENCHMARKS Fashion-MNIST (ViT-S)",
               "python examples/fashion_mnist.py --train 6000 --unlabelled 24000 --test 10000 --epochs 2 --calib-epochs 6 "
               "--calib-lr 6e-4 --out {out}/fmnist.json"),
        Figure("demo-vit", "BENCHMARKS 'coformer demo --backbone vit'",
               "coformer demo --backbone vit --out {out}/demo-vit --json {out}/demo-vit.json"),
        *[Figure(f"ablation-mpnet-{tag}", "BENCHMARKS 2026-12-02 'mpnet calibration settings'",
                 f"python examples/ablation.py --backbone mpnet --max-length 64 --train-limit 600 "
                 f"--aggregators mlp_fusion {flags} --out {{out}}/ablation-mpnet-{tag}")
          for tag, flags in (("3e-4", "--lr 3e-4 --lr-schedule constant"), ("5e-5", "--lr 5e-5 --lr-schedule cosine"))],
        Figure("demo-mpnet", "BENCHMARKS 2026-12-02 'all-mpnet-base-v2 on BBC News'",
               "coformer demo --backbone mpnet --out {out}/demo-mpnet --json {out}/demo-mpnet.json"),
        Figure("bench-mpnet", "BENCHMARKS 2026-12-02 mpnet on the testbed",
               "coformer bench --testbed --plan {out}/demo-mpnet --link-mbps 2,1000 --requests 20 --warmup 3 "
               "--accuracy-limit 100 --max-seconds 60 --out {out}/bench-mpnet", needs_root=True),
        Figure("recipe-wordnet-minilm", "BENCHMARKS 2026-12-02 'WordNet supersenses through coformer run'",
               "coformer run examples/recipes/wordnet_minilm.toml --out {out}/wordnet-minilm"),
        Figure("table5", "BENCHMARKS 'Device count (Table V)'",
               "python examples/bench_devices.py --layers 0 --out {out}/table5"),
        Figure("demo-mpnet-wordnet", "BENCHMARKS 2026-12-02 mpnet on WordNet supersenses",
               "coformer demo --backbone mpnet --data wordnet_supersense?train_size=1500&val_size=500&test_size=500 "
               "--max-length 32 --no-compressed --out {out}/demo-mpnet-wordnet --json {out}/demo-mpnet-wordnet.json"),
        Figure("recipe-wordnet-mpnet-lr", "BENCHMARKS 2026-12-02 mpnet on WordNet supersenses (the 2e-4 candidate)",
               "coformer run examples/recipes/wordnet_mpnet.toml --out {out}/wordnet-mpnet-lr2e-4"),
        Figure("bench-mpnet-wordnet", "BENCHMARKS 2026-12-02 mpnet on WordNet supersenses, on the testbed",
               "coformer bench --testbed --plan {out}/demo-mpnet-wordnet --link-mbps 2,1000 --requests 20 --warmup 3 "
               "--max-seconds 60 --out {out}/bench-mpnet-wordnet", needs_root=True),
        Figure("proxy-spread", "BENCHMARKS 2026-12-02 'Accuracy proxy on policies spread from small to large'",
               "python examples/proxy_correlation.py --policies 12 --spread --calib-docs 600 --out {out}/proxy-spread"),
        Figure("search-strategies", "BENCHMARKS 2026-12-02 'ax_gp_ei against random search on the probe Ψ'",
               "python examples/search_strategies.py --trials 50 --random-n 250 --val-docs 64 --train-docs 160 "
               "--out {out}/search"),
        Figure("proxy-wordnet", "BENCHMARKS 2026-12-02 third session 'Accuracy proxy on WordNet supersenses'",
               "python examples/proxy_correlation.py --data wordnet_supersense?train_size=1500&val_size=500&test_size=500 "
               "--max-length 32 --policies 10 --spread --probe-docs 600 --val-docs 200 --calib-docs 1000 --threads 1 "
               "--out {out}/proxy-wordnet"),
        Figure("proxy-wordnet-3seeds", "BENCHMARKS 2026-12-02 third session 'Accuracy proxy on WordNet supersenses'",
               "python examples/proxy_correlation.py --data wordnet_supersense?train_size=1500&val_size=500&test_size=500 "
               "--max-length 32 --policies 10 --spread --probe-docs 600 --val-docs 200 --calib-docs 1000 --calib-seeds 3 "
               "--threads 1 --out {out}/proxy-wordnet-3seeds"),
        Figure("ablation-aggregator", "BENCHMARKS 2026-12-02 third session 'The aggregator, decided on validation'",
               "python examples/ablation.py --max-length 64 --rules boost --out {out}/ablation-bert-boost"),
        Figure("ablation-vit", "BENCHMARKS 2026-12-02 third session 'vit and llama weight rules, on validation'",
               "python examples/ablation.py --backbone vit --out {out}/ablation-vit"),
        Figure("ablation-llama", "BENCHMARKS 2026-12-02 third session 'vit and llama weight rules, on validation'",
               "python examples/ablation.py --backbone llama --max-length 64 --rules boost,seed-unweighted "
               "--aggregators mlp_fusion --train-limit 600 --out {out}/ablation-llama"),
        Figure("cfs-period", "BENCHMARKS 2026-12-02 'The testbed's CFS period'",
               "python examples/cfs_period.py", needs_root=True),
        Figure("testbed-loop", "BENCHMARKS 2026-12-02 'The loop on the testbed'",
               "bash examples/testbed_loop.sh {out}/testbed-loop", needs_root=True),
    ]
    return figs


def deterministic_figures(demo_doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The deterministic part of a ``coformer demo --json`` document, by row name."""
    rows = [demo_doc["teacher"], *demo_doc["submodels"], demo_doc["coformer"]]
    if demo_doc.get("compressed"):
        rows.append(demo_doc["compressed"])
    return {r["name"]: {k: r[k] for k in DETERMINISTIC if k in r} for r in rows}


def compare_with_reference(demo_doc: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """Differences between a demo run's deterministic figures and the committed ones (empty: they match)."""
    got, want = deterministic_figures(demo_doc), reference["figures"]
    diffs = [f"{name}: missing from this run" for name in want if name not in got]
    diffs += [f"{name}: not in the committed figures" for name in got if name not in want]
    for name in set(got) & set(want):
        for key, value in want[name].items():
            if got[name].get(key) != value:
                diffs.append(f"{name} {key}: committed {value}, this run {got[name].get(key)}")
    return sorted(diffs)


def cpu_capability() -> str:
    """The vector unit torch's CPU kernels use here (``AVX2``, ``AVX512``, ...): the figures depend on it."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def reference_sets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The committed figure sets of a reference file, each with its ``cpu_capability`` (``None``: not recorded).

    Files written before capabilities were recorded hold one set at the top level.
    """
    if "references" in doc:
        return list(doc["references"])
    return [{"cpu_capability": None, "date": doc.get("date"), "figures": doc["figures"]}]


def reference_for(doc: dict[str, Any], capability: str) -> dict[str, Any] | None:
    """The committed figure set for CPUs with ``capability``, or ``None`` when none is committed."""
    return next((r for r in reference_sets(doc) if r["cpu_capability"] == capability), None)


def with_reference(doc: dict[str, Any] | None, figures: dict[str, Any], capability: str, date: str,
                   torch_version: str) -> dict[str, Any]:
    """``doc`` with ``figures`` recorded as the set for ``capability`` (replacing that CPU's old set only)."""
    kept = [r for r in reference_sets(doc) if r["cpu_capability"] != capability] if doc else []
    return {"command": "coformer demo --json demo.json (empty teacher cache)", "torch": torch_version,
            "references": [*kept, {"cpu_capability": capability, "date": date, "figures": figures}]}


def check_against(demo_doc: dict[str, Any], doc: dict[str, Any], capability: str) -> tuple[bool, list[str]]:
    """``(checked, lines)``: the differences from this CPU's committed set, or, where none is committed,
    the differences from another set, introduced by a line saying that they are not a check."""
    mine = reference_for(doc, capability)
    if mine is not None:
        return True, compare_with_reference(demo_doc, mine)
    other = reference_sets(doc)[0]
    where = other["cpu_capability"] or "a CPU whose capability was not recorded"
    return False, [f"not checked: no figures are committed for this CPU ({capability}); the differences from "
                   f"those of {where} ({other['date']}) follow, and rounding on other vector units explains "
                   f"differences of a few test articles. `--update` records this CPU's figures.",
                   *compare_with_reference(demo_doc, other)]


def _argv(command: str) -> list[str]:
    """The command's arguments, run with this interpreter (so the same environment's coformer)."""
    argv = shlex.split(command)
    if argv[0] == "coformer":
        return [sys.executable, "-m", "coformer", *argv[1:]]
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    return argv


def _teacher_of(plan_dir: Path) -> str:
    plan = plan_dir / "plan.json"
    return json.loads(plan.read_text())["teacher"]["path"] if plan.exists() else "<run the demo first>"


def _start_workers(fig: Figure, log: Path) -> list[subprocess.Popen]:
    procs = []
    with log.open("a") as f:
        for port in fig.workers:
            cmd = _argv(f"coformer worker --listen 127.0.0.1:{port} {fig.worker_args}")
            procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT))
    time.sleep(5)  # the workers import torch before they listen
    return procs


def run_figure(fig: Figure, out: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run one figure's command; returns its record (command, exit status, seconds, log)."""
    command = fig.command.format(out=out, teacher=_teacher_of(out / "coformer-demo"))
    record: dict[str, Any] = {"id": fig.id, "quoted_in": fig.quoted_in, "command": command}
    if fig.needs_root and os.geteuid() != 0:
        return {**record, "status": "skipped: needs root (the emulated testbed)"}
    log = out / "logs" / f"{fig.id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    workers = _start_workers(fig, log) if fig.workers else []
    started = time.perf_counter()
    try:
        with log.open("a") as f:
            rc = subprocess.run(_argv(command), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    finally:
        for p in workers:
            p.terminate()
            p.wait(timeout=30)
    return {**record, "status": "ok" if rc == 0 else f"failed (exit {rc})", "seconds": round(time.perf_counter()
                                                                                              - started, 1),
            "log": str(log)}


def main() -> int:
    """Parse arguments, run the chosen figures, write ``OUT/reproduce.json``; non-zero if any failed or differed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tier = ap.add_mutually_exclusive_group()
    tier.add_argument("--quick", action="store_true", help="the README demo figures only (default)")
    tier.add_argument("--full", action="store_true", help="every figure in README and BENCHMARKS")
    ap.add_argument("--only", default=None, help="comma-separated figure ids (see --list)")
    ap.add_argument("--list", action="store_true", help="print each figure's id, where it is quoted and its command")
    ap.add_argument("--check", action="store_true", help="compare the demo's deterministic figures with "
                                                         f"{REFERENCE.relative_to(ROOT)}")
    ap.add_argument("--update", action="store_true", help=f"rewrite {REFERENCE.relative_to(ROOT)} from this run")
    ap.add_argument("--cache", default=None, help="teacher cache (default: a fresh one under OUT, as on a clean "
                                                  "machine)")
    ap.add_argument("--out", default="runs/reproduce")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    chosen = [f for f in figures() if args.full or f.tier == "quick"]
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {f.id for f in figures()}
        if unknown:
            ap.error(f"unknown figure id(s) {sorted(unknown)}; --list shows them")
        chosen = [f for f in figures() if f.id in wanted]
    if args.list:
        for f in chosen:
            print(f"{f.id:22} [{f.tier}] {f.quoted_in}\n    {f.command}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "COFORMER_CACHE": str(Path(args.cache).resolve() if args.cache else out / "cache")}
    import torch

    records = []
    for f in chosen:
        print(f"[{time.strftime('%H:%M:%S')}] {f.id}: {f.command.format(out=out, teacher='<recorded teacher>')}",
              flush=True)
        records.append(run_figure(f, out, env))
        print(f"    {records[-1]['status']}", flush=True)
    doc: dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
                           "figures": records}
    failed = any(r["status"].startswith("failed") for r in records)
    demo_json = out / "demo.json"
    if (args.check or args.update) and demo_json.exists():
        demo_doc = json.loads(demo_json.read_text())
        committed = json.loads(REFERENCE.read_text()) if REFERENCE.exists() else None
        if args.update:
            capability = cpu_capability()
            REFERENCE.parent.mkdir(parents=True, exist_ok=True)
            REFERENCE.write_text(json.dumps(with_reference(committed, deterministic_figures(demo_doc), capability,
                                                           doc["date"], torch.__version__), indent=2) + "\n")
            print(f"wrote {REFERENCE} (the figures for {capability} CPUs)")
        elif committed is None:
            print(f"{REFERENCE} is missing: run with --update on the pinned torch and commit it")
            failed = True
        else:
            checked, lines = check_against(demo_doc, committed, cpu_capability())
            doc["check"] = lines or "the demo's deterministic figures match the committed ones"
            print("\n".join(lines) if lines else doc["check"])
            failed = failed or (checked and bool(lines))
    (out / "reproduce.json").write_text(json.dumps(doc, indent=2))
    print(f"wrote {out / 'reproduce.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
