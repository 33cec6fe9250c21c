"""Poisson subsampling, on one process and across data-parallel ranks.

The privacy accounting of DP-SGD assumes that every optimizer step uses a *Poisson* sample of
the dataset: each of the ``N`` examples enters the step independently with probability ``q``.
Shuffled fixed-size batches do not have that property, so the strategy replaces the training
DataLoader by one whose batch sampler is :class:`DistributedPoissonBatchSampler`.

Across ``W`` ranks the dataset is split into disjoint shards (example ``j`` belongs to rank
``j mod W``) and each rank draws its shard's examples independently with the same ``q``: the
union over ranks is then exactly a Poisson sample of the whole dataset. Every rank yields the same
number of (possibly empty) batches, so no rank skips an all-reduce.

With ``accumulate_grad_batches = k`` one optimizer step's logical batch is one Poisson sample,
split into ``k`` micro-batches (as Opacus's ``BatchMemoryManager`` does); sampling ``k``
independent batches per step would let an example enter one step more than once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from lightning_autodp.mechanism.randomness import secure_uniform, seeded_generator

SAMPLING_DOMAIN = "sampling"


class EmptyBatch:
    """What the Poisson loader yields for a micro-batch that drew no example.

    The strategy turns it into a step with no data: zero gradient, noise only. A user's
    ``training_step`` never sees it.
    """

    def __repr__(self) -> str:
        return "EmptyBatch()"

    def __len__(self) -> int:
        return 0


class _CollateOrEmpty:
    """Wraps a collate function so that an empty index list gives :class:`EmptyBatch`."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, samples: list[Any]) -> Any:
        if len(samples) == 0:
            return EmptyBatch()
        return self.collate_fn(samples)


class DistributedPoissonBatchSampler(Sampler[list[int]]):
    """Yields Poisson samples of this rank's shard, split into micro-batches.

    Args:
        num_samples: ``N``, the size of the whole dataset (all ranks together).
        sample_rate: ``q``, the probability that an example enters one optimizer step.
        num_replicas: ``W``, the number of data-parallel ranks.
        rank: this rank.
        micro_batches: ``k``, micro-batches per optimizer step (``accumulate_grad_batches``).
        steps_per_epoch: optimizer steps per epoch; default ``ceil(1 / q)`` so that an epoch
            uses every example once in expectation.
        seed: the user's seed; the generator of each (rank, epoch) is seeded with
            ``derive_seed(seed, "sampling", rank, epoch)`` (:mod:`lightning_autodp.mechanism.randomness`), so
            ranks and epochs draw independently, independently of the noise and of torch's global
            stream, and a run is reproducible.
        secure_mode: draw every inclusion from the OS CSPRNG instead (``seed`` unused; not
            reproducible, and a resumed epoch continues with fresh samples).

    Example::

        sampler = DistributedPoissonBatchSampler(num_samples=60000, sample_rate=256 / 60000)
        loader = DataLoader(dataset, batch_sampler=sampler)
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        num_replicas: int = 1,
        rank: int = 0,
        micro_batches: int = 1,
        steps_per_epoch: int | None = None,
        seed: int = 0,
        secure_mode: bool = False,
    ) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas}).")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.num_replicas = num_replicas
        self.rank = rank
        self.micro_batches = micro_batches
        self.steps_per_epoch = steps_per_epoch or max(1, math.ceil(1 / sample_rate))
        self.seed = seed
        self.secure_mode = secure_mode
        self.epoch = 0
        self._shard = torch.arange(rank, num_samples, num_replicas)
        self._batches_yielded = 0
        self._resume_from = 0
        # Lightning calls ``set_epoch`` on ``loader.sampler`` and ``loader.batch_sampler.sampler``
        # only; without this alias every epoch would replay epoch 0's samples.
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch; the epoch selects the generator stream."""
        self.epoch = epoch

    def inclusion_mask(self, generator: torch.Generator | None, size: int | None = None) -> Tensor:
        """Which of ``size`` candidates (default: this rank's shard) enter the next step.

        ``u_j < q`` (seeded) or ``u_j <= q`` (secure, ``u_j`` in (0, 1]): each with probability
        ``q``, independently. The data's samples and the audit's canaries are both drawn here, so
        a sampler that does not draw at its rate is seen by the audit too.
        """
        size = len(self._shard) if size is None else size
        if generator is None:
            return secure_uniform(size) <= self.sample_rate
        return torch.rand(size, generator=generator) < self.sample_rate

    def __len__(self) -> int:
        return self.steps_per_epoch * self.micro_batches

    def __iter__(self) -> Iterator[list[int]]:
        generator = (
            None if self.secure_mode else seeded_generator(self.seed, SAMPLING_DOMAIN, self.rank, self.epoch)
        )
        skip, self._resume_from = self._resume_from, 0
        self._batches_yielded = 0
        for _ in range(self.steps_per_epoch):
            logical_batch = self._shard[self.inclusion_mask(generator)]
            for micro_batch in torch.tensor_split(logical_batch, self.micro_batches):
                self._batches_yielded += 1
                if self._batches_yielded <= skip:
                    continue  # already trained on before the checkpoint this run resumed from
                yield micro_batch.tolist()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_yielded": self._batches_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # Only the epoch: ``batches_yielded`` counts batches prefetched but never trained on. The
        # strategy sets the exact number to skip from Lightning's own loop progress (see
        # :meth:`skip_next`), so a resumed run neither replays nor drops a sample.
        self.epoch = state["epoch"]

    def skip_next(self, batches: int) -> None:
        """Make the next iteration start after ``batches`` micro-batches of its epoch's stream."""
        self._resume_from = batches


