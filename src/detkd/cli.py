"""The ``detkd`` command.

User errors (bad files, options, checkpoints) print one line and exit with status 2; nothing already written
is removed or overwritten by a failed command.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from detkd.errors import ConfigError, DetkdError

# Errors of the file system, not of detkd: reported on one line even when the failed call names no file.
FILE_SYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}

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
    p.add_argument(
        "--data",
        help="dataset folder (COCO, VOC or YOLO layout); sets data.root. Its detkd.yaml, if any, applies under "
        "--config and key=value",
    )
    p.add_argument("--out", help="run folder (default runs/<name>)")
    p.add_argument("--iters", type=int, help="training steps; sets train.iters")
    p.add_argument("--batch-size", type=int, help="sets data.batch_size")
    p.add_argument("--lr", type=float, help="sets optim.lr")
    p.add_argument("--seed", type=int, help="sets train.seed")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N; sets train.device")
    p.add_argument("--threads", type=int, help="CPU threads; sets train.threads (on a shared machine, 1 per run)")
    p.add_argument("--preset", choices=["slim", "standard"], help="detector preset; sets model.preset")
    p.add_argument("--backbone-weights", help="imagenet (default) | none | PATH; sets model.backbone_weights")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run --out holds (its checkpoints, final.json, logs and config.yaml); without it, or "
        "--resume, a run folder holding results is refused",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--gpus",
        help="N | all: train on N local GPUs (restarts this command under `torchrun --nproc_per_node N`)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def _resolve(args: argparse.Namespace, extra: list[str]) -> Any:
    """The run's config: defaults < the dataset's detkd.yaml < --config < options and key=value pairs."""
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
        "weights": "model.weights",
        "student_weights": "model.weights",
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
    layers: list[str] = []
    # A resumed run's config.yaml already holds the dataset's settings.
    pairs += list(args.overrides)
    cfg = load_config(args.config, pairs, base=base, dataset_settings=base is None, layers=layers)
    args.config_layers = layers
    return cfg


def torchrun_command(argv: list[str], processes: int) -> list[str]:
    """The command that runs ``detkd argv`` (less its ``--gpus``) as ``processes`` local processes under torchrun."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            rest.append(arg)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "detkd",
        *rest,
    ]


def _gpu_count(value: str) -> int:
    if value == "all":
        import torch

        count = torch.cuda.device_count()
        if count == 0:
            raise ConfigError("--gpus all: no CUDA device found on this machine")
        return count
    try:
        count = int(value)
    except ValueError:
        raise ConfigError(f"--gpus must be a number or 'all', got {value!r}") from None
    if count < 1:
        raise ConfigError(f"--gpus must be >= 1, got {count}")
    return count


def _relaunch(args: argparse.Namespace) -> int | None:
    """With ``--gpus N`` (N > 1), run this same command under torchrun and return its exit status; else None."""
    if args.gpus is None:
        return None
    count = _gpu_count(args.gpus)
    if "WORLD_SIZE" in os.environ:
        raise ConfigError("--gpus starts torchrun itself; under torchrun, leave it out")
    if count == 1 or args.print_config:
        return None
    import subprocess

    command = torchrun_command(args.argv, count)
    print("running:", " ".join(command[1:]), file=sys.stderr)
    return subprocess.call(command)


def _run(cfg: Any, args: argparse.Namespace, default_out: str) -> int:
    from detkd import api
    from detkd.config import to_dict

    if args.print_config:
        import yaml

        layers = getattr(args, "config_layers", None)
        if layers:
            print(f"# layers, lowest first: {' < '.join(layers)}")
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    code = _relaunch(args)
    if code is not None:
        return code
    out = Path(args.out or default_out)
    start = api.distill if cfg.distill.methods else api.train
    summary = start(cfg, out, resume=args.resume, overwrite=args.overwrite)
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
    if cfg.distill.methods:  # checked here too: --print-config and --gpus stop before the API checks
        raise ConfigError("the config names distillation methods; use `detkd distill` for them")
    return _run(cfg, args, f"runs/{cfg.model.name}")


