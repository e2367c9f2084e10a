"""Batching and sampling: an infinite, resumable, rank-aware training sampler and a plain eval loader.

Training is counted in iterations, not epochs, so the training sampler never ends. Everything it yields
is a function of ``(seed, epoch, position)``: the order of epoch ``e`` is a permutation drawn from a
generator seeded with ``(seed, e)``, and each sample carries an augmentation seed drawn from the same
generator. A run resumed at iteration ``k`` therefore sees exactly the samples, and the same augmented
pixels, that the uninterrupted run saw from iteration ``k`` on, whatever the number of workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from detkd.errors import DataError

Batch = tuple[list[Tensor], list[dict[str, Any]]]


def collate(batch: list[tuple[Tensor, dict[str, Any]]]) -> Batch:
    """Keep images and targets as lists: images differ in size and the model batches them itself."""
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # SeedSequence mixes (seed, epoch) so nearby pairs give unrelated streams; it takes no negative entropy.
    (state,) = np.random.SeedSequence([seed % 2**64, epoch]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state))


class TrainSampler(Sampler[tuple[int, int]]):
    """Infinite shuffled sampler yielding ``(index, aug_seed)``, split across ranks, resumable.

    Epoch ``e`` is a permutation of the dataset padded (by wrapping around) to a multiple of
    ``world_size``; rank ``r`` takes positions ``r, r + world_size, ...``, so ranks see disjoint images
    within an epoch and the same number of them.

    Args:
        size: number of images in the dataset.
        seed: seed of the whole sequence.
        rank: this process's rank.
        world_size: number of processes.
        start: samples this rank has already consumed; iteration starts there, computed directly
            rather than by drawing and discarding.
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0):
        if size <= 0:
            raise DataError("cannot sample from an empty dataset (it has no images)")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.size = size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.per_rank = math.ceil(size / world_size)  # samples per rank per epoch

    def epoch(self, epoch: int) -> tuple[Tensor, Tensor]:
        """This rank's ``(indices, aug_seeds)`` for ``epoch``, each ``[per_rank]`` int64."""
        generator = _epoch_generator(self.seed, epoch)
        order = torch.randperm(self.size, generator=generator)
        total = self.per_rank * self.world_size
        aug_seeds = torch.randint(0, 2**62, (total,), generator=generator)
        padded = order.repeat(math.ceil(total / self.size))[:total]
        return padded[self.rank :: self.world_size], aug_seeds[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            indices, aug_seeds = self.epoch(epoch)
            yield from zip(indices[offset:].tolist(), aug_seeds[offset:].tolist())
            epoch, offset = epoch + 1, 0


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start_iter: int = 0,
    pin_memory: bool = False,
) -> Iterator[Batch]:
    """An endless iterator of training batches ``(images, targets)`` for this rank.

    Args:
        dataset: a :class:`~detkd.data.base.DetectionDataset` (indexable by ``(index, aug_seed)``).
        batch_size: images per batch on this rank.
        seed: seed of the sample order and of the augmentations.
        workers: DataLoader worker processes (0 loads in the calling process).
        rank: this process's rank.
        world_size: number of processes.
        start_iter: batches already consumed (on resume); the iterator continues from the next one.
        pin_memory: put batches in page-locked memory, so the copy to a CUDA device can overlap compute.

    Returns:
        An iterator that never ends; take as many batches as the schedule needs.
    """
    sampler = TrainSampler(len(dataset), seed, rank, world_size, start=start_iter * batch_size)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
    )
    return iter(loader)


def build_eval_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int = 0,
    max_images: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A loader over the first ``max_images`` images (all by default), in index order, without augmentation seeds.

    With ``world_size > 1`` rank ``r`` takes images ``r, r + world_size, ...``: disjoint subsets that
    together cover the selection exactly once (counts may differ by one between ranks).

    Args:
        dataset: the evaluation dataset.
        batch_size: images per batch.
        workers: DataLoader worker processes.
        max_images: evaluate only the first this many images.
        rank: this process's rank.
        world_size: number of processes.

    Returns:
        A re-iterable DataLoader of ``(images, targets)`` batches.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    count = len(dataset) if max_images is None else min(len(dataset), max(0, max_images))
    indices = list(range(rank, count, world_size))
    return DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=workers, collate_fn=collate)
