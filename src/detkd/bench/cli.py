"""``detkd bench``: its command-line options and what the command does."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from detkd.bench.curves import regime
from detkd.bench.report import aggregate, gpu_section, print_summary, render_markdown, write_plots
from detkd.bench.runner import Bench, BenchStopped, done_marker
from detkd.bench.suites import SUITES
from detkd.errors import ConfigError

log = logging.getLogger("detkd")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark suite and write BENCHMARKS.md",
        description="Pretrain the suite's backbones and train the teachers (both cached), then the student baseline "
        "and every method with the same data, schedule and seeds; measure step times in one process; write "
        "results.json, BENCHMARKS.md and plots.",
    )
    p.add_argument("--suite", default="smoke", choices=sorted(SUITES), help="which suite (default smoke)")
    p.add_argument("--methods", help="comma-separated method rows to run (default: all of the suite)")
    p.add_argument("--pairs", help="comma-separated teacher-student pairs to run (default: all of the suite)")
    p.add_argument("--seeds", type=int, help="seeds per row (default: the suite's)")
    p.add_argument("--out", default="bench", help="output root (default bench/)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time (default 1)")
    p.add_argument("--threads", type=int, help="CPU threads per run (default: cores / jobs)")
    p.add_argument("--render", metavar="FILE", help="only (re)write FILE (Markdown) from the suite's results.json")
    p.add_argument(
        "--plan",
        action="store_true",
        help="print the runs the suite (or, with --curves, the study) would make and their cost by the step times "
        "of the runs already finished in --out, with what is left to train, and exit",
    )
    p.add_argument(
        "--curves",
        action="store_true",
        help="the regime study instead of the suite: teachers and baseline students at 1x and 2x the schedule with "
        "periodic evaluation; writes curves/ (JSON, PNGs, Markdown); with --render FILE, trains nothing: collects the "
        "finished runs (the others listed as missing) and rewrites FILE's generated section (docs/benchmark-regime.md)",
    )
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    suite = SUITES[args.suite]
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    pairs = [p.strip() for p in args.pairs.split(",")] if args.pairs else None
    bench = Bench(
        suite, Path(args.out), seeds=args.seeds, methods=methods, pairs=pairs, jobs=args.jobs, threads=args.threads
    )
    if not (args.render or args.plan):
        crowded = bench.crowding()
        if crowded:
            log.warning("%s", crowded)
    if args.curves:
        return _curves(bench, args)
    if args.render:
        if not bench.results_path.exists():
            raise ConfigError(f"{bench.results_path} not found: run `detkd bench --suite {suite.name}` first")
        results = json.loads(bench.results_path.read_text())
        results["table"] = aggregate(results)  # from the records, with this version's aggregation
        results["regime"] = regime(bench)  # the study's verdicts as its runs stand now
        base = Path(args.render).parent
        plots = write_plots(results, base / "docs" / "bench" / suite.name)
        text = render_markdown(results, plots, base)
        if suite.name == "cpu":  # the published file: the gpu suite's table, or that it has not run
            text += gpu_section(Path(args.out), base)
        Path(args.render).write_text(text)
        print(f"wrote {args.render}")
        return 0
    if args.plan:
        specs = bench.plan()
        for spec in specs:
            print(f"{spec.pair:10s} {spec.row:14s} seed {spec.seed}  {spec.command} {spec.model} {spec.iters} iters")
        print("(+ same-wall-clock baselines after the timing phase)")
        print(plan_cost(bench, specs))
        return 0
    try:
        results = bench.run()
    except BenchStopped as stop:
        print(f"detkd bench: {stop}; the stopped runs resume when the same command runs again", file=sys.stderr)
        return 128 + stop.signum
    results["regime"] = regime(bench)
    plots = write_plots(results, bench.root / "plots")
    md = bench.root / "BENCHMARKS.md"
    md.write_text(render_markdown(results, plots, bench.root))
    print_summary(results)
    print(f"results: {bench.results_path}\nreport:  {md}")
    return 0


def plan_cost(bench: Bench, specs: list) -> str:
    """One line: the plan's training time by the step times of the finished runs in the output folder, and what of
    it is left to train (a stopped run counted in full)."""
    unique = {bench.run_dir(s): s for s in specs}
    costs = {out: bench.measured_seconds(s) for out, s in unique.items()}
    known = [c for c in costs.values() if c is not None]
    if not known:
        return "cost: unknown (no finished run in the output folder measures these detectors yet)"
    total = sum(known)
    todo = [out for out, s in unique.items() if not done_marker(s, out).exists()]
    left = sum(costs[out] for out in todo if costs[out] is not None)
    line = (
        f"cost by the finished runs' step times: {total / 3600:.1f} h of training for {len(known)} of {len(costs)} "
        f"runs, ≈ {total / 3600 / bench.jobs:.1f} h at --jobs {bench.jobs}"
    )
    line += "" if len(known) == len(costs) else f"; {len(costs) - len(known)} run(s) not yet measurable"
    return line + f"; left to train: {len(todo)} run(s), {left / 3600:.1f} h of them measurable"


def _curves(bench: Bench, args: argparse.Namespace) -> int:
    from detkd.bench.curves import curve_specs, render_into, run_curves

    data = bench.root / "curves" / "curves.json"
    if args.render:
        if not (bench.root / "runs").exists() and not bench.teacher_dir(bench.pairs[0]).exists():
            raise ConfigError(
                f"no run of the study in {bench.root}: run `detkd bench --suite {bench.suite.name} --curves`"
            )
        run_curves(bench, train=False)  # the finished runs as they are now; the others are listed as missing
        render_into(Path(args.render), data)
        print(f"wrote {args.render}")
        return 0
    if args.plan:
        specs = curve_specs(bench)
        for spec in specs:
            print(f"{spec.pair:10s} {spec.row:14s} seed {spec.seed}  {spec.command} {spec.model} {spec.iters} iters")
        print(plan_cost(bench, specs))
        return 0
    try:
        run_curves(bench)
    except BenchStopped as stop:
        print(f"detkd bench: {stop}; the stopped runs resume when the same command runs again", file=sys.stderr)
        return 128 + stop.signum
    print(f"curves: {data}\nreport: {data.parent / 'curves.md'}")
    return 0
