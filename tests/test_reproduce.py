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


@pytest.mark.slow
@pytest.mark.skipif(torch.__version__.split("+")[0] != _pinned_torch(),
                    reason=f"the committed demo figures are for the pinned torch {_pinned_torch()}")
def test_coformer_demo_json_matches_the_committed_figures(tmp_path: Path) -> None:
    rep = _reproduce()
    out = tmp_path / "demo.json"
    run = subprocess.run([sys.executable, "-m", "coformer", "demo", "--out", str(tmp_path / "plan"), "--json", str(out)],
                         capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "COFORMER_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert rep.REFERENCE.is_file(), (f"{rep.REFERENCE} is missing: run `python examples/reproduce.py --quick "
                                     f"--update` on the pinned torch and commit it")
    reference = json.loads(rep.REFERENCE.read_text())
    assert rep.compare_with_reference(json.loads(out.read_text()), reference) == []
