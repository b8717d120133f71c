"""Swin's stages in the search, the costs, the channel split and proportional sizing (issue #15, items 1-2).

A Swin-T-shaped tiny teacher (depths 2-2-6-2, heads 3-6-12-24, widths C-2C-4C-8C) has layers that
differ by stage. Each test here failed on the seed's code: the search capped every layer at the
narrowest one's heads (3 of the last stage's 24 reachable), costs were measured on the first k
blocks, channels of sub-models overlapped in early stages, and ``proportional_specs(layers=k)``
sized position k from teacher layer k whatever layer it ran on.
"""

from __future__ import annotations

import pytest
import torch

import coformer
from coformer.assignment import UnitImportance
from coformer.data import TensorDataset
from coformer.assignment import assign_units, layer_maps, top_layers
from coformer.offline.decompose import proportional_specs
from coformer.offline.evaluator import Evaluator
from coformer.measure import count_flops, count_params
from coformer.offline.search import PolicyEncoding
from coformer.spec import DeviceProfile, SubModelSpec, check_structure

DEVICES = tuple(DeviceProfile(n, memory_gb=8, gflops=500.0, power_w=5) for n in ("a", "b", "c"))


@pytest.fixture(scope="module")
def swin_t():
    """(backbone, Swin-T-shaped tiny teacher, validation set, importance favouring the last stage)."""
    import timm

    backbone = coformer.create_backbone("swin")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=3, img_size=32,
                                  embed_dim=6, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), head_dim=2,
                                  window_size=2, mlp_ratio=2.0).eval()
    batch = backbone.example_batch(model, batch_size=6, seed=1)
    val = TensorDataset(batch, torch.tensor([0, 1, 2, 0, 1, 2]))
    real = backbone.importance(model, batch)
    # deeper blocks more important: a k-layer sub-model runs on the last stage(s), the case the seed got wrong
    imp = UnitImportance(torch.arange(1.0, 13.0), real.channels, real.heads, real.mlp)
    return backbone, model, val, imp


def test_swin_t_shape_has_per_stage_heads_and_a_channel_group(swin_t):
    backbone, model, _, _ = swin_t
    shape = backbone.shape(model)
    assert shape.heads == (3, 3, 6, 6) + (12,) * 6 + (24, 24)
    assert shape.embed_dim == 48 and shape.channel_group == 8  # C_last / C_1 = 48 / 6


def test_search_union_reaches_every_head_and_neuron_of_the_last_stage(swin_t):
    backbone, model, val, imp = swin_t
    shape = backbone.shape(model)
    ev = Evaluator(backbone, model, list(DEVICES), val=val, importance=imp)
    enc = PolicyEncoding(shape, DEVICES, layer_order=ev.layer_order())
    for depth in (shape.layers, 2):
        params = {f"{k}_{i}": v for i in range(3) for k, v in
                  (("layers", depth), ("embed", 1 / 3), ("heads", 1 / 3), ("mlp", 1 / 3))}
        specs = enc.decode(params)
        assert check_structure(specs, shape, layer_maps=layer_maps(specs, imp.layers)) == []
        selections = assign_units(shape, specs, imp)
        for j in (10, 11):  # the last stage's two blocks
            heads = {h for s in selections for k, h_set in zip(s.layers, s.heads) if k == j for h in h_set}
            neurons = {m for s in selections for k, m_set in zip(s.layers, s.mlp) if k == j for m in m_set}
            assert heads == set(range(24)), (depth, j, sorted(heads))
            assert neurons == set(range(shape.mlp[j])), (depth, j, len(neurons))


def test_evaluator_costs_equal_a_full_forward_of_the_deployed_submodel(swin_t):
    backbone, model, val, imp = swin_t
    shape = backbone.shape(model)
    ev = Evaluator(backbone, model, list(DEVICES[:1]), val=val, importance=imp)
    spec = SubModelSpec(2, 16, (8, 8), (32, 32))
    assert ev.layers_for(spec) == (10, 11) == top_layers(imp.layers, 2)
    (selection,) = assign_units(shape, [spec], imp)
    deployed = backbone.slice(model, selection).eval()
    one = ev.cost_batch
    cost = ev.cost(spec)
    assert cost.flops == count_flops(lambda: deployed(**one))
    assert cost.params == count_params(deployed)
    # the first two blocks (stage 1, 4x the tokens, a quarter of the width) cost something else
    first = backbone.slice(model, type(selection)((0, 1), tuple(range(16)), ((0, 1, 2),) * 2,
                                                  (tuple(range(12)),) * 2))
    assert count_flops(lambda: first(**one)) != cost.flops
    # and the full spec costs exactly the teacher's feature pass
    assert ev.cost(shape.full_spec()).flops == count_flops(lambda: backbone.features(model, one))


