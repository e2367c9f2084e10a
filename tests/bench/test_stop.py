"""Stopping ``detkd bench`` stops every training run it started, and the same command resumes them.

The runs are a stand-in launcher (a small script playing ``detkd train``/``distill``): on a first start it writes
its checkpoint and a log line, then trains forever; started with ``--resume`` it finishes at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

FAKE_RUN = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path

    args = sys.argv[1:]
    out = Path(args[args.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "calls.jsonl", "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "resume": "--resume" in args}) + "\\n")
    if "--resume" not in args and os.environ.get("FAKE_HANG") == "1":
        (out / "last.pt").write_bytes(b"checkpoint")
        (out / "log.jsonl").write_text(json.dumps({"iter": 10, "step_time": 1.0}) + "\\n")
        time.sleep(600)
    (out / "final.json").write_text(json.dumps({"metrics": {"AP": 0.1, "AP50": 0.2}}))
    """
)

BENCH = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from detkd.bench.runner import Bench, BenchStopped
    from detkd.bench.suites import SUITES

    bench = Bench(SUITES["smoke"], Path(sys.argv[1]), jobs=2)
    bench.command = [sys.executable, sys.argv[2]]
    try:
        records = bench.run_all(bench.plan())
    except BenchStopped as stop:
        sys.exit(128 + stop.signum)
    print(json.dumps(records))
    """
)


def calls(root: Path) -> list[dict]:
    return [json.loads(line) for path in root.rglob("calls.jsonl") for line in path.read_text().splitlines()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_stops_every_child_run_and_the_same_command_resumes_them(tmp_path):
    fake, script = tmp_path / "fake_run.py", tmp_path / "bench.py"
    fake.write_text(FAKE_RUN)
    script.write_text(BENCH)
    root = tmp_path / "bench"
    env = dict(os.environ, FAKE_HANG="1", PYTHONPATH=os.pathsep.join(sys.path))
    bench = subprocess.Popen([sys.executable, str(script), str(root), str(fake)], env=env)
    try:
        deadline = time.monotonic() + 60
        while len(calls(root)) < 2 and time.monotonic() < deadline:  # the teacher and the baseline (2 jobs)
            time.sleep(0.2)
        children = [c["pid"] for c in calls(root)]
        assert len(children) == 2 and all(alive(pid) for pid in children)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        bench.kill()
    time.sleep(0.5)
    assert not [pid for pid in children if alive(pid)]
    assert len(calls(root)) == 2  # no run started after the stop

    again = subprocess.run(
        [sys.executable, str(script), str(root), str(fake)],
        env=dict(env, FAKE_HANG="0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    records = json.loads(again.stdout)
    assert {r["row"] for r in records} == {"teacher", "baseline", "kd", "fitnet"}
    assert not [r for r in records if r.get("failed")]
    by_folder: dict[str, list[bool]] = {}
    for path in root.rglob("calls.jsonl"):
        by_folder[str(path.parent)] = [json.loads(line)["resume"] for line in path.read_text().splitlines()]
    stopped = [flags for flags in by_folder.values() if len(flags) == 2]
    assert sorted(stopped) == [[False, True], [False, True]]  # the two stopped runs were resumed
