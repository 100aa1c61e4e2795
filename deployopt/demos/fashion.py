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


def train_teacher(work, epochs: int = 6, log=print):
    """Train the teacher on Fashion-MNIST train (55,000; 5,000 held out for early stopping) with
    deployopt's training loop; the best epoch's weights end in ``work/best.safetensors``.
    Returns the model."""
    import torch

    from deployopt.torchside.data import fashion_mnist
    from deployopt.torchside.train import TrainConfig, Trainer

    train = fashion_mnist("train")
    x, y = torch.from_numpy(train.images), torch.from_numpy(train.labels)
    xtr, ytr, xval, yval = x[:55000], y[:55000], x[55000:], y[55000:]
    model = teacher()
    torch.manual_seed(0)

    def ce(m, idx):
        return nn.functional.cross_entropy(m(xtr[idx]), ytr[idx])

    def val(m):
        with torch.no_grad():
            a = float((m(xval).argmax(-1) == yval).float().mean())
        return {"score": a, "val_accuracy": a}

    cfg = TrainConfig(epochs=epochs, batch_size=128, lr=2e-3, weight_decay=1e-4,
                      warmup_ratio=0.05, patience=2, seed=0, checkpoint_every=10**9)  # fmt: skip
    Trainer(model, ce, len(xtr), val, cfg, work, progress=False, log=log).fit()
    return model.eval()
