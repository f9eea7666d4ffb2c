"""The results report: tables, confidence intervals, paired tests, the paper side by side, plots.

    paths = write_report("runs/tiny", "runs/tiny/report")
    paths["report_html"]   # self-contained HTML (plots embedded as base64 PNG)
    paths["report_md"]     # Markdown, plots as PNG files beside it
    paths["summary_csv"]   # model, condition, gamma, seed, benchmark, judge, metric, value,
                           # ci_low, ci_high, n

This is the entry point behind `tbr-ray report RESULTS_DIR --output DIR`. It reads results only
through `tbr_ray.results`, prints nothing, and returns the paths it wrote. Only finished cells
enter the tables; unfinished ones are listed in "Cells not included".
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import paper, plots, stats, tables
from tbr_ray.judges import HARM_JUDGE, REFUSAL_MODEL_JUDGE
from tbr_ray.results import Results, read_results, read_run_manifest


@dataclass(frozen=True)
class Section:
    """One report section: a heading, a paragraph, and optionally a table or a figure."""

    title: str
    text: str = ""
    table: pd.DataFrame | None = None
    figure: str | None = None  # PNG file name in the output folder


@dataclass(frozen=True)
class ReportOptions:
    judge: str = tables.DEFAULT_JUDGE  # refusal judge for compliance columns
    gamma: float | None = None  # None: the largest gamma per model x condition
    n_boot: int = stats.DEFAULT_N_BOOT  # bootstrap replicates per CI
    seed: int = 0  # bootstrap RNG seed


def write_report(
    results_dir: str | Path,
    output_dir: str | Path,
    judge: str = tables.DEFAULT_JUDGE,
    gamma: float | None = None,
    n_boot: int = stats.DEFAULT_N_BOOT,
    seed: int = 0,
) -> dict[str, Path]:
    """Write report.md, report.html, summary.csv and the PNG plots into `output_dir`.
    Returns {"report_md", "report_html", "summary_csv", "plot_<name>"...} -> paths."""
    if not Path(results_dir).is_dir():
        raise FileNotFoundError(
            f"results directory {results_dir} does not exist. Fix: pass the folder that holds "
            "run.json and cells/ (the run's results path)."
        )
    options = ReportOptions(judge, gamma, n_boot, seed)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = read_results(results_dir)
    outcomes = tables.prompt_outcomes(results)
    rates = tables.cell_rates(outcomes)
    summary = stats.summary_table(outcomes, n_boot, seed=seed)
    figures, figure_notes = build_figures(rates, options)
    pngs = plots.save_figures(figures, output_dir)
    sections = [header_section(results_dir, results, options)]
    sections += table_sections(results, outcomes, rates, summary, options)
    sections += judges_sections(results_dir, rates, results.metrics, options)
    sections += figure_sections(pngs, figure_notes)
    sections += [excluded_section(results.status), methods_section(options)]
    paths = {
        "summary_csv": output_dir / "summary.csv",
        "report_md": output_dir / "report.md",
        "report_html": output_dir / "report.html",
    }
    summary.to_csv(paths["summary_csv"], index=False)
    paths["report_md"].write_text(render_markdown(sections))
    paths["report_html"].write_text(render_html(sections, output_dir))
    return {**paths, **{f"plot_{name}": path for name, path in pngs.items()}}


# ------------------------------------------------------------------ sections


def header_section(results_dir: str | Path, results: Results, options: ReportOptions) -> Section:
    manifest_path = Path(results_dir) / "run.json"
    manifest = read_run_manifest(results_dir) if manifest_path.is_file() else {}
    status = results.status
    n_done = int((status["status"] == "done").sum()) if len(status) else 0
    lines = [
        f"Results: `{results_dir}`",
        f"Run id: `{manifest.get('run_id', 'unknown (no run.json)')}`; config hash: "
        f"`{manifest.get('config_hash', 'unknown')}`",
        f"Cells: {len(status)} found, {n_done} finished and included.",
        f"Refusal judge: `{options.judge}`; gamma: "
        f"{'largest run per model x condition' if options.gamma is None else options.gamma}"
        f"; bootstrap: {options.n_boot} replicates, seed {options.seed}.",
    ]
    return Section("TBR reproduction report", "\n\n".join(lines))


def table_sections(
    results: Results,
    outcomes: pd.DataFrame,
    rates: pd.DataFrame,
    summary: pd.DataFrame,
    options: ReportOptions,
) -> list[Section]:
    judge, gamma = options.judge, options.gamma
    sources = tables.table3_column_sources(rates, judge)
    column_note = "; ".join(f"{r.column}: {r.source}" for r in sources.itertuples())
    wide = tables.table3(rates, judge, gamma)
    prompting = tables.table3(rates, judge, gamma, conditions=tables.PROMPT_CONDITIONS)
    at_gamma = tables.select_gamma(outcomes, gamma)
    tests = [
        stats.paired_tests(at_gamma, judge, "none", tables.GAMMA_CONDITIONS),
        stats.paired_tests(at_gamma, judge, "prompt-direct", ["prompt-cot"]),
    ]
    tests = pd.concat([t for t in tests if len(t)] or tests[:1], ignore_index=True)
    return [
        Section("Table 3 layout", "Mean over seeds. Columns: " + column_note + ".", wide),
        Section(
            "Differences from `none`",
            "Condition minus `none`, same columns.",
            tables.table3_deltas(wide),
        ),
        Section(
            "Prompting experiment (Table 1 layout)", "Chat models, direct vs CoT prompt.", prompting
        ),
        Section(
            "Compliance per category",
            "Pooled over seeds.",
            tables.category_table(outcomes, judge, gamma),
        ),
        Section(
            "Paired tests (McNemar)",
            "internal/external against `none`; prompt-cot against prompt-direct. b: prompts "
            "with outcome 1 under the baseline and 0 under the condition; c: the reverse. "
            "Pairs are the same seed and prompt. q_value: Benjamini-Hochberg adjusted over the "
            "tests against the same baseline.",
            tables.sort_rows(tests),
        ),
        side_by_side_section(summary, options),
        consistency_section(rates, results.metrics),
    ]


def side_by_side_section(summary: pd.DataFrame, options: ReportOptions) -> Section:
    """Reproduced headline values (with CI) next to the paper's Tables 3 and 1."""
    rows = stats.headline_rows(summary)
    # What the paper's number means per benchmark: Llama Guard's harmful rate on its two safety
    # sets (here the harm judge's), compliance elsewhere, accuracy on general sets.
    harm_sets = {b for _, b, m in tables.TABLE3_LAYOUT if m == "harmful_rate"}
    judged_by = rows["metric"].map(lambda m: tables.metric_judge(m, options.judge))
    wanted = (rows["judge"] == judged_by) & (
        rows["benchmark"].isin(harm_sets) == (rows["metric"] == "harmful_rate")
    )
    rows = tables.select_gamma(rows[wanted | (rows["metric"] == "accuracy")], options.gamma)
    compared = tables.sort_rows(paper.side_by_side(rows))
    text = (
        "Published values are rounded to 0.01; `outside_ci` flags a published value "
        f"more than {paper.ROUNDING_TOLERANCE} outside the reproduced 95% CI. XSTest-H and "
        "Malicious are harmful rates (the paper's Llama Guard 3-8B; here the harm judge), "
        f"the other refusal sets compliance by `{options.judge}`."
    )
    if compared.empty:
        text = "No reproduced cell matches a published one (model, benchmark, condition)."
    return Section("Reproduced vs published", text, compared)


