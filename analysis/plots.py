"""Figures from per-cell rates (`analysis.tables.cell_rates`), built on matplotlib's Agg canvas.

    rates = cell_rates(prompt_outcomes(read_results("runs/tiny")))
    fig = plot_gamma_sweep(rates)              # compliance vs gamma, XSTest-S and XSTest-H
    fig = plot_size(size_table(rates))         # compliance vs parameters, a line per family
    fig = plot_frontier(rates)                 # XSTest-H vs XSTest-S, a point per model x cond
    save_figures({"frontier": fig}, "out/")    # -> {"frontier": Path("out/frontier.png")}

Each function returns a `matplotlib.figure.Figure` (no pyplot state, nothing shown), so tests
can read its lines, points, labels and titles. Values are means over seeds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from analysis.tables import DEFAULT_JUDGE, order_conditions, order_models, select_gamma
from tbr_ray.vocab import BASE, GAMMA_CONDITIONS

CONDITION_COLOURS = {
    BASE: "tab:gray",
    "none": "tab:blue",
    "internal": "tab:orange",
    "external": "tab:green",
    "prompt-direct": "tab:purple",
    "prompt-cot": "tab:brown",
}
CONDITION_STYLES = {"none": ":", "internal": "--", "external": "-"}
BENCHMARK_TITLES = {"xstest_safe": "XSTest-S", "xstest_unsafe": "XSTest-H"}
GAMMA_LABEL = "γ (share of safety rows with a reflection)"
COMPLIANCE_LABEL = "Compliance rate"
DPI = 120


def literal_text(plot: Callable[..., Figure]) -> Callable[..., Figure]:
    """Build the figure with matplotlib's mathtext off: labels are data (categories, model
    folder names), and "$" in one would be parsed as math, or crash the report on a parse
    error ("Expected \\frac{num}{den}"). rcParams["text.parse_math"] is read as each text is
    made (matplotlib.text.Text), so it holds for the saved PNG too."""

    @functools.wraps(plot)
    def build(*args: Any, **kwargs: Any) -> Figure:
        with matplotlib.rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)

    return build


def _compliance(rates: pd.DataFrame, judge: str) -> pd.DataFrame:
    """Mean over seeds of compliance per model x condition x gamma x benchmark."""
    sel = rates[(rates["metric"] == "compliance_rate") & (rates["judge"] == judge)]
    keys = ["model", "condition", "gamma", "benchmark"]
    return sel.groupby(keys, sort=True)["value"].mean().reset_index()


def has_gamma_sweep(rates: pd.DataFrame) -> bool:
    """True when some model x condition (internal/external) was run at two or more gammas."""
    sel = rates[rates["condition"].isin(GAMMA_CONDITIONS)]
    return bool(len(sel)) and bool(
        (sel.groupby(["model", "condition"])["gamma"].nunique() > 1).any()
    )


@literal_text
def plot_gamma_sweep(
    rates: pd.DataFrame,
    judge: str = DEFAULT_JUDGE,
    benchmarks: tuple[str, ...] = ("xstest_safe", "xstest_unsafe"),
) -> Figure:
    """Compliance vs gamma, one panel per benchmark, one line per model x condition.
    Each line starts at gamma 0 with the model's `none` cell (no reflection at all), as in the
    paper's Fig. 4, when that cell exists."""
    data = _compliance(rates, judge)
    fig = Figure(figsize=(5.5 * len(benchmarks), 4.2))
    axes = fig.subplots(1, len(benchmarks), squeeze=False)[0]
    for ax, bench in zip(axes, benchmarks, strict=True):
        _sweep_panel(ax, data[data["benchmark"] == bench])
        ax.set_title(BENCHMARK_TITLES.get(bench, bench))
        ax.set_xlabel(GAMMA_LABEL)
        ax.set_ylabel(COMPLIANCE_LABEL)
        ax.set_ylim(-0.02, 1.02)
        if ax.get_lines():
            ax.legend(fontsize="small")
    fig.suptitle(f"Compliance vs reflection proportion (judge: {judge})")
    fig.tight_layout()
    return fig


