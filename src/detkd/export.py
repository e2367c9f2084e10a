"""Deployment: the student alone, as a plain checkpoint, an ONNX file checked with ONNX Runtime, or a bit-packed file.

Whatever the checkpoint (``student.pt``, ``best.pt`` or a training ``last.pt``), only the student is kept: the
distillers' modules (adapters, LGD's label-guided teacher) are training-time parts and are dropped.

**ONNX.** The exported graph is the student's ``predict`` for one image: input ``image``, float32 ``[3, H, W]``
RGB in [0, 1]; outputs ``boxes`` ``[N, 4]`` (xyxy, in the input image's pixels), ``scores`` ``[N]`` and
``labels`` ``[N]`` (int64, 1..C). Resizing, normalisation, NMS and the rescaling of boxes are inside the graph.
For torchvision detectors (Faster R-CNN, RetinaNet, FCOS) ``H`` and ``W`` are free; DETR students are traced at
one input size (``--size``), which the ONNX model then requires.

detkd uses the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) at opset 17. The
``torch.export``-based exporter, the default in current torch, stops at torchvision's batched NMS, whose output
size depends on the data, so it cannot export these models.

**Check.** The file is then run with ONNX Runtime on sample images (the first ``--check-images`` images of
``--data``, or random images) and compared with PyTorch. NMS and top-k may order near-equal scores differently in
the two runtimes, so detections are matched (same label, scores within ``score_atol``, boxes within ``box_atol``
pixels in every coordinate) rather than compared by position; a detection whose score is within ``score_atol`` of
the lowest score either runtime kept may legitimately be present on one side only and is not required to match.
Defaults: ``score_atol`` 1e-3, ``box_atol`` 0.01 px (measured differences are about 1e-7 on scores and 1e-4 px on
boxes). The file is written only when the check passes. 1-bit students are the exception: ``sign()`` of an
activation within rounding of zero may flip between the runtimes and move a few detections, so for them a failed
match is reported as a warning.

**Packed.** ``--packed FILE`` writes a 1-bit student with each binary conv's weight as sign bits (8 per byte), see
:mod:`detkd.engine.checkpoint`; it is reloaded and must reproduce the student's outputs exactly.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detkd.engine.checkpoint import file_mode
from detkd.errors import ConfigError, DetkdError
from detkd.models.outputs import Detector

log = logging.getLogger("detkd")

OPSET = 17
SCORE_ATOL = 1e-3
BOX_ATOL = 1e-2  # pixels
OUTPUTS = ("boxes", "scores", "labels")


class Predictor(nn.Module):
    """One image in, ``(boxes, scores, labels)`` out: the detector's ``predict``, as a module to trace."""

    def __init__(self, detector: Detector):
        super().__init__()
        self.detector = detector

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.detector.predict([image])[0]
        return out["boxes"], out["scores"], out["labels"]


def is_binary(detector: nn.Module) -> bool:
    """Whether the detector has 1-bit layers."""
    try:
        from detkd.models.binary import binary_modules
    except ImportError:
        return False
    return bool(binary_modules(detector))


