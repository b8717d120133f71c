"""Contract tests over every registered aggregator, plus exact checks of averaging and voting."""

from __future__ import annotations

import itertools

import pytest
import torch

import coformer
from coformer.aggregator import MissingFeaturesError, drop_devices
from coformer.heads import ClassifierHead, StudentHead

DIMS = [6, 10, 8]
EMBED = 12
LABELS = 4
NAMES = [p.name for p in coformer.list_plugins("aggregator")]


def build(name: str, dims=DIMS, embed=EMBED, labels=LABELS, seed=0):
    torch.manual_seed(seed)
    head = ClassifierHead(embed, labels, norm=True)
    students = [StudentHead(d, embed, head) for d in dims]
    return coformer.create_aggregator(name, feature_dims=dims, embed_dim=embed, task_head=head,
                                      student_heads=students)


def test_builtins_registered():
    assert {"mlp_fusion", "averaging", "voting", "attention", "se"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_nonempty_subset(name):
    agg = build(name).eval()
    feats = [torch.randn(5, d) for d in DIMS]
    outs = {}
    for r in range(1, len(DIMS) + 1):
        for keep in itertools.combinations(range(len(DIMS)), r):
            out = agg([f if i in keep else None for i, f in enumerate(feats)])
            assert out.shape == (5, LABELS)
            assert torch.isfinite(out).all()
            outs[keep] = out
    # The answer really depends on which devices answered.
    assert not torch.allclose(outs[(0,)], outs[(0, 1, 2)])


@pytest.mark.parametrize("name", NAMES)
def test_all_missing_and_bad_input(name):
    agg = build(name)
    with pytest.raises(MissingFeaturesError):
        agg([None, None, None])
    with pytest.raises(ValueError, match="3 sub-models"):
        agg([torch.randn(2, 6), None])
    with pytest.raises(ValueError, match="width 7"):
        agg([torch.randn(2, 7), None, None])


@pytest.mark.parametrize("name", NAMES)
def test_fp16_wire_features_accepted(name):
    agg = build(name).eval()
    feats = [torch.randn(3, d) for d in DIMS]
    ref = agg(feats)
    half = agg([f.half() for f in feats])
    assert half.dtype == ref.dtype
    torch.testing.assert_close(half, agg([f.half().float() for f in feats]))


def test_mlp_fusion_is_eq2():
    """Pool(W·Concat(X) + b) with missing devices zero-filled, token features mean-pooled."""
    agg = build("mlp_fusion").eval()
    toks = [torch.randn(2, 5, d) for d in DIMS]
    x = torch.cat(toks, dim=-1)
    expected = agg.head((x @ agg.fuse.weight.T + agg.fuse.bias).mean(dim=1))
    torch.testing.assert_close(agg(toks), expected)
    toks[1] = None
    x = torch.cat([toks[0], torch.zeros(2, 5, DIMS[1]), toks[2]], dim=-1)
    expected = agg.head((x @ agg.fuse.weight.T + agg.fuse.bias).mean(dim=1))
    torch.testing.assert_close(agg(toks), expected)


def identity_students(n: int, c: int) -> tuple[ClassifierHead, list[StudentHead]]:
    """Student heads whose logits equal their input features (c classes, width c)."""
    head = ClassifierHead(c, c)
    with torch.no_grad():
        head.out.weight.copy_(torch.eye(c))
        head.out.bias.zero_()
    students = []
    for _ in range(n):
        s = StudentHead(c, c, head)
        with torch.no_grad():
            s.proj.weight.copy_(torch.eye(c))
            s.proj.bias.zero_()
        students.append(s)
    return head, students


# Hand-made per-sub-model class probabilities (features are their logs, so softmax recovers them).
P = [[0.6, 0.3, 0.1], [0.1, 0.5, 0.4], [0.5, 0.1, 0.4]]


def hand_made(name: str):
    head, students = identity_students(3, 3)
    agg = coformer.create_aggregator(name, feature_dims=[3, 3, 3], embed_dim=3, task_head=head,
                                     student_heads=students)
    feats = [torch.tensor([p]).log() for p in P]
    return agg, feats


def test_averaging_definition():
    agg, f = hand_made("averaging")
    assert agg.trainable is False
    # all three: ((.6+.1+.5)/3, (.3+.5+.1)/3, (.1+.4+.4)/3) = (.4, .3, .3)
    torch.testing.assert_close(agg(f), torch.tensor([[0.4, 0.3, 0.3]]).log())
    # sub-models 1 and 2: ((.1+.5)/2, (.5+.1)/2, (.4+.4)/2) = (.3, .3, .4)
    torch.testing.assert_close(agg([None, f[1], f[2]]), torch.tensor([[0.3, 0.3, 0.4]]).log())
    # one sub-model alone: its own distribution
    torch.testing.assert_close(agg([f[0], None, None]), torch.tensor([P[0]]).log())


def test_voting_definition():
    agg, f = hand_made("voting")
    assert agg.trainable is False
    # all three vote (0, 1, 0): class 0 wins 2-1. votes + mean p = (2.4, 1.3, 0.3), over k+1 = 4
    out = agg(f)
    assert out.argmax(-1).item() == 0
    torch.testing.assert_close(out, torch.tensor([[2.4, 1.3, 0.3]]).div(4).log())
    # sub-models 0 and 1 vote (0, 1): a 1-1 tie, broken by mean p = (.35, .4, .25) → class 1
    out = agg([f[0], f[1], None])
    assert out.argmax(-1).item() == 1
    torch.testing.assert_close(out, torch.tensor([[1.35, 1.4, 0.25]]).div(3).log())
    # softmax of the logits is a distribution
    torch.testing.assert_close(out.exp().sum(), torch.tensor(1.0))


@pytest.mark.parametrize("name", ["averaging", "voting"])
def test_prediction_aggregators_need_student_heads(name):
    with pytest.raises(ValueError, match="student_heads"):
        coformer.create_aggregator(name, feature_dims=DIMS, embed_dim=EMBED,
                                   task_head=ClassifierHead(EMBED, LABELS), student_heads=None)


def separable(m: int, seed: int):
    """Three views of one 4-class problem: each sub-model's features are class means plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(LABELS, (m,), generator=g)
    feats = []
    for d in DIMS:
        means = torch.randn(LABELS, d, generator=g) * 2.0
        feats.append(means[y] + 0.5 * torch.randn(m, d, generator=g))
    return feats, y


@pytest.mark.parametrize("name", [p.name for p in coformer.list_plugins("aggregator")
                                  if getattr(p.factory, "trainable", True)])
def test_trainable_aggregator_learns(name):
    agg = build(name, seed=1)
    if not agg.trainable:
        pytest.skip(f"{name} is not trainable")
    train, y = separable(256, seed=2)
    test, yt = separable(256, seed=2)  # same class means (same seed) ...
    g = torch.Generator().manual_seed(3)
    test = [f + 0.1 * torch.randn(f.shape, generator=g) for f in test]  # ... fresh noise

    def accuracy(feats):
        with torch.no_grad():
            return (agg.eval()(feats).argmax(-1) == yt).float().mean().item()

    before = accuracy(test)
    opt = torch.optim.Adam(agg.parameters(), lr=1e-2)
    loss_fn = torch.nn.CrossEntropyLoss()
    losses = []
    agg.train()
    for step in range(150):
        idx = torch.randint(256, (32,), generator=g)
        feats = drop_devices([f[idx] for f in train], 0.3, generator=g)
        loss = loss_fn(agg(feats), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = accuracy(test)
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    assert after >= 0.95 and after > before
    # trained with drop-out, it still answers well from any single device
    for i in range(3):
        assert accuracy([f if j == i else None for j, f in enumerate(test)]) >= 0.8


def test_voting_random_inputs_follow_the_rule():
    """On random inputs the argmax is a most-voted class, ties going to the higher mean probability."""
    agg = build("voting").eval()
    feats = [torch.randn(64, d) for d in DIMS]
    with torch.no_grad():
        out = agg(feats)
        probs = torch.stack([torch.softmax(h(f), -1) for h, f in zip(agg.student_heads, feats)])
    votes = torch.nn.functional.one_hot(probs.argmax(-1), LABELS).sum(0)
    mean_p = probs.mean(0)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(64))
    for b in range(64):
        best = votes[b].max()
        tied = (votes[b] == best).nonzero().flatten()
        assert out[b].argmax().item() == tied[mean_p[b, tied].argmax()].item()


@pytest.mark.parametrize("name", NAMES)
def test_rebuilds_from_config(name):
    """``config`` + head configs + state_dict rebuild an identical aggregator (how plan directories load it)."""
    agg = build(name).eval()
    cfg = agg.config
    head = ClassifierHead.from_config(ClassifierHead(EMBED, LABELS, norm=True).config)
    students = [StudentHead.from_config(StudentHead(d, EMBED, head).config) for d in DIMS]
    torch.manual_seed(99)  # different initial weights: only the state_dict may make them equal
    again = coformer.create_aggregator(cfg["name"], feature_dims=cfg["feature_dims"], embed_dim=cfg["embed_dim"],
                                       task_head=head, student_heads=students, **cfg["options"]).eval()
    feats = [torch.randn(4, d) for d in DIMS]
    assert not torch.equal(again(feats), agg(feats))
    again.load_state_dict(agg.state_dict())
    assert torch.equal(again(feats), agg(feats))