def _sweep_panel(ax, data: pd.DataFrame) -> None:
    """A colour per model, a line style per condition."""
    for i, model in enumerate(order_models(data["model"].unique())):
        rows = data[data["model"] == model]
        start = rows[rows["condition"] == "none"]
        for condition in [c for c in GAMMA_CONDITIONS if c in set(rows["condition"])]:
            line = pd.concat([start, rows[rows["condition"] == condition]]).sort_values("gamma")
            ax.plot(
                line["gamma"],
                line["value"],
                marker="o",
                label=f"{model} · {condition}",
                color=f"C{i % 10}",
                linestyle=CONDITION_STYLES[condition],
            )


@literal_text
def plot_size(sizes: pd.DataFrame, benchmark: str = "xstest_safe") -> Figure:
    """Compliance vs parameters (log scale): one line per family x condition, from
    `analysis.tables.size_table`. Models of unknown size are left out."""
    known = sizes[sizes["params_b"].notna()]
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    families = sorted(known["family"].unique())
    colours = {f: f"C{i % 10}" for i, f in enumerate(families)}
    for family in families:
        for condition in order_conditions(known["condition"].unique()):
            line = known[(known["family"] == family) & (known["condition"] == condition)]
            if len(line):
                line = line.sort_values("params_b")
                ax.plot(
                    line["params_b"],
                    line["value"],
                    marker="o",
                    color=colours[family],
                    linestyle=CONDITION_STYLES.get(condition, "-."),
                    label=f"{family} · {condition}",
                )
    if len(known):
        ax.set_xscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.legend(fontsize="small")
    ax.set_xlabel("Parameters (billions, log scale)")
    ax.set_ylabel(COMPLIANCE_LABEL)
    ax.set_title(f"{BENCHMARK_TITLES.get(benchmark, benchmark)} compliance vs model size")
    fig.tight_layout()
    return fig


@literal_text
def plot_frontier(
    rates: pd.DataFrame, judge: str = DEFAULT_JUDGE, gamma: float | None = None
) -> Figure:
    """Over-refusal vs safety: x = XSTest-H compliance (lower: safer), y = XSTest-S compliance
    (higher: less over-refusal); one point per model x condition, coloured by condition.
    Gamma selection as in `analysis.tables.select_gamma`."""
    data = _compliance(select_gamma(rates, gamma), judge)
    wide = data.pivot_table(index=["model", "condition"], columns="benchmark", values="value")
    fig = Figure(figsize=(6.5, 5))
    ax = fig.subplots()
    if {"xstest_safe", "xstest_unsafe"} <= set(wide.columns):
        points = wide.dropna(subset=["xstest_safe", "xstest_unsafe"]).reset_index()
        for condition in order_conditions(points["condition"].unique()):
            sel = points[points["condition"] == condition]
            ax.scatter(
                sel["xstest_unsafe"],
                sel["xstest_safe"],
                label=condition,
                color=CONDITION_COLOURS.get(condition, "black"),
            )
        ax.set_xlim(-0.05, 1.05)
        ax.set_ylim(-0.05, 1.05)
        ax.legend(title="condition", loc="lower left", fontsize="small")
    ax.set_xlabel("XSTest-H compliance rate (lower: safer)")
    ax.set_ylabel("XSTest-S compliance rate (higher: less over-refusal)")
    ax.set_title(f"Over-refusal vs safety (judge: {judge})")
    fig.tight_layout()  # before placing labels: placement works in final display coordinates
    if ax.get_legend() is not None:
        place_labels(fig, ax, frontier_labels(points))
    return fig


def frontier_labels(points: pd.DataFrame) -> list[tuple[float, float, str]]:
    """One label per distinct point: (x, y, text). A lone point is labelled with its model;
    points that coincide (their markers hide each other's colour) share one label listing
    "model · condition" for each."""
    labels = []
    for (x, y), group in points.groupby(["xstest_unsafe", "xstest_safe"], sort=True):
        if len(group) == 1:
            lines = list(group["model"])
        else:
            lines = [f"{r.model} · {r.condition}" for r in group.itertuples()]
        labels.append((float(x), float(y), "\n".join(lines)))
    return labels


