"""Training sampler (determinism, ranks, exact resume) and the train/eval loaders."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from detkd.config import DataConfig
from detkd.data import TrainSampler, build_dataset, build_eval_loader, build_train_loader, build_transforms, collate
from detkd.errors import DataError


def _take(sampler: TrainSampler, n: int) -> list[tuple[int, int]]:
    return list(itertools.islice(iter(sampler), n))


def test_same_seed_same_sequence_other_seed_other_sequence():
    assert _take(TrainSampler(10, seed=3), 35) == _take(TrainSampler(10, seed=3), 35)
    assert _take(TrainSampler(10, seed=3), 35) != _take(TrainSampler(10, seed=4), 35)


def test_each_epoch_is_a_permutation_with_its_own_order():
    items = _take(TrainSampler(10, seed=0), 30)
    epochs = [[index for index, _ in items[k : k + 10]] for k in (0, 10, 20)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    seeds = [aug_seed for _, aug_seed in items]
    assert len(set(seeds)) == len(seeds)  # an image seen twice is augmented differently


@pytest.mark.parametrize("size", [12, 10])
def test_ranks_take_disjoint_slices_of_one_permutation(size):
    world = 3
    per_rank = -(-size // world)
    slices = [_take(TrainSampler(size, seed=5, rank=r, world_size=world), per_rank) for r in range(world)]
    assert all(len(s) == per_rank for s in slices)
    indices = [[i for i, _ in s] for s in slices]
    covered = set().union(*map(set, indices))
    assert covered == set(range(size))
    # Padding repeats only the first (world * per_rank - size) images of the permutation.
    assert sum(map(len, indices)) - len(covered) == world * per_rank - size
    # Interleaving the ranks gives back the single-process epoch order (before padding).
    interleaved = [indices[p % world][p // world] for p in range(size)]
    single = [i for i, _ in _take(TrainSampler(size, seed=5), size)]
    assert interleaved == single


@pytest.mark.parametrize(("start", "rank", "world"), [(0, 0, 1), (3, 0, 1), (10, 0, 1), (27, 0, 1), (9, 1, 2)])
def test_start_resumes_exactly(start, rank, world):
    fresh = _take(TrainSampler(10, seed=1, rank=rank, world_size=world), start + 25)
    resumed = _take(TrainSampler(10, seed=1, rank=rank, world_size=world, start=start), 25)
    assert resumed == fresh[start:]


def test_start_far_ahead_is_immediate():
    began = time.perf_counter()
    first = _take(TrainSampler(10, seed=1, start=10**12 + 3), 1)
    assert time.perf_counter() - began < 0.5 and len(first) == 1


def test_sampler_rejects_empty_dataset_and_bad_rank():
    with pytest.raises(DataError, match="empty"):
        TrainSampler(0)
    with pytest.raises(ValueError):
        TrainSampler(10, rank=2, world_size=2)


def test_collate_keeps_lists():
    a, b = (torch.zeros(3, 4, 5), {"image_id": 1}), (torch.ones(3, 6, 2), {"image_id": 2})
    images, targets = collate([a, b])
    assert [im.shape for im in images] == [(3, 4, 5), (3, 6, 2)]
    assert [t["image_id"] for t in targets] == [1, 2]


def _batches_equal(x, y) -> bool:
    (images_x, targets_x), (images_y, targets_y) = x, y
    return all(torch.equal(a, b) for a, b in zip(images_x, images_y)) and all(
        a["image_id"] == b["image_id"] and torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets_x, targets_y)
    )


@pytest.fixture
def augmented(coco_root):
    transforms = build_transforms(DataConfig(hflip=0.5, scale_jitter=[0.5, 1.5]), train=True)
    return build_dataset(coco_root, "val", transforms=transforms)


def test_train_loader_resume_gives_the_same_augmented_batches(augmented):
    fresh = list(itertools.islice(build_train_loader(augmented, batch_size=2, seed=11), 5))
    resumed = list(itertools.islice(build_train_loader(augmented, batch_size=2, seed=11, start_iter=3), 2))
    assert _batches_equal(resumed[0], fresh[3]) and _batches_equal(resumed[1], fresh[4])
    assert all(len(images) == 2 for images, _ in fresh)


def test_augmentation_does_not_depend_on_workers(augmented):
    in_process = list(itertools.islice(build_train_loader(augmented, batch_size=2, seed=2), 3))
    in_worker = list(itertools.islice(build_train_loader(augmented, batch_size=2, seed=2, workers=1), 3))
    assert all(_batches_equal(a, b) for a, b in zip(in_process, in_worker))


def test_eval_loader_order_limit_and_ranks(coco_root):
    ds = build_dataset(coco_root, "val")
    ids = [t["image_id"] for _, targets in build_eval_loader(ds, batch_size=2) for t in targets]
    assert ids == ds.image_ids()
    limited = [t["image_id"] for _, targets in build_eval_loader(ds, batch_size=2, max_images=2) for t in targets]
    assert limited == ds.image_ids()[:2]
    per_rank = [
        [t["image_id"] for _, targets in build_eval_loader(ds, 1, rank=r, world_size=2) for t in targets]
        for r in range(2)
    ]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(ds.image_ids()) and not set(per_rank[0]) & set(per_rank[1])
