"""Aggregator training on the calibrated sub-models' features, with random device drop-out."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from coformer.aggregator import Aggregator, drop_devices
from coformer.offline.booster.config import BoosterConfig
from coformer.offline.booster.training import device_of, make_accelerator, progress_bar, seeded, sub_seed


def train_aggregator(aggregator: Aggregator, features: Sequence[Tensor], labels: Tensor, *,
                     config: BoosterConfig | None = None, teacher_labels: Tensor | None = None,
                     on_progress: bool = True) -> list[float]:
    """Train a trainable aggregator on precomputed features ``[M, d_n]`` with random device drop-out.

    Each batch drops every sub-model's features with probability ``config.device_dropout``
    (never all; :func:`coformer.aggregator.drop_devices`) so the aggregator learns to answer
    from any subset. Loss: CE with ``labels``, or ½[CE(y) + CE(teacher's hard label)] when
    ``teacher_labels`` is given. Returns the mean loss per epoch; an aggregator whose
    ``trainable`` is False is returned untouched (empty list).
    """
    config = config or BoosterConfig()
    if not aggregator.trainable:
        return []
    if len(features) != len(aggregator.feature_dims):
        raise ValueError(f"got features of {len(features)} sub-models, the aggregator takes "
                         f"{len(aggregator.feature_dims)}")
    labels = torch.as_tensor(labels, dtype=torch.long).cpu()
    m = labels.shape[0]
    for i, f in enumerate(features):
        if f.shape[0] != m:
            raise ValueError(f"sub-model {i} has features for {f.shape[0]} samples, labels have {m}")
    if teacher_labels is not None:
        teacher_labels = torch.as_tensor(teacher_labels, dtype=torch.long).cpu()
        if teacher_labels.shape != labels.shape:
            raise ValueError("teacher_labels must have one entry per sample, like labels")
    accelerator = make_accelerator(config)
    dev = accelerator.device
    home = device_of(aggregator)
    feats = [f.detach().float().cpu() for f in features]
    losses: list[float] = []
    with seeded(sub_seed(config.seed, "aggregator"), dev) as gen, progress_bar(on_progress) as prog:
        model = aggregator.to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=config.aggregator_lr)
        model, opt = accelerator.prepare(model, opt)
        model.train()
        task = prog.add_task("train aggregator", total=config.aggregator_epochs, loss="-")
        for _ in range(config.aggregator_epochs):
            total = 0.0
            order = torch.randperm(m, generator=gen)
            for start in range(0, m, config.batch_size):
                idx = order[start:start + config.batch_size]
                batch = drop_devices([f[idx].to(dev) for f in feats], config.device_dropout, generator=gen)
                with accelerator.autocast():
                    logits = model(batch).float()
                y = labels[idx].to(dev)
                loss = F.cross_entropy(logits, y)
                if teacher_labels is not None:
                    loss = 0.5 * (loss + F.cross_entropy(logits, teacher_labels[idx].to(dev)))
                opt.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                opt.step()
                total += float(loss.detach()) * len(idx)
            losses.append(total / m)
            prog.update(task, advance=1, loss=f"{losses[-1]:.4f}")
        model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    model.to(home).eval()
    accelerator.free_memory()
    return losses
