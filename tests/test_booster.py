"""Progressive boosting distillation on a tiny real BERT: update rules, loss, hooks, checkpoint/resume."""

from __future__ import annotations

import math

import pytest
import torch

import coformer
from coformer.offline.booster import (
    BoosterConfig,
    CheckpointMismatchError,
    calibrate,
    submodel_features,
    train_aggregator,
    update_weights,
)
from coformer.data import TensorDataset
from coformer.offline.decompose import proportional_specs

M = 32


# -- update rules, by hand -------------------------------------------------------------------

# M = 4 samples; losses chosen so that exp(±(1 − 1/4)·L) = exp(±0.75·L) is a power of two:
# L = (0, 4/3·ln2, 8/3·ln2, 0) → 0.75·L = (0, ln2, 2·ln2, 0).
LN2 = math.log(2.0)
LOSSES = torch.tensor([0.0, 4 / 3 * LN2, 8 / 3 * LN2, 0.0])


def test_seed_unweighted_rule_uniform_start():
    # w·exp(−0.75·L) = 0.25·(1, 1/2, 1/4, 1); sum = 0.25·2.75 → (4, 2, 1, 4)/11
    out = update_weights(torch.full((4,), 0.25), LOSSES, "seed-unweighted")
    torch.testing.assert_close(out, torch.tensor([4, 2, 1, 4], dtype=torch.float64) / 11)


def test_boost_rule_uniform_start():
    # w·exp(+0.75·L) = 0.25·(1, 2, 4, 1); sum = 0.25·8 → (1, 2, 4, 1)/8
    out = update_weights(torch.full((4,), 0.25), LOSSES, "boost")
    torch.testing.assert_close(out, torch.tensor([1, 2, 4, 1], dtype=torch.float64) / 8)


def test_rules_from_non_uniform_weights():
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    # seed-unweighted: (0.1·1, 0.2·½, 0.3·¼, 0.4·1) = (0.1, 0.1, 0.075, 0.4), sum 0.675 → (4, 4, 3, 16)/27
    torch.testing.assert_close(update_weights(w, LOSSES, "seed-unweighted"),
                               torch.tensor([4, 4, 3, 16], dtype=torch.float64) / 27)
    # boost: (0.1·1, 0.2·2, 0.3·4, 0.4·1) = (0.1, 0.4, 1.2, 0.4), sum 2.1 → (1, 4, 12, 4)/21
    torch.testing.assert_close(update_weights(w, LOSSES, "boost"),
                               torch.tensor([1, 4, 12, 4], dtype=torch.float64) / 21)


def test_paper_rule_puts_the_weighted_loss_in_the_exponent():
    # eq. 13 with eq. 14's L_Bo,i = w_i·ℓ_i: exponent (1/M − 1)·w_i·ℓ_i; here M = 4, w = 1/4
    expected = torch.tensor([0.0, 4 / 3 * LN2, 8 / 3 * LN2, 0.0], dtype=torch.float64)
    expected = torch.exp(-0.75 * 0.25 * expected)
    out = update_weights(torch.full((4,), 0.25), LOSSES, "paper")
    torch.testing.assert_close(out, expected / expected.sum())
    # non-uniform weights: each sample's own weight scales its exponent
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    raw = w * torch.exp(-0.75 * w * LOSSES.double())
    torch.testing.assert_close(update_weights(w, LOSSES, "paper"), raw / raw.sum())


def test_paper_rule_barely_moves_weights_at_bbc_size_and_seed_unweighted_does():
    """The issue's figures: at M = 1,335 (BBC News train split) one step of eq. 13 as written leaves the
    max/min weight ratio near 1.004, while the unweighted-exponent rule spreads it by orders of magnitude."""
    m = 1335
    g = torch.Generator().manual_seed(0)
    # per-sample ½[CE_y + CE_ŷ] of a half-trained sub-model: most near 0, a tail up to ~5.6 nats
    losses = torch.cat([torch.rand(m - 2, generator=g, dtype=torch.float64) * 0.5,
                        torch.tensor([0.0, 5.6], dtype=torch.float64)])
    uniform = torch.full((m,), 1.0 / m, dtype=torch.float64)
    spread = float(losses.max() - losses.min())

    paper = update_weights(uniform, losses, "paper")
    ratio_paper = float(paper.max() / paper.min())
    assert ratio_paper == pytest.approx(math.exp((1 - 1 / m) / m * spread), rel=1e-9)
    assert 1.003 < ratio_paper < 1.005

    unweighted = update_weights(uniform, losses, "seed-unweighted")
    ratio_unweighted = float(unweighted.max() / unweighted.min())
    assert ratio_unweighted == pytest.approx(math.exp((1 - 1 / m) * spread), rel=1e-9)
    assert ratio_unweighted > 100 * ratio_paper
    # the paper's and seed-unweighted's signs agree: hard samples lose weight under both
    assert paper.argmin() == unweighted.argmin() == m - 1
    boost = update_weights(uniform, losses, "boost")
    assert boost.argmax() == m - 1