@contextmanager
def _atomic_output(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` that replaces it only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, file_mode())
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_onnx(detector: Detector, path: str | Path, size: tuple[int, int], opset: int = OPSET) -> None:
    """Write the detector's one-image ``predict`` as ONNX.

    Args:
        detector: the student (put in eval mode here).
        path: the ONNX file.
        size: ``(H, W)`` of the example image used for tracing; the only size a DETR export accepts.
        opset: ONNX opset (>= 11 for torchvision's detection ops).

    Raises:
        DetkdError: the exporter failed (the model has an operation it cannot express).
    """
    detector.eval()
    module = Predictor(detector).eval()
    example = torch.rand(3, *size, generator=torch.Generator().manual_seed(0))
    dynamic_axes = {name: {0: "detections"} for name in OUTPUTS}
    if detector.kind != "detr":
        dynamic_axes["image"] = {1: "height", 2: "width"}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # Tracing warns about every Python-level shape computation of torchvision's transform; all of them are
            # covered by the check against PyTorch that follows.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=["image"],
                output_names=list(OUTPUTS),
                dynamic_axes=dynamic_axes,
            )
    except Exception as exc:  # noqa: BLE001  (the exporter's errors have no common type)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "onnx is not installed" in first.lower():
            raise DetkdError(
                "ONNX export needs the onnx package, which is not installed: `pip install detkd[export]`"
            ) from None
        raise DetkdError(
            f"ONNX export of {detector.spec['name']} failed ({type(exc).__name__}: {first}); "
            "this detector is not supported by the exporter yet"
        ) from None


def match_detections(
    ref: dict[str, Tensor], got: dict[str, Tensor], score_atol: float = SCORE_ATOL, box_atol: float = BOX_ATOL
) -> dict[str, Any]:
    """Match two detection sets one to one: same label, scores within ``score_atol``, boxes within ``box_atol``.

    Detections scoring within ``score_atol`` of the lowest score either side kept are not required to match: one
    runtime's last kept detection may fall just under the other's threshold or top-k cut.

    Args:
        ref: the reference detections (``boxes`` ``[N, 4]``, ``scores`` ``[N]``, ``labels`` ``[N]``).
        got: the detections to check, same keys, ``[M, ...]``.
        score_atol: largest score difference of a match.
        box_atol: largest difference of a box coordinate of a match, in pixels.

    Returns:
        ``matched``, ``unmatched`` (required detections without a match, both sides), ``max_score_diff`` and
        ``max_box_diff`` over the matches.
    """
    r_boxes, r_scores, r_labels = (ref[k].detach().double().cpu() for k in OUTPUTS)
    g_boxes, g_scores, g_labels = (got[k].detach().double().cpu() for k in OUTPUTS)
    floors = [s.min().item() for s in (r_scores, g_scores) if len(s)]
    floor = max(floors) + score_atol if floors else 0.0
    score_diff = (r_scores[:, None] - g_scores[None, :]).abs()  # [N, M]
    box_diff = (r_boxes[:, None, :] - g_boxes[None, :, :]).abs().amax(-1) if len(r_boxes) and len(g_boxes) else None
    ok = (r_labels[:, None] == g_labels[None, :]) & (score_diff <= score_atol)
    if box_diff is not None:
        ok &= box_diff <= box_atol
    taken: set[int] = set()
    matched, max_score, max_box = [], 0.0, 0.0
    for i in r_scores.argsort(descending=True).tolist():
        candidates = [j for j in ok[i].nonzero().flatten().tolist() if j not in taken]
        if not candidates:
            continue
        j = min(candidates, key=lambda c: (box_diff[i, c].item(), score_diff[i, c].item()))
        taken.add(j)
        matched.append(i)
        max_score = max(max_score, score_diff[i, j].item())
        max_box = max(max_box, box_diff[i, j].item())
    missing_ref = [i for i in range(len(r_scores)) if i not in set(matched) and r_scores[i] > floor]
    missing_got = [j for j in range(len(g_scores)) if j not in taken and g_scores[j] > floor]
    return {
        "matched": len(matched),
        "unmatched": len(missing_ref) + len(missing_got),
        "max_score_diff": max_score,
        "max_box_diff": max_box,
    }


def _session(path: Path) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise DetkdError(
            "onnxruntime is not installed: `pip install detkd[export]` to check the export (or pass --no-check)"
        ) from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx(
    path: str | Path,
    detector: Detector,
    images: list[Tensor],
    score_atol: float = SCORE_ATOL,
    box_atol: float = BOX_ATOL,
) -> dict[str, Any]:
    """Run the ONNX file with ONNX Runtime on ``images`` and match its detections with PyTorch's.

    Returns:
        ``images``, ``detections`` (PyTorch's, all images), ``matched``, ``unmatched``, ``max_score_diff``,
        ``max_box_diff``, ``ok`` (no unmatched detection on any image).
    """
    session = _session(Path(path))
    total = {"images": len(images), "detections": 0, "matched": 0, "unmatched": 0}
    max_score = max_box = 0.0
    for image in images:
        ref = detector.predict([image])[0]
        values = session.run(list(OUTPUTS), {"image": image.numpy()})
        got = {name: torch.from_numpy(value) for name, value in zip(OUTPUTS, values)}
        result = match_detections(ref, got, score_atol, box_atol)
        total["detections"] += len(ref["scores"])
        total["matched"] += result["matched"]
        total["unmatched"] += result["unmatched"]
        max_score = max(max_score, result["max_score_diff"])
        max_box = max(max_box, result["max_box_diff"])
    return {**total, "max_score_diff": max_score, "max_box_diff": max_box, "ok": total["unmatched"] == 0}


def sample_images(
    detector: Detector, data: str | None, split: str, count: int, size: tuple[int, int] | None
) -> tuple[list[Tensor], str]:
    """Images to check an export on: the first ``count`` of a dataset split, or random ones; and what they are.

    With ``size`` (a DETR export's fixed input) the images are resized to it.
    """
    if data:
        from detkd.config import DataConfig
        from detkd.data import build_dataset, build_transforms

        dataset = build_dataset(data, split, "auto", build_transforms(DataConfig(), False))
        images = [dataset[i][0] for i in range(min(count, len(dataset)))]
        source = f"{len(images)} images of {data} ({split})"
    else:
        side = int(detector.spec.get("min_size", 128))
        g = torch.Generator().manual_seed(0)
        images = [torch.rand(3, side, side, generator=g) for _ in range(count)]
        source = f"{count} random {side}x{side} images (pass --data for real ones)"
    if size is not None:
        images = [
            nn.functional.interpolate(im[None], size=size, mode="bilinear", align_corners=False)[0] for im in images
        ]
    return images, source


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MB"


def _float_size(detector: Detector) -> int:
    buffer = io.BytesIO()
    torch.save(detector.state_dict(), buffer)
    return buffer.tell()


def export_packed(
    path: Path, detector: Detector, classes: list[str], meta: dict[str, Any], images: list[Tensor]
) -> str:
    """Write the bit-packed student, reload it and require identical outputs; returns a summary line."""
    from detkd.engine.checkpoint import load_packed, save_packed

    if not is_binary(detector):
        raise ConfigError(
            f"--packed: {detector.spec['name']} has no 1-bit layers (a packed file is for binary students such "
            "as frcnn_bireal18)"
        )
    save_packed(path, detector, classes, meta)
    reloaded, _ = load_packed(path)
    reloaded.eval()
    worst = 0.0
    for image in images:
        a, b = detector.predict([image])[0], reloaded.predict([image])[0]
        if any(a[k].shape != b[k].shape for k in OUTPUTS):
            worst = float("inf")
            break
        worst = max([worst] + [(a[k].double() - b[k].double()).abs().max().item() for k in OUTPUTS if a[k].numel()])
    if worst != 0.0:
        raise DetkdError(f"{path}: the packed student's outputs differ from the checkpoint's (max |diff| {worst:.3g})")
    return (
        f"packed: {path} ({_mb(path.stat().st_size)}; float weights {_mb(_float_size(detector))}), "
        f"reloaded outputs identical on {len(images)} images"
    )


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="extract the student; ONNX (checked with onnxruntime) or bit-packed export",
        description="Export the student of a checkpoint (student.pt, best.pt or a training last.pt; distillation "
        "parts are dropped): as a plain student checkpoint (--student), as ONNX checked against PyTorch with ONNX "
        "Runtime (--onnx), or, for 1-bit students, bit-packed (--packed).",
    )
    p.add_argument("checkpoint", help="student.pt / best.pt / last.pt")
    p.add_argument("--onnx", metavar="FILE", help="write the ONNX model here")
    p.add_argument("--packed", metavar="FILE", help="write the bit-packed 1-bit student here")
    p.add_argument("--student", metavar="FILE", help="write the student alone as a detkd checkpoint here")
    p.add_argument("--data", help="dataset folder whose images check the export (default: random images)")
    p.add_argument("--split", default="val", help="split of --data (default val)")
    p.add_argument("--check-images", type=int, default=4, help="images to check on (default 4)")
    p.add_argument("--no-check", action="store_true", help="do not compare the ONNX model with PyTorch")
    p.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="example input size (DETR: the fixed size)")
    p.add_argument("--score-atol", type=float, default=SCORE_ATOL, help=f"score tolerance (default {SCORE_ATOL})")
    p.add_argument("--box-atol", type=float, default=BOX_ATOL, help=f"box tolerance in pixels (default {BOX_ATOL})")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from detkd.engine.checkpoint import load_detector, save_student

    if not (args.onnx or args.packed or args.student):
        raise ConfigError("export: nothing to do; pass --onnx FILE, --packed FILE and/or --student FILE")
    if args.check_images < 1:
        raise ConfigError(f"--check-images must be at least 1, got {args.check_images}")
    if args.opset < 11:
        raise ConfigError(f"--opset must be at least 11 (torchvision's detection ops), got {args.opset}")
    detector, ckpt = load_detector(args.checkpoint)
    detector.eval()
    classes = list(ckpt.get("classes", []))
    meta = {"source": str(args.checkpoint), "iter": ckpt.get("iter", ckpt.get("meta", {}).get("iter"))}
    name = detector.spec["name"]
    size = tuple(args.size) if args.size else (int(detector.spec["min_size"]),) * 2
    fixed = size if detector.kind == "detr" else None  # a traced DETR keeps the example's shapes
    images, source = sample_images(detector, args.data, args.split, args.check_images, fixed)

    if args.student:
        save_student(args.student, detector, classes, meta)
        print(f"student: {args.student} ({_mb(Path(args.student).stat().st_size)}, {name}, {len(classes)} classes)")
    if args.onnx:
        target = Path(args.onnx)
        with _atomic_output(target) as tmp:
            export_onnx(detector, tmp, size, args.opset)
            shape = f"[3, {size[0]}, {size[1]}]" if fixed else "[3, H, W] (any H, W)"
            line = f"onnx: {target} ({_mb(tmp.stat().st_size)}, opset {args.opset}), input image {shape}"
            if not args.no_check:
                result = check_onnx(tmp, detector, images, args.score_atol, args.box_atol)
                summary = (
                    f"checked with onnxruntime on {source}: {result['matched']} of {result['detections']} detections "
                    f"matched, max |score diff| {result['max_score_diff']:.2e}, max |box diff| "
                    f"{result['max_box_diff']:.2e} px (tolerances {args.score_atol:g}, {args.box_atol:g} px)"
                )
                if not result["ok"]:
                    problem = (
                        f"{result['unmatched']} detection(s) of {name} differ between onnxruntime and PyTorch beyond "
                        f"the tolerances ({summary})"
                    )
                    if not is_binary(detector):
                        raise DetkdError(f"{target}: not written: {problem}")
                    log.warning("%s; 1-bit layers flip sign on activations within rounding of 0", problem)
                line += f"\n  {summary}"
        print(line)
    if args.packed:
        print(export_packed(Path(args.packed), detector, classes, meta, images))
    return 0
