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


# --------------------------------------------------------------------------- a registry you can trust

class _RaisingPlugin:
    """A plugin whose register hook fails half-way: nothing it registered may stay."""

    @coformer.hookimpl
    def register_aggregators(self, register):
        from coformer_aggregators.averaging import AveragingAggregator

        register("half_registered", AveragingAggregator)
        raise RuntimeError("needs a GPU driver")


class _TwicePlugin:
    @coformer.hookimpl
    def register_search_strategies(self, register):
        from coformer_search.random_search import RandomSearch

        register("twice", RandomSearch)
        register("twice", RandomSearch)


class _ThiefPlugin:
    @coformer.hookimpl
    def register_backbones(self, register):
        register("bert", lambda: "not a backbone")


class _MisspelledPlugin:
    @coformer.hookimpl
    def register_backbone(self, register):  # missing the final "s"
        register("never", object)


def test_a_failing_register_hook_is_reported_and_breaks_nothing_else():
    names = [coformer.register_plugin(p, name=n) for p, n in
             ((_RaisingPlugin(), "raising-test"), (_TwicePlugin(), "twice-test"), (_ThiefPlugin(), "thief-test"))]
    try:
        aggregators = {p.name for p in coformer.list_plugins("aggregator")}
        assert "half_registered" not in aggregators and {"mlp_fusion", "averaging"} <= aggregators
        assert "twice" not in {p.name for p in coformer.list_plugins("search")}
        assert registry.get("backbone", "bert").plugin == "bert"  # the built-in keeps its name
        assert type(coformer.create_backbone("bert")).__name__ == "BertBackbone"
        failures = {f.name: f for f in coformer.load_failures()}
        assert failures["raising-test"].value == "register_aggregators()"
        assert "RuntimeError: needs a GPU driver" in failures["raising-test"].error
        assert "registers search 'twice' twice" in failures["twice-test"].error
        assert "backbone 'bert' is already registered by 'bert'" in failures["thief-test"].error
    finally:
        for n in names:
            coformer.unregister_plugin(n)
    assert not [f for f in coformer.load_failures() if f.name.endswith("-test")]  # gone with the plugins


def test_a_misspelled_hook_is_refused_with_a_suggestion():
    with pytest.raises(ValueError,
                       match="'register_backbone' is not a coformer hook; did you mean 'register_backbones'"):
        coformer.register_plugin(_MisspelledPlugin(), name="misspelled-test")
    from coformer.plugins import get_plugin_manager

    pm = get_plugin_manager()
    assert not pm.has_plugin("misspelled-test")
    pm.check_pending()  # nothing unknown left behind


