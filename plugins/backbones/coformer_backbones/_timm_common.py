"""What the timm-based vision backbones (``vit``, ``deit``, ``swin``) share.

* **Loading** never downloads: a timm checkpoint directory (``config.json`` naming the timm
  architecture + ``model.safetensors``, the layout ``timm.models.save_for_hf`` writes and
  ``timm.create_model("local-dir:...")`` reads), a single ``.safetensors`` file for a named
  architecture (timm's ``pretrained_cfg_overlay``), or ``"timm:NAME"`` for an untrained model.
* **Importance** is first-order Taylor: gates fixed at 1 on every head (attention-projection
  input), MLP neuron (``fc2`` input), layer (residual branch) and feature channel; the score of a
  unit is ``|dL/dgate|`` where ``L`` is the teacher's cross-entropy against its own predictions
  (or the feature energy when the teacher has no classifier).
* **Masking** zeroes the projection columns of removed heads and the ``fc2`` columns of removed
  neurons, and swaps removed blocks for :class:`torch.nn.Identity` in a copy of the teacher.
* **Sub-models** are real timm models of the same architecture built from JSON config and
  re-sized module by module (per-block head counts and MLP widths), so their forward is timm's.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coformer.backbone import Backbone, Batch, SubModel

from coformer.assignment import UnitImportance
from coformer.heads import ClassifierHead
from coformer.spec import ModelShape, UnitSelection
from coformer_backbones._parallel import PARALLEL_KINDS, ParallelBaselines, build_parallel
from coformer_backbones._inputs import PIXELS, pixels
from coformer_backbones._timm_parallel import LayeredTimm

#: The batch key every vision backbone uses: normalised images ``[B, C, H, W]``.

# Arguments that describe a sub-model's size; everything else is copied from the teacher.
_SIZE_ARGS = {"embed_dim", "depth", "depths", "num_heads", "mlp_ratio", "num_classes", "img_size",
              "pretrained_model_args", "head_dim", "pretrained_cfg", "pretrained_cfg_overlay"}


def timm_module() -> Any:
    """The ``timm`` package (imported lazily so plugin discovery stays cheap)."""
    import timm

    return timm


def architecture(model: nn.Module) -> str:
    """The timm architecture name a model was created from."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        raise ValueError(f"{type(model).__name__} was not created by timm.create_model: no architecture name")
    return str(name)


def _jsonable(value: Any, key: str) -> Any:
    if isinstance(value, tuple):
        value = list(value)
    try:
        json.dumps(value)
    except TypeError as exc:
        raise ValueError(f"timm model argument {key}={value!r} is not JSON data; create the teacher with "
                         f"plain arguments so its sub-models can be rebuilt") from exc
    return value


def model_args(model: nn.Module) -> dict[str, Any]:
    """The non-size arguments the teacher was created with (JSON data), to rebuild sub-models."""
    args = dict(getattr(model, "_model_args", {}) or {})
    return {k: _jsonable(v, k) for k, v in args.items() if k not in _SIZE_ARGS}


def img_size(model: nn.Module) -> list[int]:
    """The fixed input resolution ``[H, W]`` of a timm vision model."""
    return [int(s) for s in model.patch_embed.img_size]


def load_timm(source: str | Path, *, arch: str | None, num_labels: int | None,
              extra: dict[str, Any] | None = None) -> nn.Module:
    """Load a timm model from a local checkpoint directory, a safetensors file or ``timm:NAME``."""
    timm = timm_module()
    kwargs: dict[str, Any] = dict(extra or {})
    if num_labels is not None:
        kwargs["num_classes"] = int(num_labels)
    text = str(source)
    if text.startswith("timm:"):
        return timm.create_model(text[5:], pretrained=False, **kwargs)
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json; a timm checkpoint directory holds config.json "
                                    f"(with 'architecture') and model.safetensors, as timm's save_for_hf writes")
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path} has no model.safetensors (pickled weights are not loaded)")
        return timm.create_model(f"local-dir:{path}", pretrained=True, **kwargs)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: only .safetensors weight files are loaded (no pickle)")
        if arch is None:
            raise ValueError(f"{path} is a bare weight file: say which timm architecture it holds, "
                             f"e.g. create_backbone(..., arch='vit_small_patch16_224')")
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    raise FileNotFoundError(f"{source}: not a timm checkpoint directory, a .safetensors file or 'timm:NAME'")


