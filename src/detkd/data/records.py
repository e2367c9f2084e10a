"""A split's records as a few numpy arrays, and a cache of them keyed by the annotation file.

Holding one Python object per image (a dataclass with its own small arrays, a ``Path``, a ``str``) costs memory
twice over in DataLoader workers: every access to such an object writes its reference count, which copies the
page it lives on into the worker (copy-on-access), so each worker slowly duplicates the whole list. A
:class:`RecordTable` keeps everything in a handful of arrays (boxes of all images concatenated, with per-image
offsets; paths as one bytes array) that workers only read. ``table[i]`` builds the :class:`ImageRecord` of
image ``i`` on demand, as views into the arrays.

Parsing a COCO-sized annotation file takes tens of seconds and gigabytes; :func:`cached_table` parses it once
and saves the table next to the data (or in the user's cache folder), keyed by the file's path, size and
modification time. Later reads (the second split of the same file, every ``torchrun`` rank on the machine, the
next run) load the arrays instead. Processes that start together take turns on a lock file, so one of them
parses and the others load its result. A large file is parsed in a short-lived child process that writes the cache
and exits, so the parser's transient objects (the whole JSON text and one Python object per entry) never inflate
the peak memory of the training process, which only loads the arrays.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import pickle
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detkd.errors import DataError

log = logging.getLogger("detkd")

CACHE_VERSION = 1
CACHE_FOLDER = ".detkd_cache"
# Above this size an annotation file is parsed in a child process; below it the child's start (a fresh interpreter
# importing torch, seconds) would cost more than the parse's memory is worth.
PARSE_IN_CHILD_BYTES = 32 * 2**20
_ARRAYS = ("paths", "file_names", "image_ids", "widths", "heights", "offsets", "boxes", "labels", "areas", "ignore")


@dataclass
class ImageRecord:
    """One image of a split and its annotations, boxes already clipped to the image.

    Attributes:
        path: image file.
        file_name: the image's name as the annotation files spell it (kept for ``coco_gt``).
        image_id: integer id, unique within the split.
        width: image width in pixels.
        height: image height in pixels.
        boxes: ``[N, 4]`` float32 xyxy pixels.
        labels: ``[N]`` int64, 1..C.
        areas: ``[N]`` float32 area used by the COCO small/medium/large split.
        ignore: ``[N]`` bool; True for crowd (COCO) and difficult (VOC) objects, which are left out of
            training targets and only kept as regions the evaluation does not count.
    """

    path: Path
    file_name: str
    image_id: int
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    areas: np.ndarray
    ignore: np.ndarray


class RecordTable:
    """The records of one split, packed into arrays; a read-only sequence of :class:`ImageRecord`.

    Attributes:
        paths: ``[N]`` bytes (UTF-8) image paths.
        file_names: ``[N]`` bytes (UTF-8) names as the annotation files spell them.
        image_ids: ``[N]`` int64.
        widths: ``[N]`` int32.
        heights: ``[N]`` int32.
        offsets: ``[N + 1]`` int64; the boxes of image ``i`` are rows ``offsets[i]:offsets[i + 1]``.
        boxes: ``[M, 4]`` float32 xyxy pixels, all images concatenated.
        labels: ``[M]`` int64.
        areas: ``[M]`` float32.
        ignore: ``[M]`` bool.
    """

    def __init__(self, **arrays: np.ndarray):
        missing = [name for name in _ARRAYS if name not in arrays]
        if missing:
            raise ValueError(f"RecordTable needs the arrays {', '.join(missing)}")
        for name in _ARRAYS:
            setattr(self, name, arrays[name])

    @classmethod
    def from_records(cls, records: list[ImageRecord]) -> RecordTable:
        """Pack a list of records (the readers' output) into arrays."""
        counts = np.array([len(r.labels) for r in records], dtype=np.int64)
        offsets = np.zeros(len(records) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])

        def cat(name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
            parts = [np.asarray(getattr(r, name), dtype=dtype).reshape(-1, *shape) for r in records]
            return np.concatenate(parts) if parts else np.zeros((0, *shape), dtype=dtype)

        return cls(
            paths=_bytes_array([str(r.path) for r in records]),
            file_names=_bytes_array([r.file_name for r in records]),
            image_ids=np.array([r.image_id for r in records], dtype=np.int64),
            widths=np.array([r.width for r in records], dtype=np.int32),
            heights=np.array([r.height for r in records], dtype=np.int32),
            offsets=offsets,
            boxes=cat("boxes", np.float32, (4,)),
            labels=cat("labels", np.int64, ()),
            areas=cat("areas", np.float32, ()),
            ignore=cat("ignore", bool, ()),
        )

    @classmethod
    def from_annotations(
        cls,
        images: dict[str, Any],
        ann_image: np.ndarray,
        boxes: np.ndarray,
        labels: np.ndarray,
        ignore: np.ndarray,
        areas: np.ndarray,
        skipped: Counter,
    ) -> RecordTable:
        """Build the table from per-annotation arrays in one pass, as :func:`~detkd.data.base.make_record` does
        image by image: boxes clipped to their image, degenerate ones dropped and counted in ``skipped``.

        Args:
            images: per-image ``paths``, ``file_names`` (lists of str), ``image_ids``, ``widths``, ``heights``.
            ann_image: ``[M]`` index (into the images) of each annotation's image.
            boxes: ``[M, 4]`` raw xyxy boxes.
            labels: ``[M]`` labels 1..C.
            ignore: ``[M]`` flags of objects the evaluation ignores.
            areas: ``[M]`` annotated areas; 0 where not given (the clipped box area is used).
            skipped: counter of dropped annotations by reason, updated in place.
        """
        widths = np.asarray(images["widths"], dtype=np.int32)
        heights = np.asarray(images["heights"], dtype=np.int32)
        order = np.argsort(ann_image, kind="stable")  # by image, file order within an image
        ann_image, raw = ann_image[order], np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[order]
        labels, ignore, areas = labels[order], ignore[order], areas[order]
        zero_area = (raw[:, 2] <= raw[:, 0]) | (raw[:, 3] <= raw[:, 1])
        clipped = raw.copy()
        clipped[:, 0::2] = clipped[:, 0::2].clip(0, widths[ann_image, None])
        clipped[:, 1::2] = clipped[:, 1::2].clip(0, heights[ann_image, None])
        outside = ~zero_area & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
        keep = ~(zero_area | outside)
        if (zero_area & ~ignore).any():
            skipped["zero_area"] += int((zero_area & ~ignore).sum())
        if (outside & ~ignore).any():
            skipped["outside_image"] += int((outside & ~ignore).sum())
        clipped, areas = clipped[keep], areas[keep]
        box_areas = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        offsets = np.zeros(len(widths) + 1, dtype=np.int64)
        np.cumsum(np.bincount(ann_image[keep], minlength=len(widths)), out=offsets[1:])
        return cls(
            paths=_bytes_array(images["paths"]),
            file_names=_bytes_array(images["file_names"]),
            image_ids=np.asarray(images["image_ids"], dtype=np.int64),
            widths=widths,
            heights=heights,
            offsets=offsets,
            boxes=clipped.astype(np.float32),
            labels=labels[keep].astype(np.int64),
            areas=np.where(areas > 0, areas, box_areas).astype(np.float32),
            ignore=ignore[keep].astype(bool),
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> ImageRecord:
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range ({len(self)} images)")
        index = int(index) % len(self)
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        return ImageRecord(
            path=Path(self.paths[index].decode()),
            file_name=self.file_names[index].decode(),
            image_id=int(self.image_ids[index]),
            width=int(self.widths[index]),
            height=int(self.heights[index]),
            boxes=self.boxes[lo:hi],
            labels=self.labels[lo:hi],
            areas=self.areas[lo:hi],
            ignore=self.ignore[lo:hi],
        )

    def __iter__(self) -> Iterator[ImageRecord]:
        return (self[i] for i in range(len(self)))

    def image_paths(self) -> list[Path]:
        return [Path(p.decode()) for p in self.paths]

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in _ARRAYS}


def _bytes_array(strings: list[str]) -> np.ndarray:
    # Fixed-width bytes: one buffer, no Python object per entry. numpy strips trailing NULs, which no path has.
    return np.array([s.encode() for s in strings], dtype=np.bytes_) if strings else np.zeros(0, dtype="S1")


# --- the cache -------------------------------------------------------------------------------------------------

# What a reader's parse returns: the table, the class names, their category ids, the skipped counts.
Parsed = tuple[RecordTable, list[str], list[int], Counter]


def cache_key(source: Path, extra: str = "") -> str:
    """A key that changes when ``source`` is replaced or edited: its resolved path, size and mtime."""
    stat = source.stat()
    text = f"{CACHE_VERSION}|{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{extra}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def cache_folders(source: Path) -> list[Path]:
    """Where a cache for ``source`` may live: next to it, else the user's cache folder (``DETKD_CACHE_DIR``,
    ``XDG_CACHE_HOME/detkd`` or ``~/.cache/detkd``)."""
    user = os.environ.get("DETKD_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    user = Path(user) if os.environ.get("DETKD_CACHE_DIR") else Path(user) / "detkd"
    return [source.parent / CACHE_FOLDER, user]


def _load(path: Path, key: str) -> Parsed | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            table = RecordTable(**{name: z[name] for name in _ARRAYS})
            classes = [str(c) for c in z["classes"]]
            category_ids = [int(c) for c in z["category_ids"]]
            skipped = Counter({str(k): int(v) for k, v in zip(z["skipped_reasons"], z["skipped_counts"])})
    except (OSError, ValueError, KeyError, EOFError):
        return None  # a damaged or foreign file: parse again and replace it
    return table, classes, category_ids, skipped


def _save(
    path: Path, key: str, table: RecordTable, classes: list[str], category_ids: list[int], skipped: Counter
) -> None:
    """Write atomically (temporary file + rename), so a reader never sees half a cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                key=np.array(key),
                classes=np.array(classes, dtype=np.str_) if classes else np.zeros(0, dtype="U1"),
                category_ids=np.array(category_ids, dtype=np.int64),
                skipped_reasons=np.array(sorted(skipped), dtype=np.str_) if skipped else np.zeros(0, dtype="U1"),
                skipped_counts=np.array([skipped[k] for k in sorted(skipped)], dtype=np.int64),
                **table.arrays(),
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed); without ``fcntl`` (Windows), no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _parse_and_save(path: Path, key: str, parse: Callable[[], Parsed]) -> None:
    """The child process's work: parse, write the cache, return nothing (the parent loads the file)."""
    _save(path, key, *parse())


def _parse_in_child(source: Path, parse: Callable[[], Parsed]) -> bool:
    """Whether ``source`` is large enough to be parsed in a child process, and ``parse`` can be sent there."""
    if source.stat().st_size <= PARSE_IN_CHILD_BYTES or multiprocessing.current_process().daemon:
        return False  # small files parse faster than a child starts; a daemonic process may not have children
    try:
        pickle.dumps(parse)
    except (pickle.PicklingError, AttributeError, TypeError):
        log.debug("%s: the parser cannot be sent to a child process; parsing here", source)
        return False
    return True


def cached_table(source: Path, extra: str, parse: Callable[[], Parsed]) -> Parsed:
    """``parse()``'s result for the annotation file ``source``, from the cache when it holds one for this very
    file (same path, size and mtime, and ``extra``, e.g. the image folder), else parsed and cached.

    A file over :data:`PARSE_IN_CHILD_BYTES` is parsed by a spawned child process (``parse`` must then be
    picklable, e.g. a ``functools.partial`` of a module-level function; else it runs here), which writes the cache;
    this process then loads it. An error of the parse (e.g. :class:`~detkd.errors.DataError`) is raised here with
    its type and message. A folder where the cache cannot be written (read-only data) is skipped for the next one;
    when none can be written, the file is parsed here without caching.
    """
    key = cache_key(source, extra)
    name = f"{source.stem}.{key}.npz"
    result = None
    for folder in cache_folders(source):
        path = folder / name
        try:
            with _locked(folder / f"{source.stem}.lock"):
                hit = _load(path, key) if path.is_file() else None
                if hit is not None:
                    log.debug("%s: records read from the cache %s", source, path)
                    return hit
                if result is None and _parse_in_child(source, parse):
                    # Spawned, not forked: a fork would copy this process's threads' locks (torch, OpenMP).
                    context = multiprocessing.get_context("spawn")
                    try:
                        with ProcessPoolExecutor(max_workers=1, mp_context=context) as child:
                            child.submit(_parse_and_save, path, key, parse).result()
                    except BrokenProcessPool:
                        raise DataError(
                            f"{source}: the process reading the annotation file stopped before it finished (out of "
                            "memory?); free memory or run with fewer processes per machine"
                        ) from None
                    result = _load(path, key)
                    if result is None:
                        raise OSError(f"{path}: the cache written by the parsing process cannot be read")
                else:
                    if result is None:
                        result = parse()
                    _save(path, key, *result)
        except OSError as exc:
            log.debug("%s: no cache in %s (%s)", source, folder, exc)
            continue
        log.debug("%s: records cached in %s", source, path)
        if folder == source.parent / CACHE_FOLDER:
            for old in folder.glob(f"{source.stem}.*.npz"):
                if old != path:  # the cache of an earlier version of the file
                    old.unlink(missing_ok=True)
        return result
    return result if result is not None else parse()