def test_seed_is_a_deprecated_alias_of_seed_unweighted():
    with pytest.warns(DeprecationWarning, match="'seed' is deprecated.*'seed-unweighted'"):
        old = update_weights(torch.full((4,), 0.25), LOSSES, "seed")
    torch.testing.assert_close(old, update_weights(torch.full((4,), 0.25), LOSSES, "seed-unweighted"))
    with pytest.warns(DeprecationWarning):
        cfg = BoosterConfig(weight_rule="seed")
    assert cfg.weight_rule == "seed-unweighted"


def test_boost_rule_does_not_overflow():
    out = update_weights(torch.full((3,), 1 / 3), torch.tensor([0.0, 500.0, 1000.0]), "boost")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


def test_bad_update_inputs():
    with pytest.raises(ValueError, match="unknown weight rule 'adaboost'"):
        update_weights(torch.ones(2) / 2, torch.zeros(2), "adaboost")
    with pytest.raises(ValueError, match="one entry per sample"):
        update_weights(torch.ones(2) / 2, torch.zeros(3), "seed-unweighted")
    with pytest.raises(ValueError, match="finite"):
        update_weights(torch.ones(2) / 2, torch.tensor([0.0, float("nan")]), "paper")
    with pytest.raises(ValueError, match="weight_rule 'x' is unknown"):
        BoosterConfig(weight_rule="x")
    with pytest.raises(ValueError, match="device_dropout"):
        BoosterConfig(device_dropout=1.0)


# -- calibration on a tiny real BERT --------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    backbone = coformer.create_backbone("bert")
    teacher = backbone.tiny(num_labels=3, seed=0)
    batch = backbone.example_batch(teacher, M, seed=1)
    labels = torch.randint(3, (M,), generator=torch.Generator().manual_seed(2))
    train = TensorDataset(batch, labels)
    specs = proportional_specs(backbone.shape(teacher), [1.0, 2.0, 3.0])
    importance = backbone.importance(teacher, batch)

    def fresh():
        return backbone.decompose(teacher, specs, importance=importance)

    return backbone, teacher, train, fresh


def config(**kw):
    base = dict(epochs=4, lr=3e-3, batch_size=8, seed=7, mixed_precision="no")
    base.update(kw)
    return BoosterConfig(**base)


class Recorder:
    """A runtime plugin that records the calibration notifications (and can interrupt a run)."""

    def __init__(self, interrupt_after: int | None = None):
        self.steps: list[tuple[int, int, int, float]] = []
        self.finished: list[tuple[int, torch.Tensor]] = []
        self.interrupt_after = interrupt_after

    @coformer.hookimpl
    def calibration_step(self, submodel, epoch, step, loss):
        self.steps.append((submodel, epoch, step, loss))

    @coformer.hookimpl
    def calibration_finished(self, submodel, sample_weights):
        self.finished.append((submodel, sample_weights.clone()))
        if submodel == self.interrupt_after:
            raise KeyboardInterrupt(f"interrupted after sub-model {submodel}")


@pytest.fixture
def recorder():
    rec = Recorder()
    name = coformer.register_plugin(rec, name="test-booster-recorder")
    yield rec
    coformer.unregister_plugin(name)


def test_calibration_lowers_loss_and_chains_weights(setup, recorder):
    backbone, teacher, train, fresh = setup
    subs = fresh()
    cfg = config()
    result = calibrate(backbone, teacher, subs, train, config=cfg, on_progress=False)
    n = len(subs)
    assert len(result.student_heads) == len(result.sample_weights) == len(result.loss_history) == n
    for i in range(n):
        assert result.final_loss[i] < 0.9 * result.initial_loss[i]
        assert result.loss_history[i][-1] < result.loss_history[i][0]
    # teacher hard labels computed once from the frozen teacher
    with torch.no_grad():
        torch.testing.assert_close(result.teacher_labels, backbone.forward_teacher(teacher, train.inputs).argmax(-1))
    # W_1 uniform; W_{n+1} = rule(W_n, sub-model n's unweighted per-sample loss, recomputed here)
    torch.testing.assert_close(result.sample_weights[0], torch.full((M,), 1 / M, dtype=torch.float64))
    chained = result.sample_weights[1:] + [result.final_weights]
    for i, (sub, head) in enumerate(zip(result.submodels, result.student_heads)):
        with torch.no_grad():
            logits = head(sub.eval()(**train.inputs))
        per = 0.5 * (torch.nn.functional.cross_entropy(logits, train.labels, reduction="none")
                     + torch.nn.functional.cross_entropy(logits, result.teacher_labels, reduction="none"))
        torch.testing.assert_close(per.mean().item(), result.final_loss[i], rtol=1e-5, atol=1e-6)
        expected = update_weights(result.sample_weights[i], per, "boost")
        torch.testing.assert_close(chained[i], expected, rtol=1e-5, atol=1e-9)
        # boosting: the hardest sample gained weight relative to the easiest one
        assert chained[i][per.argmax()] / chained[i][per.argmin()] > \
            result.sample_weights[i][per.argmax()] / result.sample_weights[i][per.argmin()]
    # notifications: one per optimiser step, one per finished sub-model with the next weights
    assert len(recorder.steps) == n * cfg.epochs * math.ceil(M / cfg.batch_size)
    assert [s for s, _ in recorder.finished] == list(range(n))
    for (_, w), expected in zip(recorder.finished, chained):
        assert torch.equal(w, expected)


