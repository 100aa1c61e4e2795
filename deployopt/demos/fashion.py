"""CNNs for Fashion-MNIST (1 x 28 x 28, 10 classes): a teacher and a student with under 1/8 of
its parameters. Factories: ``deployopt.demos.fashion:teacher`` and ``:student``."""

from __future__ import annotations

from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class FashionCNN(nn.Module):
    def __init__(self, widths: tuple[int, int], hidden: int, dropout: float = 0.25):
        super().__init__()
        a, b = widths
        self.features = nn.Sequential(_block(1, a), _block(a, b))  # 28 -> 14 -> 7
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(b * 7 * 7, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 10),
        )

    def forward(self, x):
        return self.head(self.features(x))


def teacher() -> nn.Module:
    return FashionCNN((32, 64), 256)


def student() -> nn.Module:
    return FashionCNN((8, 16), 64, dropout=0.1)
