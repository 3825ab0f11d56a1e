"""The house style of every figure metaopt writes, and a check that a figure keeps to it.

Figures are meant to go on a slide as they are:

- fonts readable at slide size; a title and a subtitle that says what is plotted (the metric, the interval,
  how many tasks or seeds);
- the Okabe-Ito palette (colour-blind safe), a marker per series as well as a colour; in-context (implicit)
  learners solid, explicit learners dashed; a series that would hide under an identical one is drawn with
  larger hollow markers and says so in the legend ("= other");
- honest axes: values beyond a clipped range are drawn as a triangle at the edge with the value printed; a
  log axis only when the data span more than a decade; integer ticks for counts (k, steps);
- 95% bands as light fills with thin edge lines; a series of one point is a marker with its error bar;
- reference lines (chance for classification, k = d for regression, a horizon) in grey, named in the legend;
- the legend outside the data, on the right or below.

Figures are built with the object API (:class:`matplotlib.figure.Figure`), never pyplot's global state, and
matplotlib is imported inside the functions (``import metaopt`` does not load it). :func:`save` writes a figure;
with the environment variable ``METAOPT_CHECK_FIGURES=1`` (the test suite sets it) it first runs
:func:`check_figure`, which raises :class:`FigureStyleError` naming what a figure gets wrong.
"""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

if TYPE_CHECKING:  # matplotlib is imported lazily where it is used
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

__all__ = [
    "CHECK_ENV", "ERROR_CLIP", "K_LABEL", "MARKERS", "PALETTE", "REFERENCE_COLOUR", "FigureStyleError", "Series",
    "band_word", "bars", "chance_label", "chance_line", "check_figure", "choose_scale", "colorbar", "finish",
    "heatmap", "integer_ticks", "learner_note", "new_figure", "plot_series", "plot_vs_k", "reference_line",
    "same_y_range", "save", "series_style", "symmetric_norm",
]

CHECK_ENV = "METAOPT_CHECK_FIGURES"
"""With this environment variable set to ``1``, :func:`save` checks every figure before writing it."""

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#000000", "#882255", "#999933")
"""Okabe & Ito (2008), colour-blind safe, less its yellow (too faint on white), then Tol's wine and olive."""
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
"""One per series, cycled at a different period than the palette so (colour, marker) pairs stay unique."""
REFERENCE_COLOUR = "#555555"

TICK_SIZE, LABEL_SIZE, LEGEND_SIZE, TITLE_SIZE, SUBTITLE_SIZE, NOTE_SIZE = 11, 12.5, 11, 14, 11, 9.5
MIN_FONT_SIZE = 8.0
MAX_WIDTH = 18.0
"""Widest figure in inches that :func:`check_figure` accepts (wider ones shrink below readable on a slide)."""
AUTO_RIGHT_WIDTH = 13.0
"""Widest figure in inches, legend included, that gets its legend on the right (else below)."""
BAND_ALPHA = 0.13
ERROR_CLIP = 1.25
"""Normalised error above this (worse than predicting zero by a quarter) is drawn at the edge, value printed."""
K_LABEL = "in-context / support examples k"
MAX_MARKERS = 14
"""A long series shows at most about this many markers (every n-th point)."""

_TITLE, _SUBTITLE, _CLIPPED, _REFERENCE, _CHANCE = (
    "metaopt-title", "metaopt-subtitle", "metaopt-clipped", "metaopt-reference", "metaopt-chance")
_DIVERGING = {"RdBu", "RdBu_r", "coolwarm", "bwr", "seismic", "PuOr", "PuOr_r", "BrBG", "BrBG_r", "PiYG",
              "PRGn", "RdYlBu", "RdYlBu_r", "Spectral", "RdGy", "vlag", "icefire"}


class FigureStyleError(ValueError):
    """A figure that breaks the house style (:func:`check_figure` lists every problem)."""


@dataclass(frozen=True)
class Series:
    """One line of a plot: ``y`` over ``x``, with an optional band ``[low, high]`` (a 95% interval).

    ``implicit``: True for an in-context learner (solid), False for an explicit one (dashed), None for a
    series that is neither (solid).
    """

    name: str
    x: Sequence[float]
    y: Sequence[float]
    low: Sequence[float] | None = None
    high: Sequence[float] | None = None
    implicit: bool | None = None