# Candidate label offsets in points: 8 directions (right of the marker first, where a label
# reads as its own) at growing distance.
_DIRECTIONS = ((1, 0), (1, 1), (1, -1), (-1, 0), (-1, 1), (-1, -1), (0, 1), (0, -1))
_RADII = (5, 14, 26, 40, 58)


def place_labels(fig: Figure, ax, labels: list[tuple[float, float, str]]) -> list:
    """Annotate each (x, y, text) at the first candidate offset whose text box overlaps no
    label placed before it, no other marker, and stays inside the axes (greedy, in display
    coordinates); a label pushed away from its point gets a thin leader line."""
    renderer = FigureCanvasAgg(fig).get_renderer()  # text sizes as the saved PNG has them
    frame = ax.get_window_extent(renderer)
    markers = [ax.transData.transform((x, y)) for x, y, _ in labels]
    legend = ax.get_legend()
    taken = [legend.get_window_extent(renderer)] if legend is not None else []
    annotations = []
    for (x, y, text), own in zip(labels, markers, strict=True):
        others = [m for m in markers if m is not own]
        for radius in _RADII:
            for dx, dy in _DIRECTIONS:
                ann = _annotate(ax, x, y, text, dx * radius, dy * radius, radius > _RADII[0])
                box = ann.get_window_extent(renderer).expanded(1.05, 1.1)
                clear = not any(box.overlaps(t) for t in taken) and not any(
                    box.contains(*m) for m in others
                )
                if clear and frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1):
                    break
                ann.remove()
            else:
                continue
            break
        else:  # nowhere free: keep the last try rather than drop the label
            ann = _annotate(ax, x, y, text, _RADII[-1], _RADII[-1], True)
            box = ann.get_window_extent(renderer)
        taken.append(box)
        annotations.append(ann)
    return annotations


def _annotate(ax, x: float, y: float, text: str, dx: float, dy: float, leader: bool):
    return ax.annotate(
        text,
        (x, y),
        xytext=(dx, dy),
        textcoords="offset points",
        fontsize=7,
        ha="left" if dx > 0 else "right" if dx < 0 else "center",
        va="bottom" if dy > 0 else "top" if dy < 0 else "center",
        arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"} if leader else None,
    )


@literal_text
def plot_category_heatmap(matrix: pd.DataFrame, judge: str = DEFAULT_JUDGE) -> Figure:
    """Compliance per condition (rows) x category (columns), one panel per benchmark, from
    `analysis.tables.category_matrix`; each cell shows its value, pooled over models."""
    benchmarks = list(dict.fromkeys(matrix["benchmark"]))
    widest = max(matrix.loc[matrix["benchmark"] == b, "category"].nunique() for b in benchmarks)
    fig = Figure(figsize=(max(6.0, 0.85 * widest + 2.5), 2.6 * len(benchmarks) + 0.6))
    axes = fig.subplots(len(benchmarks), 1, squeeze=False)[:, 0]
    for ax, bench in zip(axes, benchmarks, strict=True):
        grid = matrix[matrix["benchmark"] == bench].pivot(
            index="condition", columns="category", values="value"
        )
        grid = grid.reindex(index=order_conditions(grid.index))
        image = ax.imshow(grid.to_numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for (i, j), value in np.ndenumerate(grid.to_numpy()):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=35, ha="right", fontsize=7)
        ax.set_yticks(range(grid.shape[0]), grid.index, fontsize=8)
        ax.set_title(BENCHMARK_TITLES.get(bench, bench), fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.03, label="compliance")
    fig.suptitle(
        f"Compliance per category (judge: {judge})\npooled over models and seeds", fontsize=10
    )
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write one figure as PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def save_figures(figures: dict[str, Figure], output_dir: str | Path) -> dict[str, Path]:
    """Write each figure as `<output_dir>/<name>.png`."""
    return {
        name: save_figure(fig, Path(output_dir) / f"{name}.png") for name, fig in figures.items()
    }
