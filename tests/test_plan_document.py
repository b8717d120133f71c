"""The versioned plan document: stages, format versions, and load_plan's errors on earlier stages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coformer.artifacts import load_plan
from coformer.plan_document import (FORMAT_VERSION, PlanDocumentError, check_plan_document, read_plan_document,
                                    write_plan_document)
from coformer.spec import Policy, SubModelSpec, resolve_devices


def _searched_doc() -> dict:
    devices = resolve_devices("jetson-nano,jetson-tx2")
    specs = [SubModelSpec(1, 16, [1], [32]), SubModelSpec(1, 16, [1], [32])]
    return {"policy": Policy(specs, devices, {}).to_dict(), "predicted": {"psi": 1.0}, "strategy": "random",
            "backbone": "bert"}


def test_load_plan_on_a_search_result_names_the_missing_stage_and_command(tmp_path: Path) -> None:
    write_plan_document(tmp_path, _searched_doc(), "searched")
    with pytest.raises(PlanDocumentError) as err:  # was KeyError: 'sha256'
        load_plan(tmp_path)
    message = str(err.value)
    assert "'searched'" in message and "'packaged'" in message
    assert "coformer calibrate --plan DIR" in message


def test_older_and_newer_format_versions_are_refused(tmp_path: Path) -> None:
    doc = {**_searched_doc(), "format": 1, "sha256": {}}  # a packaged document of format 1
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    older = f"version 1, older than the version this coformer reads \\({FORMAT_VERSION}\\)"
    with pytest.raises(PlanDocumentError, match=older):
        load_plan(tmp_path)
    newer = {**_searched_doc(), "format_version": FORMAT_VERSION + 1, "stage": "packaged"}
    with pytest.raises(PlanDocumentError, match="newer.*upgrade coformer"):
        check_plan_document(newer, "plan.json", needs="packaged")


def test_a_search_result_is_read_back_for_its_policy_and_stamped_first(tmp_path: Path) -> None:
    path = write_plan_document(tmp_path, _searched_doc(), "searched")
    assert list(json.loads(path.read_text()))[:2] == ["format_version", "stage"]
    doc = read_plan_document(tmp_path)
    assert doc["stage"] == "searched" and Policy.from_dict(doc["policy"]).specs[0].layers == 1


def test_missing_and_malformed_plan_json_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(PlanDocumentError, match="not found.*coformer plan"):
        read_plan_document(tmp_path)
    (tmp_path / "plan.json").write_text("{\"stage\": ")
    with pytest.raises(PlanDocumentError, match="not valid JSON \\(line 1"):
        read_plan_document(tmp_path)
    with pytest.raises(PlanDocumentError, match="unknown stage 'decomposed'"):
        check_plan_document({"format_version": FORMAT_VERSION, "stage": "decomposed"}, "x/plan.json")


def test_bench_on_a_search_result_prints_the_missing_stage_not_a_traceback(tmp_path: Path, capsys) -> None:
    from coformer.cli import main

    write_plan_document(tmp_path, _searched_doc(), "searched")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--plan", str(tmp_path), "--workers", "inproc://a,inproc://b", "--out", str(tmp_path / "b")])
    assert exit_info.value.code != 0
    out = " ".join(capsys.readouterr().out.split())
    assert "is a 'searched' plan" in out and "coformer calibrate --plan DIR" in out and "Traceback" not in out