def series_style(index: int) -> dict[str, str]:
    """The colour and marker of the ``index``-th series of a figure."""
    return {"color": PALETTE[index % len(PALETTE)], "marker": MARKERS[index % len(MARKERS)]}


# ---------------------------------------------------------------------- figures and axes
def new_figure(ncols: int = 1, nrows: int = 1, *, panel: tuple[float, float] = (6.4, 4.2),
               sharex: bool | str = False, sharey: bool | str = False) -> tuple["Figure", list["Axes"]]:
    """A figure of ``nrows × ncols`` panels of ``panel`` inches each (constrained layout); its axes, row by row.

    ``sharex``/``sharey`` as in matplotlib's ``subplots`` (True, ``"row"``, ``"col"``). Panels that each set their
    y range (:func:`plot_series` does) share it through :func:`same_y_range` instead of ``sharey``.
    """
    from matplotlib.figure import Figure

    if ncols < 1 or nrows < 1:
        raise ValueError(f"new_figure: ncols and nrows must be >= 1; got ncols={ncols!r}, nrows={nrows!r}")
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    grid = fig.subplots(nrows, ncols, sharex=sharex, sharey=sharey, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes:
        ax.tick_params(labelsize=TICK_SIZE)
        ax.grid(alpha=0.25, lw=0.6)
        ax.spines[["top", "right"]].set_visible(False)
        ax.xaxis.label.set_size(LABEL_SIZE)
        ax.yaxis.label.set_size(LABEL_SIZE)
        ax.title.set_size(LABEL_SIZE)
    return fig, axes


def integer_ticks(ax: "Axes", values: Iterable[float] | None = None, axis: str = "x") -> None:
    """Integer ticks on ``axis``: at ``values`` when there are at most 12 of them, else at round integers."""
    from matplotlib.ticker import MaxNLocator

    target = ax.xaxis if axis == "x" else ax.yaxis
    values = sorted(set(values or ()))
    if values and len(values) <= 12 and all(float(v).is_integer() for v in values):
        target.set_ticks([int(v) for v in values])
    else:
        target.set_major_locator(MaxNLocator(integer=True))


def choose_scale(values: Iterable[float]) -> str:
    """``"log"`` when the finite values are all positive and span more than a decade, else ``"linear"``."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 10:
        return "log"
    return "linear"


def _finite(values: Iterable[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _same(a: Series, b: Series) -> bool:
    """Whether two series would be drawn on top of each other (same x; y equal to 0.1% of their scale)."""
    if list(a.x) != list(b.x) or len(a.y) != len(b.y):
        return False
    scale = max([abs(v) for v in _finite([*a.y, *b.y])] or [1.0]) or 1.0
    return all((u is None and v is None) or (u is not None and v is not None and
               (u == v or (math.isfinite(u) and math.isfinite(v) and abs(u - v) <= 1e-3 * scale)))
               for u, v in zip(a.y, b.y))


def plot_series(ax: "Axes", series: Sequence[Series], *, start: int = 0, clip_above: float | None = None,
                clip_below: float | None = None, floor: float | None = None, yscale: str = "linear",
                integer_x: bool = False, lw: float = 2.0, include: Sequence[float] = (),
                styles: Sequence[int] | None = None) -> None:
    """Draw ``series`` on ``ax`` in the house style (the ``start``-th style onwards, or the ``styles``-th: a
    series keeps its colour and marker across panels).

    ``clip_above``/``clip_below``: the axis stops there when the data go beyond it, and each point beyond is a
    triangle at the edge with its value printed. ``floor``: the lowest the axis goes (e.g. 0 for an error).
    ``yscale``: ``"linear"``, ``"log"``, or ``"auto"`` (log when the data span more than a decade).
    ``include``: values the y range must show as well (a reference line's).
    """
    if yscale not in ("linear", "log", "auto"):
        raise ValueError(f"plot_series: yscale must be 'linear', 'log' or 'auto'; got {yscale!r}")
    if styles is not None and len(styles) != len(series):
        raise ValueError(f"plot_series: styles has {len(styles)} entries for {len(series)} series")
    indices = list(styles) if styles is not None else [start + offset for offset in range(len(series))]
    drawn: list[Series] = []
    values = []
    xs = [float(v) for s in series for v in s.x]
    width = 0.06 * ((max(xs) - min(xs)) if xs and max(xs) > min(xs) else 1.0)
    singles: dict[float, list[int]] = {}  # single points at the same x are set side by side
    for offset, s in enumerate(series):
        if len(s.x) == 1:
            singles.setdefault(float(s.x[0]), []).append(offset)
    for offset, s in enumerate(series):
        if len(s.x) != len(s.y):
            raise ValueError(f"plot_series: series {s.name!r} has {len(s.x)} x values but {len(s.y)} y values")
        style = series_style(indices[offset])
        twin = next((other for other in drawn if _same(s, other)), None)
        label = s.name if twin is None else f"{s.name} (= {twin.name})"
        line_style = "--" if s.implicit is False else "-"
        marker = {"marker": style["marker"], "markersize": 6.5, "markeredgecolor": "white", "markeredgewidth": 0.7}
        if twin is not None:  # drawn over its twin: larger hollow markers, so both stay visible
            marker = {"marker": style["marker"], "markersize": 11, "markerfacecolor": "none",
                      "markeredgecolor": style["color"], "markeredgewidth": 1.8}
        zorder = 3 + offset * 0.01 + (1 if twin is not None else 0)
        x, y = list(s.x), [math.nan if v is None else float(v) for v in s.y]
        if len(x) == 1:  # one point: a marker with its error bar, not an invisible line; explicit learners hollow
            group = singles[float(x[0])]
            x = [x[0] + (group.index(offset) - (len(group) - 1) / 2) * width]
            if s.implicit is False and twin is None:
                marker = {**marker, "markerfacecolor": "white", "markeredgecolor": style["color"],
                          "markeredgewidth": 1.8}
            if s.low is not None and s.high is not None:
                err = [[max(0.0, y[0] - s.low[0])], [max(0.0, s.high[0] - y[0])]]
                ax.errorbar(x, y, yerr=err, fmt="none", ecolor=style["color"], elinewidth=1.6, capsize=5,
                            capthick=1.6, zorder=zorder)
            ax.plot(x, y, linestyle="none", color=style["color"], label=label, zorder=zorder + 0.1,
                    **{**marker, "markersize": marker["markersize"] + 2})
        else:
            every = max(1, math.ceil(len(x) / MAX_MARKERS))
            ax.plot(x, y, linestyle=line_style, color=style["color"], lw=lw, label=label, zorder=zorder,
                    markevery=every, **marker)
            if s.low is not None and s.high is not None:
                low, high = [float(v) for v in s.low], [float(v) for v in s.high]
                ax.fill_between(x, low, high, color=style["color"], alpha=BAND_ALPHA, lw=0, zorder=1)
                for edge in (low, high):
                    ax.plot(x, edge, color=style["color"], lw=0.7, alpha=0.55, linestyle=line_style, zorder=1.5,
                            label="_band")
        values += _finite(y) + _finite(s.low or []) + _finite(s.high or [])
        drawn.append(s)
    if xs and max(xs) == min(xs):  # every point at one x: a narrow window around it
        reach = max(0.5, width * len(series) / 2 + 0.2)
        ax.set_xlim(xs[0] - reach, xs[0] + reach)
    if integer_x:
        integer_ticks(ax, [v for s in series for v in s.x])
    scale = choose_scale(values) if yscale == "auto" else yscale
    ax.set_yscale(scale)
    _clip(ax, series, values + _finite(include), clip_above, clip_below, floor, scale, indices)


def same_y_range(axes: Sequence["Axes"]) -> None:
    """Give ``axes`` one y range, the union of theirs (when they share a scale), so panels compare at a glance.

    Marks of clipped values stay right: a panel's own range lies inside the union, and the union stops at the
    highest clipping edge of any panel.
    """
    if len({ax.get_yscale() for ax in axes}) != 1:
        return
    low = min(min(ax.get_ylim()) for ax in axes)
    high = max(max(ax.get_ylim()) for ax in axes)
    for ax in axes:
        ax.set_ylim(low, high)


def band_word(series: Sequence[Series]) -> str:
    """``"error bars"`` when every series is a single point, else ``"bands"`` (how intervals are drawn)."""
    return "error bars" if series and all(len(s.x) == 1 for s in series) else "bands"


def learner_note(series: Sequence[Series]) -> str:
    """What the line styles of ``series`` mean, for a subtitle: solid in-context learners, dashed explicit ones
    (filled and hollow markers when every series is a single point)."""
    kinds = {s.implicit for s in series}
    points = bool(series) and all(len(s.x) == 1 for s in series)
    implicit, explicit = ("filled", "hollow markers") if points else ("solid", "dashed")
    if True in kinds and False in kinds:
        return f"{implicit}: in-context (implicit) learners, {explicit}: explicit learners"
    if kinds == {False}:
        return f"all explicit learners ({explicit})"
    return f"all in-context (implicit) learners ({implicit})" if kinds == {True} else ""


def chance_label(value: float) -> str:
    """``"chance (1/N)"`` when ``value`` is 1/N, else the majority label's share."""
    ways = round(1 / value) if value > 0 else 0
    if ways and math.isclose(value, 1 / ways, rel_tol=1e-6):
        return f"chance (1/{ways})"
    return f"chance (majority label, {value:.2f})"


def plot_vs_k(ax: "Axes", series: Sequence[Series], metric: str, *, chance: float | None = None,
              dimension: int | None = None, styles: Sequence[int] | None = None) -> None:
    """A metric against the support size k: integer ticks, the metric's axis (normalised error from 0, clipped
    at :data:`ERROR_CLIP` with the values beyond printed; accuracy with its chance line; other metrics on a log
    axis when they span more than a decade) and a line at k = d where the input dimension d is known."""
    include = [] if chance is None else [chance]
    if metric == "normalized_error":
        plot_series(ax, series, styles=styles, floor=0.0, clip_above=ERROR_CLIP, integer_x=True)
    elif metric == "accuracy":
        plot_series(ax, series, styles=styles, integer_x=True, include=include)
    else:
        plot_series(ax, series, styles=styles, yscale="auto", integer_x=True)
    if chance is not None:
        chance_line(ax, chance, chance_label(chance))
    ks = [k for s in series for k in s.x]
    if dimension is not None and ks and min(ks) <= dimension <= max(ks):
        reference_line(ax, x=dimension, label=f"k = d = {dimension}")
    ax.set_xlabel(K_LABEL)
    ax.set_ylabel(metric.replace("_", " "))


def _clip(ax: "Axes", series: Sequence[Series], values: list[float], above: float | None, below: float | None,
          floor: float | None, scale: str, indices: Sequence[int]) -> None:
    """Set the y range (``floor`` up, stopping at ``above``/``below``) and mark the points beyond it."""
    from matplotlib.transforms import offset_copy

    if not values:
        return
    low, high = min(values), max(values)
    top = above if above is not None and high > above else None
    bottom = below if below is not None and low < below else None
    if scale == "linear":
        span = (high if top is None else top) - (low if bottom is None else bottom) or abs(high) * 0.5 or 1.0
        lo = bottom if bottom is not None else (floor if floor is not None and floor <= low else low - 0.05 * span)
        hi = top if top is not None else high + 0.05 * span
        ax.set_ylim(lo, hi)
    elif top is not None or bottom is not None:
        ax.set_ylim(bottom, top)
    beyond = []  # (x, y, edge marker, colour) of every point past an edge
    for offset, s in enumerate(series):
        colour = series_style(indices[offset])["color"]
        for x, y in zip(s.x, s.y):
            if y is not None and math.isfinite(y):
                if top is not None and y > top:
                    beyond.append((x, y, "^", colour))
                elif bottom is not None and y < bottom:
                    beyond.append((x, y, "v", colour))
    base = ax.get_xaxis_transform()
    for (x, marker) in dict.fromkeys((x, m) for x, _, m, _ in beyond):
        here = [(y, colour) for bx, y, m, colour in beyond if (bx, m) == (x, marker)]
        values_here: dict[str, str] = {}
        for y, colour in here:  # a twin's value once, in the colour of the first series with it
            values_here.setdefault(f"{y:.3g}", colour)
        edge = 1.0 if marker == "^" else 0.0
        sign = -1 if marker == "^" else 1
        for j, (_, colour) in enumerate(here):  # side by side at the edge
            shifted = offset_copy(base, fig=ax.figure, x=(j - (len(here) - 1) / 2) * 9, y=0, units="points")
            ax.plot([x], [edge], marker=marker, markersize=9, color=colour, transform=shifted, clip_on=False,
                    linestyle="none", zorder=6, gid=_CLIPPED, label="_clipped")
        for j, (text, colour) in enumerate(values_here.items()):  # stacked inside the axes
            ax.annotate(text, (x, edge), xycoords=base, xytext=(0, sign * (11 + 12 * j)), textcoords="offset points",
                        ha="center", va="top" if sign < 0 else "bottom", fontsize=NOTE_SIZE, color=colour, zorder=6,
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.6})


def reference_line(ax: "Axes", *, x: float | None = None, y: float | None = None, label: str,
                   style: str = ":", gid: str = _REFERENCE) -> None:
    """A grey reference line at ``x`` (vertical) or ``y`` (horizontal), named ``label`` in the legend."""
    if (x is None) == (y is None):
        raise ValueError("reference_line: give exactly one of x (a vertical line) or y (a horizontal one)")
    kwargs = {"color": REFERENCE_COLOUR, "linestyle": style, "lw": 1.4, "label": label, "zorder": 2, "gid": gid}
    if x is not None:
        ax.axvline(x, **kwargs)
    else:
        ax.axhline(y, **kwargs)


def chance_line(ax: "Axes", value: float | Sequence[float], label: str | None = None, *,
                x: Sequence[float] | None = None) -> None:
    """The accuracy of guessing (1/ways, or the majority label's share) as a grey dash-dot line: flat at ``value``,
    or stepping through the values ``value`` at ``x`` (a chance that changes, e.g. as classes accumulate)."""
    if x is None:
        reference_line(ax, y=float(value), label=label or chance_label(float(value)), style="-.", gid=_CHANCE)
        return
    values = [float(v) for v in value]
    if len(values) != len(x):
        raise ValueError(f"chance_line: {len(values)} chance values for {len(x)} x values")
    if label is None:
        label = chance_label(values[0]) if len(set(values)) == 1 else "chance"
    ax.plot(list(x), values, color=REFERENCE_COLOUR, linestyle="-.", lw=1.4, drawstyle="steps-mid", label=label,
            gid=_CHANCE, zorder=2)


def bars(ax: "Axes", groups: Sequence[str], series: dict[str, Sequence[float]], *, errors: dict[str, Any] | None = None,
         annotate: bool = True, chance: Sequence[float] | None = None) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per series (colour and hatch), values printed;
    ``chance`` (one value per group) draws each group's accuracy of guessing across its bars."""
    hatches = ("", "//", "..", "xx", "\\\\", "oo")
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        positions = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        container = ax.bar(positions, values, width * 0.95, color=series_style(i)["color"], label=name,
                           hatch=hatches[i % len(hatches)], edgecolor="white", lw=0.6,
                           yerr=None if errors is None else errors.get(name), capsize=4, zorder=3)
        if annotate:
            ax.bar_label(container, fmt="%.3g", fontsize=NOTE_SIZE, padding=2)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.grid(axis="x", visible=False)
    for g, value in enumerate(chance or []):
        ax.plot([g - 0.45, g + 0.45], [value, value], color=REFERENCE_COLOUR, linestyle="-.", lw=1.6, zorder=4,
                gid=_CHANCE, label=chance_label(value) if len(set(chance)) == 1 else "chance (1/classes)")


# ---------------------------------------------------------------------- heat maps
def symmetric_norm(values: Iterable[float], centre: float = 0.0):
    """A colour norm symmetric about ``centre`` covering every finite value (one range for every panel)."""
    from matplotlib.colors import Normalize

    finite = _finite(values)
    reach = max([abs(v - centre) for v in finite] or [1.0]) or 1.0
    return Normalize(vmin=centre - reach, vmax=centre + reach)


def heatmap(ax: "Axes", values, *, cmap: str = "viridis", norm=None, vmin: float | None = None,
            vmax: float | None = None, xlabels: Sequence[str] | None = None, ylabels: Sequence[str] | None = None,
            annotate: bool = False, fmt: str = "{:.2f}") -> "AxesImage":
    """``values`` (rows × columns) as an image (colours by ``norm``, or from ``vmin`` to ``vmax``); ``annotate``
    prints each finite cell's value in a colour readable on it."""
    import numpy as np

    array = np.asarray(values, dtype=float)
    limits = {} if norm is not None else {"vmin": vmin, "vmax": vmax}
    image = ax.imshow(array, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest", **limits)
    ax.grid(False)
    if xlabels is not None:
        ax.set_xticks(range(array.shape[1]), list(xlabels))
    if ylabels is not None:
        ax.set_yticks(range(array.shape[0]), list(ylabels))
    if annotate:
        for (r, c), v in np.ndenumerate(array):
            if math.isfinite(v):
                red, green, blue, _ = image.cmap(image.norm(v))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.55
                ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=NOTE_SIZE + 0.5,
                        color="white" if dark else "black")
    return image


def colorbar(fig: "Figure", image: "AxesImage", axes: "Axes | Sequence[Axes]", label: str):
    """One labelled colour bar for ``axes`` (all drawn with ``image``'s norm and colormap)."""
    bar = fig.colorbar(image, ax=axes, shrink=0.9, pad=0.02)
    bar.set_label(label, size=LABEL_SIZE)
    bar.ax.tick_params(labelsize=TICK_SIZE)
    return bar


# ---------------------------------------------------------------------- titles and legends
def _legend_entries(fig: "Figure") -> tuple[list, list[str]]:
    handles, labels = [], []
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    return handles, labels


def finish(fig: "Figure", title: str, subtitle: str, *, legend: str = "auto", handles: Sequence | None = None,
           labels: Sequence[str] | None = None, ncol: int | None = None) -> "Figure":
    """Add the title, the subtitle (wrapped to the figure's width) and one legend outside the data.

    ``legend``: ``"right"``, ``"below"``, ``"none"``, or ``"auto"`` (on the right while the figure stays within
    :data:`AUTO_RIGHT_WIDTH`, else below). The legend gathers every labelled artist of every panel (each label once), or shows
    ``handles``/``labels`` when given. A note on clipped values joins the subtitle.
    """
    if legend not in ("auto", "right", "below", "none"):
        raise ValueError(f"finish: legend must be 'auto', 'right', 'below' or 'none'; got {legend!r}")
    if not title or not subtitle:
        raise ValueError("finish: a figure needs a title and a subtitle saying what is plotted")
    marks = "".join(sorted({line.get_marker() for ax in fig.axes for line in ax.lines if line.get_gid() == _CLIPPED},
                           reverse=True)).replace("^", "▲").replace("v", "▼")
    if marks:
        subtitle += f" · {marks}: beyond the axis (value printed)"
    width, height = fig.get_size_inches()
    if handles is None:
        handles, labels = _legend_entries(fig)
    labels = list(labels or [])
    if legend != "none" and handles:
        entry = 0.9 + max(len(label) for label in labels) * LEGEND_SIZE * 0.5 / 72  # inches per legend column
        if legend == "auto":
            legend = "right" if width + entry <= AUTO_RIGHT_WIDTH else "below"
        if legend == "right":
            width += entry
            columns = ncol or 1
        else:
            columns = ncol or max(1, min(len(labels), int(width // entry)))
            height += 0.35 * math.ceil(len(labels) / columns) + 0.2
        fig.set_size_inches(width, height)
        options = {"ncol": columns, "frameon": False, "fontsize": LEGEND_SIZE, "handlelength": 2.6}
        if legend == "right":  # beside the top-right panel: the layout keeps it clear of the title
            panels = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is None]
            corner = max(panels, key=lambda ax: (ax.get_position().y1, ax.get_position().x1))
            corner.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, **options)
        else:
            fig.legend(handles, labels, loc="outside lower center", **options)
    lines = textwrap.wrap(subtitle, width=max(40, int(width * 72 / (SUBTITLE_SIZE * 0.52))))
    header = 0.12 + TITLE_SIZE / 72 * 1.35 + len(lines) * SUBTITLE_SIZE / 72 * 1.3 + 0.1
    fig.set_size_inches(width, height + header)
    fig.get_layout_engine().set(rect=(0, 0, 1, 1 - header / (height + header)))
    top = 1 - 0.08 / (height + header)
    fig.text(0.5, top, title, ha="center", va="top", fontsize=TITLE_SIZE, fontweight="bold", gid=_TITLE)
    fig.text(0.5, top - TITLE_SIZE / 72 * 1.35 / (height + header), "\n".join(lines), ha="center", va="top",
             fontsize=SUBTITLE_SIZE, color="#333333", gid=_SUBTITLE, linespacing=1.3)
    return fig


# ---------------------------------------------------------------------- saving and checking
def save(fig: "Figure", path: str | os.PathLike, *, dpi: int = 150) -> Path:
    """Write ``fig`` as a PNG, then check it when ``METAOPT_CHECK_FIGURES=1`` (on the layout the writing drew, so
    the check draws nothing again); returns the path."""
    path = Path(path)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
    if os.environ.get(CHECK_ENV) == "1":
        check_figure(fig, drawn=True)
    return path


def _is_data(artist, ax: "Axes") -> bool:
    return artist.get_transform() == ax.transData


def _series_lines(ax: "Axes") -> list:
    """The labelled lines drawn in data coordinates (the series, not bands, references or markers of clipping)."""
    return [line for line in ax.lines if not line.get_label().startswith("_") and _is_data(line, ax)
            and line.get_gid() not in (_CLIPPED, _REFERENCE, _CHANCE)]


def _has_data(ax: "Axes") -> bool:
    import numpy as np

    for line in ax.lines:
        y = np.asarray(line.get_ydata(), dtype=float)
        if _is_data(line, ax) and np.isfinite(y).any():
            return True
    return bool(ax.images or ax.patches or [c for c in ax.collections if len(c.get_paths()) or c.get_offsets().size])


def _labelled(ax: "Axes", axis: str) -> bool:
    """Whether ``ax`` or an axes sharing its ``axis`` has a label on it."""
    shared = ax.get_shared_x_axes() if axis == "x" else ax.get_shared_y_axes()
    siblings = shared.get_siblings(ax)
    return any((a.get_xlabel() if axis == "x" else a.get_ylabel()).strip() for a in siblings)


def check_figure(fig: "Figure", *, drawn: bool = False) -> None:
    """Raise :class:`FigureStyleError` listing every way ``fig`` breaks the house style.

    Checked: a title and a subtitle; no empty panel; both axes labelled (on the panel or a panel sharing it);
    every labelled series in a legend, with a visible point, distinct in colour/marker/line style from the others
    of its panel, a marker when it has one point; data beyond the y range marked as clipped; a log axis only over
    more than a decade; integer ticks where x holds integers only; legends outside the panels; fonts of at least
    8 pt and a figure at most 18 in wide; diverging colour maps centred and every image with a labelled colour
    bar (or sharing the norm of one that has it).
    """
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    problems: list[str] = []
    from matplotlib.text import Text

    if not drawn:  # lay it out as saving would (``drawn``: it was saved, so laid out, already)
        fig.draw_without_rendering()
    texts = {t.get_gid(): t.get_text() for t in fig.texts}
    if not texts.get(_TITLE, "").strip():
        problems.append("no title (plotting.finish adds one)")
    if not texts.get(_SUBTITLE, "").strip():
        problems.append("no subtitle saying what is plotted (plotting.finish adds one)")
    width = fig.get_size_inches()[0]
    if width > MAX_WIDTH:
        problems.append(f"{width:.1f} in wide; at most {MAX_WIDTH} in stays readable on a slide")
    colorbar_axes = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]
    panels = [ax for ax in fig.axes if ax not in colorbar_axes and ax.get_visible() and ax.axison]
    legend_labels = set()
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    for legend in legends:
        legend_labels |= {t.get_text() for t in legend.get_texts()}
        box = legend.get_window_extent()
        for ax in panels:
            overlap = box.intersection(box, ax.get_window_extent())
            if overlap is not None and overlap.width > 1 and overlap.height > 1:
                problems.append("a legend lies over a panel's data; put it outside (plotting.finish)")
                break
    for index, ax in enumerate(panels):
        name = f"panel {index} ({ax.get_title() or 'untitled'})"
        if not _has_data(ax):
            problems.append(f"{name}: empty")
            continue
        for axis in ("x", "y"):
            if not _labelled(ax, axis):
                problems.append(f"{name}: no {axis} label")
        lines = _series_lines(ax)
        styles: dict[tuple, str] = {}
        low, high = ax.get_ylim()
        clipped = any(line.get_gid() == _CLIPPED for line in ax.lines)
        for line in lines:
            label = line.get_label()
            if label not in legend_labels:
                problems.append(f"{name}: series {label!r} is not in a legend")
            y = np.asarray(line.get_ydata(), dtype=float)
            finite = y[np.isfinite(y)]
            inside = finite[(finite >= min(low, high) - 1e-12) & (finite <= max(low, high) + 1e-12)]
            if finite.size and inside.size < finite.size and not clipped:
                problems.append(f"{name}: series {label!r} has values outside the y range with no clipping mark")
            if finite.size and not inside.size and not clipped:
                problems.append(f"{name}: series {label!r} has no visible point")
            if finite.size == 1 and line.get_marker() in (None, "None", "none", "", " "):
                problems.append(f"{name}: series {label!r} has one point and no marker")
            key = (str(line.get_color()), str(line.get_marker()), str(line.get_linestyle()),
                   str(line.get_markerfacecolor()))
            if key in styles:
                problems.append(f"{name}: series {label!r} looks exactly like {styles[key]!r}")
            styles[key] = label
        for axis, scale in (("y", ax.get_yscale()), ("x", ax.get_xscale())):
            if scale not in ("log", "symlog"):
                continue
            data = [np.asarray(line.get_ydata() if axis == "y" else line.get_xdata(), dtype=float)
                    for line in ax.lines if _is_data(line, ax)]
            positive = np.concatenate(data or [np.array([])])
            positive = np.abs(positive[np.isfinite(positive) & (positive != 0)])
            if positive.size and positive.max() / positive.min() < 10:
                problems.append(f"{name}: a log {axis} axis over less than a decade "
                                f"({positive.min():.3g} to {positive.max():.3g}); use a linear one")
        xs = [np.asarray(line.get_xdata(), dtype=float) for line in lines]
        xs = np.concatenate(xs) if xs else np.array([])
        if xs.size and ax.get_xscale() == "linear" and np.all(np.isfinite(xs)) and np.all(xs == np.round(xs)):
            left, right = sorted(ax.get_xlim())
            ticks = [t for t in ax.get_xticks() if left - 1e-9 <= t <= right + 1e-9]
            if any(abs(t - round(t)) > 1e-9 for t in ticks):
                problems.append(f"{name}: x holds counts but has non-integer ticks {ticks}")
        for image in ax.images:
            norm, cmap = image.norm, image.get_cmap().name
            if cmap in _DIVERGING and not isinstance(norm, TwoSlopeNorm) and norm.vmin is not None \
                    and not math.isclose(-norm.vmin, norm.vmax, rel_tol=1e-6) and type(norm).__name__ != "CenteredNorm":
                problems.append(f"{name}: diverging colour map {cmap} not centred (vmin {norm.vmin:.3g}, "
                                f"vmax {norm.vmax:.3g}); use plotting.symmetric_norm or TwoSlopeNorm")
            bars_for = [im for a in panels for im in a.images if im.colorbar is not None
                        and im.colorbar.ax.get_ylabel() + im.colorbar.ax.get_xlabel()]
            if not any(im is image or (im.get_cmap().name == cmap and im.norm.vmin == norm.vmin
                                       and im.norm.vmax == norm.vmax) for im in bars_for):
                problems.append(f"{name}: an image with no labelled colour bar")
    for text in fig.findobj(Text):
        if text.get_visible() and text.get_text().strip() and text.get_fontsize() < MIN_FONT_SIZE:
            problems.append(f"text {text.get_text()[:30]!r} is {text.get_fontsize():g} pt; at least "
                            f"{MIN_FONT_SIZE:g} pt stays readable")
            break
    if problems:
        raise FigureStyleError("figure breaks the house style: " + "; ".join(dict.fromkeys(problems)))
