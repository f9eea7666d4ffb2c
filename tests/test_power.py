"""The power of the paired design (tbr_ray.plan.power): checked against a seeded Monte Carlo of
the design run through the report's own McNemar test, against Connor's normal approximation,
and the dry run's power section (tbr_ray.plan.power_plan) on the paper grid.

Pure and fast (no Ray):
    pytest tests/test_power.py -q
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from analysis.paper import published_pairs
from analysis.stats import mcnemar
from analysis.tables import TABLE3_LAYOUT, planned_columns
from tbr_ray.config import load_config
from tbr_ray.plan.power import (
    _tail_edge,
    connor_pairs,
    discordance,
    mcnemar_power,
    pairs_needed,
    resolvable_difference,
    resolvable_shift,
)
from tbr_ray.plan.power_plan import format_power, power_rows

REPO = Path(__file__).resolve().parent.parent
# Monte Carlo: 20,000 replicate runs; the standard error of a share near 0.8 is
# sqrt(0.8 x 0.2 / 20,000) = 0.0028, so 0.015 is over five standard errors. Powers that ignore
# the report's test miss by more: at 250 pairs and 15% discordance the uncorrected chi-square
# says 0.85 and Connor's normal approximation 0.83 where the test has 0.80; a power computed
# without the continuity correction resolves differences the test detects only 71-79% of the
# time in this simulation (checked when this test was written).
REPLICATES = 20_000
TOLERANCE = 0.015


def simulated_power(n_pairs: int, p10: float, p01: float, seed: int) -> float:
    """Share of REPLICATES seeded replicate runs of the paired design (n_pairs prompts, each a
    (1, 0) pair with chance p10, (0, 1) with p01) in which analysis.stats.mcnemar (the report's
    test) gives p <= 0.05."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_pairs, [p10, p01, 1 - p10 - p01], size=REPLICATES)[:, :2]
    pairs, times = np.unique(counts, axis=0, return_counts=True)
    rejected = [mcnemar(b, c).p_value <= 0.05 for b, c in pairs]
    return float(np.sum(times[rejected]) / REPLICATES)


@pytest.mark.parametrize(
    ("n_pairs", "share"),
    [(250, 0.15), (100, 0.12), (1319, 0.30)],
    ids=["xstest-s-one-seed", "exact-test-region", "orbench-one-seed"],
)
def test_resolvable_difference_is_detected_80_percent_of_the_time_in_simulation(n_pairs, share):
    delta = resolvable_difference(n_pairs, share)
    p10, p01 = (share - delta) / 2, (share + delta) / 2
    assert abs(simulated_power(n_pairs, p10, p01, seed=n_pairs) - 0.80) <= TOLERANCE
    # Half that difference: the computed power (well below 0.8) matches the simulation too.
    half = ((share - delta / 2) / 2, (share + delta / 2) / 2)
    computed = mcnemar_power(n_pairs, *half)
    assert computed < 0.5
    assert abs(simulated_power(n_pairs, *half, seed=n_pairs + 1) - computed) <= TOLERANCE


def test_rejection_edges_are_the_report_tests():
    """The tails the power sums are exactly where analysis.stats.mcnemar gives p <= 0.05: the
    exact binomial test under 25 discordant pairs, the corrected chi-square from there."""
    for d in range(1, 61):
        edge = int(_tail_edge(np.array([d]), 0.05, 25)[0])
        for b in range(d + 1):
            assert (mcnemar(b, d - b).p_value <= 0.05) == (min(b, d - b) <= edge), (d, b)


def test_pairs_needed_approaches_connors_approximation_for_small_gaps():
    # Many pairs: the continuity correction and the discreteness fade; within 2%.
    p10, p01 = 0.095, 0.105
    exact = pairs_needed(p10, p01)
    assert abs(exact / connor_pairs(p10, p01) - 1) < 0.02
    assert mcnemar_power(exact, p10, p01) >= 0.8 > mcnemar_power(exact - 1, p10, p01)


def test_pairs_needed_counts_whole_seeds():
    # A 0.02 gap at 10% discordance, one seed = 250 prompts: the fewest seeds that reach 0.8.
    n = pairs_needed(0.04, 0.06, step=250)
    assert n % 250 == 0
    assert mcnemar_power(n, 0.04, 0.06) >= 0.8 > mcnemar_power(n - 250, 0.04, 0.06)
    assert pairs_needed(0.05, 0.05, step=250) is None  # no gap: never
    assert pairs_needed(0.0499, 0.0501, step=250, most=10_000) is None