def test_channels_are_disjoint_in_every_stage(swin_t):
    from coformer_backbones.swin import stage_overlap, stage_widths

    backbone, model, _, imp = swin_t
    shape = backbone.shape(model)
    specs = proportional_specs(shape, [235.8, 665.6, 640.0])
    assert all(s.embed_dim % shape.channel_group == 0 for s in specs)
    selections = assign_units(shape, specs, imp)
    widths = stage_widths(model)
    assert widths == [6, 12, 24, 48]
    assert stage_overlap([s.channels for s in selections], widths) == [0, 0, 0, 0]
    # the old dealing (single channels by importance) does overlap in stage 1; the check reports it
    scattered = [tuple(range(0, 48, 3)), tuple(range(1, 48, 3)), tuple(range(2, 48, 3))]
    assert stage_overlap(scattered, widths)[0] > 0
    # a spec whose channel count splits a group is rejected as C2, naming the group
    bad = check_structure([SubModelSpec(1, 12, (1,), (1,))], shape)
    assert any(v.constraint == "C2" and "channel group 8" in v.message for v in bad)


def test_proportional_specs_size_heads_from_the_layers_assign_units_uses(swin_t):
    backbone, model, _, imp = swin_t
    shape = backbone.shape(model)
    specs = proportional_specs(shape, [1.0, 2.0, 3.0], layers=4, importance=imp)
    chosen = top_layers(imp.layers, 4)
    assert chosen == (8, 9, 10, 11)
    for k, j in enumerate(chosen):  # every head and neuron of the kept layers is handed out
        assert sum(s.heads[k] for s in specs) == shape.heads[j]
        assert sum(s.mlp[k] for s in specs) == shape.mlp[j]
    selections = assign_units(shape, specs, imp)
    last = {h for s in selections for h in s.heads[-1]}
    assert last == set(range(24))
    with pytest.raises(ValueError, match="pass importance="):
        proportional_specs(shape, [1.0, 2.0], layers=4)


def test_proportional_specs_on_a_teacher_with_non_uniform_layers_never_overbooks():
    from coformer.spec import ModelShape

    # shallow layers narrow, deep layers wide; importance picks a mix
    shape = ModelShape(4, 16, (2, 8, 2, 8), (8, 32, 8, 32), head_dim=2)
    imp = UnitImportance(torch.tensor([0.1, 0.9, 0.5, 0.8]), torch.rand(16),
                         [torch.rand(h) for h in shape.heads], [torch.rand(m) for m in shape.mlp])
    specs = proportional_specs(shape, [1.0, 1.0], layers=2, importance=imp)
    assert [s.heads for s in specs] == [(4, 4), (4, 4)]  # layers 1 and 3, 8 heads each
    selections = assign_units(shape, specs, imp)
    assert all(s.layers == (1, 3) for s in selections)
    specs = proportional_specs(shape, [1.0, 1.0], layers=3, importance=imp)
    assert [s.heads for s in specs] == [(4, 1, 4), (4, 1, 4)]  # layers 1, 2, 3
    assign_units(shape, specs, imp)  # the seed's sizing asked layer 2 for 4 + 4 heads of its 2


def test_per_teacher_layer_check_names_the_layer():
    from coformer.spec import ModelShape

    shape = ModelShape(2, 8, (2, 8), (4, 16), head_dim=2)
    specs = [SubModelSpec(1, 4, (6,), (4,)), SubModelSpec(1, 4, (4,), (4,))]
    text = [str(v) for v in check_structure(specs, shape, layer_maps=[(1,), (1,)])]
    assert text == ["C3: teacher layer 2: heads 6 (0) + 4 (1) = 10 > h=8 by 2"]