def cmd_distill(args: argparse.Namespace) -> int:
    from detkd import api

    extra = []
    if args.method:
        methods = [m.strip() for m in args.method.split("+") if m.strip()]
        extra.append(f"distill.methods=[{','.join(methods)}]")
    if args.teacher:
        extra.append("distill.teacher=null" if args.teacher.lower() == "none" else f"distill.teacher={args.teacher}")
    if args.student:
        extra.append(f"model.name={args.student}")
    cfg = _resolve(args, extra)
    api.check_distill_config(cfg)  # here too: --print-config and --gpus stop before the API runs it
    return _run(cfg, args, f"runs/{'+'.join(cfg.distill.methods)}")


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from detkd import api

    if args.threads:
        torch.set_num_threads(args.threads)
    metrics = api.evaluate(
        args.checkpoint,
        args.data,
        split=args.split,
        metric=args.metric,
        format=args.format,
        batch_size=args.batch_size,
        max_images=args.max_images,
        device=args.device,
        save_predictions=args.save_predictions,
        progress=not args.no_progress,
    )
    _print_metrics(metrics, args.checkpoint)
    if args.save_predictions:
        print(f"predictions written to {args.save_predictions} (COCO results format)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        from detkd.engine.evaluate import json_safe

        payload = {"checkpoint": str(args.checkpoint), "data": args.data, "split": args.split, **metrics}
        Path(args.out).write_text(json.dumps(json_safe(payload), indent=2))
        print(f"metrics written to {args.out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from detkd import api

    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = api.load(args.checkpoint, args.device)
    category_ids = None
    if args.data:
        from detkd.data import build_dataset

        dataset = build_dataset(args.data, args.split, "auto")
        if list(dataset.classes) != predictor.classes:
            raise ConfigError(
                f"{args.checkpoint} was trained on classes {predictor.classes}, {args.data} has {dataset.classes}"
            )
        category_ids = dataset.category_ids
    summary = api.predict_files(
        predictor,
        args.images,
        args.out,
        score_threshold=args.score_threshold,
        batch_size=args.batch_size,
        category_ids=category_ids,
        pictures=not args.no_pictures,
    )
    out = Path(args.out)
    print(
        f"{summary['images']} images: {summary['detections']} detections in {out / 'predictions.json'} "
        f"(image ids: {out / 'images.json'})"
        + ("" if args.no_pictures else f"; {summary['drawn']} scoring >= {args.score_threshold} drawn in {out}")
    )
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
        print("timm:<model>  any timm model with features_only (pip install 'detkd[timm]'), e.g. frcnn_timm:resnet18")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("detkd")
    except PackageNotFoundError:
        return "0+unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="detkd",
        description="Knowledge distillation for object detectors.",
        epilog="Run `detkd COMMAND --help` for the options of a command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}", help="print the version")
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
    p.add_argument(
        "--weights",
        help="whole-detector weights: torchvision (COCO) | a torchvision state dict | a detkd checkpoint; "
        "sets model.weights",
    )
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
    p.add_argument(
        "--teacher",
        help="teacher checkpoint (best.pt/student.pt of a run), or none; a torchvision state dict is first "
        "fine-tuned with `detkd train --weights FILE`",
    )
    p.add_argument("--student", help="student detector, e.g. frcnn_r18")
    p.add_argument(
        "--student-weights",
        help="the student's starting weights: torchvision (COCO) | a torchvision state dict | a detkd checkpoint "
        "(e.g. a converged baseline); sets model.weights",
    )
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
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--max-images", type=int, help="evaluate the first N images only")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--threads", type=int, help="CPU threads")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument(
        "--save-predictions",
        metavar="FILE",
        help="write the detections scored as a COCO results JSON (the dataset's image and category ids)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "predict",
        help="detect objects in images",
        description="Run a checkpoint on image files or folders. Writes OUT/predictions.json (COCO results: every "
        "detection the detector outputs, scores down to its own floor, 0.05 for Faster R-CNN/RetinaNet/FCOS), "
        "OUT/images.json (image id -> file, and the categories) and one PNG per image with the boxes scoring at "
        "least --score-threshold, labelled with class name and score.",
    )
    p.add_argument("checkpoint", help="student.pt / best.pt / last.pt")
    p.add_argument("images", nargs="+", metavar="IMAGE|DIR", help="image files, or folders of images (not recursive)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--score-threshold", type=float, default=0.3, help="draw boxes scoring at least this (default 0.3)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--threads", type=int, help="CPU threads")
    p.add_argument(
        "--data",
        help="the dataset the checkpoint was trained on: its category ids go into the JSON (default 1..C)",
    )
    p.add_argument("--split", default="train", help="split of --data to read the categories from (default train)")
    p.add_argument("--no-pictures", action="store_true", help="write the JSON files only")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("list", help="list methods, detectors or backbones")
    p.add_argument("what", choices=["methods", "detectors", "backbones"], help="what to list")
    p.set_defaults(func=cmd_list)

    _add_optional_commands(sub)
    return parser


def _add_optional_commands(sub: Any) -> None:
    """Commands whose modules register their own parsers (pretrain, export, bench, report)."""
    for module in ("detkd.pretrain", "detkd.export", "detkd.bench.cli", "detkd.report"):
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
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except DetkdError as exc:
        print(f"detkd: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None and exc.errno not in FILE_SYSTEM_ERRNOS:
            raise
        # The file system refused (permissions, a file where a folder should be, a full disk): not a bug. A write
        # to an open file (a log line on a full disk) names no file.
        where = f"{exc.filename}: " if exc.filename is not None else ""
        kept = "" if exc.filename is not None else " (the run folder keeps its last checkpoint)"
        print(f"detkd: error: {where}{exc.strerror or type(exc).__name__}{kept}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("detkd: interrupted (the run folder keeps its last checkpoint; continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