def judges_sections(
    results_dir: str | Path, rates: pd.DataFrame, metrics: pd.DataFrame, options: ReportOptions
) -> list[Section]:
    """Which judge made every Table 3 column (model and format of the model judges, from the
    run's config), and the share of each model judge's answers that could not be parsed."""
    manifest_path = Path(results_dir) / "run.json"
    manifest = read_run_manifest(results_dir) if manifest_path.is_file() else {}
    named = judge_models(manifest)
    sources = tables.table3_column_sources(rates, options.judge)
    sources["judge model"] = sources["judge"].map(lambda j: named.get(j, _judge_kind(j)))
    unparsable = metrics[metrics["metric"] == "unparsable_share"]
    text = (
        "Share of each model judge's answers that could not be parsed, per cell and benchmark "
        "(a cell above eval.judge_max_unparsable fails and is listed under Cells not included)."
    )
    if unparsable.empty:
        text, unparsable = "No model judge ran in the included cells.", None
    else:
        unparsable = tables.sort_rows(unparsable).pivot_table(
            index=["model", "condition", "gamma", "seed"],
            columns=["benchmark", "judge"],
            values="value",
            sort=False,
        )
    return [
        Section("Judges of the Table 3 columns", "Where each column's numbers come from.", sources),
        Section("Unparsable judge answers", text, unparsable),
    ]


def _judge_kind(judge: str) -> str:
    if judge in (REFUSAL_MODEL_JUDGE, HARM_JUDGE):
        return "model judge (run.json names none)"
    return "rule" if judge else ""


def judge_models(manifest: dict) -> dict[str, str]:
    """{results judge name: "model (format)"} for the model judges in a run's config."""
    e = manifest.get("config", {}).get("eval", {})
    out = {}
    for name, field in ((REFUSAL_MODEL_JUDGE, "refusal_judge"), (HARM_JUDGE, "harm_judge")):
        if e.get(field):
            out[name] = f"{e[field]['model']} ({e[field]['format']})"
    return out


def consistency_section(rates: pd.DataFrame, metrics: pd.DataFrame) -> Section:
    bad = tables.metrics_mismatches(rates, metrics)
    text = (
        f"All stored metrics agree with the per-prompt rows ({len(metrics)} rows checked)."
        if bad.empty
        else "Stored metrics that differ from the per-prompt rows:"
    )
    return Section("Consistency with the metrics table", text, None if bad.empty else bad)


