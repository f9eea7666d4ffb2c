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

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from analysis.tables import (
    DEFAULT_JUDGE,
    GAMMA_CONDITIONS,
    order_conditions,
    order_models,
    select_gamma,
)

CONDITION_COLOURS = {
    "base": "tab:gray",
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
            for row in sel.itertuples():
                ax.annotate(
                    row.model,
                    (row.xstest_unsafe, row.xstest_safe),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.legend(title="condition")
    ax.set_xlabel("XSTest-H compliance rate (lower: safer)")
    ax.set_ylabel("XSTest-S compliance rate (higher: less over-refusal)")
    ax.set_title(f"Over-refusal vs safety (judge: {judge})")
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