def test_seed_rule_lowers_hard_samples(setup):
    backbone, teacher, train, fresh = setup
    result = calibrate(backbone, teacher, fresh()[:1], train, config=config(weight_rule="seed-unweighted", epochs=1),
                       on_progress=False)
    w = result.final_weights
    sub, head = result.submodels[0], result.student_heads[0]
    with torch.no_grad():
        logits = head(sub.eval()(**train.inputs))
    per = 0.5 * (torch.nn.functional.cross_entropy(logits, train.labels, reduction="none")
                 + torch.nn.functional.cross_entropy(logits, result.teacher_labels, reduction="none"))
    assert w[per.argmax()] < w[per.argmin()]


def _state(result):
    out = {}
    for i, (s, h) in enumerate(zip(result.submodels, result.student_heads)):
        out.update({f"{i}.sub.{k}": v for k, v in s.state_dict().items()})
        out.update({f"{i}.head.{k}": v for k, v in h.state_dict().items()})
    for i, w in enumerate(result.sample_weights + [result.final_weights]):
        out[f"w{i}"] = w
    return out


def test_resume_is_bit_identical(setup, tmp_path):
    backbone, teacher, train, fresh = setup
    cfg = config(epochs=2, checkpoint_dir=tmp_path / "run")
    full = calibrate(backbone, teacher, fresh(), train, config=config(epochs=2), on_progress=False)

    rec = Recorder(interrupt_after=0)
    name = coformer.register_plugin(rec, name="test-booster-interrupt")
    try:
        with pytest.raises(KeyboardInterrupt):
            calibrate(backbone, teacher, fresh(), train, config=cfg, on_progress=False)
    finally:
        coformer.unregister_plugin(name)
    assert [s for s, _ in rec.finished] == [0]
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["state.json", "submodel_0.safetensors", "weights.safetensors"]

    torch.manual_seed(12345)  # the caller's global RNG state must not matter
    resumed = calibrate(backbone, teacher, fresh(), train, config=cfg, on_progress=False)
    assert resumed.resumed == [0]
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.loss_history == full.loss_history

    # a finished run resumes to the same result without training anything
    again = calibrate(backbone, teacher, fresh(), train, config=cfg, on_progress=False)
    assert again.resumed == [0, 1, 2]
    assert all(torch.equal(v, _state(again)[k]) for k, v in a.items())

    with pytest.raises(CheckpointMismatchError, match="weight_rule"):
        calibrate(backbone, teacher, fresh(), train, config=config(epochs=2, checkpoint_dir=cfg.checkpoint_dir,
                                                                   weight_rule="seed-unweighted"), on_progress=False)


def test_train_aggregator_on_calibrated_features(setup):
    backbone, teacher, train, fresh = setup
    result = calibrate(backbone, teacher, fresh(), train, config=config(epochs=1), on_progress=False)
    feats = submodel_features(result.submodels, train, batch_size=8)
    assert [f.shape for f in feats] == [(M, s.feature_dim) for s in result.submodels]
    kwargs = dict(feature_dims=[s.feature_dim for s in result.submodels],
                  embed_dim=backbone.shape(teacher).embed_dim, task_head=backbone.task_head(teacher),
                  student_heads=result.student_heads)

    averaging = coformer.create_aggregator("averaging", **kwargs)
    before = {k: v.clone() for k, v in averaging.state_dict().items()}
    assert train_aggregator(averaging, feats, train.labels, config=config()) == []
    assert all(torch.equal(before[k], v) for k, v in averaging.state_dict().items())

    cfg = config(aggregator_epochs=30, aggregator_lr=1e-2, device_dropout=0.0)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # same initial aggregator weights
        agg = coformer.create_aggregator("mlp_fusion", **kwargs)
        losses = train_aggregator(agg, feats, train.labels, config=cfg, teacher_labels=result.teacher_labels,
                                  on_progress=False)
        runs.append((losses, agg.state_dict()))
    losses = runs[0][0]
    assert len(losses) == 30 and losses[-1] < 0.7 * losses[0]
    assert runs[0][0] == runs[1][0]  # deterministic given the seed
    assert all(torch.equal(v, runs[1][1][k]) for k, v in runs[0][1].items())
    assert not agg.training


