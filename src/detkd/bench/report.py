"""What a suite's records add up to: the aggregated table, the goals, BENCHMARKS.md, plots and the terminal summary.

Everything here is computed from ``results.json`` (the report is generated, never typed by hand).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from detkd.bench.plan import needs_teacher
from detkd.bench.suites import CONVERGED_GAIN, MIN_GAP, SUITES


def _timed_on(timing: dict[str, Any]) -> str:
    """Where a timing ran: ``N threads`` on the CPU, the GPU's name otherwise (older results name no device)."""
    device = timing.get("device", "cpu")
    return f"{timing['threads']} threads" if device == "cpu" else f"on {device}"


def _stats(values: list[float]) -> dict[str, float | int | None]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def aggregate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (pair, row): accuracy over seeds, gains, gap closed, cost."""
    records = [r for r in results["records"] if not r.get("failed")]
    timing = results.get("timing", {})
    suite = SUITES.get(results["suite"])
    grid = results.get("time_grid") or (suite.time_grid if suite else 0.25)
    table = []
    for pair in results["pairs"]:
        name = pair["name"]
        mine = [r for r in records if r["pair"] == name]
        teacher = next((r for r in records if r["kind"] == "teacher" and r["model"] == pair["teacher"]), None)
        base = _stats([r["AP"] for r in mine if r["row"] == "baseline"])
        base50 = _stats([r["AP50"] for r in mine if r["row"] == "baseline"])
        t = timing.get(name, {})
        row_methods = {key: row for key, (row, _) in (pair.get("variants") or {}).items()}
        row_methods.update({key: ft["methods"] for key, ft in (pair.get("finetunes") or {}).items()})
        rows = [
            "teacher",
            "baseline",
            *pair["references"],
            *pair["methods"],
            *pair.get("variants", {}),
            *pair.get("finetunes", {}),
            *sorted({r["row"] for r in mine if r["kind"] == "time_matched"}),
        ]
        for row in rows:
            if row == "teacher":
                runs = [teacher] if teacher else []
            else:
                runs = [r for r in mine if r["row"] == row]
            if not runs:
                continue
            ap, ap50 = _stats([r["AP"] for r in runs]), _stats([r["AP50"] for r in runs])
            entry = {
                "pair": name,
                "row": row,
                "kind": runs[0]["kind"],
                "model": runs[0]["model"],
                "iters": runs[0]["iters"],
                "AP": ap,
                "AP50": ap50,
                # A time-matched row trains the baseline's model and batch for longer: its memory is the baseline's.
                "peak_memory_mb": None
                if runs[0]["kind"] == "time_matched"
                else max((r["peak_memory_mb"] or 0) for r in runs),
                "train_time_s": _stats([r["train_time_s"] for r in runs])["mean"],
                "failed_seeds": sum(
                    1 for r in results["records"] if r["pair"] == name and r["row"] == row and r.get("failed")
                ),
            }
            # A fine-tune row is judged as GKD's paper judges it: against the converged baseline it starts from.
            if runs[0]["kind"] in ("method", "finetune"):
                entry["gain"] = None if base["mean"] is None else ap["mean"] - base["mean"]
                entry["gain_AP50"] = None if base50["mean"] is None else ap50["mean"] - base50["mean"]
                entry["gain_over_2std"] = (
                    entry["gain"] is not None and base["std"] is not None and entry["gain"] > 2 * base["std"]
                )
                if teacher and base["mean"] is not None and teacher["AP"] is not None:
                    gap = teacher["AP"] - base["mean"]
                    entry["gap_closed"] = (ap["mean"] - base["mean"]) / gap if gap > 0 else None
                    entry["reaches_teacher"] = ap["mean"] >= teacher["AP"]
                row_t = t.get("rows", {}).get(row, {})
                if row_t.get("nonfinite_steps") or t.get("student_nonfinite_steps"):
                    row_t = {}  # a diverged timed step does different work: its time is not the method's
                entry["step_s"] = row_t.get("step_s")
                # A row that runs no teacher is compared with the student's own step.
                methods = row_methods.get(row, row)
                teacher_free = pair["teacher"] is None or not methods or not needs_teacher(methods)
                entry["step_ratio"] = row_t.get("ratio_student") if teacher_free else row_t.get("ratio")
                entry["step_ratio_student"] = row_t.get("ratio_student")
                factor = None
                if row_t.get("step_s") and t.get("student_step_s"):
                    factor = max(1.0, math.ceil(row_t["step_s"] / t["student_step_s"] / grid - 1e-9) * grid)
                # Without a measured step time there is nothing to match the baseline's time to.
                tm_row = None if factor is None else f"tm{factor:g}" if factor > 1.0 else "baseline"
                tm = _stats([r["AP"] for r in mine if r["row"] == tm_row])
                entry["time_matched_row"] = tm_row if tm["n"] else None
                entry["gain_time_matched"] = None if tm["mean"] is None else ap["mean"] - tm["mean"]
            cost = t.get("cost", {}).get(runs[0]["model"]) or t.get("cost", {}).get(row)
            if cost:
                entry["cost"] = cost
            table.append(entry)
    return table


def goal_methods() -> list[Any]:
    """The methods held to the benchmark's goals: those whose class sets ``benchmark_goal``."""
    from detkd.methods import METHODS

    return [cls for cls in (METHODS.get(name) for name in METHODS.names()) if cls.benchmark_goal]


