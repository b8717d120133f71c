"""The testbed loop's comparison: planned vs proportional vs compressed vs teacher, at every rate.

    .venv/bin/python examples/loop_table.py runs/testbed-loop

Reads what ``examples/testbed_loop.sh OUT`` wrote: the planned policy's demo and bench
(``OUT/demo.json``, ``OUT/bench/bench.json``) and the GFLOPS-proportional policy's
(``OUT/proportional.json``, ``OUT/proportional-bench/bench.json``). Each bench timed its own teacher
beside its methods, so every speed-up is against the teacher of the same run. Test accuracy is the
bench's (measured through the deployed runtime), validation accuracy the demo's. Prints markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

#: (label, demo file, bench directory) for each policy the loop benches
POLICIES = (("planned", "demo.json", "bench"), ("proportional", "proportional.json", "proportional-bench"))


def rows(out: Path) -> list[dict[str, Any]]:
    """One row per (policy, method, rate) that the loop's benches measured."""
    found: list[dict[str, Any]] = []
    for label, demo_name, bench_name in POLICIES:
        bench_file, demo_file = out / bench_name / "bench.json", out / demo_name
        if not bench_file.exists():
            continue
        bench = json.loads(bench_file.read_text())
        demo = json.loads(demo_file.read_text()) if demo_file.exists() else {}
        val = {"teacher": (demo.get("teacher") or {}).get("val_accuracy"),
               "coformer": (demo.get("coformer") or {}).get("val_accuracy"),
               "compressed": (demo.get("compressed") or {}).get("val_accuracy")}
        for run in bench["runs"]:
            method = run["method"]
            if label != "planned" and method in ("pipeline", "tensor-parallel"):
                continue  # the same teacher split in both runs; shown once
            found.append({"policy": label, "method": method, "rate_mbps": run["rate_mbps"],
                          "median_ms": run["latency_ms"]["median"], "speedup": run["speedup_vs_teacher"],
                          "kb": run["bytes_per_request"] / 1024,
                          "test": bench["accuracy"][method]["accuracy"], "val": val.get(method)})
    return found


def markdown(found: list[dict[str, Any]]) -> str:
    """The table: one row per (policy, method), a latency column pair per rate."""
    rates = sorted({r["rate_mbps"] for r in found})
    keys = list(dict.fromkeys((r["policy"], r["method"]) for r in found))
    head = "| policy | method | test acc. % | val. acc. % | " + " | ".join(
        f"{rate:g} Mb/s median ms (× its teacher)" for rate in rates) + " |"
    lines = [head, "|" + "---|" * (4 + len(rates))]
    for policy, method in keys:
        cells = {r["rate_mbps"]: r for r in found if (r["policy"], r["method"]) == (policy, method)}
        first = next(iter(cells.values()))
        val = "—" if first["val"] is None else f"{first['val']:.2f}"
        lat = " | ".join(f"{cells[rate]['median_ms']:.1f} ({cells[rate]['speedup']:.2f}×)" if rate in cells else "—"
                         for rate in rates)
        lines.append(f"| {policy} | {method} | {first['test']:.2f} | {val} | {lat} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    """Print the table; exit 1 when the loop wrote no bench."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the OUT directory of examples/testbed_loop.sh")
    args = ap.parse_args()
    found = rows(args.out)
    if not found:
        print(f"no bench.json under {args.out}/bench or {args.out}/proportional-bench: run examples/testbed_loop.sh first",
              file=sys.stderr)
        return 1
    print(markdown(found), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
