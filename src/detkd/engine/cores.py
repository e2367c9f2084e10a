"""Whether a process's CPU threads fit the cores that other work leaves free.

A CPU op whose threads outnumber the free cores waits for them: on 2 cores with one busy, converting a 256-px
image to float took 16 ms with 2 threads against 0.1 ms with one, and two benches with the default threads trained
at 8 s a step instead of 1.1 s. ``detkd train``/``distill`` and ``detkd bench`` warn before they start such runs.

The 1-minute load average is cheap but slow to fall: right after ``pip install`` or another run it still counts
work that has ended. Where it says the cores are full, the cores' busy time over half a second (``/proc/stat``,
Linux) decides; elsewhere the load average does.
"""

from __future__ import annotations

import os
import time

# Set by ``detkd bench`` for the runs it starts: it checked the cores for all of them, and a run starting as another
# ends would see the ended run in the load average.
CORES_CHECKED = "DETKD_CORES_CHECKED"


def cpu_times() -> tuple[float, float] | None:
    """``(busy, total)`` time of all cores since boot, in clock ticks, from ``/proc/stat``; None where there is none."""
    try:
        with open("/proc/stat") as f:
            ticks = [float(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    if len(ticks) < 4:
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0.0)
    return sum(ticks) - idle, sum(ticks)


def busy_cores(cores: int, window: float = 0.5) -> float | None:
    """How many of ``cores`` were busy over the next ``window`` seconds (this process sleeps through it)."""
    first = cpu_times()
    if first is None:
        return None
    time.sleep(window)
    second = cpu_times()
    if second is None or second[1] <= first[1]:
        return None
    return cores * (second[0] - first[0]) / (second[1] - first[1])


def crowded(threads: int, load: float | None = None, cores: int | None = None) -> tuple[float, int, int] | None:
    """``(load, cores, free)`` when ``threads`` more busy threads would outnumber the cores, else None.

    ``load`` is how many cores other work keeps busy: when None, the 1-minute load average and, where that says the
    cores are full, :func:`busy_cores` (None comes back where the platform has neither). ``cores`` is the core
    count (default: this machine's); ``free`` the number of cores the load leaves, at least 1. Half a core of slack
    keeps a briefly busy machine from warning.
    """
    cores = cores or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this platform
            return None
        if load + threads > cores + 0.5:  # the average may still count work that has ended: look at the cores now
            now = busy_cores(cores)
            load = load if now is None else now
    if load + threads <= cores + 0.5:
        return None
    return load, cores, max(1, int(cores - load + 0.5))


def thread_warning(threads: int, load: float | None = None, cores: int | None = None) -> str | None:
    """The warning ``detkd train``/``distill`` log when their ``threads`` CPU threads would share busy cores."""
    found = crowded(threads, load, cores)
    if found is None:
        return None
    load, cores, free = found
    return (
        f"the machine's load is {load:.1f} on {cores} cores before this run starts, and it trains with {threads} "
        f"CPU thread(s): threads that share busy cores train several times slower. Pass --threads {free} "
        "(train.threads), or stop the other work"
    )
