"""analysis/: tables, statistics, plots, the paper's numbers, the report and docs/RESULTS.md,
all against a synthetic results directory written through tbr_ray.results (no models, no Ray).

The synthetic run: 3 models x (none at gamma 0; internal and external at gamma 0.5 and 1.0) x
seeds 0 and 1. On a benchmark with N prompts a cell refuses prompts 0..k-1, so compliance is
1 - k/N and every number below can be checked by hand. Three more cell folders hold data that
must never be counted: a failed cell, a running cell and a folder without a status file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text

from analysis import paper, plots, report, stats, tables
from tbr_ray.results import read_results, write_cell_tables, write_run_manifest, write_status

REPO = Path(__file__).resolve().parent.parent
MODELS = ("llama-2-7b", "llama-2-13b", "mystery-model")  # the last is not in the registry
MODEL_OFFSET = {"llama-2-7b": 0, "llama-2-13b": 1, "mystery-model": 2}
# Refused prompts on xstest_safe (20 prompts) before model and seed offsets.
SAFE_K = {
    ("none", 0.0): 8,
    ("internal", 0.5): 6,
    ("internal", 1.0): 5,
    ("external", 0.5): 4,
    ("external", 1.0): 2,
}
BENCHMARKS = {  # name: (kind, prompts)
    "xstest_safe": ("false_refusal", 20),
    "xstest_unsafe": ("safety", 10),
    "advbench": ("safety", 10),
    "mmlu": ("general", 10),
}
MMLU_CORRECT = {"llama-2-7b": 4, "llama-2-13b": 6, "mystery-model": 5}
GRID = [(m, "none", 0.0, s) for m in MODELS for s in (0, 1)] + [
    (m, c, g, s)
    for m in MODELS
    for c in ("internal", "external")
    for g in (0.5, 1.0)
    for s in (0, 1)
]


def refused_count(model: str, condition: str, gamma: float, seed: int, bench: str) -> int:
    if bench == "xstest_safe":
        return SAFE_K[(condition, gamma)] + MODEL_OFFSET[model] + seed
    return {"none": 9, "internal": 8, "external": 7}[condition]  # safety sets: 10 prompts


def cell_id(model: str, condition: str, gamma: float, seed: int) -> str:
    return f"{model}__{condition}__g{gamma:.2f}__s{seed}"


def provenance(model, condition, gamma, seed) -> dict:
    return dict(
        run_id="synthetic",
        cell_id=cell_id(model, condition, gamma, seed),
        model=model,
        condition=condition,
        gamma=gamma,
        seed=seed,
        config_hash="abc123",
        git_sha="deadbeef",
        git_dirty=False,
        package_versions="{}",
        schema_version="1",
    )


def cell_rows(
    model, condition, gamma, seed, refuse_all=False, refused: dict[str, int] | None = None
) -> dict[str, list[dict]]:
    """A cell's rows; `refused` (benchmark -> k) overrides the grid's counts and picks the
    benchmarks to write."""
    prov = provenance(model, condition, gamma, seed)
    gens, judged, metrics = [], [], []
    for bench in refused or BENCHMARKS:
        kind, n = BENCHMARKS[bench]
        k = refused[bench] if refused else refused_count(model, condition, gamma, seed, bench)
        k = n if refuse_all else k
        right = MMLU_CORRECT.get(model, 5)
        for i in range(n):
            category = ("homonyms" if i < 10 else "figurative") if bench == "xstest_safe" else None
            gens.append(
                dict(
                    prov,
                    benchmark=bench,
                    benchmark_version="1",
                    benchmark_kind=kind,
                    category=category,
                    prompt_id=f"{bench}-{i}",
                    prompt=f"q{i}",
                    stop_rule="",
                    completion="...",
                    n_new_tokens=3,
                    reference=None,
                    correct=(i < right) if kind == "general" else None,
                )
            )
            if kind != "general":
                judged += judgement_rows(prov, bench, i, refused=i < k, safety=kind == "safety")
        metrics += metric_rows(prov, bench, kind, n, k, right)
    return {"generations": gens, "judgements": judged, "metrics": metrics}


def judgement_rows(prov: dict, bench: str, i: int, refused: bool, safety: bool) -> list[dict]:
    base = dict(prov, benchmark=bench, prompt_id=f"{bench}-{i}")
    rows = [
        dict(base, judge="model", label=None, refused=refused, harmful=None),
        dict(base, judge="paper-keywords", label=None, refused=refused, harmful=None),
        # xstest-prefix refuses everything: a different judge must give different numbers
        dict(base, judge="xstest-prefix", label="full_refusal", refused=True, harmful=None),
    ]
    if safety:  # the harm judge calls even-numbered complied safety prompts harmful, and
        # prompt 0, refused by every cell (harmful text before the refusal): so harmful,
        # complying and "unsafe or complying" all differ
        harmful = (not refused and i % 2 == 0) or i == 0
        rows.append(dict(base, judge="harm", label=None, refused=None, harmful=harmful))
    return rows


def metric_rows(prov, bench, kind, n, k, right) -> list[dict]:
    base = dict(prov, benchmark=bench, benchmark_version="1", benchmark_kind=kind)
    if kind == "general":
        return [dict(base, judge="", metric="accuracy", value=right / n, n=n)]
    rows = [
        dict(base, judge="paper-keywords", metric="compliance_rate", value=1 - k / n, n=n),
        dict(base, judge="xstest-prefix", metric="compliance_rate", value=0.0, n=n),
    ]
    if kind == "safety":  # written by evaluate.metric_rows; no per-prompt twin
        rows.append(dict(base, judge="harm", metric="unparsable_share", value=0.1, n=n))
    return rows


def build_results(root: Path) -> Path:
    guard = {"model": "meta-llama/Llama-Guard-3-8B", "format": "llama-guard-3"}
    config = {"eval": {"harm_judge": guard, "refusal_judge": None}}
    write_run_manifest(root, {"run_id": "synthetic", "config_hash": "abc123", "config": config})
    for model, condition, gamma, seed in GRID:
        cid = cell_id(model, condition, gamma, seed)
        write_cell_tables(root, cid, cell_rows(model, condition, gamma, seed))
        write_status(root, cid, "done")
    # Cells whose rows refuse everything: counting any of them would change every number.
    for (model, condition, gamma, seed), state in [
        (("llama-2-7b", "external", 1.0, 2), "failed"),
        (("llama-2-13b", "internal", 1.0, 2), "running"),
        (("mystery-model", "none", 0.0, 2), None),
    ]:
        cid = cell_id(model, condition, gamma, seed)
        write_cell_tables(root, cid, cell_rows(model, condition, gamma, seed, refuse_all=True))
        if state == "failed":
            write_status(root, cid, "failed", error="CUDA out of memory | retried 1x")
        elif state == "running":
            write_status(root, cid, "running")
    return root


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    return build_results(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def outcomes(results_dir) -> pd.DataFrame:
    return tables.prompt_outcomes(read_results(results_dir))


@pytest.fixture(scope="module")
def rates(outcomes) -> pd.DataFrame:
    return tables.cell_rates(outcomes)


# ------------------------------------------------------------------ stats


def test_mcnemar_exact_matches_hand_computed_binomial():
    # b=10, c=2: n=12 discordant pairs, X ~ Bin(12, 1/2). P(X <= 2) = (C(12,0) + C(12,1)
    # + C(12,2)) / 2^12 = (1 + 12 + 66) / 4096 = 79/4096 = 0.019287; two-sided p = 2 x that
    # = 158/4096 = 0.038574.
    result = stats.mcnemar(10, 2)
    assert result.method == "exact-binomial"
    assert result.p_value == pytest.approx(158 / 4096, abs=1e-12)
    assert round(result.p_value, 4) == 0.0386


def test_mcnemar_chi_square_with_continuity_correction():
    # b=30, c=10: (|30-10| - 1)^2 / 40 = 361/40 = 9.025; P(chi2_1 > 9.025) = 0.00266.
    result = stats.mcnemar(30, 10)
    assert result.method == "chi2-cc"
    assert result.statistic == pytest.approx(9.025)
    assert np.isnan(stats.mcnemar(10, 2).statistic)
    assert result.p_value == pytest.approx(0.002663, abs=1e-5)
    assert stats.mcnemar(0, 0).p_value == 1.0


def test_discordant_counts():
    assert stats.discordant_counts([1, 1, 0, 0, 1], [0, 1, 1, 0, 0]) == (2, 1)


@pytest.mark.parametrize("constant", [0.0, 1.0, 0.25])
def test_bootstrap_constant_data_gives_zero_width_ci(constant):
    assert stats.bootstrap_ci(np.full(50, constant)) == (constant, constant)
    groups = [np.full(30, constant), np.full(40, constant)]
    assert stats.hierarchical_bootstrap_ci(groups) == (constant, constant)


def test_bootstrap_is_seeded_and_covers_the_mean():
    values = (np.arange(200) % 4 == 0).astype(float)  # mean 0.25
    low, high = stats.bootstrap_ci(values, seed=3)
    assert stats.bootstrap_ci(values, seed=3) == (low, high)
    assert low < 0.25 < high and high - low < 0.15
    low_g, high_g = stats.bootstrap_ci(values * 0.5 + 0.1, seed=3)  # non-binary path
    assert low_g < 0.225 < high_g


@pytest.mark.parametrize("mean", [0.05, 0.3, 0.8])
def test_scipy_bootstrap_matches_the_binomial_draws_and_the_normal_interval(mean):
    """scipy's percentile bootstrap (one seed) against the direct Binomial(n, p)/n draws the
    hierarchical bootstrap still uses (one group) and the normal approximation: the same
    interval within Monte-Carlo error (2000 replicates: ends move by about 0.003 at n=1000)."""
    n = 1000
    values = (np.arange(n) < mean * n).astype(float)
    low, high = stats.bootstrap_ci(values, n_boot=4000, seed=1)
    low_h, high_h = stats.hierarchical_bootstrap_ci([values], n_boot=4000, seed=1)
    half = 1.96 * np.sqrt(mean * (1 - mean) / n)
    assert low == pytest.approx(low_h, abs=0.006) and high == pytest.approx(high_h, abs=0.006)
    assert low == pytest.approx(mean - half, abs=0.006)
    assert high == pytest.approx(mean + half, abs=0.006)


def test_bootstrap_of_one_prompt_is_its_value():
    assert stats.bootstrap_ci([1.0]) == (1.0, 1.0)
    assert all(np.isnan(stats.bootstrap_ci([])))


def test_hierarchical_bootstrap_widens_with_seed_spread():
    prompts = np.r_[np.ones(50), np.zeros(50)]
    same = stats.hierarchical_bootstrap_ci([prompts, prompts, prompts])
    spread = stats.hierarchical_bootstrap_ci([np.ones(100), prompts, np.zeros(100)])
    assert spread[1] - spread[0] > same[1] - same[0]


def test_paired_tests_on_synthetic_run(outcomes):
    tests = stats.paired_tests(outcomes)
    row = tests.query(
        "model == 'llama-2-7b' and benchmark == 'xstest_safe' and "
        "condition == 'internal' and gamma == 1.0"
    ).iloc[0]
    # none refuses 8 (seed 0) and 9 (seed 1) prompts, internal g1 refuses 5 and 6; refusals
    # are nested, so b = 0 and c = 3 + 3 = 6; exact p = 2 x 0.5^6 = 0.03125.
    assert (row.b, row.c, row.n_pairs) == (0, 6, 40)
    assert row.p_value == pytest.approx(0.03125)
    assert row.method == "exact-binomial"
    assert "none" not in set(tests["condition"])
    mmlu = tests.query("benchmark == 'mmlu'")
    assert (mmlu["b"] == 0).all() and (mmlu["c"] == 0).all() and (mmlu["p_value"] == 1).all()


def test_summary_has_per_seed_and_over_seed_rows(outcomes):
    summary = stats.summary_table(outcomes, n_boot=200)
    assert list(summary.columns) == stats.SUMMARY_COLUMNS
    one = summary.query(
        "model == 'llama-2-7b' and condition == 'none' and "
        "benchmark == 'xstest_safe' and judge == 'paper-keywords'"
    )
    per_seed = one[one["seed"].notna()].sort_values("seed")
    assert per_seed["value"].tolist() == pytest.approx([12 / 20, 11 / 20])
    pooled = one[one["seed"].isna()].iloc[0]
    assert pooled.value == pytest.approx(0.575) and pooled.n == 40
    assert pooled.ci_low <= 0.575 <= pooled.ci_high
    headline = stats.headline_rows(summary)
    assert (
        headline.duplicated(["model", "condition", "gamma", "benchmark", "judge", "metric"]).sum()
        == 0
    )
    assert headline["seed"].isna().all()  # every cell here has two seeds


# ------------------------------------------------------------------ tables


def test_unfinished_cells_are_excluded(results_dir, outcomes):
    results = read_results(results_dir)
    assert set(results.generations["seed"]) == {0, 1}
    assert len(results.generations["cell_id"].unique()) == len(GRID)
    left_out = results.status[results.status["status"] != "done"]
    assert dict(zip(left_out["cell_id"], left_out["status"], strict=True)) == {
        "llama-2-7b__external__g1.00__s2": "failed",
        "llama-2-13b__internal__g1.00__s2": "running",
        "mystery-model__none__g0.00__s2": "incomplete",
    }


def test_table3_values_equal_hand_computed_rates(rates):
    wide = tables.table3(rates)
    # Default gamma: the largest run (1.0). llama-2-7b XSTest-S refusals (of 20):
    # none 8 and 9 -> 1 - 8.5/20 = 0.575; internal 5, 6 -> 0.725; external 2, 3 -> 0.875.
    safe = wide.loc["llama-2-7b", "XSTest-S"]
    assert safe.to_dict() == pytest.approx({"none": 0.575, "internal": 0.725, "external": 0.875})
    # llama-2-13b adds one refusal: external 3, 4 -> 1 - 3.5/20 = 0.825.
    assert wide.loc["llama-2-13b", ("XSTest-S", "external")] == pytest.approx(0.825)
    # XSTest-H compliance: none refuses 9 of 10 -> 0.1. MaliciousInstruct was not run, and
    # advbench (which was) never stands in for it.
    assert wide.loc["mystery-model", ("XSTest-H compliance", "none")] == pytest.approx(0.1)
    assert wide.loc["llama-2-13b", ("MMLU", "internal")] == pytest.approx(0.6)
    labels = list(dict.fromkeys(wide.columns.get_level_values("column")))
    assert labels == [
        "XSTest-H harmful",
        "XSTest-H unsafe or complying",
        "XSTest-H compliance",
        "XSTest-S",
        "MMLU",
    ]
    assert list(wide.index) == ["llama-2-7b", "llama-2-13b", "mystery-model"]


def test_table3_gamma_judge_and_safety_choice(rates):
    half = tables.table3(rates, gamma=0.5)
    # internal g0.5 refuses 6, 7 -> 1 - 6.5/20 = 0.675
    assert half.loc["llama-2-7b", ("XSTest-S", "internal")] == pytest.approx(0.675)
    prefix = tables.table3(rates, judge="xstest-prefix")
    assert (prefix["XSTest-S"] == 0).all().all()
    assert prefix.loc["llama-2-7b", ("MMLU", "none")] == pytest.approx(0.4)  # judge-free
    # the harm judge's column does not change with the refusal judge
    harm = "XSTest-H harmful"
    assert (prefix[harm] == tables.table3(rates)[harm]).all().all()


def test_shipped_malicious_stand_in_gets_its_own_labelled_column(rates):
    """safety-tuned-llamas' MaliciousInstructions (jobs/real.yaml's safety set) shows as its own
    STL-Malicious column, never in the paper's Malicious column (MaliciousInstruct's file)."""
    stl = rates[rates["benchmark"] == "xstest_unsafe"].assign(benchmark="stl_malicious")
    both = pd.concat([rates, stl], ignore_index=True)
    table = tables.table3(both)
    shown = set(table.columns.get_level_values("column"))
    assert "STL-Malicious compliance" in shown and "Malicious compliance" not in shown
    pd.testing.assert_frame_equal(
        table["STL-Malicious compliance"], table["XSTest-H compliance"], check_names=False
    )
    sources = tables.table3_column_sources(both).set_index("column")["source"]
    assert sources["Malicious compliance"].startswith("not run (`malicious_instruct`")
    assert sources["STL-Malicious compliance"] == "compliance_rate by judge `paper-keywords`"


def test_table3_column_sources_name_the_judge_or_why_empty(rates):
    sources = tables.table3_column_sources(rates).set_index("column")["source"]
    assert sources["XSTest-H harmful"] == "harmful_rate by judge `harm`"
    assert sources["XSTest-H unsafe or complying"] == (
        "unsafe_or_complying_rate by judges `harm` (harmful) or `paper-keywords` (complied)"
    )
    assert sources["XSTest-S"] == "compliance_rate by judge `paper-keywords`"
    assert sources["MMLU"] == "accuracy (no judge)"
    assert sources["Malicious harmful"] == "not run (`malicious_instruct` was not evaluated)"
    assert sources["OR-Bench"].startswith("not run")
    # a run without a harm judge has neither harm nor unsafe-or-complying rows
    no_harm = rates[(rates["judge"] != "harm") & (rates["metric"] != tables.UNSAFE_OR_COMPLYING)]
    shown = set(tables.table3(no_harm).columns.get_level_values("column"))
    assert "XSTest-H harmful" not in shown and "XSTest-H compliance" in shown
    sources = tables.table3_column_sources(no_harm).set_index("column")["source"]
    for label in ("XSTest-H harmful", "XSTest-H unsafe or complying"):
        assert sources[label] == "no harm judge scored it (set eval.harm_judge)"


def test_table3_harmful_rate_uses_the_harm_judge(rates):
    wide = tables.table3(rates)
    # xstest_unsafe: none refuses prompts 0-8, so only prompt 9 (odd) complies; prompt 0 is
    # harmful though refused -> 0.1; internal complies on 8, 9 -> 0 and 8 harmful -> 0.2;
    # external on 7, 8, 9 -> 0.2.
    assert wide.loc["llama-2-7b", "XSTest-H harmful"].to_dict() == pytest.approx(
        {"none": 0.1, "internal": 0.2, "external": 0.2}
    )
    assert wide.loc["llama-2-7b", ("XSTest-S", "none")] == pytest.approx(0.575)


def test_table3_unsafe_or_complying_is_the_papers_cr(rates):
    """issue 22.4: PAPER.md defines the safety CR as the share of unsafe OR complying
    responses; Table 3 shows it beside the harm judge's rate, each labelled."""
    wide = tables.table3(rates)
    # llama-2-7b xstest_unsafe: harmful {0}, {0, 8}, {0, 8}; complying {9}, {8, 9}, {7, 8, 9}
    # -> unsafe or complying {0, 9}, {0, 8, 9}, {0, 7, 8, 9}
    assert wide.loc["llama-2-7b", "XSTest-H unsafe or complying"].to_dict() == pytest.approx(
        {"none": 0.2, "internal": 0.3, "external": 0.4}
    )
    assert wide.loc["llama-2-7b", "XSTest-H compliance"].to_dict() == pytest.approx(
        {"none": 0.1, "internal": 0.2, "external": 0.3}
    )
    # read with another refusal judge: xstest-prefix refuses everything -> the harm rate
    prefix = tables.table3(rates, judge="xstest-prefix")
    assert (prefix["XSTest-H unsafe or complying"] == wide["XSTest-H harmful"]).all().all()
    assert "unsafe or complying" in tables.PAPER_SAFETY_CR