def test_broken_entry_point_plugins_are_listed_by_coformer_plugins(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "misspelled_plugin.py").write_text(
        "from coformer import hookimpl\n\n@hookimpl\ndef register_datasetz(register):\n    register('x', dict)\n")
    (site / "raising_plugin.py").write_text(
        "from coformer import hookimpl\n\n@hookimpl\ndef register_datasets(register):\n"
        "    raise OSError('the corpus server is down')\n")
    _fake_distribution(site, "coformer-typo", "1.0", {"typo": "misspelled_plugin"})
    _fake_distribution(site, "coformer-raising", "2.0", {"raising": "raising_plugin"})
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "250"}
    out = subprocess.run([sys.executable, "-m", "coformer", "plugins"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert re.search(r"failed to load typo \(misspelled_plugin, from coformer-typo\): ValueError: .*"
                     r"'register_datasetz' is not a coformer hook; did you mean 'register_datasets'", text), text
    assert re.search(r"failed to load raising \(register_datasets\(\), from coformer-raising\): "
                     r"OSError: the corpus server is down", text), text
    assert "wordnet_supersense" in text and "mlp_fusion" in text  # everything else still loads


def _plugin_names_in_subprocess(value: str | None) -> tuple[set[str], list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "COFORMER_LOAD_PLUGINS"}
    if value is not None:
        env["COFORMER_LOAD_PLUGINS"] = value
    code = ("import coformer, json; print(json.dumps([sorted({p.plugin for p in coformer.list_plugins()}), "
            "[f.error for f in coformer.load_failures()]]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json

    plugins, errors = json.loads(out.stdout)
    return set(plugins), errors


def test_coformer_load_plugins_selects_entry_point_plugins():
    chosen, errors = _plugin_names_in_subprocess("bert, mlp_fusion,csv_typo")
    assert chosen == {"bert", "mlp_fusion"}
    assert len(errors) == 1 and "no installed plugin is called 'csv_typo'" in errors[0] and "tabular" in errors[0]
    none, errors = _plugin_names_in_subprocess("")
    assert none == set() and errors == []
    everything, _ = _plugin_names_in_subprocess(None)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["coformer"]
    assert set(declared) <= everything


def test_the_registered_key_is_the_only_name():
    from coformer.aggregator import Aggregator
    from coformer_aggregators.averaging import AveragingAggregator
    from coformer_search.random_search import RandomSearch

    class Renamed:
        @coformer.hookimpl
        def register_aggregators(self, register):
            register("mean_of_students", AveragingAggregator)

        @coformer.hookimpl
        def register_search_strategies(self, register):
            register("dice", RandomSearch)

        @coformer.hookimpl
        def register_backbones(self, register):
            register("not_a_backbone", lambda: object())

    name = coformer.register_plugin(Renamed(), name="renamed-test")
    try:
        task = ClassifierHead(4, 3)
        agg = coformer.create_aggregator("mean_of_students", feature_dims=[2], embed_dim=4, task_head=task,
                                         student_heads=[StudentHead(2, 4, task)])
        assert isinstance(agg, Aggregator) and agg.name == "mean_of_students"
        assert agg.config["name"] == "mean_of_students"  # what a saved plan names rebuilds this very object
        assert coformer.create_search_strategy("dice").name == "dice"
        assert coformer.create_aggregator("averaging", feature_dims=[2], embed_dim=4, task_head=task,
                                          student_heads=[StudentHead(2, 4, task)]).name == "averaging"
        with pytest.raises(coformer.PluginTypeError, match=r"backbone 'not_a_backbone' from plugin 'renamed-test' "
                                                           r"returned a object, not a coformer\.backbone\.Backbone"):
            coformer.create_backbone("not_a_backbone")
    finally:
        coformer.unregister_plugin(name)


def test_every_hookspec_is_documented():
    specs = {name: fn for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, "coformer_spec")}
    assert "register_datasets" in specs
    undocumented = [name for name, fn in specs.items() if len((fn.__doc__ or "").strip()) < 20]
    assert not undocumented, f"hook specs without a docstring: {undocumented}"


def test_the_package_is_typed():
    assert (ROOT / "coformer" / "py.typed").is_file()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert "coformer" in packages["packages"] and "plugins/datasets/coformer_datasets" in packages["packages"]


def test_plugins_module_does_not_import_the_registry():
    """The plugin manager sits below the registry: no import of it, even inside a function (was a cycle)."""
    tree = ast.parse((ROOT / "coformer" / "plugins.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not {m for m in imported if m and m.startswith("coformer.registry")}, imported


# --------------------------------------------------------------------------- contract over every transport

def _start_worker(scheme: str, request: pytest.FixtureRequest) -> str:
    """A live worker for ``scheme`` on this machine, returning its URI: served by the transport itself where it
    serves; skip for a connect-only scheme this test does not know how to start."""
    from coformer.online.serve import ServingTransport, start_serving
    from coformer.transport import get_transport

    if isinstance(get_transport(scheme), ServingTransport):
        server = start_serving(scheme, "127.0.0.1:0", name="contract")
        request.addfinalizer(lambda: server.stop(0))
        return server.uri
    if scheme == "inproc":
        from coformer_transports.inprocess import shutdown

        request.addfinalizer(lambda: shutdown("transport-contract"))
        return "inproc://transport-contract"
    pytest.skip(f"{scheme!r} only connects and this test cannot start a worker for it")


@pytest.fixture(scope="module")
def tiny_submodels():
    from coformer.artifacts import submodel_artifact
    from coformer.offline.decompose import proportional_specs

    torch.manual_seed(0)
    backbone = coformer.create_backbone("bert")
    teacher = backbone.tiny(num_labels=3)
    batch = backbone.example_batch(teacher, batch_size=3)
    subs = [s.eval() for s in backbone.decompose(teacher, proportional_specs(backbone.shape(teacher), [2, 1]),
                                                 batch=batch)]
    return subs, [submodel_artifact(s) for s in subs], batch


@pytest.mark.timeout(120)
@pytest.mark.parametrize("info", coformer.list_plugins("transport"), ids=lambda i: i.name)
def test_every_registered_transport_round_trips(info, tiny_submodels, request):
    from coformer.transport import BadRequestError, TransportError, WorkerClient

    subs, arts, batch = tiny_submodels
    uri = _start_worker(info.name, request)
    client = coformer.open_transport(uri)
    try:
        assert isinstance(client, WorkerClient) and client.uri == uri
        for sub, art in zip(subs, arts):
            assert client.load(art) is False and client.load(art) is True  # sent once, then cached by sha256
            result = client.infer(art.sha256, batch)
            with torch.inference_mode():
                expected = sub(**batch)
            assert result.features.dtype == torch.float16 and result.features.shape == expected.shape
            torch.testing.assert_close(result.features.float(), expected, atol=2e-3, rtol=2e-3)
        assert isinstance(client.health(), dict)
        # inproc raises BadRequestError, grpc TransportError (FAILED_PRECONDITION): both name what is missing
        with pytest.raises((BadRequestError, TransportError), match="no sub-model with sha256 000000000000"):
            client.infer("0" * 64, batch)
    finally:
        client.close()


def test_the_core_names_no_plugin_outside_its_defaults() -> None:
    """Every plugin name as a string in core code (docstrings aside) lives in coformer/defaults.py."""
    core = Path(coformer.__file__).parent
    names = {p.name for p in coformer.list_plugins()}
    found = []
    for path in sorted(core.rglob("*.py")):
        if path.name == "defaults.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        found += [f"{path.relative_to(core)}:{n.lineno} {n.value!r}" for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names
                  and id(n) not in docstrings]
    assert not found, f"plugin names in the core (move them to coformer/defaults.py): {found}"