class PoissonDataLoader(DataLoader):
    """A DataLoader over the user's dataset whose batches are Poisson samples.

    Lightning saves its ``state_dict`` in checkpoints (it is *stateful*); with the epoch's
    generator derived from ``(seed, rank, epoch)`` and the number of micro-batches Lightning
    completed, a run resumed mid-epoch continues the same stream instead of replaying batches.
    """

    batch_sampler: DistributedPoissonBatchSampler

    def state_dict(self) -> dict[str, int]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)


def check_poisson_compatible(dataloader: object) -> DataLoader:
    """Raise a clear error when ``dataloader`` cannot be Poisson-sampled."""
    if not isinstance(dataloader, DataLoader):
        raise TypeError(
            f"dp_auto's Poisson sampling needs a torch DataLoader over a map-style dataset, got "
            f"{type(dataloader).__name__}. Return a DataLoader from train_dataloader(), or pass "
            "DPAutoStrategy(poisson_sampling=False) and account for the sampling yourself."
        )
    if isinstance(dataloader.dataset, IterableDataset):
        raise TypeError(
            "dp_auto's Poisson sampling needs random access to examples, but the training dataset is an "
            "IterableDataset. Use a map-style Dataset (with __getitem__ and __len__), or pass "
            "DPAutoStrategy(poisson_sampling=False), which weakens the privacy accounting."
        )
    if dataloader.batch_size is None:
        raise ValueError(
            "The training DataLoader has batch_size=None, so dp_auto cannot derive the sampling rate "
            "q = batch_size / len(dataset). Give the DataLoader a batch_size (the expected batch size "
            "per device), without a custom batch_sampler."
        )
    try:
        len(dataloader.dataset)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(
            "dp_auto's Poisson sampling needs len(dataset); the training dataset has no __len__."
        ) from err
    return dataloader


def poisson_dataloader(
    dataloader: DataLoader,
    sample_rate: float,
    num_replicas: int,
    rank: int,
    micro_batches: int,
    seed: int,
    secure_mode: bool = False,
) -> PoissonDataLoader:
    """A :class:`PoissonDataLoader` over ``dataloader``'s dataset, collate_fn and workers."""
    dataset: Dataset = dataloader.dataset
    sampler = DistributedPoissonBatchSampler(
        num_samples=len(dataset),  # type: ignore[arg-type]
        sample_rate=sample_rate,
        num_replicas=num_replicas,
        rank=rank,
        micro_batches=micro_batches,
        seed=seed,
        secure_mode=secure_mode,
    )
    worker_kwargs: dict[str, Any] = {}
    if dataloader.num_workers > 0:
        worker_kwargs = {
            "prefetch_factor": dataloader.prefetch_factor,
            "persistent_workers": dataloader.persistent_workers,
            "worker_init_fn": dataloader.worker_init_fn,
            "multiprocessing_context": dataloader.multiprocessing_context,
            "timeout": dataloader.timeout,
        }
    return PoissonDataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=_CollateOrEmpty(dataloader.collate_fn),
        num_workers=dataloader.num_workers,
        pin_memory=dataloader.pin_memory,
        **worker_kwargs,
    )
