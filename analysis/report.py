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
from tbr_ray import labels
from tbr_ray.plan.power import ALPHA, POWER
from tbr_ray.results import Results, human_consensus, read_results, read_run_manifest
from tbr_ray.vocab import HARM_JUDGE, HUMAN, JUDGES, REFUSAL_MODEL_JUDGE, REVIEW_JUDGES


@dataclass(frozen=True)
class Section:
    """One report section: a heading, a paragraph, and optionally a table or a figure."""

    title: str
    text: str = ""
    table: pd.DataFrame | None = None
    figure: str | None = None  # PNG file name in the output folder
    html: str | None = None  # report.html shows this instead of `table` (links, details)


@dataclass(frozen=True)
class ReportOptions:
    judge: str = tables.DEFAULT_JUDGE  # refusal judge for compliance columns
    gamma: float | None = None  # None: the largest gamma per model x condition
    n_boot: int = stats.DEFAULT_N_BOOT  # bootstrap replicates per CI
    seed: int = 0  # bootstrap RNG seed
    # Generations listed per Table 3 number in report.html, judge disagreements first; the
    # rest are counted, not listed. 50 lists all of the tiny run's (50 prompts per benchmark);
    # the paper's 420 numbers at ~1.5 kB a row make a page of ~30 MB (200 would be ~130 MB).
    max_generations: int = 50


def write_report(
    results_dir: str | Path,
    output_dir: str | Path,
    judge: str = tables.DEFAULT_JUDGE,
    gamma: float | None = None,
    n_boot: int = stats.DEFAULT_N_BOOT,
    seed: int = 0,
    max_generations: int = ReportOptions.max_generations,
) -> dict[str, Path]:
    """Write report.md, report.html, summary.csv and the PNG plots into `output_dir`.
    Returns {"report_md", "report_html", "summary_csv", "plot_<name>"...} -> paths."""
    if not Path(results_dir).is_dir():
        raise FileNotFoundError(
            f"results directory {results_dir} does not exist. Fix: pass the folder that holds "
            "run.json and cells/ (the run's results path)."
        )
    options = ReportOptions(judge, gamma, n_boot, seed, max_generations=max_generations)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = read_results(results_dir)
    outcomes = tables.prompt_outcomes(results)
    rates = tables.cell_rates(outcomes)
    summary = stats.summary_table(outcomes, n_boot, seed=seed)
    figures, figure_notes = build_figures(rates, outcomes, options)
    pngs = plots.save_figures(figures, output_dir)
    numbers = table3_numbers(summary, options)
    sections = [
        header_section(results_dir, results, options, review_note(results, numbers, options))
    ]
    sections += table_sections(results, outcomes, rates, summary, numbers, options)
    sections += judges_sections(results_dir, rates, results.metrics, options)
    sections += review_sections(results, numbers)
    sections += figure_sections(pngs, figure_notes)
    sections += [generations_section(results, numbers, options)]
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


def header_section(
    results_dir: str | Path, results: Results, options: ReportOptions, review: str = ""
) -> Section:
    manifest = read_run_manifest(results_dir) or {}
    status = results.status
    n_done = int((status["status"] == "done").sum()) if len(status) else 0
    lines = [
        f"Results: `{results_dir}`",
        f"Run id: `{manifest.get('run_id', 'unknown (no run.json)')}`; config hash: "
        f"`{manifest.get('config_hash', 'unknown')}`",
        f"Cells: {len(status)} found, {n_done} finished and included.",
        f"Refusal judge: `{options.judge}` ({review}); gamma: "
        f"{'largest run per model x condition' if options.gamma is None else options.gamma}"
        f"; bootstrap: {options.n_boot} replicates, seed {options.seed}.",
    ]
    return Section("TBR reproduction report", "\n\n".join(lines))


