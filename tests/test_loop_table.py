"""examples/loop_table.py: the testbed loop's planned vs proportional vs compressed vs teacher table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(methods: dict[str, tuple[float, float]], medians: dict[tuple[str, float], float]) -> dict:
    """A bench.json document with the fields the table reads: accuracy per method, runs per (method, rate)."""
    runs = []
    for (method, rate), ms in medians.items():
        teacher = medians[("teacher", rate)]
        runs.append({"method": method, "rate_mbps": rate, "latency_ms": {"median": ms}, "bytes_per_request": 2048,
                     "speedup_vs_teacher": teacher / ms})
    return {"accuracy": {m: {"accuracy": acc} for m, (acc, _) in methods.items()}, "runs": runs}


def _write(out: Path, name: str, doc: dict) -> None:
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(doc))


def test_the_table_puts_both_policies_and_their_teachers_side_by_side_at_every_rate(tmp_path: Path) -> None:
    planned = {"teacher": (96.2, 0), "coformer": (94.8, 0), "compressed": (70.8, 0), "pipeline": (96.2, 0)}
    _write(tmp_path, "bench/bench.json", _bench(planned, {
        ("teacher", 2.0): 22.0, ("coformer", 2.0): 5.5, ("compressed", 2.0): 5.0, ("pipeline", 2.0): 800.0,
        ("teacher", 1000.0): 22.0, ("coformer", 1000.0): 5.5, ("compressed", 1000.0): 4.0,
        ("pipeline", 1000.0): 40.0}))
    _write(tmp_path, "demo.json", {"teacher": {"val_accuracy": 93.9}, "coformer": {"val_accuracy": 93.7},
                                   "compressed": {"val_accuracy": 71.9}})
    proportional = {"teacher": (96.2, 0), "coformer": (95.7, 0), "compressed": (97.0, 0), "pipeline": (96.2, 0)}
    _write(tmp_path, "proportional-bench/bench.json", _bench(proportional, {
        ("teacher", 2.0): 20.0, ("coformer", 2.0): 10.0, ("compressed", 2.0): 8.0, ("pipeline", 2.0): 800.0,
        ("teacher", 1000.0): 20.0, ("coformer", 1000.0): 10.0, ("compressed", 1000.0): 8.0,
        ("pipeline", 1000.0): 40.0}))

    res = subprocess.run([sys.executable, str(ROOT / "examples" / "loop_table.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)

    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "2 Mb/s" in lines[0] and "1000 Mb/s" in lines[0]
    assert "| planned | coformer | 94.80 | 93.70 | 5.5 (4.00×) | 5.5 (4.00×) |" in lines
    assert "| planned | compressed | 70.80 | 71.90 | 5.0 (4.40×) | 4.0 (5.50×) |" in lines
    # each policy's speed-up is against the teacher timed in its own run
    assert "| proportional | coformer | 95.70 | — | 10.0 (2.00×) | 10.0 (2.00×) |" in lines
    assert "| proportional | teacher | 96.20 | — | 20.0 (1.00×) | 20.0 (1.00×) |" in lines
    # the split baselines do not depend on the policy: shown once
    assert sum(line.startswith("| ") and "pipeline" in line for line in lines) == 1


def test_without_a_bench_it_says_which_command_to_run(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "loop_table.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "examples/testbed_loop.sh" in res.stderr
