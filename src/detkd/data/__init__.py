"""Datasets, augmentation and loaders: COCO, VOC and YOLO folders and the built-in digits scenes."""

from detkd.data.base import DetectionDataset
from detkd.data.digits import DIGITS_DIFFICULTIES, DigitsSpec, make_digits
from detkd.data.formats import build_dataset
from detkd.data.loader import TrainSampler, build_eval_loader, build_train_loader, collate
from detkd.data.transforms import build_transforms

__all__ = [
    "DIGITS_DIFFICULTIES",
    "DetectionDataset",
    "DigitsSpec",
    "TrainSampler",
    "build_dataset",
    "build_eval_loader",
    "build_train_loader",
    "build_transforms",
    "collate",
    "make_digits",
]