def save_timm(model: nn.Module, path: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in timm's own local-dir layout."""
    from timm.models import save_for_hf

    out = Path(path)
    save_for_hf(model, str(out), safe_serialization=True)
    return out


def to_images(examples: Any) -> Tensor:
    """Raw images as float ``[B, C, H, W]``: a ``[B, C, H, W]``/``[B, H, W]`` tensor or array, or a list of
    ``[C, H, W]``/``[H, W]`` ones; floats are taken as [0, 1], ``uint8`` as 0..255."""
    if isinstance(examples, Tensor):
        x = examples
    elif isinstance(examples, (list, tuple)):
        if not examples:
            raise ValueError("prepare() got no images")
        x = torch.stack([torch.as_tensor(e) for e in examples])
    else:
        x = torch.as_tensor(examples)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W] or [B, H, W], got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:  # 0..255 pixel values
        return x.float() / 255.0
    x = x.float()
    return x


def prepare_images(model: nn.Module, examples: Any) -> Batch:
    """Images in [0, 1] → the model's resolution, channel count and normalisation."""
    x = to_images(examples)
    in_chans = int(getattr(model, "in_chans", model.patch_embed.proj.in_channels))
    if x.shape[1] == 1 and in_chans == 3:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != in_chans:
        raise ValueError(f"images have {x.shape[1]} channels but the model takes {in_chans}")
    size = tuple(img_size(model))
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", (0.5,) * in_chans)).view(1, -1, 1, 1)
    std = torch.tensor(cfg.get("std", (0.5,) * in_chans)).view(1, -1, 1, 1)
    return {PIXELS: ((x - mean) / std).contiguous()}


def seeded(seed: int) -> Callable[[Callable[[], nn.Module]], nn.Module]:
    """Run a model constructor under a fixed torch seed without disturbing the global RNG."""

    def run(make: Callable[[], nn.Module]) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return make()

    return run


