"""Per-device latency predictors trained on a profile, and the FLOPs-proportional baseline.

The seed's predictor (supplementary §A): a three-layer MLP (600 hidden units, ReLU) mapping
a sub-model's (layers, embed dim, mean heads, mean MLP width) to its measured latency.
It regresses the *logarithm* of the latency: predictions are always positive (a linear target
extrapolated below zero for sub-models smaller than any profiled one, so a search saw them as
free), and squared error in log space weighs relative error alike for 1 ms and 60 ms shapes.
Inputs and log targets are standardised with statistics of the training set. Saved as
``<path>.safetensors`` (weights + normalisation) and ``<path>.json`` (device, metadata).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from coformer.offline.profiler import ProfileRecord
from coformer.spec import SubModelSpec

HIDDEN = 600


def _stem(path: str | Path) -> Path:
    """``path`` without a ``.json``/``.safetensors`` suffix (other dots, e.g. in device names, stay)."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in {".json", ".safetensors"} else p


def spec_features(spec: SubModelSpec) -> list[float]:
    """The predictor's input for ``spec``: [layers, embed dim, mean heads, mean MLP width]."""
    return [float(spec.layers), float(spec.embed_dim), spec.mean_heads, spec.mean_mlp]


def _xy(records: Sequence[ProfileRecord]) -> tuple[Tensor, Tensor]:
    x = torch.tensor([spec_features(r.spec) for r in records], dtype=torch.float32)
    y = torch.tensor([r.latency_ms for r in records], dtype=torch.float32)
    return x, y


