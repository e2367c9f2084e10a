"""Optional extras: a missing matplotlib or tensorboard gives a clear message instead of an import traceback;
page-locked batches for CUDA."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from detkd.errors import DetkdError


def test_missing_matplotlib_names_the_extra(monkeypatch):
    from detkd.viz import pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(DetkdError, match=r"pip install 'detkd\[plots\]'"):
        pyplot()


def test_report_without_matplotlib_is_one_line(monkeypatch, tmp_path, capsys):
    from detkd.report import plot_curves

    (tmp_path / "log.jsonl").write_text('{"iter": 1, "loss_cls": 1.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(DetkdError, match="needs matplotlib"):
        plot_curves(tmp_path, tmp_path)


def test_missing_tensorboard_warns_once_and_training_goes_on(monkeypatch, tmp_path, caplog):
    from detkd.engine.hooks import Logger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    logger = Logger(tmp_path, every=1, progress=False, tensorboard=True)
    with caplog.at_level(logging.WARNING, logger="detkd"):
        logger.before_train(types.SimpleNamespace(max_iters=1, iter=0))
    assert logger.writer is None
    assert "pip install 'detkd[tensorboard]'" in caplog.text
    assert not (tmp_path / "tb").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_train_loader_pins_batches_for_cuda(tmp_path):
    from detkd.data import build_dataset, build_train_loader, make_digits

    make_digits(tmp_path / "d", train=2, val=1, size=32)
    dataset = build_dataset(tmp_path / "d", "train")
    images, _ = next(build_train_loader(dataset, 2, seed=0, pin_memory=True))
    assert all(image.is_pinned() for image in images)
    images, _ = next(build_train_loader(dataset, 2, seed=0))
    assert not any(image.is_pinned() for image in images)
