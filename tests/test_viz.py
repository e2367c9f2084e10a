"""Report pictures that read: bars from zero, labels that do not overlap, a one-point curve with its value."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from detkd.viz import _labels_overlap, eval_curve, map_bar_chart  # noqa: E402


@pytest.fixture
def figures(monkeypatch):
    """The figures the functions draw, kept open for inspection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    monkeypatch.undo()
    for fig in kept:
        plt.close(fig)


def test_map_bars_start_at_zero_and_show_values(figures, tmp_path):
    path = map_bar_chart(["teacher", "baseline", "kd"], [0.49, 0.46, 0.48], [0.0, 0.004, 0.005], tmp_path / "m.png")
    assert path.stat().st_size > 0
    ax = figures[0].axes[0]
    assert ax.get_ylim()[0] == 0.0
    assert ax.get_ylim()[1] > 0.49 + 0.005
    written = {t.get_text() for t in ax.texts}
    assert {"0.490", "0.460", "0.480"} <= written


@pytest.mark.parametrize("count", [3, 12, 30])
def test_map_bar_labels_do_not_overlap(figures, tmp_path, count):
    names = [f"method_{i}+fitnet_long_suffix" for i in range(count)]
    map_bar_chart(names, [0.4] * count, [0.01] * count, tmp_path / "m.png", title="many rows")
    fig = figures[0]
    labels = fig.axes[0].get_xticklabels()
    assert len(labels) == count
    assert not _labels_overlap(fig, labels)


def test_overlap_check_sees_overlapping_labels(figures):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.set_xticks(range(10), ["a very long label"] * 10)
    assert _labels_overlap(fig, ax.get_xticklabels())
    figures.append(fig)


def test_eval_curve_with_one_point_is_a_labelled_point(figures, tmp_path):
    eval_curve([300], {"mAP": [0.43], "mAP@.5": [None]}, tmp_path / "e.png")
    ax = figures[0].axes[0]
    (line,) = ax.lines  # the undefined series is left out
    assert list(line.get_xdata()) == [300] and line.get_marker() == "o"
    assert [t.get_text() for t in ax.texts] == ["0.430"]
    lo, hi = ax.get_xlim()
    assert lo < 300 < hi and ax.get_ylim()[0] == 0.0
