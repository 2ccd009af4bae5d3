"""The models of the time-series and image tasks: a Transformer-encoder forecaster and a ResNet.

Both are plain ``nn.Module`` objects without in-place operations on activations, so MetaAdamW
can differentiate the training loss twice (its meta-update takes gradients of gradients; for the
Transformer on PyTorch's math attention kernel).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

POOLINGS = ("last", "mean")


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    """The fixed sine/cosine positional encoding of Vaswani et al. (2017): (length, d_model)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: d_model // 2])
    return table


class TimeSeriesTransformer(nn.Module):
    """One-step forecaster: a window (batch, seq_len, n_inputs) -> the next target value (batch,).

    A linear input projection to ``d_model``, sinusoidal positions, a ``torch.nn.TransformerEncoder``
    (post-norm layers, feed-forward width 4 * d_model) and a linear head on the last position
    (``pooling="last"``) or on the mean over positions (``pooling="mean"``). The fused attention
    kernels have no double backward: second-order differentiation (MetaAdamW's meta-update) must
    select ``torch.nn.attention.SDPBackend.MATH``, as ``metaadamw.meta.meta_update`` does.
    """

    def __init__(
        self,
        n_inputs: int,
        seq_len: int,
        d_model: int = 128,
        n_heads: int = 4,
        n_layers: int = 2,
        dropout: float = 0.2,
        pooling: str = "last",
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not one of {', '.join(POOLINGS)}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not a multiple of n_heads={n_heads}")
        self.pooling = pooling
        self.input_proj = nn.Linear(n_inputs, d_model)
        self.register_buffer("positions", sinusoidal_positions(seq_len, d_model), persistent=False)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=4 * d_model, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.input_proj(x) + self.positions[: x.shape[1]])
        h = h[:, -1] if self.pooling == "last" else h.mean(dim=1)
        return self.head(h).squeeze(-1)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (1x1 conv-BN when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet for small images (He et al., 2016; the usual CIFAR variant: 3x3 stem, no max-pool).

    ``blocks`` gives the number of BasicBlocks per stage ([2, 2, 2, 2] is ResNet-18); stage ``i``
    has ``width * 2**i`` channels and halves the resolution from the second stage on. Global
    average pooling and a linear classifier follow.
    """

    def __init__(self, blocks: Sequence[int] = (2, 2, 2, 2), width: int = 64, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if not blocks or any(b < 1 for b in blocks):
            raise ValueError(f"blocks must be a non-empty list of positive block counts, got {list(blocks)}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages, c_in = [], width
        for i, n_blocks in enumerate(blocks):
            c_out = width * 2**i
            for j in range(n_blocks):
                stages.append(BasicBlock(c_in, c_out, stride=2 if i > 0 and j == 0 else 1))
                c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))
        return self.fc(h.mean(dim=(2, 3)))