def build_figures(rates: pd.DataFrame, options: ReportOptions) -> tuple[dict, dict[str, str]]:
    """The figures the data supports, plus a note for each one skipped."""
    figures, notes = {}, {}
    if plots.has_gamma_sweep(rates):
        figures["gamma_sweep"] = plots.plot_gamma_sweep(rates, options.judge)
    else:
        notes["gamma_sweep"] = "Skipped: no model x condition was run at two or more gammas."
    sizes = tables.size_table(rates, "xstest_safe", options.judge, options.gamma)
    if sizes["params_b"].notna().any():
        figures["size"] = plots.plot_size(sizes)
    else:
        notes["size"] = "Skipped: no XSTest-S results for a model of known size."
    if {"xstest_safe", "xstest_unsafe"} <= set(rates["benchmark"]):
        figures["frontier"] = plots.plot_frontier(rates, options.judge, options.gamma)
    else:
        notes["frontier"] = "Skipped: needs both xstest_safe and xstest_unsafe."
    return figures, notes


FIGURE_TITLES = {
    "gamma_sweep": "Compliance vs gamma",
    "size": "Compliance vs model size",
    "frontier": "Over-refusal vs safety frontier",
}


def figure_sections(pngs: dict[str, Path], notes: dict[str, str]) -> list[Section]:
    return [
        Section(title, notes.get(name, ""), figure=pngs[name].name if name in pngs else None)
        for name, title in FIGURE_TITLES.items()
    ]


def excluded_section(status: pd.DataFrame) -> Section:
    """Cells that are failed, running or incomplete (no status file): not in any table."""
    if status.empty:
        return Section("Cells not included", "No cell folders found.")
    left_out = status[status["status"] != "done"]
    if left_out.empty:
        return Section("Cells not included", "None: every cell finished.")
    columns = [c for c in ("cell_id", "status", "error") if c in left_out.columns]
    return Section(
        "Cells not included",
        "These cells are not in any table above.",
        left_out[columns].reset_index(drop=True),
    )


def methods_section(options: ReportOptions) -> Section:
    text = (
        "Compliance rate: share of prompts the judge did not flag as a refusal. Accuracy: "
        "share of general-task generations marked correct. Values come from the per-prompt "
        "rows of finished cells. 95% CIs are percentile bootstrap intervals over prompts "
        "(one seed) or two-stage over seeds then prompts (several seeds; summary rows with "
        "an empty seed). McNemar: exact two-sided binomial test when b + c < "
        f"{stats.EXACT_BELOW}, else chi-square with continuity correction. Judge: "
        f"`{options.judge}`."
    )
    return Section("Methods", text)


# ------------------------------------------------------------------ rendering


def display_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """Flatten index and MultiIndex columns and format numbers as text for both renderers."""
    out = frame.copy()
    if isinstance(out.columns, pd.MultiIndex):
        out.columns = [" · ".join(str(p) for p in col) for col in out.columns]
    if not isinstance(out.index, pd.RangeIndex):
        out = out.reset_index()
    for col in out.columns:
        fmt = "{:.3g}" if col in ("p_value", "q_value") else "{:.3f}"
        out[col] = out[col].map(lambda v, f=fmt: f.format(v) if _is_float(v) else v)
    out = out.astype(object)
    return out.where(out.notna(), "").map(str)


def _is_float(value) -> bool:
    return isinstance(value, float | np.floating) and not pd.isna(value)


def markdown_table(frame: pd.DataFrame) -> str:
    shown = display_frame(frame)
    lines = ["| " + " | ".join(map(str, shown.columns)) + " |", "|" + "---|" * len(shown.columns)]
    lines += [
        "| " + " | ".join(_md_cell(v) for v in row) + " |" for row in shown.itertuples(index=False)
    ]
    return "\n".join(lines)


def _md_cell(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")


def _html_text(text: str) -> str:
    """Escape a paragraph and turn `code` spans into <code>."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def render_markdown(sections: list[Section]) -> str:
    parts = []
    for i, s in enumerate(sections):
        parts.append(f"{'#' if i == 0 else '##'} {s.title}\n")
        if s.text:
            parts.append(s.text + "\n")
        if s.table is not None:
            parts.append(markdown_table(s.table) + "\n" if len(s.table) else "No data.\n")
        if s.figure:
            parts.append(f"![{s.title}]({s.figure})\n")
    return "\n".join(parts)


_CSS = (
    "body{font-family:sans-serif;max-width:75em;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}"
    "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
    "img{max-width:100%}"
)


def render_html(sections: list[Section], image_dir: Path) -> str:
    """A standalone page: tables as HTML, figures as base64 data URIs."""
    body = []
    for i, s in enumerate(sections):
        level = 1 if i == 0 else 2
        body.append(f"<h{level}>{_html_text(s.title)}</h{level}>")
        if s.text:
            body += [f"<p>{_html_text(p)}</p>" for p in s.text.split("\n\n")]
        if s.table is not None:
            body.append(
                display_frame(s.table).to_html(index=False) if len(s.table) else "<p>No data.</p>"
            )
        if s.figure:
            data = base64.b64encode((image_dir / s.figure).read_bytes()).decode("ascii")
            body.append(f'<img alt="{html.escape(s.title)}" src="data:image/png;base64,{data}">')
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>TBR report</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
