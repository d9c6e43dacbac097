"""A user's own model, for tests/test_models_builders.py: importable as ``builder_nets`` (pytest puts tests/ on
sys.path, as for ``helpers``), so its builder ref is ``builder_nets:make_tiny_cnn``."""

from __future__ import annotations

from torch import nn


class TinyCNN(nn.Module):
    """Plain conv/BN/ReLU stack with dense 3x3 convs worth converting, and a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def make_tiny_cnn(num_classes: int = 10, width: int = 16) -> TinyCNN:
    return TinyCNN(num_classes=num_classes, width=width)


def not_a_model(**kwargs):
    return {"kwargs": kwargs}


NOT_CALLABLE = 42
