"""Choosing and loading a few training images outside the training loader.

Methods that look at the training set between epochs (GKD's prototypes) read the annotations of every image
without decoding any (:func:`item_annotations`), draw a class-balanced sample (:func:`class_balanced_images`) and
load just those items in batches (:func:`subset_batches`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch import Tensor


def item_annotations(dataset: Any, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The boxes ``[N, 4]`` (float64, xyxy) and labels ``[N]`` (int64) of ``dataset[index]``'s target, in the
    target's order.

    A :class:`~detkd.data.base.DetectionDataset` answers from its records without decoding the image (the item's
    target holds the objects that are not ignored, in record order); any other dataset is indexed.
    """
    records = getattr(dataset, "records", None)
    if records is not None:
        keep = ~records[index].ignore
        boxes, labels = records[index].boxes[keep], records[index].labels[keep]
    else:
        target = dataset[index][1]
        boxes, labels = target["boxes"].numpy(), target["labels"].numpy()
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(labels, dtype=np.int64)


def class_balanced_images(
    labels_per_image: list[np.ndarray], max_images: int | None, max_per_class: int | None, rng: np.random.Generator
) -> list[int]:
    """Images drawn class by class in turn until every class has ``max_per_class`` images or ``max_images`` are drawn.

    Each class's images are visited in a random order (drawn from ``rng``); an image counts for every class it
    shows.

    Args:
        labels_per_image: the labels of the objects eligible in each image.
        max_images: images in all (None: no cap).
        max_per_class: images per class (None: no cap).
        rng: the random generator (the caller may draw more from it afterwards).

    Returns:
        The chosen image indices, sorted.
    """
    by_class: dict[int, list[int]] = {}
    for i, labels in enumerate(labels_per_image):
        for c in set(labels.tolist()):
            by_class.setdefault(c, []).append(i)
    queues = {c: list(rng.permutation(ims)) for c, ims in sorted(by_class.items())}
    chosen: dict[int, None] = {}
    images_of = dict.fromkeys(queues, 0)
    max_images = len(labels_per_image) if max_images is None else max_images
    max_per_class = len(labels_per_image) if max_per_class is None else max_per_class
    while len(chosen) < max_images:
        added = False
        for c, queue in queues.items():
            if len(chosen) >= max_images or images_of[c] >= max_per_class:
                continue
            while queue and int(queue[0]) in chosen:
                queue.pop(0)
            if not queue:
                continue
            image = int(queue.pop(0))
            chosen[image] = None
            added = True
            for c2 in set(labels_per_image[image].tolist()):
                images_of[c2] += 1
        if not added:
            break
    return sorted(chosen)


def subset_batches(dataset: Any, indices: list[int], batch_size: int) -> Iterator[list[tuple[Tensor, dict]]]:
    """The items ``dataset[i]`` for ``i`` in ``indices``, in order, ``batch_size`` at a time."""
    for start in range(0, len(indices), batch_size):
        yield [dataset[i] for i in indices[start : start + batch_size]]
