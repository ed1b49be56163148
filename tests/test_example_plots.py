"""The monitor's plot (``EigenLogger.plot``/``plot_records``, drawn by
``examples/monitor_digits.py``): its artists, not its pixels.

A one-epoch run of the example (records from a real training loop) and
synthetic records over wide and narrow ranges go through
``plot_records(records, lr=lr)``; the tests check what the figure holds: the
panels, one line per top eigenvalue and the ``2 / lr`` line on the eigenvalue
axis, the trace on an axis of its own, legends outside the data areas and
readable tick labels.
"""

import importlib.util
from pathlib import Path

import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
pytest.importorskip("sklearn", reason="the example trains on scikit-learn's digits")

import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402

from curvext.monitor import plot_records  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def monitor_digits():
    return load_example("monitor_digits")


@pytest.fixture(scope="module")
def tiny_run(monitor_digits, tmp_path_factory):
    """One epoch of the example as a user runs it: (records, lr, image path)."""
    folder = tmp_path_factory.mktemp("monitor_digits")
    image = folder / "eigenvalues.png"
    lr = 0.5
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # as a user runs it (the tests default to float64)
    try:
        options = ["--epochs", "1", "--every", "4", "--lr", str(lr)]
        records = monitor_digits.main([str(image), "--log", str(folder / "r.jsonl"), *options])
    finally:
        torch.set_default_dtype(dtype)
    return records, lr, image


def synthetic_records(eig_low, eig_high, steps=20, top_k=4):
    """Records whose eigenvalues span [eig_low, eig_high], geometric over steps."""
    records = []
    for step in range(steps):
        top = eig_low * (eig_high / eig_low) ** (step / (steps - 1))
        eigvals = [top / 1.1**i for i in range(top_k)]
        records.append(
            {
                "step": 10 * step,
                "group": 0,
                "batch_size": 32,
                "loss": 1.0,
                "rank": 50,
                "trace": 3 * sum(eigvals),
                "top_eigvals": eigvals,
                "noise_scale": 2.0 + 300 * step,
            }
        )
    return records


def panels(figure):
    """The eigenvalue, trace and noise axes, found by their titles."""
    found = {}
    for ax in figure.axes:
        title = ax.get_title(loc="left").lower()
        for key in ("eigenvalues", "trace", "noise"):
            if key in title:
                assert key not in found, f"two axes titled with {key!r}"
                found[key] = ax
    return found


def visible_tick_labels(ax):
    low, high = sorted(ax.get_ylim())
    return [
        label.get_text()
        for label in ax.get_yticklabels()
        if label.get_visible() and label.get_text() and low <= label.get_position()[1] <= high
    ]


