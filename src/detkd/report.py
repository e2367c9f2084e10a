"""``detkd report RUN``: a Markdown page for one run folder.

It shows the training curves (task and distillation terms, evaluation mAP), sample detections of the teacher,
an optional baseline student and this run's student on the same val images, and each method's diagnostic
pictures (masks, selected proposals, prototypes...) from a training forward on a val batch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detkd.errors import ConfigError
from detkd.viz import draw_boxes, save_png, tile, to_uint8, unnormalize, upscale


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _is_loss(key: str) -> bool:
    # Task losses (loss_*), distillation terms (<method>.kd_*) and methods' own losses (<method>.loss_*, e.g. LGD's
    # teacher; its parts are logged as stats <method>.teacher_det.loss_*).
    own = key.count(".") == 1 and key.split(".")[1].startswith("loss_")
    return key.startswith("loss_") or own or (".kd_" in key and not key.startswith("raw."))


def plot_curves(run: Path, out: Path) -> list[Path]:
    """Loss terms over steps (task vs distillation) and eval mAP over steps."""
    from detkd.viz import eval_curve, pyplot

    plt = pyplot()

    rows = _read_jsonl(run / "log.jsonl")
    paths = []
    if rows:
        keys = sorted({k for r in rows for k in r if _is_loss(k)})
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for key in keys:
            pts = [(r["iter"], r[key]) for r in rows if key in r]
            # A marker where a line has a single point, which a plain line would not draw.
            marker = "o" if len(pts) == 1 else None
            ax.plot(*zip(*pts), label=key, lw=1.0, ls="-" if key.startswith("loss_") else "--", marker=marker)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (weighted)")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        paths.append(out / "losses.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    evals = _read_jsonl(run / "eval.jsonl")
    if evals:
        steps = [e["iter"] for e in evals]
        series = {"mAP": [e.get("AP") for e in evals], "mAP@.5": [e.get("AP50") for e in evals]}
        paths.append(eval_curve(steps, series, out / "eval.png"))
    return paths


def detection_grid(models: dict[str, Any], dataset: Any, images: int, score: float, classes: list[str]) -> np.ndarray:
    """Rows = val images, columns = ground truth then each model's detections above ``score``."""
    cells = []
    for i in range(min(images, len(dataset))):
        image, target = dataset[i]
        base = to_uint8(image)
        factor = max(1, 256 // max(base.shape[:2]))
        cells.append(
            upscale(
                draw_boxes(
                    base, target["boxes"], color=(0, 160, 0), labels=[classes[int(c) - 1] for c in target["labels"]]
                ),
                factor,
            )
        )
        for model in models.values():
            (pred,) = model.predict([image])
            keep = pred["scores"] >= score
            labels = [f"{classes[int(c) - 1]} {s:.2f}" for c, s in zip(pred["labels"][keep], pred["scores"][keep])]
            cells.append(upscale(draw_boxes(base, pred["boxes"][keep], color=(220, 0, 0), labels=labels), factor))
    return tile(cells, columns=1 + len(models))


def method_pictures(run: Path, cfg: Any, dataset: Any, out: Path) -> list[Path]:
    """Each distiller's ``visualize`` on the first val batch, with the run's trained distiller state."""
    import detkd.methods  # noqa: F401  (registration)
    from detkd.distillation import DistillModel, build_distillers
    from detkd.engine.checkpoint import load_detector, read_checkpoint

    if not cfg.distill.methods:
        return []
    source = run / "last.pt"
    student, _ = load_detector(source if source.exists() else run / "student.pt")
    teacher = load_detector(cfg.distill.teacher)[0] if cfg.distill.teacher else None
    distillers = build_distillers(cfg.distill.methods, cfg.distill.options, student, teacher)
    model = DistillModel(student, teacher, distillers, cfg.distill.weights, cfg.train.iters)
    if source.exists():
        state = read_checkpoint(source)["trainable"]
        model.trainable_module.load_state_dict(state, strict=False)
    model.train()
    images, targets = zip(*[dataset[i] for i in range(min(cfg.data.batch_size, len(dataset)))])
    with torch.no_grad():
        batch, tgts = student.preprocess(list(images), list(targets))
        t_out = model.run_teacher(batch)
        s_out = student(batch, tgts)
        model.share_rois(s_out, t_out)
        first = unnormalize(batch.tensors[0], student.transform.image_mean, student.transform.image_std)
        paths = []
        for name, distiller in distillers.items():
            distiller(s_out, t_out, tgts, cfg.train.iters // 2)  # some pictures use state set in forward
            for key, picture in distiller.visualize(first, s_out, t_out, tgts).items():
                paths.append(save_png(np.asarray(picture), out / f"{name}_{key}.png"))
    return paths


def make_report(run: Path, baseline: Path | None = None, images: int = 4, score: float = 0.3) -> Path:
    """Write ``RUN/report/report.md`` and its pictures; returns the Markdown path."""
    from detkd.config import load_config
    from detkd.data import build_dataset, build_transforms
    from detkd.engine.checkpoint import load_detector

    if not (run / "config.yaml").exists():
        raise ConfigError(f"{run} is not a run folder (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    out = run / "report"
    out.mkdir(exist_ok=True)
    dataset = build_dataset(cfg.data.root, cfg.data.val_split, cfg.data.format, build_transforms(cfg.data, False))
    final = json.loads((run / "final.json").read_text()) if (run / "final.json").exists() else {}
    ckpt = run / "best.pt" if (run / "best.pt").exists() else run / "student.pt"
    models: dict[str, Any] = {}
    if cfg.distill.teacher and Path(cfg.distill.teacher).exists():
        models["teacher"] = load_detector(cfg.distill.teacher)[0]
    if baseline is not None:
        models["baseline"] = load_detector(baseline / "best.pt" if baseline.is_dir() else baseline)[0]
    student, meta = load_detector(ckpt)
    models["this run"] = student
    classes = list(meta.get("classes") or dataset.classes)

    curves = plot_curves(run, out)
    grid = save_png(detection_grid(models, dataset, images, score, classes), out / "detections.png")
    pictures = method_pictures(run, cfg, dataset, out)

    m = final.get("metrics", {})
    lines = [f"# Run report: `{run}`", ""]
    what = "+".join(cfg.distill.methods) or "(no distillation)"
    lines += [
        f"- **Student:** `{cfg.model.name}` ({cfg.model.preset}); **method:** {what}; **teacher:** "
        f"`{cfg.distill.teacher or 'none'}`",
        f"- **Data:** `{cfg.data.root}`; **steps:** {cfg.train.iters}",
    ]
    if m:
        lines.append(
            f"- **Final val:** mAP {m.get('AP', 0):.4f}, mAP@.5 {m.get('AP50', 0):.4f} on "
            f"{m.get('num_images')} images; step time {final.get('step_time_s') or 0:.3f} s; peak memory "
            f"{final.get('peak_memory_mb')} MB"
        )
    if final.get("kd_active"):
        lines.append(f"- **Distillation terms active over the first steps:** {final['kd_active']}")
    lines.append("")
    for path in curves:
        lines += [f"![{path.stem}]({path.name})", ""]
    lines += [
        "## Detections",
        "",
        "Columns: ground truth (green), then " + ", ".join(models) + f" (red, score ≥ {score}).",
        "",
        f"![detections]({grid.name})",
        "",
    ]
    if pictures:
        lines += ["## Method diagnostics", ""]
        for path in pictures:
            lines += [f"**{path.stem}**", "", f"![{path.stem}]({path.name})", ""]
    md = out / "report.md"
    md.write_text("\n".join(lines))
    return md


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="write a Markdown report of a run folder",
        description="Curves, sample detections (teacher / baseline / this run on the same val images) "
        "and the method's diagnostic pictures, in RUN/report/report.md.",
    )
    p.add_argument("run", help="run folder")
    p.add_argument("--baseline", help="a baseline run folder (or checkpoint) to show next to this run")
    p.add_argument("--images", type=int, default=4, help="val images to show (default 4)")
    p.add_argument("--score", type=float, default=0.3, help="minimum score of drawn detections (default 0.3)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    md = make_report(Path(args.run), Path(args.baseline) if args.baseline else None, args.images, args.score)
    print(f"wrote {md}")
    return 0
