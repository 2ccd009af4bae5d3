"""Models, batches and losses for the benchmarks in this folder.

* ``MLP``        - ``n_layers`` Linear layers (2 tensors each) with ReLU: ``MLP(256, 5)`` is the
                   10-tensor MLP of the step benchmark.
* ``TinyMLP``    - a residual stack of ``n_layers`` width-16 Linear layers (per-tensor cost:
                   ``2 * n_layers`` tensors so small that per-tensor overhead dominates).
* ``MiniGPT``    - vocab 10,000, d_model 128, 2 layers, 4 heads, block 128: token + position
                   embeddings, causal ``nn.TransformerEncoderLayer`` blocks (batch_first, pre-norm,
                   GELU, feed-forward 4 * d_model), final LayerNorm, untied linear head. Twice
                   differentiable on the CPU (MetaAdamW's meta-update forces math attention).
                   ``ablate.tasks.models_text.MiniGPT`` ties the head to the embedding, so it is
                   not used here.
* ``resnet18``   - ResNet-18 for 32x32 images (3x3 stem, no max-pool, BasicBlocks [2, 2, 2, 2],
                   widths 64-512, BatchNorm): ``ablate.tasks.models_vision_ts.ResNet`` (the
                   benchmarks need the ``ablate`` package installed, e.g. ``pip install -e .``).

``make_workload(name, seed)`` returns ``(model, loss_fn, make_batch, source)`` where
``loss_fn(model, batch)`` is a scalar training loss and ``make_batch(generator)`` a fresh batch
of the benchmark's size (MLP: 64 x 256; MiniGPT: 16 x 128 tokens; ResNet-18: 32 x 3 x 32 x 32).

``make_meta_adamw(model)`` is the MetaAdamW every benchmark measures (its defaults), and
``LR, WD`` the hyperparameters the AdamW baselines get.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ablate.tasks.models_vision_ts import ResNet
from metaadamw import MetaAdamW

VOCAB, BLOCK, D_MODEL, N_LAYERS, N_HEADS = 10_000, 128, 128, 2, 4
LR, WD = 5e-4, 1e-2  # MetaAdamW's defaults, given to AdamW too (the cost does not depend on them)


def make_meta_adamw(model: nn.Module, **kwargs: Any) -> MetaAdamW:
    """The default MetaAdamW of ``model`` (its padding warning silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MetaAdamW(model.named_parameters(), model=model, **kwargs)


class MLP(nn.Module):
    def __init__(self, width: int = 256, n_layers: int = 5, out: int = 10):
        super().__init__()
        dims = [width] * n_layers + [out]
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 < len(self.layers):
                x = F.relu(x)
        return x


class TinyMLP(nn.Module):
    """Residual stack x <- x + tanh(W x + b) / sqrt(L): gradients reach every layer, finite."""

    def __init__(self, n_layers: int, width: int = 16):
        super().__init__()
        self.scale = 1.0 / math.sqrt(n_layers)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + self.scale * torch.tanh(layer(x))
        return x


class MiniGPT(nn.Module):
    def __init__(self, vocab: int = VOCAB, block: int = BLOCK, d_model: int = D_MODEL, n_layers: int = N_LAYERS,
                 n_heads: int = N_HEADS):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(block, d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        length = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(length, device=idx.device))
        mask = torch.ones(length, length, dtype=torch.bool, device=idx.device).triu(1)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.ln_f(x))


def resnet18() -> tuple[nn.Module, str]:
    """ResNet-18 for 32x32 inputs and where it came from."""
    return ResNet(blocks=(2, 2, 2, 2), width=64, num_classes=10, in_channels=3), "ablate.tasks.models_vision_ts.ResNet"


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def regression_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


Workload = tuple[nn.Module, Callable[[nn.Module, Any], torch.Tensor], Callable[[torch.Generator], Any], str]


def make_workload(name: str, seed: int = 0) -> Workload:
    """``(model, loss_fn, make_batch, source)`` for 'mlp10', 'minigpt', 'resnet18' or 'tiny<N>' (N tensors)."""
    torch.manual_seed(seed)
    if name == "mlp10":
        model = MLP(256, 5, 10)
        return model, classification_loss, lambda g: (torch.randn(64, 256, generator=g),
                                                       torch.randint(0, 10, (64,), generator=g)), "benchmarks._models.MLP"
    if name == "minigpt":
        model = MiniGPT()
        return model, lm_loss, lambda g: torch.randint(0, VOCAB, (16, BLOCK + 1), generator=g), "benchmarks._models.MiniGPT"
    if name == "resnet18":
        model, source = resnet18()
        return model, classification_loss, lambda g: (torch.randn(32, 3, 32, 32, generator=g),
                                                       torch.randint(0, 10, (32,), generator=g)), source
    if name.startswith("tiny"):
        n_tensors = int(name[4:])
        model = TinyMLP(n_tensors // 2, 16)
        return model, regression_loss, lambda g: (torch.randn(8, 16, generator=g),
                                                   torch.randn(8, 16, generator=g)), "benchmarks._models.TinyMLP"
    raise ValueError(f"unknown workload {name!r}")