def check_figure(figure, records, lr):
    canvas = FigureCanvasAgg(figure)  # the example draws without pyplot
    canvas.draw()
    renderer = canvas.get_renderer()
    axes = panels(figure)
    assert set(axes) == {"eigenvalues", "trace", "noise"}
    assert len(figure.axes) == 3
    eig_ax, trace_ax = axes["eigenvalues"], axes["trace"]

    # one line per top eigenvalue, holding the records' values, largest first
    top_k = max(len(record["top_eigvals"]) for record in records)
    lines = eig_ax.get_lines()
    eig_lines = [line for line in lines if "lambda" in line.get_label()]
    assert len(eig_lines) == top_k
    for i, line in enumerate(eig_lines):
        assert list(line.get_xdata()) == [record["step"] for record in records]
        assert list(line.get_ydata()) == pytest.approx([r["top_eigvals"][i] for r in records])

    # the 2/lr stability limit: one horizontal line across the axis, labelled
    limits = [line for line in lines if line not in eig_lines]
    assert len(limits) == 1
    limit = limits[0]
    assert list(limit.get_ydata()) == pytest.approx([2 / lr, 2 / lr])
    assert list(limit.get_xdata()) == [0, 1]  # axes coordinates: the full width
    assert "2 / lr" in limit.get_label()
    low, high = eig_ax.get_ylim()
    assert low < 2 / lr < high

    # the trace is on its own axis, not on the eigenvalue axis
    traces = [record["trace"] for record in records]
    assert trace_ax is not eig_ax
    assert trace_ax.get_shared_x_axes().joined(trace_ax, eig_ax)
    assert any(list(line.get_ydata()) == pytest.approx(traces) for line in trace_ax.get_lines())
    for line in lines:
        assert list(line.get_ydata()) != pytest.approx(traces)
    assert trace_ax.get_ylabel() and trace_ax.get_ylabel() != eig_ax.get_ylabel()

    # legends: every curve of the eigenvalue axis named, none over a data area
    legend = eig_ax.get_legend()
    assert legend is not None
    texts = [text.get_text() for text in legend.get_texts()]
    assert len(texts) == top_k + 1 and any("2 / lr" in text for text in texts)
    figure_box = figure.bbox
    for ax in figure.axes:
        if ax.get_legend() is None:
            continue
        box = ax.get_legend().get_window_extent(renderer)
        for other in figure.axes:
            assert not box.overlaps(other.get_window_extent(renderer)), ax.get_title(loc="left")
        # drawn inside the image, not cut off
        assert figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1 + 0.5
        assert figure_box.y0 <= box.y0 and box.y1 <= figure_box.y1 + 0.5

    # readable ticks: at least three labels on every y axis (log or linear)
    for ax in figure.axes:
        labels = visible_tick_labels(ax)
        assert len(labels) >= 3, (ax.get_title(loc="left"), ax.get_yscale(), labels)

    # labels and titles
    for ax in figure.axes:
        assert ax.get_ylabel()
    assert "step" in figure.axes[-1].get_xlabel()
    assert figure.get_suptitle()


def test_plot_of_a_one_epoch_run(tiny_run, monitor_digits):
    records, lr, image = tiny_run
    assert image.stat().st_size > 0  # main() wrote the image
    assert len(records) == 6  # 24 steps of 64 samples, every 4th logged
    figure = plot_records(records, lr=lr)
    check_figure(figure, records, lr)


@pytest.mark.parametrize(
    "eig_low, eig_high, lr, scale",
    [(1e-3, 50.0, 0.1, "log"), (1.0, 1.4, 1.6, "linear")],
    ids=["wide-range", "narrow-range"],
)
def test_plot_scales(eig_low, eig_high, lr, scale):
    records = synthetic_records(eig_low, eig_high)
    figure = plot_records(records, lr=lr)
    check_figure(figure, records, lr)
    axes = panels(figure)
    assert axes["eigenvalues"].get_yscale() == scale
    assert axes["noise"].get_yscale() == "log"  # 2 to 5702 samples


def test_plot_from_a_log_file(tiny_run, monitor_digits):
    """Records read back from the JSON-lines file plot the same."""
    from curvext.monitor import EigenLogger

    records, lr, image = tiny_run
    read = EigenLogger.read(image.with_name("r.jsonl"))
    for mine, theirs in zip(read, records, strict=True):
        assert mine["top_eigvals"] == pytest.approx(theirs["top_eigvals"])
    check_figure(plot_records(read, lr=lr), read, lr)


def test_plot_arguments_are_checked():
    records = synthetic_records(1.0, 50.0)
    with pytest.raises(ValueError, match=r"lr=0.*pass a number > 0"):
        plot_records(records, lr=0)
    with pytest.raises(ValueError, match=r"average=0.*int >= 1"):
        plot_records(records, lr=0.1, average=0)


def test_a_nan_noise_scale_leaves_the_running_mean_of_the_others():
    """A logged batch of one sample has no noise scale (NaN); the running mean
    of the others goes on."""
    records = synthetic_records(1.0, 50.0, steps=8)
    records[3]["noise_scale"] = float("nan")
    axes = panels(plot_records(records, lr=0.1, average=3))
    running = [line for line in axes["noise"].get_lines() if "mean" in line.get_label()][0]
    values = list(running.get_ydata())
    expected = [r["noise_scale"] for r in records]
    assert values[4] == pytest.approx((expected[2] + expected[4]) / 2)
    assert all(v == v for v in values)  # no NaN