def paper_share(share: float | None) -> str:
    """The share of the gap a paper reports closing, as the report prints it."""
    if share is None:
        return "–"
    return "> 300%" if share >= 3.0 else f"{share:.0%}"


def _fmt(stat: dict[str, Any] | None, digits: int = 3) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    text = f"{stat['mean']:.{digits}f}"
    if stat.get("n", 0) > 1:
        text += f" ± {stat['std']:.{digits}f}"
    return text


def _signed(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:+.{digits}f}"


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def portable_command(command: str) -> str:
    """The command line with each absolute path cut to its last part: a generated report names no folder of the
    machine that made it."""
    return " ".join(Path(arg).name if arg.startswith("/") else arg for arg in command.split(" "))


def write_plots(results: dict[str, Any], folder: Path) -> dict[str, list[Path]]:
    """mAP per row with error bars, and training-loss curves, per pair. Returns pair -> PNG paths."""
    from detkd.viz import map_bar_chart, pyplot

    plt = pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    plots: dict[str, list[Path]] = {}
    table = results.get("table", [])
    for pair in results["pairs"]:
        rows = [e for e in table if e["pair"] == pair["name"] and e["AP"]["mean"] is not None]
        if not rows:
            continue
        colors = [
            "#555555" if e["kind"] == "teacher" else "#1f77b4" if e["kind"] == "method" else "#aaaaaa" for e in rows
        ]
        base = next((e for e in rows if e["row"] == "baseline"), None)
        paths = [
            map_bar_chart(
                [e["row"] for e in rows],
                [e["AP"]["mean"] for e in rows],
                [e["AP"]["std"] or 0.0 for e in rows],
                folder / f"{pair['name']}_map.png",
                colors=colors,
                baseline=base["AP"]["mean"] if base else None,
                title=f"{pair['name']}: {pair['teacher'] or '(no teacher)'} → {pair['student']}",
            )
        ]

        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        for rec in results["records"]:
            if rec["pair"] != pair["name"] or rec.get("seed") != 0 or rec["kind"] not in ("baseline", "method"):
                continue
            log = Path(rec["run"]) / "log.jsonl"
            if not log.exists():
                continue
            pts = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            xs = [p["iter"] for p in pts if "loss_cls" in p]
            ys = [sum(v for k, v in p.items() if k.startswith("loss_")) for p in pts if "loss_cls" in p]
            if xs:
                ax.plot(xs, ys, label=rec["row"], lw=1.2 if rec["kind"] == "method" else 2.0)
        ax.set_xlabel("step")
        ax.set_ylabel("detection loss (task terms)")
        ax.set_title(f"{pair['name']}: training curves, seed 0", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"{pair['name']}_curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
        plots[pair["name"]] = paths
    return plots


def goals(results: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """The goals the table is judged against: (goal, met?, evidence)."""
    table = results.get("table", [])
    methods = [e for e in table if e["kind"] == "method"]
    out = []
    for method in goal_methods():
        name = method.name
        rows = [e for e in methods if e["row"] == name]
        if not rows:
            out.append((f"`{name}` beats its baseline by > 2 std of the baseline's seeds", None, "not run here"))
            continue
        for e in rows:
            base = next(b for b in table if b["pair"] == e["pair"] and b["row"] == "baseline")
            ok = bool(e.get("gain_over_2std"))
            evidence = (
                f"gain {_signed(e.get('gain'))}, 2 std = {2 * (base['AP']['std'] or 0):.3f} (n = {base['AP']['n']})"
            )
            if e.get("gain_time_matched") is not None:
                evidence += f"; {_signed(e['gain_time_matched'])} against the same-wall-clock baseline"
                evidence += f" `{e['time_matched_row']}`" if e["time_matched_row"] != "baseline" else ""
            if e.get("gap_closed") is not None and method.paper_gap_closed is not None:
                evidence += f"; gap closed {e['gap_closed']:.0%} (paper: {paper_share(method.paper_gap_closed)})"
            if not ok or (e.get("gain_time_matched") is not None and e["gain_time_matched"] <= 0):
                evidence += _missed_because(_regime_of(results, e["pair"]))
            out.append((f"`{name}` ({e['pair']}) beats its baseline by > 2 std of the baseline's seeds", ok, evidence))
    reach = [e for e in methods if e.get("reaches_teacher")]
    out.append(
        (
            "at least one method's student reaches its teacher's mAP",
            bool(reach),
            ", ".join(f"{e['pair']}/{e['row']}" for e in reach)
            or "best gap closed: " + _num(max((e.get("gap_closed") or -9 for e in methods), default=None), ".0%"),
        )
    )
    for pair in results["pairs"]:
        for e in methods:
            if e["pair"] == pair["name"] and e["row"] in pair.get("feature_methods", []) and e.get("step_ratio"):
                out.append(
                    (
                        f"step overhead ≤ 1.15× (student step + teacher forward): {e['pair']}/{e['row']}",
                        e["step_ratio"] <= 1.15,
                        f"{e['step_ratio']:.2f}×",
                    )
                )
    return out


def render_markdown(results: dict[str, Any], plots: dict[str, list[Path]], base: Path) -> str:
    """The whole BENCHMARKS.md text; image links are relative to ``base`` (where the file is written)."""
    m = results["machine"]
    d = results["data"]
    lines = [
        f"# detkd benchmark — suite `{results['suite']}`",
        "",
        "Generated by `detkd bench` from `results.json`; do not edit by hand. "
        f"Regenerate with `detkd bench --suite {results['suite']} --render BENCHMARKS.md`.",
        "",
        f"- **Suite:** {results['description']}.",
        f"- **Date:** {results['date']}. **Machine:** {m['cpu']}, {m['cores']} cores"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
        + f"; Python {m['python']}, torch {m['torch']}.",
        f"- **Data:** built-in digits, `{d['difficulty']}` variant, {d['train']} train / {d['val']} val images of "
        f"{d['size']} px (seed {d['seed']}); train and val use disjoint source digits.",
        f"- **Protocol:** every student row uses the same data, schedule and seeds ({results['seeds']} seeds: 0.."
        f"{results['seeds'] - 1}"
        + ("; the rows a pair names run seed 0 only" if any(p.get("one_seed") for p in results["pairs"]) else "")
        + f"); each teacher trained once (seed 0) and cached. {results['jobs']} run(s) at a time, "
        f"{results['threads_per_run']} CPU thread(s) each. Metrics on the full val split.",
    ]
    pretrained = [r for r in results["records"] if r["kind"] == "pretrain" and not r.get("failed")]
    if pretrained:
        lines.append(
            "- **Pretrained backbones** (`detkd pretrain` on the suite's training crops, the stand-in for ImageNet "
            "weights; val top-1 on the val crops): "
            + ", ".join(f"{r['model']} {r['iters']} steps, top-1 {_num(r.get('top1'), '.3f')}" for r in pretrained)
            + "."
        )
    if results.get("regime"):
        page = Path("docs/benchmark-regime.md")
        where = (
            f"[{page.as_posix()}]({os.path.relpath(page.resolve(), base.resolve())})"
            if page.exists()
            else f"`detkd bench --suite {results['suite']} --curves`"
        )
        lines.append(
            f"- **Regime:** the schedules and pairs come from the learning-curve study ({where}); under each pair's "
            "table, what it measured: the student alone at twice the schedule (converged when that adds less than "
            f"2 std of its seeds or {CONVERGED_GAIN}), the teacher at twice its schedule (at its plateau when that "
            f"adds less than {CONVERGED_GAIN}), and teacher − student (the protocol asks ≥ {MIN_GAP})."
        )
    lines += [
        "- **Columns:** mAP = COCO mAP@[.5:.95] (mean ± std over seeds); gain = method − baseline (same schedule); "
        "gain (time) = method − baseline trained for the same wall-clock time (the baseline's iterations × the "
        f"method's measured step-time ratio, rounded up to a {results.get('time_grid', 0.25):g} grid: row `tmX`; "
        "a method no slower than the student is compared with the baseline itself); gap closed = gain / (teacher − "
        "baseline); step ratio = method step / (student step + teacher forward), medians of interleaved full "
        "training steps measured in one process from the trained checkpoints at learning rate 0, so that every row "
        "does the same work at every step (`×S` = relative to the student step alone).",
        "",
    ]
    table = results.get("table", [])
    timing = results.get("timing", {})
    for pair in results["pairs"]:
        rows = [e for e in table if e["pair"] == pair["name"]]
        if not rows:
            continue
        t = timing.get(pair["name"], {})
        lines += [
            f"## {pair['name']}: {pair['teacher'] or '(no teacher)'} → {pair['student']}",
            "",
            (f"Teacher {pair['teacher_iters']} steps; every" if pair["teacher"] else "No teacher; every")
            + f" student row {pair['student_iters']} steps"
            + (
                f"; overrides `{' '.join(pair['overrides'] + pair['student_overrides'])}`"
                if pair["overrides"] or pair["student_overrides"]
                else ""
            )
            + ". "
            + "".join(
                f"`{m}` runs with `{' '.join(o)}`. "
                for m, o in (pair.get("method_overrides") or {}).items()
                if o and any(m in row.split("+") for row in pair["methods"])
            )
            + "".join(
                f"`{key}` is `{row}` with `{' '.join(o)}` (not timed). "
                for key, (row, o) in (pair.get("variants") or {}).items()
            )
            + "".join(
                f"`{key}` starts from the baseline's student of the same seed and trains {ft['iters']} more steps "
                + (f"with `{ft['methods']}`" if ft["methods"] else "alone")
                + (f" (`{' '.join(ft['overrides'])}`)" if ft["overrides"] else "")
                + "; its gain is over that baseline. "
                for key, ft in (pair.get("finetunes") or {}).items()
            )
            + (
                f"{', '.join(f'`{r}`' for r in pair['one_seed'])} ran seed 0 only (context rows, no goal judges "
                "them; their gain is over the baseline's mean, and a same-wall-clock baseline that only they need ran "
                "seed 0 only too). "
                if pair.get("one_seed") and results["seeds"] > 1
                else ""
            )
            + ("Every run starts from the suite's pretrained backbones. " if pair.get("pretrained") else "")
            + (
                ""
                if not pair["methods"]
                else "Method rows run with `distill.calibrate=auto`. "
                if (results.get("calibrate") if pair.get("calibrate") is None else pair["calibrate"])
                else "Method rows run with their papers' loss weights (`distill.calibrate=off`). "
            )
            + (
                f"Student step {t['student_step_s']:.3f} s, teacher forward "
                f"{_num(t.get('teacher_forward_s'), '.3f')} s (batch {t['batch_size']}, {_timed_on(t)})."
                if t
                else ""
            ),
            "",
            "| row | steps | mAP | mAP@.5 | gain | gain (time) | gap closed | step ratio | peak RSS MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for e in rows:
            ratio = ""
            if e.get("step_ratio") is not None:
                ratio = f"{e['step_ratio']:.2f}× ({e['step_ratio_student']:.2f}×S)"
            tm = ""
            if e.get("gain_time_matched") is not None:
                tm = f"{e['gain_time_matched']:+.3f} vs {e['time_matched_row']}"
            failed = f" ({e['failed_seeds']} seed(s) failed)" if e.get("failed_seeds") else ""
            lines.append(
                f"| {e['row']}{failed} | {e['iters']} | {_fmt(e['AP'])} | {_fmt(e['AP50'])} | "
                f"{_signed(e.get('gain'))} | {tm or '–'} | {_num(e.get('gap_closed'), '.0%')} | {ratio or '–'} | "
                f"{_num(e.get('peak_memory_mb'), '.0f')} |"
            )
        verdict = _regime_line(_regime_of(results, pair["name"]))
        if verdict:
            lines += ["", verdict]
        costs = t.get("cost", {})
        if costs:
            lines += [
                "",
                "| model | params | FP32 MB | packed MB | GFLOPs | GBOPs | GOPs | latency ms (1 image) |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for name, c in costs.items():
                if not c:
                    continue
                lines.append(
                    f"| {name} | {c.get('params', 0) / 1e6:.2f} M | {_num(c.get('fp32_mb'), '.1f')} | "
                    f"{_num(c.get('packed_mb'), '.1f')} | {_num(_g(c.get('flops')), '.2f')} | "
                    f"{_num(_g(c.get('bops')), '.2f')} | {_num(_g(c.get('ops')), '.2f')} | "
                    f"{_num(c.get('latency_ms'), '.1f')} |"
                )
        for path in plots.get(pair["name"], []):
            lines += ["", f"![{path.stem}]({os.path.relpath(path, base)})"]
        lines.append("")
    speed = timing.get("_detectors")
    if speed:
        lines += [
            "## Detector speed",
            "",
            f"Freshly built slim detectors (random weights), batch {speed['batch_size']} of {speed['size']}-px images, "
            f"{_timed_on(speed)}; median of {speed['steps']} interleaved training steps (forward, backward, "
            "SGD step) and of 10 one-image predictions.",
            "",
            "| detector | params | train step s | predict ms (1 image) |",
            "|---|---:|---:|---:|",
        ]
        for name, d in speed["detectors"].items():
            lines.append(f"| {name} | {d['params'] / 1e6:.1f} M | {d['step_s']:.3f} | {d['latency_ms']:.1f} |")
        lines.append("")
    lines += ["## Goals", "", "| goal | met | evidence |", "|---|:---:|---|"]
    for goal, ok, evidence in goals(results):
        lines.append(f"| {goal} | {'–' if ok is None else 'yes' if ok else '**no**'} | {evidence} |")
    failed = [r for r in results["records"] if r.get("failed")]
    runs = {r["run"]: r for r in results["records"]}  # rows sharing a run folder count once
    train_h = sum(r.get("train_time_s") or 0 for r in runs.values()) / 3600
    lines += [
        "",
        "## What ran",
        "",
        f"{len(runs)} training runs ({len(failed)} failed); their training steps took {train_h:.1f} h in all "
        f"(sum over runs, {results['jobs']} at a time)"
        + (
            f"; the last `detkd bench` invocation took {results['wall_s'] / 3600:.1f} h of wall time"
            if results.get("wall_s")
            else ""
        )
        + f". Command: `{portable_command(results['command'])}`.",
    ]
    if results.get("pairs_not_run"):
        lines.append(
            f"Pairs of the suite not run here: {', '.join(results['pairs_not_run'])} (`--pairs` chose the others); "
            f"{results['seeds']} seed(s) per row."
        )
    if not results.get("complete", True):
        if results.get("timing"):
            lines.append(
                "**This suite is incomplete**: the same-wall-clock baselines (rows `tmX`) were not trained, so the "
                "gain (time) column is empty; the gains above are at the same step count only."
            )
        else:
            lines.append("**This suite is incomplete**: runs or the timing phase are still missing.")
    for r in failed:
        lines.append(f"- failed: {r['pair']}/{r['row']} seed {r['seed']}: {r.get('error')}")
    return "\n".join(lines) + "\n"


def gpu_section(root: Path, base: Path) -> str:
    """The part of another suite's BENCHMARKS.md about the ``gpu`` suite: its whole report, one heading level down,
    where ``root/gpu/results.json`` holds a complete run (plots under ``base/docs/bench/gpu``); otherwise a paragraph
    saying it has not run to completion, and where its state is described."""
    path = root / "gpu" / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if results.get("complete"):
        results["table"] = aggregate(results)
        plots = write_plots(results, base / "docs" / "bench" / "gpu")
        text = render_markdown(results, plots, base)
        return "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines()) + "\n"
    page = "docs/benchmark-regime.md"
    return (
        "\n## Suite `gpu`\n\n"
        "The same regime at 256 px for one GPU (`scripts/gpu_bench.sh`) has no complete run"
        + (f" in `{path.parent.name}/` (its results.json is of an unfinished run)" if path.exists() else "")
        + f"; what its runs on a GPU have measured so far is in {page} "
        '("The `gpu` suite").\n'
    )


def _regime_of(results: dict[str, Any], pair: str) -> dict[str, Any] | None:
    return next((e for e in results.get("regime") or [] if e["pair"] == pair), None)


def yes_no(value: bool | None) -> str:
    """A verdict as the reports print it: yes, **no** (bold), or – when it was not measured."""
    return "–" if value is None else "yes" if value else "**no**"


def _regime_line(e: dict[str, Any] | None) -> str:
    """One sentence under a pair's table: what the learning-curve study measured of the pair."""
    if not e or all(e.get(k) is None for k in ("student_2x", "teacher_2x", "gap")):
        return ""
    plateau = yes_no(e.get("teacher_plateau"))
    teacher = (
        f"the teacher above is the study's 2x run, {_num(e.get('teacher_2x'), '.3f')} against "
        f"{_num(e.get('teacher_1x'), '.3f')} at half its steps (at its plateau at half: {plateau}; its own 2x not run)"
        if e.get("teacher_is_2x")
        else f"the teacher at twice its schedule {_num(e.get('teacher_2x'), '.3f')} (at its plateau: {plateau})"
    )
    return (
        f"Regime study: the student alone at twice the schedule {_num(e.get('student_2x'), '.3f')} "
        f"({_signed(e.get('student_2x_gain'))}; converged: {yes_no(e.get('student_converged'))}); {teacher}; "
        f"teacher − student {_num(e.get('gap'), '.3f')} (≥ {MIN_GAP}: {yes_no(e.get('gap_ok'))})."
    )


def _missed_because(e: dict[str, Any] | None) -> str:
    """What the regime study measured that bears on a missed goal of the pair (empty when nothing)."""
    if not e:
        return ""
    parts = []
    if e.get("gap_ok") is False:
        parts.append(f"teacher − student is {e['gap']:.3f}, below the protocol's {MIN_GAP}")
    if e.get("student_converged") is False:
        parts.append(f"the student alone still gains {e['student_2x_gain']:+.3f} at twice the schedule")
    return "; the pair's regime: " + ", and ".join(parts) if parts else ""


def _g(value: float | None) -> float | None:
    return None if value is None else value / 1e9


def print_summary(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"detkd bench --suite {results['suite']}")
    for col in ("pair", "row", "mAP", "mAP@.5", "gain", "step ratio"):
        table.add_column(col, justify="left" if col in ("pair", "row") else "right")

    def fmt(s: dict[str, Any]) -> str:
        if s["mean"] is None:
            return "-"
        return f"{s['mean']:.3f}" + (f" ±{s['std']:.3f}" if s["n"] > 1 else "")

    for e in results.get("table", []):
        ap, ap50 = e["AP"], e["AP50"]
        gain = e.get("gain")
        ratio = e.get("step_ratio")
        table.add_row(
            e["pair"],
            e["row"],
            fmt(ap),
            fmt(ap50),
            "" if gain is None else f"{gain:+.3f}",
            "" if ratio is None else f"{ratio:.2f}x",
        )
    Console().print(table)
