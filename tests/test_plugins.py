"""The plugin core: entry-point loading, registries, third-party plugins, failures, hook coverage."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import coformer
from coformer import hookspecs, registry
from coformer.heads import ClassifierHead, StudentHead

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PLUGIN = ROOT / "examples" / "third_party_plugin" / "coformer_max_confidence.py"


def test_every_builtin_entry_point_loads():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["coformer"]
    assert coformer.load_failures() == []
    names = {p.plugin for p in coformer.list_plugins()}
    assert set(declared) <= names


def test_builtins_of_every_kind_are_registered():
    kinds = {k: {p.name for p in coformer.list_plugins(k)} for k in registry.KINDS}
    assert {"bert", "vit", "deit", "swin", "gpt2", "flan_t5", "llama"} <= kinds["backbone"]
    assert {"mlp_fusion", "averaging", "voting", "attention", "se"} <= kinds["aggregator"]
    assert {"ax_gp_ei", "random", "uniform"} <= kinds["search"]
    assert {"inproc", "grpc"} <= kinds["transport"]
    bert = registry.get("backbone", "bert")
    assert (bert.distribution, bert.version) == ("coformer", coformer.__version__)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(coformer.UnknownPluginError) as err:
        coformer.create_aggregator("mean_of_everything")
    msg = str(err.value)
    assert "unknown aggregator 'mean_of_everything'" in msg and "mlp_fusion" in msg and "averaging" in msg
    with pytest.raises(coformer.UnknownPluginError, match="known transports: .*inproc"):
        coformer.open_transport("carrier-pigeon://coop")
    with pytest.raises(coformer.UnknownPluginError, match="known kinds: backbone"):
        coformer.list_plugins("widget")


def _load_example_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("coformer_max_confidence", EXAMPLE_PLUGIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runtime_registered_plugin_is_used():
    module = _load_example_module()
    name = coformer.register_plugin(module, name="max-confidence-test")
    try:
        assert "max_confidence" in {p.name for p in coformer.list_plugins("aggregator")}
        torch.manual_seed(0)
        task = ClassifierHead(4, 3)
        students = [StudentHead(d, 4, task) for d in (2, 3)]
        agg = coformer.create_aggregator("max_confidence", feature_dims=[2, 3], embed_dim=4, task_head=task,
                                         student_heads=students)
        f = [torch.randn(5, 2), torch.randn(5, 3)]
        out = agg(f)
        per = torch.stack([students[0](f[0]), students[1](f[1])])
        best = per.softmax(-1).amax(-1).argmax(0)
        assert torch.equal(out, per[best, torch.arange(5)])
        assert torch.equal(agg([None, f[1]]), students[1](f[1]))  # a missing device is simply left out
    finally:
        coformer.unregister_plugin(name)
    assert "max_confidence" not in {p.name for p in coformer.list_plugins("aggregator")}


def _fake_distribution(site: Path, dist: str, version: str, entry_points: dict[str, str]) -> None:
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[coformer]\n{eps}\n")


def test_installed_third_party_plugin_and_a_broken_one(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(EXAMPLE_PLUGIN, site / EXAMPLE_PLUGIN.name)
    (site / "broken_plugin.py").write_text("raise ImportError('needs libfoo, which is not installed')\n")
    _fake_distribution(site, "coformer-max-confidence", "0.1.0", {"max_confidence": "coformer_max_confidence"})
    _fake_distribution(site, "coformer-broken", "9.9", {"broken": "broken_plugin"})
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "200"}
    cli = [sys.executable, "-m", "coformer"]
    out = subprocess.run([*cli, "plugins"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if "max_confidence" in line)
    assert "aggregator" in row and "coformer-max-confidence" in row and "0.1.0" in row
    assert re.search(r"failed to load.*broken.*coformer-broken.*needs libfoo", out.stdout.replace("\n", " "))
    assert "mlp_fusion" in out.stdout  # the others still load
    hello = subprocess.run([*cli, "hello"], env=env, capture_output=True, text=True, timeout=120)
    assert hello.returncode == 0 and "hello from coformer-max-confidence" in hello.stdout


def test_every_hook_is_exercised_by_a_test():
    """Meta-test: each hook spec must be implemented by a plugin defined in some test (or test-run example)."""
    specs = [name for name, fn in vars(hookspecs).items()
             if callable(fn) and hasattr(fn, "coformer_spec")]
    assert specs, "no hook specs found"
    sources = [p.read_text() for p in (ROOT / "tests").glob("test_*.py")] + [EXAMPLE_PLUGIN.read_text()]
    implemented = {node.name for src in sources for node in ast.walk(ast.parse(src))
                   if isinstance(node, ast.FunctionDef)}
    missing = [s for s in specs if s not in implemented]
    assert not missing, f"hooks with no test implementing them: {missing}"


def test_cli_reports_bad_input_without_a_traceback():
    out = subprocess.run([sys.executable, "-m", "coformer", "demo", "--backbone", "nope"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 2
    text = out.stdout + out.stderr
    assert "error: unknown backbone 'nope'; known backbones: bert" in text and "Traceback" not in text
