"""examples/proxy_correlation.py: the rank statistic is Spearman's, and the quick run writes a full report."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("proxy_correlation", ROOT / "examples" / "proxy_correlation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_spearman_is_a_rank_correlation_with_average_ties():
    rho = _module().spearman
    assert rho([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)  # monotone, not linear
    assert rho([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: ranks a = 1, 2.5, 2.5, 4; b = 1, 2, 3, 4 → Pearson of ranks
    assert rho([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)


WORDNET_URI = "wordnet_supersense?train_size=120&val_size=60&test_size=60"


@pytest.mark.slow
@pytest.mark.parametrize("data", [None, WORDNET_URI])
def test_quick_run_reports_both_proxies_against_calibrated_accuracy(tmp_path: Path, data: str | None) -> None:
    if data == WORDNET_URI and not Path("/usr/share/wordnet/data.noun").is_file():
        pytest.skip("needs the Debian package wordnet-base (apt-get install wordnet-base)")
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "proxy_correlation.py"), "--quick",
                          "--policies", "3", *(["--data", data, "--calib-seeds", "2"] if data else []),
                          "--out", str(tmp_path / "out")],
                         capture_output=True, text=True,
                         timeout=1500, env={**os.environ, "COFORMER_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "proxy_correlation.json").read_text())
    assert doc["policies"] == 3 and len(doc["rows"]) == 3
    for row in doc["rows"]:
        assert row["probe_L_val"] > 0 and row["uncalibrated_L_val"] > 0
        assert 0 <= row["calibrated_val_accuracy"] <= 100
        seeds = row["calibrated_val_accuracy_per_seed"]
        assert len(seeds) == (2 if data else 1) and row["calibrated_val_accuracy"] == pytest.approx(sum(seeds) / len(seeds))
        assert len(row["policy"]) == 3  # Nano, TX2, Orin Nano
    assert -1 <= doc["spearman_probe"] <= 1 and -1 <= doc["spearman_uncalibrated"] <= 1
    assert doc["calibration"]["epochs"] == 1 and "Spearman rho" in run.stdout
    assert ("--data " + data in doc["command"]) if data else ("--data bbc_news" in doc["command"])


def test_spread_policies_span_the_pool_from_smallest_to_largest_total_flops():
    from types import SimpleNamespace

    class Encoding:
        def sample(self, rng):
            return (rng.randrange(1, 1000), rng.randrange(1, 1000))

        def policy(self, x):
            return SimpleNamespace(specs=x)

    class Evaluator:
        def check(self, policy):
            return []

        def cost(self, spec):
            return SimpleNamespace(flops=float(spec))

    mod = _module()
    pool = mod.sample_policies(Evaluator(), Encoding(), 4 * 5, seed=3)
    spread = mod.spread_policies(Evaluator(), Encoding(), 5, seed=3, pool=4)
    totals = [sum(p.specs) for p in spread]
    assert len(spread) == 5 and totals == sorted(totals)
    assert totals[0] == min(sum(p.specs) for p in pool) and totals[-1] == max(sum(p.specs) for p in pool)


def test_zero_calibration_seeds_is_refused_with_the_fix() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "proxy_correlation.py"), "--calib-seeds", "0"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--calib-seeds must be at least 1 (got 0)" in run.stderr