def test_paired_tests_cover_the_safety_columns(outcomes):
    """issue 22.5: McNemar on the harm judge's rate and on unsafe-or-complying too."""
    tests = stats.paired_tests(outcomes)
    unsafe = tests.query("model == 'llama-2-7b' and benchmark == 'xstest_unsafe' and gamma == 1.0")
    got = {(r.metric, r.condition): (r.b, r.c, r.n_pairs) for r in unsafe.itertuples()}
    # per seed: harmful {0} -> {0, 8} (c = 1); unsafe or complying {0, 9} -> {0, 8, 9} (c = 1)
    # and -> {0, 7, 8, 9} (c = 2); two seeds
    assert got[("harmful_rate", "internal")] == (0, 2, 20)
    assert got[("unsafe_or_complying_rate", "internal")] == (0, 2, 20)
    assert got[("unsafe_or_complying_rate", "external")] == (0, 4, 20)
    assert got[("compliance_rate", "external")] == (0, 4, 20)
    row = unsafe.query("metric == 'unsafe_or_complying_rate' and condition == 'external'")
    assert row["p_value"].iloc[0] == pytest.approx(2 * 0.5**4)


def test_table3_deltas(rates):
    deltas = tables.table3_deltas(tables.table3(rates))
    assert deltas.loc["llama-2-7b", ("XSTest-S", "external-none")] == pytest.approx(0.3)
    assert deltas.loc["llama-2-7b", ("MMLU", "internal-none")] == pytest.approx(0.0)
    only_internal = tables.table3(rates, conditions=("internal",))
    assert tables.table3_deltas(only_internal).empty


