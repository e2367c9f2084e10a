"""Peak memory of a run: its own, not the peak of the process that started it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detkd.engine.launch import peak_memory_mb


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_a_child_run_does_not_report_its_parents_peak():
    ballast = bytearray(1500 * 2**20)
    ballast[::4096] = b"\1" * len(range(0, len(ballast), 4096))  # touch every page: resident
    parent = peak_memory_mb(torch.device("cpu"))
    code = "import torch; from detkd.engine.launch import peak_memory_mb; print(peak_memory_mb(torch.device('cpu')))"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    del ballast
    assert parent > 1500
    assert 0 < child < parent - 1000
