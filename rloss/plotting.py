"""Training curves as one figure: a panel per quantity (loss, lr on a log scale, the train and test
outputs) against iteration, with the runs of several logs overlaid, each in its own colour and named
by its log in the legends. matplotlib is optional (`pip install rloss[plot]`); it is imported only
here, without pyplot, so drawing touches no global state and needs no display."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

from rloss.errors import LogError
from rloss.training_log import LR, Run, quantity_order

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PANEL_INCHES = (6.0, 3.0)  # width, height of one panel
COLUMNS = 2
DPI = 100
MARKED_POINTS = 30  # series of at most this many points show their points (a few test results)

Logs = Sequence[tuple[str, Sequence[Run]]]  # (label, its runs)


def figure_inches(panels: int) -> tuple[float, float]:
    """The figure's size for `panels` panels, COLUMNS to a row."""
    columns = min(COLUMNS, panels)
    return PANEL_INCHES[0] * columns, PANEL_INCHES[1] * math.ceil(panels / columns)


def series_label(label: str, run: int, runs: int) -> str:
    """A log's name, and the run's number (from 1) when the log holds several."""
    return label if runs == 1 else f"{label} (run {run})"


def draw(logs: Logs) -> Figure:
    """The figure of `logs`' curves."""
    figure_class = _figure_class()
    curves = [(series_label(label, k, len(runs)), run.series())
              for label, runs in logs for k, run in enumerate(runs, start=1)]
    quantities = sorted(dict.fromkeys(q for _, series in curves for q in series), key=quantity_order)
    figure = figure_class(figsize=figure_inches(len(quantities)), dpi=DPI, layout="constrained")
    columns = min(COLUMNS, len(quantities))
    panels = figure.subplots(math.ceil(len(quantities) / columns), columns, squeeze=False).ravel()
    for axes in panels[len(quantities):]:
        axes.set_visible(False)
    for axes, quantity in zip(panels, quantities):
        for colour, (label, series) in enumerate(curves):
            if quantity in series:
                iterations, values = series[quantity]
                axes.plot(iterations, values, color=f"C{colour % 10}", label=label,
                          marker="o" if len(values) <= MARKED_POINTS else None, markersize=3)
        if quantity == LR:
            axes.set_yscale("log")
        axes.set_title(quantity)
        axes.set_xlabel("iteration")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="small")
    return figure


def render(figure: Figure, path: Union[str, Path]) -> bytes:
    """`figure` in the format that `path`'s name ends with (.png, .pdf, .svg, ...), made in memory so
    that nothing is written before everything to write is ready."""
    file_format = Path(path).suffix.lstrip(".").lower()
    formats = figure.canvas.get_supported_filetypes()
    if file_format not in formats:
        raise LogError(f"{path}: a figure cannot be written as '{Path(path).suffix}'; name it with one of "
                       + ", ".join(f".{name}" for name in sorted(formats)))
    data = io.BytesIO()
    figure.savefig(data, format=file_format)
    return data.getvalue()


def _figure_class() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise LogError("drawing training curves needs matplotlib: pip install rloss[plot] "
                       "(or pip install matplotlib)") from None
    return Figure