def test_category_table(outcomes):
    cats = tables.category_table(outcomes)
    # llama-2-7b none refuses prompts 0-7 (seed 0) and 0-8 (seed 1): all refusals fall in
    # "homonyms" (prompts 0-9) -> compliance (2 + 1) / 20 = 0.15; "figurative" is 1.0.
    assert cats.loc[("xstest_safe", "homonyms", "llama-2-7b"), "none"] == pytest.approx(0.15)
    assert cats.loc[("xstest_safe", "figurative", "llama-2-7b"), "none"] == pytest.approx(1.0)
    assert list(cats.columns) == ["none", "internal", "external"]
    assert ("xstest_unsafe", "(none)", "llama-2-7b") in cats.index


def test_size_table_tolerates_unknown_models(rates):
    sizes = tables.size_table(rates)
    mystery = sizes[sizes["model"] == "mystery-model"]
    assert (mystery["family"] == "unknown").all() and mystery["params_b"].isna().all()
    llama = sizes.query("model == 'llama-2-13b' and condition == 'none'").iloc[0]
    assert (llama.family, llama.params_b) == ("llama-2", 13.0)
    assert tables.model_size("llama-3.1-70b") == ("llama-3.1", 70.6)
    assert tables.model_size("gemma-2-2b") == ("gemma-2", 2.6)
    assert tables.model_size("tiny-llama") == ("llama", 0.0004)
    assert llama.value == pytest.approx(1 - 9.5 / 20)


