"""Noise and sampling streams: independent of torch's global stream and of each other; secure mode."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_autodp import DPAutoStrategy
from lightning_autodp.mechanism.noise import NOISE_DOMAIN, NoiseSource
from lightning_autodp.mechanism.randomness import (
    derive_seed,
    secure_gaussian,
    secure_uniform,
    seeded_generator,
)
from lightning_autodp.mechanism.sampling import SAMPLING_DOMAIN, DistributedPoissonBatchSampler
from tests.models import quiet_trainer

N = 32


class IndexedModel(L.LightningModule):
    """Records which examples each step drew and the gradient the optimizer saw (zero loss: noise only)."""

    def __init__(self, width: int = 40) -> None:
        super().__init__()
        self.net = nn.Linear(width, width)
        self.samples: list[list[int]] = []
        self.grads: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, index = batch
        self.samples.append(sorted(index.tolist()))
        return 0.0 * F.mse_loss(self.net(x), x)

    def on_train_batch_start(self, batch, batch_idx):
        if len(batch) == 0:  # an EmptyBatch
            self.samples.append([])

    def on_before_optimizer_step(self, optimizer):
        self.grads.append(torch.cat([p.grad.flatten() for p in self.parameters()]).clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def _run(seed_everything: int, steps: int = 6, **strategy_kwargs) -> IndexedModel:
    L.seed_everything(seed_everything, verbose=False)
    model = IndexedModel()
    data = TensorDataset(torch.randn(N, 40), torch.arange(N))
    strategy = DPAutoStrategy(noise_multiplier=1.0, max_grad_norm=1.0, **strategy_kwargs)
    quiet_trainer(strategy=strategy, max_steps=steps).fit(model, DataLoader(data, batch_size=8))
    return model


def test_the_first_noise_draw_is_not_the_global_stream_of_the_same_seed():
    seed = 1234
    model = _run(seed, steps=1, poisson_sampling=False)
    # zero loss, no Poisson sampling: the gradient is sigma * R * z / B with B = 8 examples
    z = model.grads[0] * 8
    # what torch.randn gives after manual_seed(seed): model initialisation draws come from it
    torch.manual_seed(seed)
    global_stream = torch.randn(4_000)
    # not the stream itself, nor the stream shifted by the draws of a model's initialisation
    for shift in range(2_000):
        corr = torch.corrcoef(torch.stack([z, global_stream[shift : shift + len(z)]]))[0, 1]
        assert abs(corr) < 0.15, shift
    # and z is a standard normal sample (the test above would pass for zeros)
    assert abs(z.std().item() - 1) < 0.1


def test_noise_and_sampling_streams_are_independent_and_domain_separated():
    seeds = range(300)
    noise_first = torch.tensor(
        [torch.rand(1, generator=seeded_generator(s, NOISE_DOMAIN, 0, 0)).item() for s in seeds]
    )
    sampling_first = torch.tensor(
        [torch.rand(1, generator=seeded_generator(s, SAMPLING_DOMAIN, 0, 0)).item() for s in seeds]
    )
    global_first = torch.tensor(
        [torch.rand(1, generator=torch.Generator().manual_seed(s)).item() for s in seeds]
    )
    for a, b in [(noise_first, sampling_first), (noise_first, global_first), (sampling_first, global_first)]:
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1]) < 0.2
    # every (domain, rank, epoch/step) is its own stream
    derived = {
        derive_seed(7, domain, rank, t)
        for domain in (NOISE_DOMAIN, SAMPLING_DOMAIN)
        for rank in range(3)
        for t in range(5)
    }
    assert len(derived) == 2 * 3 * 5
    assert derive_seed(7, NOISE_DOMAIN, 1, 0) == derive_seed(7, NOISE_DOMAIN, 1, 0)


def test_the_sampler_uses_the_sampling_domain():
    sampler = DistributedPoissonBatchSampler(num_samples=1000, sample_rate=0.3, seed=11, micro_batches=1)
    first = next(iter(sampler))
    mask = torch.rand(1000, generator=seeded_generator(11, SAMPLING_DOMAIN, 0, 0)) < 0.3
    assert first == torch.arange(1000)[mask].tolist()


def test_seeded_runs_are_reproducible_and_follow_the_strategy_seed():
    a, b = _run(0), _run(0)
    assert a.samples == b.samples and all(torch.equal(x, y) for x, y in zip(a.grads, b.grads))
    # an explicit seed decides, whatever seed_everything was given
    c, d = _run(0, seed=99), _run(5, seed=99)
    assert c.samples == d.samples and all(torch.equal(x, y) for x, y in zip(c.grads, d.grads))
    assert not all(torch.equal(x, y) for x, y in zip(a.grads, c.grads))


def test_secure_mode_runs_with_the_same_seed_differ_in_noise_and_samples():
    a, b = _run(0, secure_mode=True, seed=3), _run(0, secure_mode=True, seed=3)
    assert a.samples != b.samples
    assert not any(torch.equal(x, y) for x, y in zip(a.grads, b.grads))
    # the noise still has the right scale: sigma * R / B, B = q * N = 8
    std = torch.stack(a.grads).std().item()
    assert abs(std / (1.0 / 8) - 1) < 0.1


def test_secure_sources_have_the_right_distribution():
    u = secure_uniform(200_000)
    assert (u > 0).all() and (u <= 1).all()
    assert abs((u <= 0.1).double().mean().item() - 0.1) < 0.003
    z = secure_gaussian((200_000,))
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    noise = NoiseSource(seed=0, secure_mode=True).gaussian(2.0, like=torch.empty(100_000))
    assert abs(noise.std().item() / 2.0 - 1) < 0.02
    assert not torch.equal(
        noise, NoiseSource(seed=0, secure_mode=True).gaussian(2.0, like=torch.empty(100_000))
    )


@pytest.mark.parametrize("secure_mode", [False, True])
def test_secure_mode_sampler_is_poisson(secure_mode):
    n, q = 400, 0.1
    sampler = DistributedPoissonBatchSampler(num_samples=n, sample_rate=q, seed=1, secure_mode=secure_mode)
    sizes = torch.tensor([len(b) for b in sampler], dtype=torch.float64)  # 10 steps
    sizes = torch.cat(
        [sizes] + [torch.tensor([len(b) for b in sampler], dtype=torch.float64) for _ in range(20)]
    )
    mean, var = q * n, q * (1 - q) * n
    assert abs(sizes.mean().item() - mean) < 5 * (var / len(sizes)) ** 0.5
