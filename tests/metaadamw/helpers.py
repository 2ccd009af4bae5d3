"""Small models and helpers shared by the optimizer tests."""

from __future__ import annotations

import io

import torch
from torch import nn


class TinyTransformer(nn.Module):
    """Embedding + nn.TransformerEncoderLayer blocks + head: names like a real language model."""

    def __init__(self, vocab: int = 11, d: int = 8, layers: int = 2, dropout: float = 0.0):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, 2, 16, dropout=dropout, batch_first=True), layers, enable_nested_tensor=False
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        return self.head(self.norm(self.encoder(self.embedding(x))))


class TinyConvNet(nn.Module):
    """Conv + BatchNorm, to check that meta-updates leave running statistics alone."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def mlp(seed: int = 0, widths=(6, 16, 16, 1)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def regression_batches(n: int = 4, size: int = 16, seed: int = 1, dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, dim, generator=g), torch.randn(size, 1, generator=g)) for _ in range(n)]


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def lm_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def lm_batches(n: int = 3, seed: int = 2, vocab: int = 11):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (4, 7), generator=g), torch.randint(0, vocab, (4, 7), generator=g)) for _ in range(n)]


def conv_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def conv_batches(n: int = 3, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def small_kwargs(**over):
    """A cheap modulator for tests."""
    kw = dict(modulator_layers=1, modulator_ff=8)
    kw.update(over)
    return kw


def randomise_head(opt, seed: int = 0) -> None:
    """A random modulator head: non-trivial multipliers from the first step."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        opt.modulator.head.weight.copy_(torch.randn(opt.modulator.head.weight.shape, generator=g))
        opt.modulator.head.bias.copy_(torch.randn(4, generator=g))


def save_and_load(obj):
    """``obj`` through ``torch.save`` and ``torch.load``, as a checkpoint file would take it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)
