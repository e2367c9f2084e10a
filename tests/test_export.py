"""``detkd export``: the student alone (distiller parts dropped), ONNX checked with onnxruntime against PyTorch,
bit-packed 1-bit students; and the detection matching the check relies on."""

from __future__ import annotations

import importlib.util
import io
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from detkd.cli import main
from detkd.data import make_digits
from detkd.distillation import DistillModel, build_distillers
from detkd.engine.checkpoint import TRAIN_FORMAT, load_detector, read_checkpoint, save_atomic, save_student
from detkd.export import OUTPUTS, match_detections
from tests.conftest import tiny

CLASSES = [str(d) for d in range(10)]
needs_onnxruntime = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")


def _dets(boxes, scores, labels) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


REF = _dets([[0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 50]], [0.9, 0.5, 0.2], [1, 2, 1])


def test_matching_ignores_order_and_reports_differences():
    got = _dets([[30, 30, 40, 50.004], [0, 0, 10, 10], [5, 5, 20, 20]], [0.2002, 0.9, 0.5], [1, 1, 2])
    result = match_detections(REF, got)
    assert result["matched"] == 3 and result["unmatched"] == 0
    assert result["max_score_diff"] == pytest.approx(2e-4, abs=1e-6)
    assert result["max_box_diff"] == pytest.approx(4e-3, abs=1e-5)


@pytest.mark.parametrize(
    "got, unmatched",
    [
        (_dets([[0, 0, 10, 10], [5, 5, 20, 20.5], [30, 30, 40, 50]], [0.9, 0.5, 0.2], [1, 2, 1]), 2),  # box moved
        (_dets([[0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 50]], [0.9, 0.51, 0.2], [1, 2, 1]), 2),  # score moved
        (_dets([[0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 50]], [0.9, 0.5, 0.2], [1, 3, 1]), 2),  # label changed
        (_dets([[0, 0, 10, 10], [30, 30, 40, 50]], [0.9, 0.2], [1, 1]), 1),  # one lost
    ],
    ids=["box", "score", "label", "missing"],
)
def test_matching_finds_real_differences(got, unmatched):
    assert match_detections(REF, got)["unmatched"] == unmatched


