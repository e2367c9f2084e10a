"""The ``detkd`` command.

User errors (bad files, options, checkpoints) print one line and exit with status 2; nothing already written
is removed or overwritten by a failed command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from detkd.errors import ConfigError, DetkdError

EPILOG_OVERRIDES = "Any config field can be set as key=value, e.g. optim.lr=0.01 train.iters=500 data.batch_size=4."


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def one_line(exc: BaseException) -> str:
    """The message of a user error on one line.

    An error raised in a DataLoader worker comes back with the worker's traceback in its message; its last line
    holds the original message.
    """
    text = str(exc).strip()
    if "Traceback (most recent call last)" in text:
        last = text.splitlines()[-1]
        _, sep, message = last.partition(": ")
        text = message if sep else last
    return " ".join(text.split())


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, show_time=False, markup=False)],
        force=True,
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file of overrides (the defaults are in detkd/config.py)")
    p.add_argument("--data", help="dataset folder (COCO, VOC or YOLO layout); sets data.root")
    p.add_argument("--out", help="run folder (default runs/<name>)")
    p.add_argument("--iters", type=int, help="training steps; sets train.iters")
    p.add_argument("--batch-size", type=int, help="sets data.batch_size")
    p.add_argument("--lr", type=float, help="sets optim.lr")
    p.add_argument("--seed", type=int, help="sets train.seed")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N; sets train.device")
    p.add_argument("--threads", type=int, help="CPU threads; sets train.threads (on a shared machine, 1 per run)")
    p.add_argument("--preset", choices=["slim", "standard"], help="detector preset; sets model.preset")
    p.add_argument("--backbone-weights", help="none | imagenet | PATH; sets model.backbone_weights")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def _resolve(args: argparse.Namespace, extra: list[str]) -> Any:
    from detkd.config import load_config

    pairs = list(extra)
    simple = {
        "data": "data.root",
        "iters": "train.iters",
        "batch_size": "data.batch_size",
        "lr": "optim.lr",
        "seed": "train.seed",
        "device": "train.device",
        "preset": "model.preset",
        "backbone_weights": "model.backbone_weights",
        "threads": "train.threads",
    }
    for attr, key in simple.items():
        value = getattr(args, attr, None)
        if value is not None:
            pairs.append(f"{key}={value}")
    if args.no_progress:
        pairs.append("train.progress=false")
    base = None
    if args.resume and args.out and (Path(args.out) / "config.yaml").exists() and not args.config:
        base = load_config(Path(args.out) / "config.yaml")
    return load_config(args.config, pairs + list(args.overrides), base=base)


def _run(cfg: Any, args: argparse.Namespace, default_out: str) -> int:
    from detkd.config import to_dict
    from detkd.engine.launch import run

    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    out = Path(args.out or default_out)
    summary = run(cfg, out, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, one summary is enough
        return 0
    metrics = summary["metrics"]
    if metrics:
        print(
            f"val mAP {metrics.get('AP', 0):.4f}  mAP@0.5 {metrics.get('AP50', 0):.4f}  "
            f"({metrics.get('num_images', '?')} images)"
        )
    print(f"run folder: {out}  (student: {out / 'student.pt'}, best: {out / 'best.pt'}, log: {out / 'log.jsonl'})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    extra = [f"model.name={args.model}"] if args.model else []
    cfg = _resolve(args, extra)
    if cfg.distill.methods:
        raise ConfigError("the config names distillation methods; use `detkd distill` for them")
    return _run(cfg, args, f"runs/{cfg.model.name}")


def cmd_distill(args: argparse.Namespace) -> int:
    extra = []
    if args.method:
        methods = [m.strip() for m in args.method.split("+") if m.strip()]
        extra.append(f"distill.methods=[{','.join(methods)}]")
    if args.teacher:
        extra.append("distill.teacher=null" if args.teacher.lower() == "none" else f"distill.teacher={args.teacher}")
    if args.student:
        extra.append(f"model.name={args.student}")
    cfg = _resolve(args, extra)
    if not cfg.distill.methods:
        raise ConfigError("no method given: pass --method NAME[+NAME] (see `detkd list methods`)")
    if cfg.distill.teacher is not None and not Path(cfg.distill.teacher).is_file():
        raise ConfigError(
            f"--teacher {cfg.distill.teacher}: file not found (train one with `detkd train`, or pass "
            "--teacher none for teacher-free methods)"
        )
    return _run(cfg, args, f"runs/{'+'.join(cfg.distill.methods)}")


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from detkd.data import build_dataset, build_transforms
    from detkd.engine.checkpoint import load_detector
    from detkd.engine.evaluate import run_evaluation
    from detkd.engine.launch import select_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    detector, ckpt = load_detector(args.checkpoint, device)
    from detkd.config import DataConfig

    dataset = build_dataset(args.data, args.split, args.format, build_transforms(DataConfig(), False))
    if list(dataset.classes) != list(ckpt.get("classes", [])):
        raise ConfigError(
            f"{args.checkpoint} was trained on classes {ckpt.get('classes')}, {args.data} has {dataset.classes}"
        )
    metrics = run_evaluation(
        detector.predict,
        dataset,
        batch_size=args.batch_size,
        metric=args.metric,
        max_images=args.max_images,
        progress=not args.no_progress,
    )
    _print_metrics(metrics, args.checkpoint)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        from detkd.engine.evaluate import json_safe

        payload = {"checkpoint": str(args.checkpoint), "data": args.data, "split": args.split, **metrics}
        Path(args.out).write_text(json.dumps(json_safe(payload), indent=2))
        print(f"metrics written to {args.out}")
    return 0


def _print_metrics(metrics: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(title))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
        elif isinstance(value, int):
            table.add_row(key, str(value))
    per_class = metrics.get("per_class") or {}
    for name, value in per_class.items():
        table.add_row(f"AP[{name}]", f"{value:.4f}")
    Console().print(table)


def cmd_data(args: argparse.Namespace) -> int:
    from detkd.config import parse_overrides
    from detkd.data import make_digits

    overrides = parse_overrides(args.set or [])
    out = Path(args.out)
    if (out / "annotations").exists() and any((out / "annotations").iterdir()) and not args.force:
        raise ConfigError(f"{out} already holds a dataset; pass --force to overwrite it")
    summary = make_digits(
        out, train=args.train, val=args.val, size=args.size, seed=args.seed, difficulty=args.difficulty, **overrides
    )
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.what == "methods":
        import detkd.methods  # noqa: F401  (registration)
        from detkd.methods.base import METHODS

        width = max(len(n) for n in METHODS.names())
        for name in METHODS.names():
            cls = METHODS.get(name)
            teacher = "" if cls.needs_teacher else "  [no teacher]"
            print(f"{name:<{width}}  {cls.summary}{teacher}")
    elif args.what == "detectors":
        from detkd.models.detectors import detector_names

        for name in detector_names():
            print(name)
    else:
        from detkd.models.backbones import BACKBONES

        for name in BACKBONES.names():
            print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="detkd",
        description="Knowledge distillation for object detectors.",
        epilog="Run `detkd COMMAND --help` for the options of a command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data", help="build the built-in dataset", description="Build a built-in dataset.")
    dsub = p.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    d = dsub.add_parser(
        "digits",
        help="scenes of real handwritten digits, written as a COCO dataset",
        description="Compose scikit-learn's handwritten digits into detection scenes and write a "
        "COCO dataset (PNG images + annotations/instances_{train,val}.json).",
    )
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--train", type=int, default=2000, help="training images (default 2000)")
    d.add_argument("--val", type=int, default=300, help="validation images (default 300)")
    d.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.add_argument("--difficulty", default="easy", choices=["easy", "hard"], help="preset (default easy)")
    d.add_argument("--set", nargs="*", metavar="field=value", help="override generator fields (see DigitsSpec)")
    d.add_argument("--force", action="store_true", help="overwrite an existing dataset in --out")
    d.set_defaults(func=cmd_data)

    p = sub.add_parser(
        "train",
        help="train a detector",
        epilog=EPILOG_OVERRIDES,
        description="Train a detector (no distillation). Writes config.yaml, log.jsonl, eval.jsonl, "
        "last.pt (resumable), best.pt and student.pt into the run folder.",
    )
    p.add_argument("--model", help="detector <family>_<backbone>, e.g. frcnn_r50 (see `detkd list detectors`)")
    _add_run_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "distill",
        help="train a student with distillation",
        epilog=EPILOG_OVERRIDES,
        description="Train a student detector with one or more distillation methods. Method settings: "
        "distill.options.<method>.<field>=value; weights: distill.weights.<method>=w, or distill.calibrate=auto "
        "to measure each term's scale against the detection loss over the first steps.",
    )
    p.add_argument("--method", help="method(s), e.g. tar or gkd+fitnet (see `detkd list methods`)")
    p.add_argument("--teacher", help="teacher checkpoint (best.pt/student.pt of a run), or none")
    p.add_argument("--student", help="student detector, e.g. frcnn_r18")
    _add_run_args(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("eval", help="evaluate a checkpoint", description="Evaluate a checkpoint on a dataset split.")
    p.add_argument("checkpoint", help="student.pt / best.pt / last.pt")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--split", default="val", help="split name (default val)")
    p.add_argument("--format", default="auto", choices=["auto", "coco", "voc", "yolo"], help="dataset layout")
    p.add_argument(
        "--metric",
        default="coco",
        choices=["coco", "voc", "voc07"],
        help="COCO mAP, VOC mAP@0.5 (area) or VOC07 11-point",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-images", type=int, help="evaluate the first N images only")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="CPU threads")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("list", help="list methods, detectors or backbones")
    p.add_argument("what", choices=["methods", "detectors", "backbones"])
    p.set_defaults(func=cmd_list)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub: Any) -> None:
    """Commands whose modules register their own parsers (pretrain, export, bench, report)."""
    for module in ("detkd.pretrain", "detkd.export", "detkd.bench", "detkd.report"):
        try:
            mod = __import__(module, fromlist=["add_parser"])
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        mod.add_parser(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest:
        # argparse takes one run of positionals: overrides given between options arrive here.
        if hasattr(args, "overrides") and not any(r.startswith("-") for r in rest):
            args.overrides = list(args.overrides) + rest
        else:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except DetkdError as exc:
        print(f"detkd: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:
            raise
        # The file system refused (permissions, a file where a folder should be, a full disk): not a bug.
        print(f"detkd: error: {exc.filename}: {exc.strerror or type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("detkd: interrupted (the run folder keeps its last checkpoint; continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