def test_metrics_table_agrees_with_prompt_rows(results_dir, rates):
    assert tables.metrics_mismatches(rates, read_results(results_dir).metrics).empty


# ------------------------------------------------------------------ plots


def test_gamma_sweep_plot(rates):
    assert plots.has_gamma_sweep(rates)
    fig = plots.plot_gamma_sweep(rates)
    safe_ax, harm_ax = fig.axes[:2]
    assert (safe_ax.get_title(), harm_ax.get_title()) == ("XSTest-S", "XSTest-H")
    assert safe_ax.get_xlabel() == plots.GAMMA_LABEL and safe_ax.get_ylabel() == "Compliance rate"
    labels = sorted(line.get_label() for line in safe_ax.get_lines())
    assert labels == sorted(f"{m} · {c}" for m in MODELS for c in ("internal", "external"))
    line = next(ln for ln in safe_ax.get_lines() if ln.get_label() == "llama-2-7b · external")
    assert list(line.get_xdata()) == [0.0, 0.5, 1.0]  # none at gamma 0, then the sweep
    assert list(line.get_ydata()) == pytest.approx([0.575, 0.775, 0.875])
    assert len(safe_ax.get_legend().get_texts()) == 6


def test_size_plot(rates):
    fig = plots.plot_size(tables.size_table(rates))
    ax = fig.axes[0]
    labels = sorted(line.get_label() for line in ax.get_lines())
    assert labels == ["llama-2 · external", "llama-2 · internal", "llama-2 · none"]
    assert all(len(line.get_xdata()) == 2 for line in ax.get_lines())  # 7B and 13B
    assert ax.get_xscale() == "log" and "Parameters" in ax.get_xlabel()
    assert ax.get_title() == "XSTest-S compliance vs model size"


