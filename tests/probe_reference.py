"""Reference probe tables for ``tests/test_probe_plan.py``: a few models (an MLP, a CNN with
BatchNorm and bounded activations, a residual model with functional activations) probed on fixed
batches, every column, note and theory string of the result stored in ``probe_reference.json``.

The stored values were written by the probe as it was before its per-model plan and lazy table
(one ``.item``-free transfer per call, statistics reduced per tensor); the test checks that the
planned probe gives the same table. Regenerate only for a deliberate change of the probe's values:
``python tests/probe_reference.py --write``.
"""
from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PATH = Path(__file__).with_name("probe_reference.json")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 100), nn.ReLU(inplace=True), nn.Linear(100, 100), nn.ReLU(inplace=True),
                         nn.Linear(100, 10))


def bounded_mlp() -> nn.Module:
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(20, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    with torch.no_grad():
        m[0].weight.mul_(4.0)  # some sigmoid units saturate
    return m


def cnn() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.LeakyReLU(0.1),
                         nn.Linear(16, 5))


class Residual(nn.Module):
    """Two residual blocks with functional ReLUs, then a readout."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Linear(12, width)
        self.a1, self.b1 = nn.Linear(width, width), nn.Linear(width, width)
        self.a2, self.b2 = nn.Linear(width, width), nn.Linear(width, width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = h + self.b1(F.relu(self.a1(h)))
        h = h + self.b2(torch.tanh(self.a2(h)))
        return self.head(F.relu(h))


def residual() -> nn.Module:
    torch.manual_seed(3)
    return Residual()


def cases() -> dict[str, Callable[[], tuple[nn.Module, torch.Tensor, dict[str, Any]]]]:
    """name -> () -> (model, batch, probe keyword arguments)."""
    def g(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def target(n: int, k: int, seed: int) -> torch.Tensor:
        return torch.randint(0, k, (n,), generator=g(seed))

    return {
        "mlp": lambda: (mlp(), torch.rand(256, 784, generator=g(10)), {"target": target(256, 10, 11)}),
        "mlp_forward_only": lambda: (mlp(), torch.rand(64, 784, generator=g(12)), {}),
        "bounded_mlp": lambda: (bounded_mlp(), torch.randn(128, 20, generator=g(13)) + 0.5,
                                {"target": torch.randn(128, 4, generator=g(14))}),
        "cnn": lambda: (cnn(), torch.randn(16, 3, 8, 8, generator=g(15)), {"target": target(16, 5, 16)}),
        "cnn_eval_hist": lambda: (cnn().eval(), torch.randn(16, 3, 8, 8, generator=g(17)),
                                  {"target": target(16, 5, 18), "bins": 16}),
        "residual": lambda: (residual(), torch.randn(64, 12, generator=g(19)), {"target": target(64, 3, 20)}),
    }


def _value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)  # "nan", "inf"
    return v


def table(result: Any) -> dict[str, Any]:
    """Everything a probe result reports, as JSON-ready values."""
    return {
        "rows": [{k: _value(v) for k, v in row.items()} for row in result.rows],
        "input": [_value(result.input_mean), _value(result.input_var), _value(result.input_sq_mean)],
        "loss": _value(result.loss), "traced": result.traced, "backward": result.backward,
        "notes": list(result.notes), "theory": list(result.theory), "batch_size": result.batch_size,
        "histograms": {layer: {k: {"counts": h.counts.tolist(), "edges": h.edges.tolist(), "num": h.num}
                               for k, h in hs.items()} for layer, hs in result.histograms.items()},
    }


def compute() -> dict[str, Any]:
    import initlab

    out = {}
    for name, make in cases().items():
        model, x, kw = make()
        out[name] = table(initlab.probe(model, x, **kw))
    return out


if __name__ == "__main__":
    if "--write" not in sys.argv:
        raise SystemExit("usage: python tests/probe_reference.py --write")
    PATH.write_text(json.dumps(compute(), indent=1) + "\n")
    print(f"wrote {PATH}")
