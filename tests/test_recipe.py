"""``coformer run recipe.toml``: every stage from one file on a tiny BERT and a CSV; unchanged stages skipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import coformer
from coformer.artifacts import load_plan
from coformer.cli import build_cli
from coformer.experiments.recipe import RecipeError, load_recipe
from coformer.experiments.recipe_run import RecipeRun, stage_key
from tiny_split import tiny_text_project

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """\
format_version = 1
out = "runs/tiny"

[model]
backbone = "bert"
source = "ckpt"            # relative to this file
max_length = 16

[data]
uri = "csv:news.csv?text=body&label=topic"

[devices]
names = ["jetson-nano", "jetson-tx2"]

[profile]
shapes = 8
repeats = 1
warmup = 0

[search]
strategy = "random"
trials = 2
val_docs = 8
train_docs = 20

[calibrate]
aggregator = "mlp_fusion"
booster = { epochs = 1, batch_size = 16, lr = 1e-3, aggregator_epochs = 3 }

[bench]
workers = ["inproc://recipe-0", "inproc://recipe-1"]
link_mbps = [1000]
requests = 1
warmup = 0
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("recipe")
    mp = pytest.MonkeyPatch()
    mp.setenv("COFORMER_CACHE", str(root / "cache"))
    tiny_text_project(root)
    (root / "recipe.toml").write_text(RECIPE)
    yield root
    mp.undo()


def _run(recipe: Path, *extra: str) -> str:
    res = CliRunner().invoke(build_cli(), ["run", str(recipe), *extra], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())


def test_every_stage_runs_then_nothing_reruns_then_one_edited_line_reruns_only_what_it_feeds(project: Path) -> None:
    out = project / "runs" / "tiny"
    text = _run(project / "recipe.toml")
    assert "ran: profile, search, calibrate, bench" in text
    for device in ("jetson-nano", "jetson-tx2"):
        assert json.loads((out / "profile" / f"{device}-predictor.json").read_text())["device"] == device
    searched = json.loads((out / "search" / "plan.json").read_text())
    assert searched["stage"] == "searched" and len(searched["predicted"]["devices"]) == 2
    assert all(d["t1_source"] == "predictor" for d in searched["predicted"]["devices"])  # the profiled predictors
    plan = load_plan(out / "calibrate")
    assert plan.meta["policy"]["specs"] == searched["policy"]["specs"]
    assert plan.meta["dataset"] == coformer.create_dataset(f"csv:{project / 'news.csv'}?text=body&label=topic").uri
    assert load_plan(out / "calibrate" / "compressed").meta["policy"]["devices"][0]["name"] == "jetson-tx2"
    bench = json.loads((out / "bench" / "bench.json").read_text())
    assert {"teacher", "coformer", "compressed"} <= set(bench["accuracy"])

    assert "ran: nothing (every stage was up to date)" in _run(project / "recipe.toml")

    edited = project / "recipe.toml"
    edited.write_text(RECIPE.replace('aggregator = "mlp_fusion"', 'aggregator = "averaging"'))
    text = _run(edited)
    assert "ran: calibrate, bench" in text and "profile: inputs unchanged, skipped" in text
    assert json.loads((out / "calibrate" / "plan.json").read_text())["figures"]["coformer"]["aggregator"] == "averaging"

    (out / "bench" / "stage.json").unlink()  # as if the bench had been interrupted
    assert "ran: bench" in _run(edited)
    assert "ran: profile, search, calibrate, bench" in _run(edited, "--force")


def test_a_changed_data_file_changes_every_stage_key(project: Path, tmp_path: Path) -> None:
    recipe = load_recipe(project / "recipe.toml")
    before = RecipeRun(recipe).files
    copy = tmp_path / "recipe.toml"
    (tmp_path / "news.csv").write_text((project / "news.csv").read_text() + "one more line,sport\n")
    (tmp_path / "ckpt").symlink_to(project / "ckpt")
    copy.write_text(RECIPE)
    after = RecipeRun(load_recipe(copy)).files
    assert before["source"] == after["source"] and before["data"] != after["data"]
    assert stage_key("calibrate", {}, None, before) != stage_key("calibrate", {}, None, after)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("format_version = 1", "format_version = 0"), "format_version is 0; this coformer reads"),
    (lambda t: t.replace("trials = 2", "trails = 2"), "[search] has unknown key(s) trails; known: strategy, trials"),
    (lambda t: t.replace("[bench]", "[benchmark]"), "unknown section(s) benchmark"),
    (lambda t: t.replace("epochs = 1,", "epoch = 1,"), "[calibrate.booster] has unknown key(s) epoch"),
    (lambda t: t.replace('aggregator = "mlp_fusion"', 'aggregator = "mlp_fusion"\nlayers = 2'),
     "layers applies to the proportional policy"),
    (lambda t: t.replace('workers = ["inproc://recipe-0", "inproc://recipe-1"]', ""), "exactly one of testbed"),
    (lambda t: t.replace("trials = 2", "trials = = 2"), "line 22, column 10"),
])
def test_a_bad_recipe_is_refused_naming_the_file_and_the_problem(tmp_path: Path, edit: Any, message: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(edit(RECIPE))
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    assert str(bad) in str(err.value) and message in str(err.value)
    res = CliRunner().invoke(build_cli(), ["run", str(bad)])
    assert res.exit_code == 1 and message in " ".join(res.output.split())


def test_the_shipped_recipes_parse_and_the_demo_recipe_is_the_demo(tmp_path: Path) -> None:
    recipes = sorted((ROOT / "examples" / "recipes").glob("*.toml"))
    assert {p.stem for p in recipes} >= {"demo", "ablation"}
    for path in recipes:
        load_recipe(path)
    demo = load_recipe(ROOT / "examples" / "recipes" / "demo.toml")
    assert demo.stages == ("calibrate",) and demo.model["backbone"] == "bert" and demo.data["uri"] == "bbc_news"
    assert demo.calibrate["aggregator"] == "mlp_fusion" and demo.calibrate["compressed"] is True
    ablation = load_recipe(ROOT / "examples" / "recipes" / "ablation.toml")
    assert ablation.search is not None and ablation.bench is not None
