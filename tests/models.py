"""Small models and a generic LightningModule shared by the tests."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class MeanPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


def make_case(name: str, n: int = 8) -> tuple[nn.Module, Tensor, Tensor]:
    """A network with layers of one kind, inputs and 3-class labels."""
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (n,), generator=g)
    if name == "linear":
        net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        x = torch.randn(n, 6, generator=g)
    elif name == "linear3d":
        net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), MeanPool(), nn.Linear(5, 3))
        x = torch.randn(n, 4, 6, generator=g)
    elif name == "conv2d":
        net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
        x = torch.randn(n, 2, 6, 6, generator=g)
    elif name == "conv1d":
        net = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 7, 3))
        x = torch.randn(n, 2, 7, generator=g)
    elif name == "embedding":
        net = nn.Sequential(nn.Embedding(20, 4), MeanPool(), nn.Linear(4, 3))
        x = torch.randint(0, 20, (n, 5), generator=g)
    elif name == "layernorm":
        net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))
        x = torch.randn(n, 6, generator=g)
    elif name == "groupnorm":
        net = nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
        )
        x = torch.randn(n, 2, 6, 6, generator=g)
    elif name == "transformer":
        layer = nn.TransformerEncoderLayer(
            d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True
        )
        net = nn.Sequential(layer, MeanPool(), nn.Linear(8, 3))
        x = torch.randn(n, 4, 8, generator=g)
    else:
        raise KeyError(name)
    return net, x, y


class Classifier(L.LightningModule):
    """``training_step`` returns the mean (or sum) of per-example cross-entropy losses."""

    def __init__(
        self, net: nn.Module, reduction: str = "mean", optimizer: str = "sgd", lr: float = 1.0
    ) -> None:
        super().__init__()
        self.net = net
        self.reduction = reduction
        self.optimizer_name = optimizer
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y, reduction=self.reduction)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(x: Tensor, y: Tensor, batch_size: int, **kwargs) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, **kwargs)


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)