def _feature_gap(backbone, teacher, result, train):
    """Mean normalised squared distance of each student's projected features to the teacher's."""
    with torch.no_grad():
        target = backbone.features(teacher.eval(), train.inputs)
        return [float((h.proj(s.eval()(**train.inputs)) - target).pow(2).mean() / target.pow(2).mean())
                for s, h in zip(result.submodels, result.student_heads)]


def test_feature_distillation_pulls_projected_features_to_the_teacher(setup):
    backbone, teacher, train, fresh = setup
    plain = calibrate(backbone, teacher, fresh(), train, config=config(), on_progress=False)
    distilled = calibrate(backbone, teacher, fresh(), train, config=config(feature_weight=1.0), on_progress=False)
    gap_plain = _feature_gap(backbone, teacher, plain, train)
    gap_distilled = _feature_gap(backbone, teacher, distilled, train)
    for p, d in zip(gap_plain, gap_distilled):
        assert d < 0.5 * p, (gap_plain, gap_distilled)
    # the sample weights still follow the classification loss alone
    for i, (sub, head) in enumerate(zip(distilled.submodels, distilled.student_heads)):
        with torch.no_grad():
            logits = head(sub.eval()(**train.inputs))
        per = 0.5 * (torch.nn.functional.cross_entropy(logits, train.labels, reduction="none")
                     + torch.nn.functional.cross_entropy(logits, distilled.teacher_labels, reduction="none"))
        nxt = (distilled.sample_weights[1:] + [distilled.final_weights])[i]
        torch.testing.assert_close(nxt, update_weights(distilled.sample_weights[i], per, "boost"),
                                   rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("beta", [-0.1, float("nan"), float("inf")])
def test_feature_weight_must_be_finite_and_non_negative(beta):
    with pytest.raises(ValueError, match="feature_weight"):
        BoosterConfig(feature_weight=beta)


def test_cosine_schedule_anneals_each_submodel_to_zero(setup, recorder):
    backbone, teacher, train, fresh = setup
    lrs = []
    real = torch.optim.lr_scheduler.CosineAnnealingLR.step

    def spy(self, *a, **kw):
        real(self, *a, **kw)
        lrs.append(self.optimizer.param_groups[0]["lr"])

    torch.optim.lr_scheduler.CosineAnnealingLR.step = spy
    try:
        cfg = config(lr_schedule="cosine", epochs=2)
        calibrate(backbone, teacher, fresh()[:2], train, config=cfg, on_progress=False)
    finally:
        torch.optim.lr_scheduler.CosineAnnealingLR.step = real
    steps = cfg.epochs * math.ceil(M / cfg.batch_size)
    # a fresh schedule per sub-model: the scheduler's own initial step, then one per optimiser step
    assert len(lrs) == 2 * (steps + 1)
    for part in (lrs[: steps + 1], lrs[steps + 1:]):
        assert part[0] == pytest.approx(cfg.lr) and part[-1] == pytest.approx(0.0, abs=1e-12)
        assert all(a >= b for a, b in zip(part, part[1:]))
    with pytest.raises(ValueError, match="lr_schedule"):
        BoosterConfig(lr_schedule="linear")


def test_config_for_backbone_layers_defaults_family_then_caller():
    vit = coformer.create_backbone("vit")
    bert = coformer.create_backbone("bert")
    assert BoosterConfig.for_backbone(bert, seed=3) == BoosterConfig(seed=3)
    cfg = BoosterConfig.for_backbone(vit, seed=3)
    assert (cfg.weight_rule, cfg.feature_weight, cfg.lr_schedule, cfg.seed) == ("seed-unweighted", 1.0, "cosine", 3)
    assert BoosterConfig.for_backbone(vit, weight_rule="boost").weight_rule == "boost"  # the caller wins
    # llama's rule was re-decided on validation: the booster's own default
    assert BoosterConfig.for_backbone(coformer.create_backbone("llama"), epochs=1).weight_rule == BoosterConfig().weight_rule


def test_config_for_backbone_names_an_unknown_field():
    class Odd(type(coformer.create_backbone("bert"))):
        calibration_defaults = {"epoch": 5}

    with pytest.raises(TypeError, match=r"unknown BoosterConfig field\(s\) epoch .*known: .*epochs"):
        BoosterConfig.for_backbone(Odd())