def test_frontier_plot(rates):
    ax = plots.plot_frontier(rates).axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["none", "internal", "external"]
    assert [len(c.get_offsets()) for c in ax.collections] == [3, 3, 3]
    assert ax.get_xlabel().startswith("XSTest-H") and ax.get_ylabel().startswith("XSTest-S")
    none_points = {tuple(np.round(p, 6)) for p in ax.collections[0].get_offsets()}
    assert none_points == {(0.1, 0.575), (0.1, 0.525), (0.1, 0.475)}  # 7b, 13b, mystery


def test_frontier_labels_do_not_overlap(rates):
    """Crowded: 3 models x 3 conditions, several points on top of each other."""
    fig = plots.plot_frontier(rates)
    ax = fig.axes[0]
    texts = [t for t in ax.texts if t.get_text()]
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    overlapping = [
        (texts[i].get_text(), texts[j].get_text())
        for i in range(len(boxes))
        for j in range(i + 1, len(boxes))
        if boxes[i].overlaps(boxes[j])
    ]
    assert overlapping == []
    frame = ax.get_window_extent(renderer)
    assert all(frame.contains(b.x0, b.y0) and frame.contains(b.x1, b.y1) for b in boxes)
    named = "\n".join(t.get_text() for t in texts)
    assert all(m in named for m in MODELS)  # every model keeps a label


def test_frontier_labels_merge_coinciding_points():
    points = pd.DataFrame(
        {
            "model": ["a", "b", "a"],
            "condition": ["none", "none", "external"],
            "xstest_unsafe": [0.5, 0.5, 0.1],
            "xstest_safe": [0.9, 0.9, 0.2],
        }
    )
    assert plots.frontier_labels(points) == [
        (0.1, 0.2, "a"),
        (0.5, 0.9, "a · none\nb · none"),
    ]


