"""examples/ablation.py chooses the weight rule on validation figures and renders every rule (issue #15, item 4)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ablation():
    spec = importlib.util.spec_from_file_location("ablation_example", ROOT / "examples" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rule(all_devices: float, subsets: dict[str, float]) -> dict:
    row = {"accuracy": all_devices, "aggregation_ms": 0.1, "params": 10, "subsets": subsets,
           "mean_over_subsets": sum(subsets.values()) / len(subsets)}
    return {"calibrated": [80.0, 85.0], "calibration_s": 1.0, "final_loss": [0.1, 0.1],
            "first_update_weight_ratio": 1.004, "aggregators": {"mlp_fusion": row}}


def test_rule_is_chosen_by_graceful_degradation_on_validation_and_every_rule_is_shown():
    ablation = _ablation()
    assert ablation.subsets_of(2) == [(0,), (1,), (0, 1)]
    rules = {
        # best with every device, but falls apart when one is missing
        "seed-unweighted": _rule(97.0, {"0": 60.0, "1": 70.0, "0,1": 97.0}),
        "paper": _rule(95.0, {"0": 80.0, "1": 85.0, "0,1": 95.0}),
        "boost": _rule(96.0, {"0": 79.0, "1": 84.0, "0,1": 96.0}),
    }
    assert ablation.choose_rule(rules) == "paper"  # subset means 75.67 / 86.67 / 86.33
    tied = {"paper": _rule(95.0, {"0": 80.0, "0,1": 95.0}), "boost": _rule(96.0, {"0": 79.0, "0,1": 96.0})}
    assert ablation.choose_rule(tied) == "boost"  # equal means: the all-devices accuracy decides
    test = {"rule": "paper", "teacher_accuracy": 96.0, "uncalibrated": [20.0, 30.0], "calibrated": [81.0, 84.0],
            "aggregators": {"mlp_fusion": {"accuracy": 94.0}}}
    text = ablation.markdown({"backbone": "bert", "dataset": "bbc_news", "devices": ["nano", "orin"],
                              "teacher_accuracy": 95.5, "uncalibrated": [21.0, 29.0], "rules": rules, "test": test})
    assert "validation split" in text and "### Test split (read once): paper rule" in text
    for rule in rules:
        assert f"| {rule} |" in text


def test_each_rule_runs_with_the_backbones_calibration_defaults_and_the_flags_on_top():
    import coformer

    ablation = _ablation()
    vit = coformer.create_backbone("vit")  # declares feature_weight 1.0 and a cosine schedule
    config = ablation.rule_config(vit, "boost", seed=3, overrides={"lr": 5e-5})
    assert config.weight_rule == "boost" and config.seed == 3 and config.lr == 5e-5
    for field, value in vit.calibration_defaults.items():
        if field != "weight_rule":
            assert getattr(config, field) == value, field


def test_an_image_backbone_is_ablated_at_the_demos_input_size():
    """The ablation loaded vit at timm's 224 px while the demo it ablates runs at 56 px (16x the tokens)."""
    import coformer
    from coformer.experiments.demo import DEMO_IMG_SIZE

    ablation = _ablation()
    vit, bert = coformer.create_backbone("vit"), coformer.create_backbone("bert")
    assert ablation.input_options(vit, max_length=None, img_size=None) == {"img_size": DEMO_IMG_SIZE}
    assert ablation.input_options(vit, max_length=64, img_size=112) == {"img_size": 112}
    assert ablation.input_options(bert, max_length=64, img_size=None) == {"max_length": 64}
    assert ablation.input_options(bert, max_length=None, img_size=None) == {}
