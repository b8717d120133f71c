"""examples/reproduce.py: every quoted figure has a runnable command, and the demo reproduces the committed figures."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _reproduce() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "examples" / "reproduce.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


def _pinned_torch() -> str:
    match = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert match, "constraints.txt pins torch"
    return match.group(1)


def test_every_figure_command_names_a_real_command_or_script() -> None:
    from coformer.cli import build_cli

    rep = _reproduce()
    commands = build_cli().commands
    figs = rep.figures()
    assert len({f.id for f in figs}) == len(figs)
    assert [f.id for f in figs if f.tier == "quick"] == ["demo"]
    for f in figs:
        argv = f.command.split()
        if argv[0] == "coformer":
            assert argv[1] in commands, f"{f.id}: `coformer {argv[1]}` does not exist"
        else:
            assert argv[0] in ("python", "bash") and (ROOT / argv[1]).is_file(), f"{f.id}: {argv[1]} does not exist"
    listing = subprocess.run([sys.executable, str(ROOT / "examples" / "reproduce.py"), "--full", "--list"],
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert all(f.command in listing.stdout for f in figs)


def test_the_check_compares_deterministic_figures_and_ignores_latency() -> None:
    rep = _reproduce()
    row = {"accuracy": 95.5, "val_accuracy": 96.0, "params": 10, "flops": 2.0, "latency_ms": 3.0}
    doc = {"teacher": {"name": "teacher", **row}, "submodels": [{"name": "sub-model 0 (x)", **row}],
           "coformer": {"name": "CoFormer", **row}, "compressed": None}
    reference = {"figures": rep.deterministic_figures(doc)}
    assert "latency_ms" not in reference["figures"]["CoFormer"]
    slower = copy.deepcopy(doc)
    slower["coformer"]["latency_ms"] = 9.0
    assert rep.compare_with_reference(slower, reference) == []
    worse = copy.deepcopy(doc)
    worse["coformer"]["accuracy"] = 95.28
    assert rep.compare_with_reference(worse, reference) == ["CoFormer accuracy: committed 95.5, this run 95.28"]


def _demo_doc(coformer_accuracy: float) -> dict:
    row = {"accuracy": 95.5, "val_accuracy": 96.0, "params": 10, "flops": 2.0}
    return {"teacher": {"name": "teacher", **row}, "submodels": [],
            "coformer": {"name": "CoFormer", **row, "accuracy": coformer_accuracy}, "compressed": None}


def test_figures_are_kept_per_cpu_capability_and_a_file_without_one_still_reads() -> None:
    """The demo's accuracies moved by 0.68 point on an AVX2 machine, so one set of figures cannot serve every CPU."""
    rep = _reproduce()
    old = {"date": "2026-12-02T08:56:20Z", "figures": rep.deterministic_figures(_demo_doc(95.96))}
    assert rep.reference_sets(old) == [{"cpu_capability": None, "date": old["date"], "figures": old["figures"]}]
    assert rep.reference_for(old, "AVX2") is None
    both = rep.with_reference(old, rep.deterministic_figures(_demo_doc(95.28)), "AVX2", "2026-12-02T16:00:00Z", "2.14.1")
    assert [r["cpu_capability"] for r in rep.reference_sets(both)] == [None, "AVX2"]
    assert rep.reference_for(both, "AVX2")["figures"]["CoFormer"]["accuracy"] == 95.28
    again = rep.with_reference(both, rep.deterministic_figures(_demo_doc(95.50)), "AVX2", "later", "2.14.1")
    assert [r["cpu_capability"] for r in rep.reference_sets(again)] == [None, "AVX2"]  # this CPU's set replaced
    assert rep.reference_for(again, "AVX2")["date"] == "later"


def test_the_check_compares_with_this_cpus_figures_and_never_calls_another_cpus_a_failure() -> None:
    rep = _reproduce()
    committed = rep.with_reference({"date": "d0", "figures": rep.deterministic_figures(_demo_doc(95.96))},
                                   rep.deterministic_figures(_demo_doc(95.28)), "AVX2", "d1", "2.14.1")
    assert rep.check_against(_demo_doc(95.28), committed, "AVX2") == (True, [])
    assert rep.check_against(_demo_doc(95.06), committed, "AVX2") == (
        True, ["CoFormer accuracy: committed 95.28, this run 95.06"])
    checked, lines = rep.check_against(_demo_doc(95.28), {"date": "d0", "figures": committed["references"][0]["figures"]},
                                       "AVX512")
    assert not checked and lines[0].startswith("not checked: no figures are committed for this CPU (AVX512)")
    assert "a CPU whose capability was not recorded (d0)" in lines[0]
    assert lines[1:] == ["CoFormer accuracy: committed 95.96, this run 95.28"]


@pytest.mark.slow
@pytest.mark.skipif(torch.__version__.split("+")[0] != _pinned_torch(),
                    reason=f"the committed demo figures are for the pinned torch {_pinned_torch()}")
def test_coformer_demo_json_matches_the_committed_figures(tmp_path: Path) -> None:
    rep = _reproduce()
    assert rep.REFERENCE.is_file(), (f"{rep.REFERENCE} is missing: run `python examples/reproduce.py --quick "
                                     f"--update` on the pinned torch and commit it")
    reference = rep.reference_for(json.loads(rep.REFERENCE.read_text()), rep.cpu_capability())
    if reference is None:
        pytest.skip(f"no demo figures are committed for {rep.cpu_capability()} CPUs (`python examples/reproduce.py "
                    f"--quick --update` records them)")
    out = tmp_path / "demo.json"
    run = subprocess.run([sys.executable, "-m", "coformer", "demo", "--out", str(tmp_path / "plan"), "--json", str(out)],
                         capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "COFORMER_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert rep.compare_with_reference(json.loads(out.read_text()), reference) == []
