"""Whether a process's CPU threads fit the cores that other work leaves free.

A CPU op whose threads outnumber the free cores waits for them: on 2 cores with one busy, converting a 256-px
image to float took 16 ms with 2 threads against 0.1 ms with one, and two benches with the default threads trained
at 8 s a step instead of 1.1 s. ``detkd train``/``distill`` and ``detkd bench`` warn before they start such runs.
"""

from __future__ import annotations

import os

# Set by ``detkd bench`` for the runs it starts: it checked the cores for all of them, and a run starting as another
# ends would see the ended run in the load average.
CORES_CHECKED = "DETKD_CORES_CHECKED"


def crowded(threads: int, load: float | None = None, cores: int | None = None) -> tuple[float, int, int] | None:
    """``(load, cores, free)`` when ``threads`` more busy threads would outnumber the cores, else None.

    ``load`` is the machine's 1-minute load average (read when None; None comes back where the platform has none),
    ``cores`` its core count (default: this machine's); ``free`` is the number of cores the load leaves, at least 1.
    Half a core of slack keeps a briefly busy machine from warning.
    """
    cores = cores or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this platform
            return None
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