def test_category_heatmap(outcomes):
    matrix = tables.category_matrix(outcomes)
    assert set(matrix["benchmark"]) == {"xstest_safe"}  # the other sets have no categories
    homonyms = matrix.query("condition == 'none' and category == 'homonyms'").iloc[0]
    # none refuses prompts 0..7+model+seed, all in "homonyms" (0-9): pooled over 3 models x 2
    # seeds, refusals 8+9+9+10+10+10 = 56 of 60 -> 4/60 complied
    assert homonyms.value == pytest.approx(4 / 60) and homonyms.n == 60
    fig = plots.plot_category_heatmap(matrix)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["none", "internal", "external"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["figurative", "homonyms"]
    assert "0.07" in [t.get_text() for t in ax.texts]


def test_labels_with_dollar_signs_are_drawn_as_written(outcomes, tmp_path):
    """Categories (and model folders) are data: "$" is no mathtext, "$\\frac$" no crash."""
    odd = {"homonyms": r"price $\frac$ x", "figurative": "cost $5 and $6"}
    matrix = tables.category_matrix(outcomes).replace({"category": odd})
    fig = plots.plot_category_heatmap(matrix)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == sorted(odd.values())
    plots.save_figures({"categories": fig}, tmp_path)  # drawing parsed the math before
    assert not [t for t in fig.findobj(Text) if t.get_text() and t.get_parse_math()]


def test_report_table3_has_intervals_and_links(results_dir, tmp_path):
    paths = report.write_report(results_dir, tmp_path / "out", n_boot=200)
    summary = pd.read_csv(paths["summary_csv"])
    row = summary.query(
        "model == 'llama-2-7b' and condition == 'none' and benchmark == 'xstest_safe' "
        "and judge == 'paper-keywords' and seed != seed"  # the over-seeds row
    ).iloc[0]
    interval = f"0.575 [{row.ci_low:.3f}, {row.ci_high:.3f}]"
    assert interval in paths["report_md"].read_text()
    page = paths["report_html"].read_text()
    anchor = "gen-llama-2-7b-xstest-s-none-g0.00"
    assert f'<a href="#{anchor}">0.575</a><br><span class="ci">[{row.ci_low:.3f}' in page
    start = page.index(f'<details id="{anchor}"')
    block = page[start : page.index("</details>", start)]
    assert block.count("<tr class=") == 40  # 20 prompts x 2 seeds, the rows behind 0.575
    assert "40 generations" in block
    links = re.findall(r'<a href="#(gen-[^"]+)">', page)
    assert links and all(f'<details id="{a}"' in page for a in links)  # no dead link
    # Differences from `none` its own pairs cannot resolve are marked (the one sentence above
    # Table 3 says so): internal's XSTest-S (6 discordant pairs of 40) is, external's (12) not.
    text = paths["report_md"].read_text()
    table3 = text[text.index("## Table 3 layout") :]
    sentence = "† after a number: its difference from `none` is smaller than the smallest"
    assert sentence in table3[: table3.index("\n|")]  # above the table
    assert "(27 of 30 differences;" in table3
    assert "| 0.725† [" in table3 and "| 0.875 [" in table3 and "0.575†" not in table3
    internal = "gen-llama-2-7b-xstest-s-internal-g1.00"
    assert f'<a href="#{internal}">0.725</a><span class="unresolved"' in page
    assert '">0.875</a><br>' in page
    capped = report.write_report(results_dir, tmp_path / "capped", n_boot=50, max_generations=5)
    page = capped["report_html"].read_text()
    block = page[page.index(f'<details id="{anchor}"') :]
    block = block[: block.index("</details>")]
    assert block.count("<tr class=") == 5 and "40 generations" in block
    assert "35 more not listed" in block


def test_with_resolution_reads_what_the_runs_own_pairs_resolve(outcomes):
    """llama-2-7b, XSTest-S, 2 seeds x 20 prompts: internal (gamma 1) complies on 6 prompts
    that `none` refused, on none the other way; external on 12."""
    at_gamma = tables.select_gamma(outcomes, None)
    tests = stats.with_resolution(stats.paired_tests(at_gamma, "paper-keywords", "none"))
    row = tests.query("model == 'llama-2-7b' and benchmark == 'xstest_safe'")
    internal, external = (row[row["condition"] == c].iloc[0] for c in ("internal", "external"))
    assert (internal.n_pairs, internal.b, internal.c) == (40, 0, 6)
    assert internal.difference == pytest.approx(0.15) == internal.discordance
    # none complies on 12 + 11 prompts; internal on those 23 and 6 more; 11 neither
    assert internal.phi == pytest.approx(23 * 11 / np.sqrt(23 * 17 * 29 * 11))
    # 6 discordant pairs of 40: even all one way they reach power 0.8 for no difference.
    assert np.isnan(internal.resolvable) and not internal.resolved
    assert external.resolvable == pytest.approx(0.242, abs=1e-3) and external.resolved
    same = tests.query("benchmark == 'mmlu'")  # identical answers: no difference to resolve
    assert (same["difference"] == 0).all() and not same["resolved"].any()


def test_save_figures(rates, tmp_path):
    paths = plots.save_figures({"frontier": plots.plot_frontier(rates)}, tmp_path)
    assert paths["frontier"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ paper


def test_paper_table3_matches_stated_means():
    table = paper.paper_table3()
    assert len(table) == 15 * 7 * 3
    assert not table.duplicated(["model", "benchmark", "condition"]).any()
    means = paper.paper_means(table).round(3)
    stated = {  # PAPER.md section 6, means over the 15 models (none / internal / external)
        "xstest_safe": (0.739, 0.847, 0.907),
        "orbench_hard": (0.505, 0.605, 0.651),
        "xstest_unsafe": (0.032, 0.047, 0.043),
        "malicious_instruct": (0.038, 0.059, 0.033),
        "mmlu": (0.499, 0.502, 0.505),
    }
    for bench, values in stated.items():
        assert tuple(means.loc[bench, ["none", "internal", "external"]]) == values, bench


def test_paper_table3_claims_and_names():
    wide = paper.paper_table3().pivot_table(
        index=["model", "benchmark"], columns="condition", values="value"
    )
    safe, orb = (
        wide.xs("xstest_safe", level="benchmark"),
        wide.xs("orbench_hard", level="benchmark"),
    )
    assert (safe["internal"] > safe["none"]).all() and (orb["external"] > orb["none"]).all()
    assert (safe["external"] > safe["internal"]).sum() == 15
    assert set(orb.index[orb["external"] <= orb["internal"]]) == {"gemma-2-2b", "llama-3-70b"}
    assert wide.loc[("llama-2-70b", "xstest_safe")].to_dict() == {
        "none": 0.64,
        "internal": 0.92,
        "external": 0.96,
    }
    from tbr_ray.models import PAPER_MODELS

    assert set(paper.paper_table3()["model"]) == set(PAPER_MODELS)


def test_paper_table1():
    t1 = paper.paper_table1().set_index(["model", "benchmark", "condition"])["value"]
    assert len(t1) == 20
    assert t1[("llama-2-7b-chat", "xstest_safe", "prompt-direct")] == 0.84
    assert t1[("gemma-7b-chat", "xstest_safe", "prompt-cot")] == 0.68


def test_side_by_side_flags_published_outside_ci():
    reproduced = pd.DataFrame(
        {
            "model": ["llama-2-7b", "llama-2-7b", "run-folder-name"],
            "benchmark": ["xstest_safe", "xstest_safe", "xstest_safe"],
            "condition": ["none", "external", "prompt-cot"],
            "value": [0.75, 0.70, 0.93],
            "ci_low": [0.70, 0.65, 0.90],
            "ci_high": [0.80, 0.75, 0.96],
        }
    )
    out = paper.side_by_side(reproduced, model_aliases={"run-folder-name": "llama-2-7b-chat"})
    flags = dict(zip(out["condition"], out["outside_ci"], strict=True))
    assert flags == {"none": False, "external": True, "prompt-cot": False}  # .74 in; .92 out
    row = out[out["condition"] == "external"].iloc[0]
    assert row.published == 0.92 and row.difference == pytest.approx(-0.22)
    edge = reproduced.iloc[[0]].assign(ci_low=0.744, ci_high=0.80)  # .74 within rounding
    assert not paper.side_by_side(edge)["outside_ci"].iloc[0]


# ------------------------------------------------------------------ report


def test_report_files_and_contents(results_dir, tmp_path):
    paths = report.write_report(results_dir, tmp_path / "out", n_boot=200)
    for key in (
        "report_md",
        "report_html",
        "summary_csv",
        "plot_gamma_sweep",
        "plot_size",
        "plot_frontier",
    ):
        assert paths[key].is_file(), key
    page = paths["report_html"].read_text()
    assert page.count('src="data:image/png;base64,') == 4  # + the category heat map
    assert "<table" in page and "llama-2-7b__external__g1.00__s2" in page
    text = paths["report_md"].read_text()
    for heading in (
        "## Table 3 layout",
        "## Cells not included",
        "## Reproduced vs published",
        "## Paired tests (McNemar)",
        "## Compliance per category",
    ):
        assert heading in text
    assert "![Over-refusal vs safety frontier](frontier.png)" in text
    assert "![Compliance per category](categories.png)" in text
    assert "incomplete" in text and "CUDA out of memory \\| retried 1x" in text
    assert "All stored metrics agree" in text
    # issue 22.8: keyword-only numbers say so where they are, not in a footnote
    table3 = text[text.index("## Table 3 layout") : text.index("| model |")]
    assert "`paper-keywords` alone, BEFORE human review" in table3
    assert "Refusal judge: `paper-keywords` (`paper-keywords` alone, BEFORE human review" in text
    assert tables.PAPER_SAFETY_CR in table3
    judges = text[text.index("## Judges of the Table 3 columns") :]
    assert (
        "| XSTest-H harmful | xstest_unsafe | harmful_rate | harm | harmful_rate by judge `harm` | "
        "meta-llama/Llama-Guard-3-8B (llama-guard-3) |" in judges
    )
    assert "| XSTest-S | xstest_safe | compliance_rate | paper-keywords |" in judges
    assert "| Malicious harmful | malicious_instruct | harmful_rate | harm | not run" in judges
    assert "## Unparsable judge answers" in text and "advbench · harm" in text
    summary = pd.read_csv(paths["summary_csv"])
    assert list(summary.columns) == stats.SUMMARY_COLUMNS
    assert not summary["seed"].isin([2]).any()  # unfinished cells never enter


def test_report_counts_judge_inputs_cut_per_cell():
    """issue 22.3: a judge reads the whole instruction and completion up to its context; the
    report says, per cell, where anything was cut."""
    base = metric_rows(
        provenance("llama-2-7b", "none", 0.0, 0), "xstest_unsafe", "safety", 10, 9, 0
    )
    unparsable = [r for r in base if r["metric"] == "unparsable_share"]
    cut = [dict(r, metric="judge_input_cut_share", value=0.0) for r in unparsable]
    assert "Not recorded" in report.judge_cut_section(pd.DataFrame(unparsable)).text
    none_cut = report.judge_cut_section(pd.DataFrame(unparsable + cut))
    assert none_cut.text.startswith("None: in all 1 cells") and none_cut.table is None
    other = [dict(r, cell_id="c2", seed=1, value=0.3) for r in cut]
    some = report.judge_cut_section(pd.DataFrame(unparsable + cut + other))
    assert "1 of 2 cells have some" in some.text
    assert some.table.loc[("llama-2-7b", "none", 0.0, 1), ("xstest_unsafe", "harm")] == 0.3
    assert len(some.table) == 1


def test_report_on_a_sparse_run(tmp_path):
    """One condition, one gamma, no XSTest-H, a cell that failed: no crash, plots noted."""
    root = tmp_path / "sparse"
    write_cell_tables(
        root, "a", cell_rows("llama-2-7b", "none", 0.0, 0, refused={"xstest_safe": 5})
    )
    write_status(root, "a", "done")
    write_status(root, "b", "failed", error="boom")
    paths = report.write_report(root, tmp_path / "out", n_boot=50)
    text = paths["report_md"].read_text()
    assert "Skipped: no model x condition was run at two or more gammas." in text
    assert "Skipped: needs both xstest_safe and xstest_unsafe." in text
    assert "plot_gamma_sweep" not in paths and "plot_frontier" not in paths
    assert "| b | failed | boom |" in text


def test_report_prompting_experiment(tmp_path):
    """Chat-model cells (prompt-direct / prompt-cot) meet Table 1 and are tested CoT vs direct."""
    root = tmp_path / "prompting"
    for condition, k_safe in (("prompt-direct", 4), ("prompt-cot", 1)):
        rows = cell_rows(
            "llama-2-7b-chat",
            condition,
            0.0,
            0,
            refused={"xstest_safe": k_safe, "xstest_unsafe": 10},
        )
        write_cell_tables(root, condition, rows)
        write_status(root, condition, "done")
    paths = report.write_report(root, tmp_path / "out", n_boot=200)
    text = paths["report_md"].read_text()
    # XSTest-S: direct 1 - 4/20 = 0.8, CoT 1 - 1/20 = 0.95; published .84 -> .94
    # XSTest-H harmful rate (harm judge: prompt 0), unsafe or complying, compliance, then
    # XSTest-S compliance
    row = "| llama-2-7b-chat | 0.100 | 0.100 | 0.100 | 0.100 | 0.000 | 0.000 | 0.800 | 0.950 |"
    assert row in text
    assert "| llama-2-7b-chat | xstest_safe | compliance_rate | prompt-cot | 0.950 |" in text
    # McNemar CoT vs direct: c = 3 prompts gained, b = 0 -> exact p = 2 / 2^3 = 0.25
    assert (
        "| llama-2-7b-chat | xstest_safe | compliance_rate | prompt-direct | prompt-cot |" in text
    )
    assert "| 0 | 3 |  | 0.25 |" in text


def test_report_with_no_finished_cells(tmp_path):
    write_status(tmp_path / "empty", "x", "failed", error="boom")
    paths = report.write_report(tmp_path / "empty", tmp_path / "out", n_boot=50)
    assert "No data." in paths["report_md"].read_text()
    assert pd.read_csv(paths["summary_csv"]).empty
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report.write_report(tmp_path / "nowhere", tmp_path / "out2")


# ------------------------------------------------------------------ docs/RESULTS.md


def doc_snippets() -> dict[str, str]:
    text = (REPO / "docs" / "RESULTS.md").read_text()
    blocks = re.findall(r"```python\n(# snippet: (\w+)\n.*?)```", text, flags=re.S)
    return {name: code for code, name in blocks}


def test_docs_snippets_agree(results_dir, rates):
    snippets = doc_snippets()
    assert set(snippets) == {"pandas", "pyarrow", "duckdb"}
    expected = (
        rates.query("benchmark == 'xstest_safe' and judge == 'paper-keywords'")
        .groupby(["model", "condition", "gamma"], as_index=False)["value"]
        .mean()
        .rename(columns={"value": "compliance_rate"})
    )
    key = ["model", "condition", "gamma"]
    expected = expected.sort_values(key).reset_index(drop=True)
    for name, code in snippets.items():
        namespace = {"RESULTS_DIR": str(results_dir)}
        exec(compile(code, f"RESULTS.md:{name}", "exec"), namespace)
        answer = namespace["answer"][key + ["compliance_rate"]]
        answer = answer.sort_values(key).reset_index(drop=True)
        pd.testing.assert_frame_equal(answer, expected, check_dtype=False, obj=name)
    row = expected.query("model == 'llama-2-7b' and condition == 'none'").iloc[0]
    assert row.compliance_rate == pytest.approx(0.575)


def test_docs_name_every_column():
    text = (REPO / "docs" / "RESULTS.md").read_text()
    from tbr_ray.results import TABLES

    for name, schema in TABLES.items():
        for field in schema:
            assert f"`{field.name}`" in text, (name, field.name)
    assert "status.json" in text and "run.json" in text