def test_discordance_from_rates_and_correlation():
    assert discordance(0.7, 0.8, 0.0) == pytest.approx(0.7 * 0.2 + 0.8 * 0.3)  # independent
    assert discordance(0.7, 0.7, 1.0) == pytest.approx(0.0)
    assert discordance(0.75, 0.75, 0.5) == pytest.approx(0.1875)
    assert discordance(0.1, 0.5, 0.99) == pytest.approx(0.4)  # never below |p1 - p2|


def test_resolvable_shift_has_no_room_below_a_small_rate():
    # 200 XSTest-H prompts at a 3% harmful rate: a rise of ~5 points is resolvable, no fall is.
    up = resolvable_shift(200, 0.03, 0.5, up=True)
    assert 0.03 < up < 0.07
    assert resolvable_shift(200, 0.03, 0.5, up=False) is None
    # Symmetric at 0.5; more pairs resolve less (about 1/sqrt of the pairs).
    at_half = resolvable_shift(400, 0.5, 0.5, up=True)
    assert at_half == pytest.approx(resolvable_shift(400, 0.5, 0.5, up=False), abs=2e-4)
    assert resolvable_shift(1600, 0.5, 0.5) == pytest.approx(at_half / 2, rel=0.08)
    # Compare with a normal-theory difference of two paired proportions at the same share.
    share = discordance(0.5, 0.5 + at_half, 0.5)
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    assert at_half == pytest.approx(z * np.sqrt(share / 400), rel=0.1)


def test_resolvable_difference_needs_discordant_pairs():
    assert resolvable_difference(200, 0.0) is None
    assert resolvable_difference(10, 0.2) is None  # two discordant pairs: never significant


def paper_rows(*sets: str):
    cfg = load_config(REPO / "jobs" / "paper.yaml", list(sets))
    columns = planned_columns(cfg.eval.benchmarks, cfg.eval.harm_judge is not None)
    return cfg, {r.column: r for r in power_rows(cfg, columns, published_pairs(cfg.grid.models))}


def test_paper_grid_power_per_table3_column():
    cfg, rows = paper_rows()
    assert set(rows) == {label for label, _, _ in TABLE3_LAYOUT}
    xs = rows["XSTest-S"]
    assert (xs.prompts, xs.seeds, xs.published) == (250, 1, True)
    assert xs.rate == pytest.approx(
        np.mean([p for p, _ in published_pairs(cfg.grid.models)["XSTest-S"]])
    )
    assert 0.06 < xs.resolvable_up < 0.1 and len(xs.gaps) == 30
    assert not rows["XSTest-H compliance"].published  # the paper has no such column
    text = format_power(cfg, list(rows.values()))
    assert "power 0.80" in text and "power.outcome_correlation" in text
    assert "XSTest-S" in text and "250 x 1" in text


def test_more_seeds_resolve_smaller_differences_and_more_paper_gaps():
    _, one = paper_rows()
    _, three = paper_rows("grid.seeds=[0,1,2]")
    for column in ("XSTest-S", "OR-Bench", "GSM8K"):
        a, b = one[column], three[column]
        assert b.pairs == 3 * a.pairs
        assert b.resolvable_up == pytest.approx(a.resolvable_up / np.sqrt(3), rel=0.1)
        assert a.seeds_needed == b.seeds_needed  # what a gap needs does not depend on the plan
    resolved = [sum(s is not None and s <= r.seeds for s in r.seeds_needed) for r in one.values()]
    resolved3 = [
        sum(s is not None and s <= r.seeds for s in r.seeds_needed) for r in three.values()
    ]
    assert all(x <= y for x, y in zip(resolved, resolved3, strict=True)) and resolved != resolved3


def test_columns_that_need_a_harm_judge_are_planned_only_with_one():
    _, rows = paper_rows("eval.harm_judge=null")
    assert "XSTest-H compliance" in rows and "XSTest-H harmful" not in rows
    assert not any("unsafe or complying" in column for column in rows)
    # Both readings of the paper's CR take its published XSTest-H values.
    _, rows = paper_rows()
    assert rows["XSTest-H harmful"].gaps == rows["XSTest-H unsafe or complying"].gaps != ()


def test_a_grid_without_none_has_no_comparison():
    cfg, rows = paper_rows("grid.conditions=[internal, external]")
    assert rows == {}
    assert "no Table 3 comparison" in format_power(cfg, [])