class LatencyPredictor(nn.Module):
    """f(l, d, h̄, D̄) → latency in ms on one device: Linear-ReLU-Linear-ReLU-Linear, 600 hidden."""

    x_mean: Tensor
    x_std: Tensor
    y_mean: Tensor
    y_std: Tensor

    def __init__(self, device: str = "device", hidden: int = HIDDEN, *, log_target: bool = True):
        super().__init__()
        self.device_name = device
        self.hidden = hidden
        self.log_target = log_target
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))
        self.register_buffer("x_mean", torch.zeros(4))
        self.register_buffer("x_std", torch.ones(4))
        self.register_buffer("y_mean", torch.zeros(()))
        self.register_buffer("y_std", torch.ones(()))
        self.meta: dict[str, Any] = {}
        #: the runtime's fixed cost of one call to this device (ms), when it was profiled through its worker
        self.call_overhead_ms = 0.0

    def forward(self, x: Tensor) -> Tensor:
        """Latency (ms) for raw feature rows ``x`` ``[B, 4]``."""
        z = (x - self.x_mean) / self.x_std
        out = self.net(z).squeeze(-1) * self.y_std + self.y_mean
        return torch.exp(out) if self.log_target else out

    def fit(self, records: Sequence[ProfileRecord], *, epochs: int = 1500, lr: float = 1e-3,
            seed: int = 0) -> LatencyPredictor:
        """Train on ``records`` (full-batch Adam on standardised MSE); returns ``self``."""
        if len(records) < 4:
            raise ValueError(f"a latency predictor needs at least 4 profiled shapes, got {len(records)}; "
                             f"profile more shapes (`coformer profile --shapes N`)")
        torch.manual_seed(seed)
        for m in self.net:
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        x, y = _xy(records)
        if self.log_target:
            if (y <= 0).any():
                raise ValueError("profiled latencies must be positive to fit their logarithm")
            y = torch.log(y)
        self.x_mean.copy_(x.mean(0))
        self.x_std.copy_(x.std(0).clamp_min(1e-6))
        self.y_mean.copy_(y.mean())
        self.y_std.copy_(y.std().clamp_min(1e-6))
        z = (x - self.x_mean) / self.x_std
        t = (y - self.y_mean) / self.y_std
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        self.train()
        for _ in range(epochs):
            opt.zero_grad()
            loss = nn.functional.mse_loss(self.net(z).squeeze(-1), t)
            loss.backward()
            opt.step()
            sched.step()
        self.eval()
        self.meta = {"device": self.device_name, "train_shapes": len(records), "epochs": epochs, "lr": lr,
                     "target": "log_ms" if self.log_target else "ms"}
        return self

    @torch.no_grad()
    def predict(self, spec: SubModelSpec) -> float:
        """Predicted latency of ``spec`` in ms (never below zero)."""
        return max(0.0, float(self(torch.tensor([spec_features(spec)], dtype=torch.float32))[0]))

    @torch.no_grad()
    def predict_many(self, specs: Sequence[SubModelSpec]) -> list[float]:
        """Predicted latencies (ms) of several specs."""
        x = torch.tensor([spec_features(s) for s in specs], dtype=torch.float32)
        return [max(0.0, float(v)) for v in self(x)]

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` and ``<path>.json``; returns the JSON path."""
        base = _stem(path)
        base.parent.mkdir(parents=True, exist_ok=True)
        weights, meta_file = Path(f"{base}.safetensors"), Path(f"{base}.json")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(weights))
        doc = {"kind": "coformer-latency-predictor", "device": self.device_name, "hidden": self.hidden,
               "inputs": ["layers", "embed_dim", "mean_heads", "mean_mlp"], "unit": "ms",
               "target": "log_ms" if self.log_target else "ms",
               "call_overhead_ms": self.call_overhead_ms, "weights": weights.name, "meta": self.meta}
        meta_file.write_text(json.dumps(doc, indent=2))
        return meta_file

    @classmethod
    def load(cls, path: str | Path) -> LatencyPredictor:
        """Inverse of :meth:`save` (give either file or the common stem)."""
        base = _stem(path)
        meta_file = Path(f"{base}.json")
        if not meta_file.exists():
            raise FileNotFoundError(f"{meta_file} not found: not a saved latency predictor "
                                    f"(train one with coformer.offline.predictor.LatencyPredictor.fit and .save)")
        doc = json.loads(meta_file.read_text())
        if doc.get("kind") != "coformer-latency-predictor":
            raise ValueError(f"{meta_file} is not a latency predictor (kind={doc.get('kind')!r})")
        # predictors saved before the log target regressed milliseconds directly
        model = cls(doc["device"], doc["hidden"], log_target=doc.get("target", "ms") == "log_ms")
        model.load_state_dict(load_file(str(base.parent / doc["weights"])))
        model.meta = doc.get("meta", {})
        model.call_overhead_ms = float(doc.get("call_overhead_ms", 0.0))
        return model.eval()


@dataclass
class FlopsBaseline:
    """latency ≈ a · FLOPs, with ``a`` fitted by least squares through the origin."""

    ms_per_flop: float = 0.0

    def fit(self, records: Sequence[ProfileRecord]) -> FlopsBaseline:
        """Fit ``a`` = Σ f·t / Σ f² on ``records``; returns ``self``."""
        num = sum(r.flops * r.latency_ms for r in records)
        den = sum(r.flops ** 2 for r in records)
        if den <= 0:
            raise ValueError("FLOPs baseline: every profiled shape has zero FLOPs")
        self.ms_per_flop = num / den
        return self

    def predict_record(self, record: ProfileRecord) -> float:
        """Predicted latency (ms) of a profiled shape from its measured FLOPs."""
        return self.ms_per_flop * record.flops


def errors(predicted: Sequence[float], actual: Sequence[float]) -> dict[str, float]:
    """RMSE (ms) and MAPE (%) of ``predicted`` against ``actual``."""
    n = len(actual)
    if n == 0:
        raise ValueError("no held-out shapes to score")
    rmse = math.sqrt(sum((p - a) ** 2 for p, a in zip(predicted, actual)) / n)
    mape = 100.0 * sum(abs(p - a) / max(a, 1e-9) for p, a in zip(predicted, actual)) / n
    return {"rmse_ms": rmse, "mape_pct": mape, "n": n}


def split_records(records: Sequence[ProfileRecord], test_fraction: float = 0.25,
                  seed: int = 0) -> tuple[list[ProfileRecord], list[ProfileRecord]]:
    """A random train/held-out split of a profile; held-out shapes never appear in training."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(records), generator=g).tolist()
    n_test = max(1, int(round(test_fraction * len(records))))
    test = [records[i] for i in order[:n_test]]
    train = [records[i] for i in order[n_test:]]
    return train, test


def train_and_score(records: Sequence[ProfileRecord], device: str, *, test_fraction: float = 0.25,
                    seed: int = 0, epochs: int = 1500) -> tuple[LatencyPredictor, dict[str, Any]]:
    """Train a predictor on part of a profile; score it and the FLOPs baseline on the held-out rest."""
    train, test = split_records(records, test_fraction, seed)
    pred = LatencyPredictor(device).fit(train, epochs=epochs, seed=seed)
    base = FlopsBaseline().fit(train)
    actual = [r.latency_ms for r in test]
    report = {
        "device": device, "train_shapes": len(train), "held_out_shapes": len(test),
        "predictor": errors(pred.predict_many([r.spec for r in test]), actual),
        "flops_baseline": errors([base.predict_record(r) for r in test], actual),
    }
    pred.meta["held_out"] = report
    return pred, report