def test_matching_tolerates_the_cut_at_the_lowest_kept_score():
    """A detection at the other runtime's threshold/top-k edge may be kept on one side only."""
    got = _dets([[0, 0, 10, 10], [5, 5, 20, 20]], [0.9, 0.5], [1, 2])
    edge = _dets([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 3, 3]], [0.9, 0.5, 0.5004], [1, 2, 3])
    assert match_detections(got, edge)["unmatched"] == 0
    assert match_detections(edge, got)["unmatched"] == 0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A training checkpoint (student + FitNet adapters + optimiser) and sample images."""
    root = tmp_path_factory.mktemp("export")
    make_digits(root / "digits", train=2, val=2, size=64)
    student = tiny("frcnn_r18", num_classes=10, fpn_channels=16)
    teacher = tiny("frcnn_r18", num_classes=10, fpn_channels=32)  # adapters 16 -> 32 channels: real parameters
    model = DistillModel(student, teacher, build_distillers(["fitnet"], {}, student, teacher))
    assert any(k.startswith("distillers.") for k in model.trainable_module.state_dict())
    last = root / "last.pt"
    save_atomic(
        {
            "format": TRAIN_FORMAT,
            "iter": 7,
            "trainable": model.trainable_module.state_dict(),
            "spec": dict(student.spec),
            "classes": CLASSES,
        },
        last,
    )
    return {"root": root, "data": root / "digits", "last": last, "student": student}


def _export(*argv: str) -> str:
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        assert main(["export", *argv]) == 0
    return stdout.getvalue()


@needs_onnxruntime
def test_onnx_export_of_a_distilled_run_matches_pytorch(files, tmp_path):
    onnx_path, student_path = tmp_path / "student.onnx", tmp_path / "student.pt"
    text = _export(
        str(files["last"]), "--onnx", str(onnx_path), "--student", str(student_path), "--data", str(files["data"])
    )
    assert "checked with onnxruntime on 2 images" in text and "max |box diff|" in text

    # The student alone: no distiller parameters, the same weights.
    ckpt = read_checkpoint(student_path)
    assert ckpt["format"] == "detkd.student" and ckpt["classes"] == CLASSES and ckpt["meta"]["iter"] == 7
    assert ckpt["model"].keys() == files["student"].state_dict().keys()

    # Independently of the command's own check: other image sizes (the input is dynamic), real and random images.
    import onnxruntime as ort

    detector, _ = load_detector(student_path)
    detector.eval()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == list(OUTPUTS)
    g = torch.Generator().manual_seed(3)
    # Portrait shapes: torchvision's MultiScaleRoIAlign infers its level scales from the first image it sees, and
    # a landscape image whose height shrinks under max_size (38 of 64 rows here) makes it pick the wrong ones.
    images = [torch.rand(3, 100, 70, generator=g), torch.rand(3, 80, 60, generator=g)]
    matched = 0
    for image in images:
        ref = detector.predict([image])[0]
        got = dict(zip(OUTPUTS, (torch.from_numpy(v) for v in session.run(None, {"image": image.numpy()}))))
        result = match_detections(ref, got)
        assert result["unmatched"] == 0, result
        assert result["max_score_diff"] <= 1e-3 and result["max_box_diff"] <= 1e-2
        matched += result["matched"]
    assert matched > 0, "the check needs detections to compare"


def test_failed_check_leaves_the_target_untouched(files, tmp_path, monkeypatch, capsys):
    import detkd.export as export

    target = tmp_path / "model.onnx"
    target.write_bytes(b"the previous export")
    monkeypatch.setattr(export, "export_onnx", lambda detector, path, size, opset: Path(path).write_bytes(b"new"))
    failed = {"images": 1, "detections": 5, "matched": 3, "unmatched": 2, "max_score_diff": 0.0, "max_box_diff": 0.0}
    monkeypatch.setattr(export, "check_onnx", lambda *args: {**failed, "ok": False})
    assert main(["export", str(files["last"]), "--onnx", str(target), "--check-images", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{target}: not written: 2 detection(s) of frcnn_r18 differ" in err
    assert target.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


@pytest.mark.skipif(importlib.util.find_spec("detkd.models.binary") is None, reason="needs detkd.models.binary")
def test_packed_export_of_a_binary_student(files, tmp_path):
    from detkd.engine.checkpoint import load_packed
    from detkd.models.binary import binary_modules

    detector = tiny("frcnn_bireal18", num_classes=10, binary_neck=True).eval()
    assert binary_modules(detector)
    ckpt, packed = tmp_path / "student.pt", tmp_path / "student.packed"
    save_student(ckpt, detector, CLASSES)
    text = _export(str(ckpt), "--packed", str(packed), "--data", str(files["data"]), "--check-images", "2")
    assert "reloaded outputs identical on 2 images" in text
    assert packed.stat().st_size < ckpt.stat().st_size / 4  # 1 bit instead of 32 for most weights

    reloaded, payload = load_packed(packed)
    assert payload["classes"] == CLASSES
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    a, b = detector.predict([image])[0], reloaded.predict([image])[0]
    assert len(a["scores"]) > 0
    for key in OUTPUTS:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@needs_onnxruntime
@pytest.mark.parametrize("name", ["conditional_detr_r18", "deformable_detr_r18"])
def test_onnx_export_of_detr_students(files, tmp_path, name):
    """DETR students export at one fixed input size (the traced shapes are kept)."""
    ckpt = tmp_path / "student.pt"
    save_student(ckpt, tiny(name, num_classes=10), CLASSES)
    text = _export(str(ckpt), "--onnx", str(tmp_path / "s.onnx"), "--data", str(files["data"]), "--check-images", "2")
    assert "input image [3, 64, 64]" in text and "checked with onnxruntime" in text