def table_sections(
    results: Results,
    outcomes: pd.DataFrame,
    rates: pd.DataFrame,
    summary: pd.DataFrame,
    numbers: pd.DataFrame,  # table3_numbers: Table 3's values with intervals and anchors
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
    tests = stats.with_resolution(tests)
    marked = mark_unresolved(numbers, tests)
    review = review_note(results, numbers, options)
    return [
        Section(
            "Table 3 layout",
            f"Compliance columns: {review}.\n\n"
            "Mean over seeds, with its 95% interval (see Methods). Each number links to the "
            "generations behind it (report.html). XSTest-H and Malicious are shown two ways, "
            f"each labelled: the harm judge's rate alone (`harmful`) and the paper's definition "
            f"(`unsafe or complying`), {tables.PAPER_SAFETY_CR} Columns: " + column_note + "."
            "\n\n" + resolution_note(marked),
            table3_with_intervals(wide, marked),
            html=table3_html(wide, marked),
        ),
        Section(
            "Differences from `none`",
            "Condition minus `none`, same columns.",
            tables.table3_deltas(wide),
        ),
        Section(
            "Prompting experiment (Table 1 layout)", "Chat models, direct vs CoT prompt.", prompting
        ),
        Section(
            "Paired tests (McNemar)",
            "internal/external against `none`; prompt-cot against prompt-direct; every Table 3 "
            "metric, each from its own judge (harmful rate: the harm judge). b: prompts "
            "with outcome 1 under the baseline and 0 under the condition; c: the reverse. "
            "Pairs are the same seed and prompt. q_value: Benjamini-Hochberg adjusted over the "
            "tests against the same baseline. " + resolution_columns_note(tests),
            tables.sort_rows(tests),
        ),
        side_by_side_section(summary, options),
        consistency_section(rates, results.metrics),
    ]


# ------------------------------------------------------------------ Table 3: intervals, links


def review_note(results: Results, numbers: pd.DataFrame, options: ReportOptions) -> str:
    """Whether the compliance numbers are before or after human review, said where they are
    (the paper's XS-S and OR-B are after review: keyword matching, then human review)."""
    judge = options.judge
    fix = "label generations with `tbr-ray review`, then report with `--judge paper-reviewed`"
    if judge not in REVIEW_JUDGES:
        return (
            f"`{judge}` alone, BEFORE human review; the paper's XS-S and OR-B are after review "
            f"(keyword matching, then human review of the responses): {fix}"
        )
    counts = reviewed_counts(results, numbers) if not results.reviews.empty else None
    reviewed = 0 if counts is None else int(counts["reviewed"].sum())
    judged = 0 if counts is None else int(counts["judged"].sum())
    if judge == HUMAN:
        return f"human labels only ({reviewed} of {judged} judged generations carry one)"
    return (
        f"`{judge}`: the keyword rule, overridden by human labels on {reviewed} of {judged} "
        f"judged generations (the rest are keyword-only, before review); to review more, {fix}"
    )


def table3_numbers(summary: pd.DataFrame, options: ReportOptions) -> pd.DataFrame:
    """One row per Table 3 number: model, column, benchmark, metric, condition, gamma, value,
    ci_low, ci_high, n, and `anchor` (the id of its generations in report.html)."""
    head = stats.headline_rows(summary)
    keys = ["model", "column", "benchmark", "metric", "condition", "gamma"]
    numbers = None
    # table3_long picks each column's rows (and the judge per metric); a headline row is alone
    # in its group, so passing a statistic as `value` returns that statistic unchanged.
    for stat in ("value", "ci_low", "ci_high", "n"):
        long = tables.table3_long(
            head.assign(value=head[stat].astype(float)),
            judge=options.judge,
            gamma=options.gamma,
        )[keys + ["value"]].rename(columns={"value": stat})
        numbers = long if numbers is None else numbers.merge(long, on=keys)
    return numbers.assign(anchor=[anchor_id(r) for r in numbers.itertuples()])


def anchor_id(row) -> str:
    """gen-<model>-<column>-<condition>-g<gamma>, lower case, safe in a URL fragment."""
    text = f"gen-{row.model}-{row.column}-{row.condition}-g{row.gamma:.2f}"
    return re.sub(r"[^a-z0-9.]+", "-", text.lower())


def _number_text(row) -> str:
    return f"{row.value:.3f}{_mark(row)} [{row.ci_low:.3f}, {row.ci_high:.3f}]"


# After a Table 3 number whose difference from `none` the run's own pairs cannot resolve.
UNRESOLVED_MARK = "†"


def _mark(row) -> str:
    return UNRESOLVED_MARK if getattr(row, "unresolved", False) else ""


def mark_unresolved(numbers: pd.DataFrame, tests: pd.DataFrame) -> pd.DataFrame:
    """`numbers` (table3_numbers) plus `resolved` (its paired test against `none`, from
    stats.with_resolution; NA for `none`, `base` and untested numbers) and `unresolved`
    (resolved is False: the difference is below what its pairs resolve)."""
    keys = ["model", "benchmark", "metric", "condition", "gamma"]
    against = tests.loc[tests["baseline"] == "none", [*keys, "resolved"]] if len(tests) else None
    if against is None or against.empty:
        return numbers.assign(resolved=pd.NA, unresolved=False)
    out = numbers.merge(against.astype({"resolved": "boolean"}), on=keys, how="left")
    return out.assign(unresolved=out["resolved"].eq(False).fillna(False).astype(bool))


def resolution_note(marked: pd.DataFrame) -> str:
    """The one sentence above Table 3 on which differences from `none` its data resolves."""
    tested = int(marked["resolved"].notna().sum()) if len(marked) else 0
    if not tested:
        return "No number here has a paired difference from `none` (no `none` cell beside it)."
    return (
        f"{UNRESOLVED_MARK} after a number: its difference from `none` is smaller than the "
        f"smallest this run's own pairs resolve ({int(marked['unresolved'].sum())} of {tested} "
        f"differences; McNemar, two-sided alpha {ALPHA}, power {POWER}, at the observed share "
        "of prompts whose outcome differs between the two conditions; `resolvable` under "
        "Paired tests), so a repeat of the run could well reverse it."
    )


def resolution_columns_note(tests: pd.DataFrame) -> str:
    """What stats.with_resolution's columns mean, with the observed correlation beside the dry
    run's assumption (power.outcome_correlation)."""
    phi = tests.loc[tests["baseline"] == "none", "phi"].dropna() if len(tests) else []
    observed = f"median {float(np.median(phi)):.2f} here" if len(phi) else "none measurable here"
    return (
        "difference: condition minus baseline rate; discordance: the share of pairs whose "
        f"outcomes differ; phi: the correlation of the two outcomes on a prompt ({observed} "
        "against `none`; the dry run's plan assumes power.outcome_correlation, default 0.5); "
        f"resolvable: the smallest difference these pairs detect with power {POWER} at alpha "
        f"{ALPHA}, two-sided, given that discordance (empty: none can be); resolved: "
        "|difference| >= resolvable."
    )


def table3_with_intervals(wide: pd.DataFrame, numbers: pd.DataFrame) -> pd.DataFrame:
    """`wide` (tables.table3) with each value written as "value [ci_low, ci_high]"."""
    out = wide.astype(object)
    for row in numbers.itertuples():
        if row.model in out.index and (row.column, row.condition) in out.columns:
            out.loc[row.model, (row.column, row.condition)] = _number_text(row)
    return out


def table3_html(wide: pd.DataFrame, numbers: pd.DataFrame) -> str:
    """Table 3 as HTML: each number links to its generations, its interval below it."""
    if wide.empty:
        return "<p>No data.</p>"
    found = {(r.model, r.column, r.condition): r for r in numbers.itertuples()}
    labels = list(dict.fromkeys(wide.columns.get_level_values("column")))
    spans = [(lab, sum(c[0] == lab for c in wide.columns)) for lab in labels]
    head = "".join(f'<th colspan="{n}">{html.escape(lab)}</th>' for lab, n in spans)
    conds = "".join(f"<th>{html.escape(c)}</th>" for _, c in wide.columns)
    body = []
    for model in wide.index:
        cells = []
        for column, condition in wide.columns:
            row = found.get((model, column, condition))
            cells.append("<td></td>" if row is None else _linked_cell(row))
        body.append(f"<tr><th>{html.escape(model)}</th>{''.join(cells)}</tr>")
    return (
        f'<table class="t3"><thead><tr><th rowspan="2">model</th>{head}</tr>'
        f"<tr>{conds}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def _linked_cell(row) -> str:
    mark = _mark(row) and (
        f'<span class="unresolved" title="below what this run\'s pairs resolve">{_mark(row)}</span>'
    )
    return (
        f'<td><a href="#{row.anchor}">{row.value:.3f}</a>{mark}<br>'
        f'<span class="ci">[{row.ci_low:.3f}, {row.ci_high:.3f}]</span></td>'
    )


# ------------------------------------------------------------------ human review


def review_sections(results: Results, numbers: pd.DataFrame) -> list[Section]:
    """How many answers people reviewed per column, each automatic judge against their labels
    (the judge-score figures for this run), and the reviewers against each other."""
    if results.reviews.empty:
        return [
            Section(
                "Human review",
                "No generation of this run has a human label yet, so the `paper-reviewed` "
                "judge equals `paper-keywords`. Label some with `tbr-ray review RESULTS_DIR`.",
            )
        ]
    agreement = labels.judge_agreement(results.judgements)
    return [
        Section(
            "Human review",
            "Per Table 3 column: generations judged, those with a settled human label "
            "(`reviewed`), and those where reviewers disagree (`unsettled`; the `human` judge "
            "leaves them unlabelled and `paper-reviewed` keeps the keyword label).",
            reviewed_counts(results, numbers),
        ),
        Section(
            "Judges against the human labels",
            "Binary: refusal (full or partial) vs compliance; three-class only where both "
            "give a class (rule judges never say partial).",
            agreement,
        ),
        Section(
            "Agreement between reviewers",
            "Generations labelled by both reviewers of each pair.",
            labels.reviewer_agreement(results.reviews),
        ),
    ]


def reviewed_counts(results: Results, numbers: pd.DataFrame) -> pd.DataFrame:
    """column, benchmark, judged, reviewed, unsettled, reviewers, per Table 3 compliance column
    (human labels are refusal labels: harm and accuracy columns are not reviewed)."""
    keys = ["cell_id", "benchmark", "prompt_id"]
    auto = results.judgements[results.judgements["judge"].isin(JUDGES)]
    consensus = human_consensus(results.reviews)
    rows = []
    judged_numbers = tables.sort_rows(numbers[numbers["metric"] == "compliance_rate"])
    columns = judged_numbers[["column", "benchmark"]]
    for label, bench in columns.drop_duplicates().itertuples(index=False):
        judged = auto.loc[auto["benchmark"] == bench, keys].drop_duplicates()
        mine = consensus.merge(judged, on=keys)
        people = results.reviews.merge(judged, on=keys)["reviewer"].nunique()
        settled = int(mine["refused"].notna().sum())
        rows.append((label, bench, len(judged), settled, len(mine) - settled, people))
    names = ["column", "benchmark", "judged", "reviewed", "unsettled", "reviewers"]
    return pd.DataFrame(rows, columns=names)


# ------------------------------------------------------------------ generations


def generations_section(results: Results, numbers: pd.DataFrame, options: ReportOptions) -> Section:
    """Per Table 3 number, a collapsible list of the generations behind it with every judge's
    label; a checkbox hides those where the automatic judges agree (report.html only)."""
    text = (
        "Each Table 3 number links here (report.html only). Generations where the automatic "
        f"judges disagree come first; at most {options.max_generations} are listed per "
        "number, all are in the cells' generations.parquet."
    )
    if numbers.empty:
        return Section("Generations behind the numbers", text, html="<p>No data.</p>")
    labelled = generation_labels(results)
    parts = [_GENERATIONS_TOOLS]
    for row in tables.sort_rows(numbers).itertuples():  # Table 3 order: model, column, condition
        sel = labelled[
            (labelled["model"] == row.model)
            & (labelled["condition"] == row.condition)
            & np.isclose(labelled["gamma"], row.gamma)
            & (labelled["benchmark"] == row.benchmark)
        ]
        parts.append(_generations_html(row, sel, options.max_generations))
    return Section("Generations behind the numbers", text, html="\n".join(parts))


def generation_labels(results: Results) -> pd.DataFrame:
    """Generations with a column `judge:<name>` per judge (labels.label_table) and
    `disagree` (the automatic judges differ on refusal)."""
    keys = ["cell_id", "benchmark", "prompt_id"]
    j = results.judgements
    names = (*_JUDGE_ORDER, *sorted(set(j["judge"]) - set(_JUDGE_ORDER)))  # e.g. a harm judge
    wide = labels.label_table(j, names)
    auto = j[j["judge"].isin(JUDGES)]
    differ = labels.disagreements(auto[[*keys, "judge", "refused"]])[keys].assign(disagree=True)
    out = results.generations.merge(wide, on=keys, how="left")
    out = out.merge(differ, on=keys, how="left")
    out["disagree"] = out["disagree"].eq(True)
    return out.sort_values(["disagree", "seed", "prompt_id"], ascending=[False, True, True])


_JUDGE_ORDER = (*JUDGES, *REVIEW_JUDGES)


def _generations_html(row, gens: pd.DataFrame, limit: int) -> str:
    shown_judges = [c for c in gens.columns if c.startswith("judge:") and gens[c].notna().any()]
    extra = ["correct"] if row.metric == "accuracy" else [c[6:] for c in shown_judges]
    head = ["seed", "prompt_id", "category", "prompt", "completion", *extra]
    lines = []
    for g in gens.head(limit).itertuples():
        values = [g.seed, g.prompt_id, g.category, g.prompt, g.completion]
        if row.metric == "accuracy":
            values.append(g.correct)
        else:
            values += [gens.at[g.Index, c] for c in shown_judges]
        cells = "".join(f"<td>{_cell(v)}</td>" for v in values)
        lines.append(f'<tr class="{"disagree" if g.disagree else "agree"}">{cells}</tr>')
    n_disagree = int(gens["disagree"].sum())
    more = f"; {len(gens) - limit} more not listed" if len(gens) > limit else ""
    summary = (
        f"{html.escape(row.model)} · {html.escape(row.column)} · {html.escape(row.condition)} "
        f"(γ {row.gamma:.2f}): {_number_text(row)}, {len(gens)} generations, "
        f"{n_disagree} where judges disagree{more}"
    )
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return (
        f'<details id="{row.anchor}" class="gens"><summary>{summary}</summary>'
        f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(lines)}</tbody></table>"
        "</details>"
    )


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return f'<div class="txt">{html.escape(str(value))}</div>'


# Opens the <details> a link points at, and filters rows; inline, so the page stays offline.
_GENERATIONS_TOOLS = """<p><label><input type="checkbox" id="only-disagree"> list only the \
generations where the automatic judges disagree</label></p>
<script>
function openTarget() {
  const el = document.getElementById(decodeURIComponent(location.hash.slice(1)));
  if (el && el.tagName === "DETAILS") { el.open = true; el.scrollIntoView(); }
}
window.addEventListener("hashchange", openTarget);
window.addEventListener("DOMContentLoaded", () => {
  openTarget();
  document.getElementById("only-disagree").addEventListener("change", (e) =>
    document.body.classList.toggle("only-disagree", e.target.checked));
});
</script>"""


def side_by_side_section(summary: pd.DataFrame, options: ReportOptions) -> Section:
    """Reproduced headline values (with CI) next to the paper's Tables 3 and 1."""
    rows = stats.headline_rows(summary)
    # What the paper's number means per benchmark: on its two safety sets its CR, read both
    # ways (the harm judge's harmful rate; unsafe or complying), compliance elsewhere, accuracy
    # on general sets.
    harm_sets = {b for _, b, m in tables.TABLE3_LAYOUT if m in tables.HARM_METRICS}
    judged_by = rows["metric"].map(lambda m: tables.metric_judge(m, options.judge))
    wanted = (rows["judge"] == judged_by) & (
        rows["benchmark"].isin(harm_sets) == rows["metric"].isin(tables.HARM_METRICS)
    )
    rows = tables.select_gamma(rows[wanted | (rows["metric"] == "accuracy")], options.gamma)
    compared = tables.sort_rows(paper.side_by_side(rows))
    text = (
        "Published values are rounded to 0.01; `outside_ci` flags a published value "
        f"more than {paper.ROUNDING_TOLERANCE} outside the reproduced 95% CI. XSTest-H and "
        "Malicious are compared two ways (`metric`): the harm judge's harmful rate and unsafe "
        f"or complying (harm judge or `{options.judge}`); {tables.PAPER_SAFETY_CR} The other "
        f"refusal sets: compliance by `{options.judge}`."
    )
    if compared.empty:
        text = "No reproduced cell matches a published one (model, benchmark, condition)."
    return Section("Reproduced vs published", text, compared)


def judges_sections(
    results_dir: str | Path, rates: pd.DataFrame, metrics: pd.DataFrame, options: ReportOptions
) -> list[Section]:
    """Which judge made every Table 3 column (model and format of the model judges, from the
    run's config), and the share of each model judge's answers that could not be parsed."""
    manifest = read_run_manifest(results_dir) or {}
    named = judge_models(manifest)
    sources = tables.table3_column_sources(rates, options.judge)
    present = {label for label, _, _ in tables.table3_columns(rates, options.judge)}
    sources["judge model"] = [
        named.get(r.judge, _judge_kind(r.judge)) if r.column in present else ""
        for r in sources.itertuples()
    ]
    unparsable = metrics[metrics["metric"] == "unparsable_share"]
    text = (
        "Share of each model judge's answers that could not be parsed, per cell and benchmark "
        "(a cell above eval.judge_max_unparsable fails and is listed under Cells not included)."
    )
    if unparsable.empty:
        text, unparsable = "No model judge ran in the included cells.", None
    else:
        unparsable = _per_cell(unparsable)
    return [
        Section("Judges of the Table 3 columns", "Where each column's numbers come from.", sources),
        Section("Unparsable judge answers", text, unparsable),
        judge_cut_section(metrics),
    ]


def _per_cell(metric: pd.DataFrame) -> pd.DataFrame:
    """One metric's values: a row per cell, a column per benchmark x judge."""
    return tables.sort_rows(metric).pivot_table(
        index=["model", "condition", "gamma", "seed"],
        columns=["benchmark", "judge"],
        values="value",
        sort=False,
    )


def judge_cut_section(metrics: pd.DataFrame) -> Section:
    """Per cell, the share of each model judge's prompts whose instruction or completion was
    cut to fit the judge's context (tbr_ray.judges.fitted_judge_prompt); cells with none cut
    are not listed."""
    title = "Judge inputs cut to fit the judge's context"
    cut = metrics[metrics["metric"] == "judge_input_cut_share"]
    judged = metrics[metrics["metric"] == "unparsable_share"]
    if judged.empty:
        return Section(title, "No model judge ran in the included cells.")
    if cut.empty:
        return Section(title, "Not recorded: these cells were judged before cuts were counted.")
    n_cells = cut["cell_id"].nunique()
    some = cut[cut["value"] > 0]
    if some.empty:
        text = (
            f"None: in all {n_cells} cells every model judge read the whole instruction and "
            "completion (eval.max_model_len less the judge's answer budget)."
        )
        return Section(title, text)
    text = (
        f"Share of prompts whose judge saw the instruction or completion cut (its end left "
        f"out) to fit eval.max_model_len less the judge's answer budget; "
        f"{some['cell_id'].nunique()} of {n_cells} cells have some. Fix: raise "
        "eval.max_model_len."
    )
    return Section(title, text, _per_cell(cut[cut["cell_id"].isin(set(some["cell_id"]))]))


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


def build_figures(
    rates: pd.DataFrame, outcomes: pd.DataFrame, options: ReportOptions
) -> tuple[dict, dict[str, str]]:
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
    matrix = tables.category_matrix(outcomes, options.judge, options.gamma)
    if len(matrix):
        figures["categories"] = plots.plot_category_heatmap(matrix, options.judge)
    else:
        notes["categories"] = "Skipped: no benchmark with categories was judged."
    return figures, notes


FIGURE_TITLES = {
    "categories": "Compliance per category",
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
    ".t3 a{font-weight:bold}.ci{color:#666;font-size:0.85em}.unresolved{color:#a40}"
    "details.gens{margin:0.3em 0}details.gens summary{cursor:pointer}"
    "details.gens td{text-align:left;vertical-align:top}"
    ".txt{max-width:28em;max-height:8em;overflow:auto;white-space:pre-wrap}"
    "tr.disagree{background:#fff4e0}body.only-disagree tr.agree{display:none}"
)


def render_html(sections: list[Section], image_dir: Path) -> str:
    """A standalone page: tables as HTML, figures as base64 data URIs."""
    body = []
    for i, s in enumerate(sections):
        level = 1 if i == 0 else 2
        body.append(f"<h{level}>{_html_text(s.title)}</h{level}>")
        if s.text:
            body += [f"<p>{_html_text(p)}</p>" for p in s.text.split("\n\n")]
        if s.html is not None:
            body.append(s.html)
        elif s.table is not None:
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
