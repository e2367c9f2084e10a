"""Annotations without decoding, class-balanced image draws, and loading chosen items in batches."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from detkd.data.sampling import class_balanced_images, item_annotations, subset_batches


class Indexed:
    """A dataset known only through ``__getitem__`` (no records)."""

    def __init__(self, targets):
        self.targets = targets
        self.loaded = []

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        self.loaded.append(i)
        return torch.zeros(3, 4, 4), self.targets[i]


def test_records_are_read_without_loading_and_ignored_objects_are_left_out():
    record = SimpleNamespace(
        boxes=np.array([[0, 0, 5, 5], [1, 1, 9, 9], [2, 2, 4, 4]], dtype=np.float32),
        labels=np.array([1, 2, 3]),
        ignore=np.array([False, True, False]),
    )
    dataset = SimpleNamespace(records=[record], __getitem__=None)
    boxes, labels = item_annotations(dataset, 0)
    assert boxes.dtype == np.float64 and labels.dtype == np.int64
    assert labels.tolist() == [1, 3] and boxes.tolist() == [[0, 0, 5, 5], [2, 2, 4, 4]]


def test_a_dataset_without_records_is_indexed():
    dataset = Indexed([{"boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "labels": torch.tensor([2])}])
    boxes, labels = item_annotations(dataset, 0)
    assert boxes.shape == (1, 4) and labels.tolist() == [2] and dataset.loaded == [0]


def test_class_balanced_draw_caps_each_class_and_visits_rare_classes():
    # Class 1 in 20 images, class 2 in images 20..21 only.
    per_image = [np.array([1])] * 20 + [np.array([2]), np.array([1, 2])]
    chosen = class_balanced_images(per_image, max_images=6, max_per_class=3, rng=np.random.default_rng(1))
    assert chosen == sorted(chosen) and len(set(chosen)) == len(chosen)
    shown = [c for i in chosen for c in set(per_image[i].tolist())]
    assert shown.count(2) == 2  # both images of the rare class
    assert shown.count(1) <= 3 + 1  # the cap, plus class 1 coming along in a class-2 image
    again = class_balanced_images(per_image, max_images=6, max_per_class=3, rng=np.random.default_rng(1))
    assert again == chosen
    assert class_balanced_images(per_image, 100, 100, np.random.default_rng(0)) == list(range(22))


def test_subset_batches_load_only_the_chosen_items_in_order():
    dataset = Indexed([{"i": i} for i in range(10)])
    batches = list(subset_batches(dataset, [7, 2, 5], batch_size=2))
    assert [[t["i"] for _, t in b] for b in batches] == [[7, 2], [5]]
    assert dataset.loaded == [7, 2, 5]
