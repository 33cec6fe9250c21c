"""Poisson sampling: batch-size moments, inclusion frequencies, shards across ranks, resume."""

from __future__ import annotations

import lightning as L
import torch

from lightning_autodp import DPAutoStrategy
from lightning_autodp.mechanism.sampling import DistributedPoissonBatchSampler, EmptyBatch, _CollateOrEmpty
from tests.models import Classifier, loader, make_case, quiet_trainer


def _steps(sampler: DistributedPoissonBatchSampler, epochs: int) -> list[list[int]]:
    batches = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        batches.extend(sampler)
    return batches


def test_batch_size_mean_and_variance():
    n, q = 1000, 0.05
    sampler = DistributedPoissonBatchSampler(num_samples=n, sample_rate=q, seed=3)
    sizes = torch.tensor([len(b) for b in _steps(sampler, epochs=100)], dtype=torch.float64)
    steps = len(sizes)
    assert steps == 100 * 20
    mean, var = q * n, q * (1 - q) * n
    assert abs(sizes.mean() - mean) < 4 * (var / steps) ** 0.5
    assert abs(sizes.var() / var - 1) < 4 * (2 / steps) ** 0.5


def test_every_example_appears_with_frequency_q():
    n, q = 200, 0.1
    sampler = DistributedPoissonBatchSampler(num_samples=n, sample_rate=q, seed=5)
    batches = _steps(sampler, epochs=200)
    counts = torch.zeros(n)
    for b in batches:
        assert len(set(b)) == len(b), "an example appeared twice in one step"
        counts[b] += 1
    steps = len(batches)
    expected, sd = steps * q, (steps * q * (1 - q)) ** 0.5
    assert (counts > 0).all()
    assert ((counts - expected).abs() < 5 * sd).all()
    # the frequencies as a whole: chi-square with n-1 degrees of freedom, far tail
    chi2 = (((counts - expected) ** 2) / (expected * (1 - q))).sum()
    assert chi2 < n + 6 * (2 * n) ** 0.5


def test_ranks_draw_disjoint_shards_whose_union_is_poisson():
    n, q, world = 101, 0.2, 2
    samplers = [
        DistributedPoissonBatchSampler(num_samples=n, sample_rate=q, num_replicas=world, rank=r, seed=7)
        for r in range(world)
    ]
    assert len(samplers[0]) == len(samplers[1])  # the same number of steps on every rank
    per_rank = [_steps(s, epochs=300) for s in samplers]
    counts = torch.zeros(n)
    for rank, batches in enumerate(per_rank):
        for b in batches:
            assert all(i % world == rank for i in b)
            counts[b] += 1
    steps = len(per_rank[0])
    assert ((counts - steps * q).abs() < 5 * (steps * q * (1 - q)) ** 0.5).all()
    # independent streams: the ranks do not draw the same pattern
    assert [len(b) for b in per_rank[0]] != [len(b) for b in per_rank[1]]


def test_micro_batches_split_one_poisson_sample():
    sampler = DistributedPoissonBatchSampler(num_samples=100, sample_rate=0.3, micro_batches=3, seed=1)
    plain = DistributedPoissonBatchSampler(num_samples=100, sample_rate=0.3, micro_batches=1, seed=1)
    split, whole = list(sampler), list(plain)
    assert len(split) == 3 * len(whole)
    for step, logical in enumerate(whole):
        assert sum(split[3 * step : 3 * step + 3], []) == logical


def test_seed_reproducible_and_epochs_differ():
    a = DistributedPoissonBatchSampler(num_samples=50, sample_rate=0.2, seed=11)
    b = DistributedPoissonBatchSampler(num_samples=50, sample_rate=0.2, seed=11)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first


def test_resume_skips_batches_already_used():
    sampler = DistributedPoissonBatchSampler(num_samples=60, sample_rate=0.1, seed=2)
    sampler.set_epoch(4)
    full = list(sampler)
    resumed = DistributedPoissonBatchSampler(num_samples=60, sample_rate=0.1, seed=2)
    resumed.load_state_dict(sampler.state_dict())  # the epoch; the skip comes from Lightning's progress
    resumed.skip_next(3)
    assert list(resumed) == full[3:]
    assert list(resumed) == full  # the skip applies to the interrupted epoch only


class _SeenIds(L.Callback):
    def __init__(self) -> None:
        self.steps: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append([] if isinstance(batch, EmptyBatch) else batch[0][:, 0].long().tolist())


def test_a_lightning_run_samples_every_example_with_frequency_q_and_fresh_epochs():
    """End to end through Trainer: the examples training_step receives, not the sampler alone."""
    n, batch_size, epochs = 40, 4, 60
    q = batch_size / n
    ids = torch.arange(n, dtype=torch.float64)[:, None].repeat(1, 6)  # column 0 carries the id
    y = torch.zeros(n, dtype=torch.long)
    net, _, _ = make_case("linear")
    seen = _SeenIds()
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(
        strategy=DPAutoStrategy(noise_multiplier=1.0),
        max_epochs=epochs,
        callbacks=[seen],
        precision="64-true",
    )
    trainer.fit(Classifier(net.double(), lr=0.0), loader(ids, y, batch_size=batch_size))
    per_epoch = len(seen.steps) // epochs
    assert per_epoch == n // batch_size
    epoch_samples = [seen.steps[e * per_epoch : (e + 1) * per_epoch] for e in range(epochs)]
    assert len({repr(s) for s in epoch_samples}) == epochs, "an epoch replayed another epoch's samples"
    counts = torch.zeros(n)
    for step in seen.steps:
        assert len(set(step)) == len(step)
        counts[step] += 1
    total = len(seen.steps)
    assert ((counts - total * q).abs() < 5 * (total * q * (1 - q)) ** 0.5).all()


def test_empty_index_list_collates_to_empty_batch():
    collate = _CollateOrEmpty(lambda xs: torch.stack(xs))
    assert isinstance(collate([]), EmptyBatch)
    assert collate([torch.zeros(2)]).shape == (1, 2)
