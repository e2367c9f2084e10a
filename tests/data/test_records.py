"""Records as arrays (no object per image for DataLoader workers to copy) and the parse-once cache."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest

from detkd.data import build_dataset
from detkd.data import coco as coco_reader
from detkd.data import records as records_module
from detkd.data.records import CACHE_FOLDER, RecordTable
from detkd.errors import DataError
from tests.data.conftest import SCENE


def _count_parses(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real = coco_reader._read_json

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(coco_reader, "_read_json", counting)
    return calls


def test_records_are_arrays_and_read_like_records(coco_root):
    ds = build_dataset(coco_root, "val")
    table = ds.records
    assert isinstance(table, RecordTable)
    assert table.boxes.shape == (3, 4) and table.offsets.tolist() == [0, 2, 2, 3]
    for i, item in enumerate(SCENE):
        record = ds.records[i]
        assert record is not ds.records[i]  # built on demand, not held
        assert np.array_equal(record.boxes, np.array(item["boxes"], dtype=np.float32).reshape(-1, 4))
        assert record.labels.tolist() == item["labels"] and not record.ignore.any()
        assert record.path == coco_root / "val" / f"{item['name']}.png"
        assert (record.width, record.height) == (item["width"], item["height"])
        assert ds.record(i).image_id == record.image_id == i
    assert [r.image_id for r in ds.records] == ds.image_ids() == [0, 1, 2]
    other = ds.with_transforms(None)
    assert other.records is ds.records and other.transforms is None


def test_list_of_records_is_packed(coco_root):
    ds = build_dataset(coco_root, "val")
    again = type(ds)(list(ds.records), ds.classes, ds.root, ds.split, ds.format)
    for name, array in ds.records.arrays().items():
        assert np.array_equal(getattr(again.records, name), array), name


def test_annotation_file_is_parsed_once_per_version(coco_root, monkeypatch):
    calls = _count_parses(monkeypatch)
    first = build_dataset(coco_root, "val")
    second = build_dataset(coco_root, "val")
    assert len(calls) == 1
    assert list((coco_root / "annotations" / CACHE_FOLDER).glob("instances_val.*.npz"))
    for name, array in first.records.arrays().items():
        assert np.array_equal(getattr(second.records, name), array), name
    assert second.classes == first.classes
    ann = coco_root / "annotations" / "instances_val.json"
    ann.write_text(ann.read_text().replace('"cat"', '"kat"'))  # an edit: the cache must not be used
    third = build_dataset(coco_root, "val")
    assert len(calls) == 2 and third.classes[0] == "kat"
    assert len(list((coco_root / "annotations" / CACHE_FOLDER).glob("instances_val.*.npz"))) == 1


def test_cache_goes_to_the_user_folder_when_the_data_folder_refuses(coco_root, tmp_path, monkeypatch):
    (coco_root / "annotations" / CACHE_FOLDER).write_text("a file where the cache folder would go")
    monkeypatch.setenv("DETKD_CACHE_DIR", str(tmp_path / "cache"))
    calls = _count_parses(monkeypatch)
    build_dataset(coco_root, "val")
    build_dataset(coco_root, "val")
    assert len(calls) == 1 and list((tmp_path / "cache").glob("instances_val.*.npz"))


def _load_in_child(root: str, log: str) -> None:
    real = coco_reader._read_json

    def counting(path):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(path)

    coco_reader._read_json = counting
    build_dataset(root, "val")


def test_processes_starting_together_parse_once(coco_root, tmp_path):
    """As torchrun's ranks on one machine: one process parses, the others load its cache."""
    log = tmp_path / "parses.txt"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_load_in_child, args=(str(coco_root), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert len(log.read_text().splitlines()) == 1


def test_bad_annotations_are_not_cached(coco_root, monkeypatch):
    ann = coco_root / "annotations" / "instances_val.json"
    ann.write_text('{"images": [')
    with pytest.raises(DataError):
        build_dataset(coco_root, "val")
    assert not list((coco_root / "annotations" / CACHE_FOLDER).glob("*.npz"))


def test_large_file_is_parsed_in_a_child_process(coco_root, monkeypatch):
    """Over the size threshold (lowered here to 0 bytes) the parse runs in a spawned child, which writes the cache
    this process loads: the same table as parsing here, and this process never reads the JSON."""
    here = build_dataset(coco_root, "val")
    for old in (coco_root / "annotations" / CACHE_FOLDER).glob("*.npz"):
        old.unlink()
    monkeypatch.setattr(records_module, "PARSE_IN_CHILD_BYTES", 0)
    calls = _count_parses(monkeypatch)  # counts parses in this process only
    child = build_dataset(coco_root, "val")
    assert calls == [] and list((coco_root / "annotations" / CACHE_FOLDER).glob("instances_val.*.npz"))
    for name, array in here.records.arrays().items():
        assert np.array_equal(getattr(child.records, name), array), name
    assert (child.classes, child.category_ids, child.skipped) == (here.classes, here.category_ids, here.skipped)


def test_child_parse_errors_arrive_as_they_are(coco_root, monkeypatch):
    ann = coco_root / "annotations" / "instances_val.json"
    ann.write_text(ann.read_text().replace('"bbox": [', '"bbox": ["x", ', 1))
    with pytest.raises(DataError) as here:
        build_dataset(coco_root, "val")
    monkeypatch.setattr(records_module, "PARSE_IN_CHILD_BYTES", 0)
    calls = _count_parses(monkeypatch)
    with pytest.raises(DataError) as child:
        build_dataset(coco_root, "val")
    assert calls == [] and "bbox must be 4 finite numbers" in str(here.value)
    assert type(child.value) is DataError and str(child.value) == str(here.value)
    assert not list((coco_root / "annotations" / CACHE_FOLDER).glob("*.npz"))


def test_large_file_is_parsed_here_when_no_cache_can_be_written(coco_root, tmp_path, monkeypatch):
    (coco_root / "annotations" / CACHE_FOLDER).write_text("a file where the cache folder would go")
    (tmp_path / "cache").write_text("and one where the user's cache folder would go")
    monkeypatch.setenv("DETKD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(records_module, "PARSE_IN_CHILD_BYTES", 0)
    calls = _count_parses(monkeypatch)
    assert len(build_dataset(coco_root, "val")) == len(SCENE) and len(calls) == 1


def test_train_parses_each_annotation_file_once(tmp_path, monkeypatch):
    from detkd.cli import main
    from detkd.data import make_digits

    data = tmp_path / "digits"
    make_digits(data, train=4, val=2, size=64)
    calls = _count_parses(monkeypatch)
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--iters", "1", "--no-progress"]
    argv += ["model.min_size=64", "model.max_size=64", "model.fpn_channels=16", "data.batch_size=2", "--device", "cpu"]
    assert main([*argv, "train.tensorboard=false", "data.val_max_images=1"]) == 0
    assert sorted(p.name for p in calls) == ["instances_train.json", "instances_val.json"]


@pytest.mark.slow
def test_memory_of_a_coco_sized_split(tmp_path):
    """100k images, 700k boxes: the first read parses in a child process, so neither it nor the cached read needs
    half the memory the parse itself takes (the child's peak over the import), and DataLoader workers copy (almost)
    nothing of the records. The numbers are printed; docs/robustness.md quotes them."""
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "scripts" / "measure_annotation_memory.py"

    def measure(folder: Path, images: int, *extra: str) -> dict:
        cmd = [sys.executable, str(script), "--dir", str(folder), "--images", str(images), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    floor = measure(tmp_path / "small", 1000, "--fresh")  # workers' own growth (imports, gc) without records
    cold = measure(tmp_path / "big", 100_000, "--fresh")
    warm = measure(tmp_path / "big", 100_000)
    print(json.dumps({"floor": floor, "cold": cold, "warm": warm}, indent=1))
    parse = cold["parse_child_peak_mb"] - cold["peak_after_import_mb"]  # 0 - import when no child parsed
    assert warm["parse_child_peak_mb"] == 0 and parse > 0
    assert max(cold["load_peak_increase_mb"], warm["load_peak_increase_mb"]) < parse / 2
    base = max(floor["worker_private_growth_mb"])
    assert all(g - base < 20 for g in cold["worker_private_growth_mb"] + warm["worker_private_growth_mb"])


def _die() -> None:
    os._exit(1)  # the parsing process vanishes, as when the kernel kills it for memory


def test_a_parsing_process_that_dies_is_one_line(tmp_path, monkeypatch):
    source = tmp_path / "instances_train.json"
    source.write_text("{}")
    monkeypatch.setattr(records_module, "PARSE_IN_CHILD_BYTES", 0)
    with pytest.raises(DataError, match="stopped before it finished"):
        records_module.cached_table(source, "x", _die)