def randomise_layer_scale(model: nn.Module, seed: int) -> None:
    """Give LayerScale gammas spread-out values (timm initialises them to ~1e-5, hiding every block)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))


def linear_head(head: nn.Module, what: str) -> nn.Linear:
    """A timm classifier as a Linear, or a clear error when the teacher has none."""
    fc = getattr(head, "fc", head)
    if not isinstance(fc, nn.Linear):
        raise ValueError(f"the {what} teacher has no classifier head; load it with num_labels=N to attach one")
    return fc


def own_head(fc: nn.Linear) -> ClassifierHead:
    """A :class:`ClassifierHead` whose output layer *is* ``fc``: fitting it fits the teacher itself.

    ``task_head`` must hand out the teacher's own parameters, not a copy: the demo fits the head
    and then saves (and later reloads) the teacher, which would otherwise keep its untrained head.
    """
    if fc.bias is None:
        raise ValueError("the teacher's classifier has no bias; coformer's ClassifierHead needs one")
    head = ClassifierHead(fc.in_features, fc.out_features)
    head.out = fc
    return head


def head_columns(head_idx: Sequence[int], head_dim: int) -> Tensor:
    """Flat indices of the ``head_dim`` channels of each selected head."""
    return torch.tensor([h * head_dim + i for h in head_idx for i in range(head_dim)], dtype=torch.long)


def qkv_rows(head_idx: Sequence[int], heads: int, head_dim: int) -> Tensor:
    """Rows of a fused qkv projection (q, k, v stacked) that belong to the selected heads."""
    cols = head_columns(head_idx, head_dim)
    return torch.cat([cols + part * heads * head_dim for part in range(3)])


def resize_attention(attn: nn.Module, dim: int, heads: int, head_dim: int) -> None:
    """Re-size a timm attention module in place to ``heads`` heads over ``dim`` channels."""
    qkv_bias = attn.qkv.bias is not None
    proj_bias = attn.proj.bias is not None
    attn.num_heads = heads
    attn.head_dim = head_dim
    attn.attn_dim = heads * head_dim
    attn.scale = head_dim ** -0.5
    attn.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=qkv_bias)
    attn.proj = nn.Linear(heads * head_dim, dim, bias=proj_bias)


def resize_mlp(mlp: nn.Module, dim: int, hidden: int) -> None:
    """Re-size a timm ``Mlp`` in place to ``hidden`` neurons over ``dim`` channels."""
    mlp.fc1 = nn.Linear(dim, hidden, bias=mlp.fc1.bias is not None)
    mlp.fc2 = nn.Linear(hidden, dim, bias=mlp.fc2.bias is not None)


def check_standard_block(block: nn.Module, where: str) -> None:
    """Raise for block variants whose units cannot be sliced exactly here (qk-norm, gated or GLU MLPs)."""
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    problems = []
    if attn is None or not hasattr(attn, "qkv") or not hasattr(attn, "proj"):
        problems.append("attention without a fused qkv/proj")
    else:
        for name in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
                problems.append(f"attention {name}")
        if getattr(attn, "gate", None) is not None:
            problems.append("gated attention")
    if mlp is None or not hasattr(mlp, "fc1") or not hasattr(mlp, "fc2") or \
            not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity) or \
            mlp.fc1.out_features != mlp.fc2.in_features:
        problems.append("an MLP other than fc1 → act → fc2")
    if problems:
        raise ValueError(f"{where}: unsupported block variant ({', '.join(problems)}); this backbone slices "
                         f"standard pre-norm blocks only")


class TimmSubModel(LayeredTimm, SubModel):
    """A sliced timm model; ``forward(pixel_values=...)`` returns the feature vector.

    ``pool`` turns the net's final-norm token map into features (the same function the
    backbone applies to its teacher), so both share one code path.
    """

    def __init__(self, net: nn.Module, config: dict[str, Any], pool: Callable[[nn.Module, Tensor], Tensor]):
        super().__init__()
        self.net = net
        self.config = config
        self.feature_dim = int(config["feature_dim"])
        self._pool = pool

    def forward(self, pixel_values: Tensor, **_: Tensor) -> Tensor:
        """Features ``[B, feature_dim]`` for normalised images."""
        return self._pool(self.net, self.net.forward_features(pixel_values))


class TimmVisionBackbone(ParallelBaselines, Backbone):
    """Shared behaviour of the timm-backed vision backbones; subclasses describe their blocks."""

    modality: ClassVar[str] = "image"
    #: timm architecture used by :meth:`tiny` and size arguments for it.
    tiny_arch: ClassVar[str] = ""
    tiny_args: ClassVar[dict[str, Any]] = {}

    def __init__(self, arch: str | None = None, img_size: int | None = None):
        self.arch = arch
        self.img_size = img_size

    # -- per-family hooks ------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> list[tuple[nn.Module, int, nn.Module]]:
        """``(container, index, block)`` for every transformer block, in depth order."""
        raise NotImplementedError

    def pool(self, net: nn.Module, tokens: Tensor) -> Tensor:
        """Final-norm token map → feature vector (shared by teacher and sub-models)."""
        raise NotImplementedError

    def check_model(self, model: nn.Module) -> None:
        """Raise a clear error when ``model`` is not an architecture this backbone slices."""

    def default_teacher(self, num_labels: int | None) -> nn.Module:
        """The embedded default teacher (``load(None)``)."""
        raise FileNotFoundError(
            f"no installed package carries {self.name} weights; pass a timm checkpoint directory "
            f"(config.json + model.safetensors), a .safetensors file with arch=..., or 'timm:NAME'")

    def layer_starts_stage(self, model: nn.Module, layer: int) -> bool:
        """Whether block ``layer`` is the first of its container (a Swin stage; block 0 of a ViT)."""
        return self.blocks(model)[layer][1] == 0

    def feature_channel_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules whose outputs carry the feature channels (gated for channel importance)."""
        return [model.norm]

    # -- Backbone API ----------------------------------------------------------------------
    def load(self, source: str | Path | None = None, *, num_labels: int | None = None,
             img_size: int | None = None) -> nn.Module:
        """A timm teacher from a local checkpoint (see module docstring) or the embedded default."""
        size = img_size or self.img_size
        if source is None:
            model = self.default_teacher(num_labels)
            if size is not None:
                self.set_img_size(model, size)
        else:
            extra = {"img_size": size} if size is not None else None
            model = load_timm(source, arch=self.arch, num_labels=num_labels, extra=extra)
        self.check_model(model)
        return model.eval()

    def set_img_size(self, model: nn.Module, size: int) -> None:
        """Change the fixed input resolution (position tables are resampled where there are any)."""
        model.set_input_size(img_size=(size, size))

    def save(self, model: nn.Module, path: str | Path) -> Path:
        """timm's local-dir layout: ``config.json`` + ``model.safetensors``; :meth:`load` reads it back."""
        return save_timm(model, path)

    def tiny(self, *, num_labels: int = 3, seed: int = 0) -> nn.Module:
        """A small random teacher of the exact architecture, identical for equal seeds."""
        timm = timm_module()

        def make() -> nn.Module:
            return timm.create_model(self.tiny_arch, pretrained=False, num_classes=num_labels, **self.tiny_args)

        model = seeded(seed)(make)
        randomise_layer_scale(model, seed)
        self.check_model(model)
        return model.eval()

    def prepare(self, model: nn.Module, examples: Sequence[Any]) -> Batch:
        """Images in [0, 1] (or ``uint8`` 0..255) → resized, normalised ``pixel_values``."""
        return prepare_images(model, examples)

    def example_batch(self, model: nn.Module, batch_size: int = 2, seed: int = 0) -> Batch:
        """Random normalised images at the model's resolution."""
        g = torch.Generator().manual_seed(seed)
        h, w = img_size(model)
        return {PIXELS: torch.randn(batch_size, model.patch_embed.proj.in_channels, h, w, generator=g)}

    def features(self, model: nn.Module, batch: Batch) -> Tensor:
        """What the task head takes, from the final-norm tokens."""
        return self.pool(model, model.forward_features(pixels(batch)))

    def shape(self, model: nn.Module) -> ModelShape:
        """Layers = blocks; heads and MLP neurons per block; embed_dim = feature channels."""
        blocks = [b for _, _, b in self.blocks(model)]
        head_dims = {b.attn.qkv.out_features // (3 * b.attn.num_heads) for b in blocks}
        if len(head_dims) != 1:
            raise ValueError(f"{self.name}: blocks have different head sizes {sorted(head_dims)}")
        return ModelShape(len(blocks), self.feature_channels(model), tuple(b.attn.num_heads for b in blocks),
                          tuple(b.mlp.fc1.out_features for b in blocks), head_dims.pop())

    def feature_channels(self, model: nn.Module) -> int:
        """Width of the channel dimension that ``UnitSelection.channels`` indexes."""
        return int(model.norm.weight.shape[0])

    def importance(self, model: nn.Module, batch: Batch) -> UnitImportance:
        """Taylor scores |dL/dgate| of head, neuron, layer and channel gates (see module docstring)."""
        shape = self.shape(model)
        blocks = self.blocks(model)
        head_g = [torch.ones(h, requires_grad=True) for h in shape.heads]
        mlp_g = [torch.ones(m, requires_grad=True) for m in shape.mlp]
        layer_g = torch.ones(shape.layers, requires_grad=True)
        chan_g = torch.ones(shape.embed_dim, requires_grad=True)
        hd = shape.head_dim
        handles = []

        def gate_heads(k: int) -> Callable[..., Any]:
            def pre(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                return (args[0] * head_g[k].repeat_interleave(hd),) + tuple(args[1:])
            return pre

        def gate_mlp(k: int) -> Callable[..., Any]:
            def pre(_m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                return (args[0] * mlp_g[k],) + tuple(args[1:])
            return pre

        def gate_layer(k: int) -> Callable[..., Any]:
            def post(_m: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
                return args[0] + layer_g[k] * (out - args[0])
            return post

        def gate_channels(_m: nn.Module, _args: tuple[Any, ...], out: Tensor) -> Tensor:
            return out * chan_g

        try:
            for k, (_, _, blk) in enumerate(blocks):
                handles.append(blk.attn.proj.register_forward_pre_hook(gate_heads(k)))
                handles.append(blk.mlp.fc2.register_forward_pre_hook(gate_mlp(k)))
                handles.append(blk.register_forward_hook(gate_layer(k)))
            for mod in self.feature_channel_modules(model):
                handles.append(mod.register_forward_hook(gate_channels))
            was_training = model.training
            model.eval()
            with torch.enable_grad():
                feats = self.features(model, batch)
                try:
                    logits = self.task_head_logits(model, feats)
                    loss = F.cross_entropy(logits, logits.detach().argmax(-1))
                except ValueError:  # no classifier: keep the features' energy
                    loss = feats.pow(2).mean()
                grads = torch.autograd.grad(loss, [layer_g, chan_g, *head_g, *mlp_g], allow_unused=True)
            model.train(was_training)
        finally:
            for h in handles:
                h.remove()

        def score(g: Tensor | None, like: Tensor) -> Tensor:
            return torch.zeros_like(like).detach() if g is None else g.detach().abs()

        n = shape.layers
        return UnitImportance(score(grads[0], layer_g), score(grads[1], chan_g),
                              [score(g, head_g[k]) for k, g in enumerate(grads[2:2 + n])],
                              [score(g, mlp_g[k]) for k, g in enumerate(grads[2 + n:])])

    def task_head_logits(self, model: nn.Module, feats: Tensor) -> Tensor:
        """Logits from features through the converted task head (raises ValueError without a head)."""
        return self.task_head(model)(feats)

    def check_selection(self, shape: ModelShape, sel: UnitSelection) -> None:
        """Indices in range, sorted, unique; one heads/mlp entry per kept layer."""
        def ok(idx: Sequence[int], n: int) -> bool:
            return list(idx) == sorted(set(idx)) and all(0 <= i < n for i in idx) and len(idx) > 0

        if not ok(sel.layers, shape.layers):
            raise ValueError(f"selection layers {list(sel.layers)} must be sorted unique indices < {shape.layers}")
        if not ok(sel.channels, shape.embed_dim):
            raise ValueError(f"selection channels must be sorted unique indices < {shape.embed_dim}")
        if len(sel.heads) != len(sel.layers) or len(sel.mlp) != len(sel.layers):
            raise ValueError("selection needs one heads and one mlp entry per kept layer")
        for j, h, m in zip(sel.layers, sel.heads, sel.mlp):
            if not ok(h, shape.heads[j]) or not ok(m, shape.mlp[j]):
                raise ValueError(f"layer {j}: heads/mlp indices must be sorted, unique, non-empty and in range")

    def mask(self, model: nn.Module, selection: UnitSelection) -> nn.Module:
        """A teacher copy with removed heads/neurons zeroed and removed blocks skipped."""
        shape = self.shape(model)
        self.check_selection(shape, selection)
        if len(selection.channels) != shape.embed_dim:
            raise ValueError("mask() keeps every channel: channel removal has no masking identity; "
                             "compare channel-sliced sub-models against the teacher instead")
        masked = copy.deepcopy(model)
        blocks = self.blocks(masked)
        hd = shape.head_dim
        with torch.no_grad():
            for j, (container, idx, blk) in enumerate(blocks):
                if j not in selection.layers:
                    container[idx] = nn.Identity()
                    continue
                k = selection.layers.index(j)
                drop_h = [h for h in range(shape.heads[j]) if h not in selection.heads[k]]
                if drop_h:
                    blk.attn.proj.weight[:, head_columns(drop_h, hd)] = 0
                drop_m = [m for m in range(shape.mlp[j]) if m not in selection.mlp[k]]
                if drop_m:
                    blk.mlp.fc2.weight[:, drop_m] = 0
        return masked.eval()

    def build_submodel(self, config: dict[str, Any]) -> TimmSubModel:
        """An untrained sub-model from its JSON config (weights are loaded afterwards)."""
        if config.get("backbone") != self.name:
            raise ValueError(f"config is for backbone {config.get('backbone')!r}, not {self.name!r}")
        if config.get("kind") in PARALLEL_KINDS:  # pipeline stages / tensor shards (baselines)
            return build_parallel(self, config)
        return TimmSubModel(self.build_net(config), dict(config), self.pool_for(config)).eval()

    def pool_for(self, config: dict[str, Any]) -> Callable[[nn.Module, Tensor], Tensor]:
        """The pooling a sub-model with ``config`` uses (options travel in the config, not the plugin)."""
        return self.pool

    def build_net(self, config: dict[str, Any]) -> nn.Module:
        """The timm network a sub-model config describes."""
        raise NotImplementedError

    def slice(self, model: nn.Module, selection: UnitSelection) -> TimmSubModel:
        """A real smaller timm model holding only the selected units' weights."""
        shape = self.shape(model)
        self.check_selection(shape, selection)
        config = self.submodel_config(model, shape, selection)
        sub = self.build_submodel(config)
        state = self.sliced_state(model, shape, selection, sub)
        sub.net.load_state_dict(state, strict=True)
        return sub.eval()

    def submodel_config(self, model: nn.Module, shape: ModelShape, selection: UnitSelection) -> dict[str, Any]:
        """JSON config of the sub-model for ``selection``."""
        raise NotImplementedError

    def sliced_state(self, model: nn.Module, shape: ModelShape, selection: UnitSelection,
                     sub: TimmSubModel) -> dict[str, Tensor]:
        """The sub-model's state dict, cut out of the teacher's."""
        raise NotImplementedError


def take(t: Tensor, dim: int, idx: Tensor) -> Tensor:
    """``t`` indexed along ``dim`` (a contiguous copy)."""
    return t.index_select(dim, idx).contiguous().clone()


def fit_state(expected: dict[str, Tensor], produced: dict[str, Tensor]) -> dict[str, Tensor]:
    """Check a produced state dict against the sub-model's own (names and shapes)."""
    missing = sorted(set(expected) - set(produced))
    extra = sorted(set(produced) - set(expected))
    if missing or extra:
        raise RuntimeError(f"sliced state does not fit the sub-model: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, v in expected.items():
        if tuple(v.shape) != tuple(produced[k].shape):
            raise RuntimeError(f"sliced {k} has shape {tuple(produced[k].shape)}, sub-model wants {tuple(v.shape)}")
    return produced


def iter_block_keys(prefix: str, state: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Entries of ``state`` under ``prefix`` with the prefix removed."""
    for k, v in state.items():
        if k.startswith(prefix):
            yield k[len(prefix):], v
