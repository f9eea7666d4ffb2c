"""Uncertainty and paired tests for per-prompt outcomes (pure functions of arrays and frames).

    bootstrap_ci(outcomes_of_one_cell)                 # 95% percentile CI over prompts
    hierarchical_bootstrap_ci([seed0, seed1, seed2])   # over seeds, then prompts
    mcnemar(b=10, c=2)                                 # exact: p = 0.0386
    summary_table(prompt_outcomes(results))            # value, ci_low, ci_high, n per cell
    paired_tests(outcomes, judge="paper-keywords")     # each condition vs `none`, same prompts
    with_resolution(paired_tests(...))                 # + what those pairs can resolve

Bootstrap scheme. One seed: `scipy.stats.bootstrap`'s percentile interval of the mean over
prompts (resampled with replacement, n_boot times). Several seeds (no library has this one): a
two-stage bootstrap. Each replicate draws S seeds with replacement, then for each drawn seed an
independent prompt resample, and averages the S means. This keeps both seed-to-seed (training)
variance and prompt sampling variance in the interval. There, for 0/1 outcomes, the mean of a
prompt resample is Binomial(n, p_hat) / n, so it is drawn directly (same distribution, no
n x n_boot index matrix).

McNemar. For a condition against `none` on the same prompts, b = prompts with outcome 1 under
`none` and 0 under the condition, c = the reverse. With b + c < `exact_below` (default 25) the
test is exact: two-sided binomial test of b successes in b + c trials at p = 0.5. Otherwise the
chi-square statistic with continuity correction, (|b - c| - 1)^2 / (b + c), on 1 df.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

from analysis.tables import CELL_KEYS, RATE_KEYS, metric_judge

# The power arithmetic of the paired design, shared with the dry run (a pure leaf module);
# EXACT_BELOW: discordant pairs under which McNemar uses the exact binomial test.
from tbr_ray.plan.power import EXACT_BELOW, resolvable_difference

DEFAULT_N_BOOT = 2000  # more: smoother interval ends, linearly more time
DEFAULT_CONFIDENCE = 0.95
_CHUNK_ELEMENTS = 4_000_000  # cap on the resampling index matrix for non-binary data


# ------------------------------------------------------------------ bootstrap


def _bootstrap_means(values: np.ndarray, n_draws: int, rng: np.random.Generator) -> np.ndarray:
    """n_draws means of prompt resamples of `values` (with replacement, same size)."""
    n = len(values)
    if np.isin(values, (0.0, 1.0)).all():
        return rng.binomial(n, values.mean(), size=n_draws) / n
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // n)
    means = [
        values[rng.integers(0, n, size=(min(rows_per_chunk, n_draws - start), n))].mean(1)
        for start in range(0, n_draws, rows_per_chunk)
    ]
    return np.concatenate(means)


def _interval(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over prompts (scipy.stats.bootstrap); (nan, nan) for
    no data, the value itself for one prompt (scipy needs two)."""
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        value = float(values[0]) if values.size else float("nan")
        return value, value
    ci = sps.bootstrap(
        (values,),
        np.mean,
        n_resamples=n_boot,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        batch=max(1, _CHUNK_ELEMENTS // values.size),  # bounds the resample index matrix
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return float(ci.low), float(ci.high)


def hierarchical_bootstrap_ci(
    groups: Sequence[Sequence[float] | np.ndarray],
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float]:
    """Two-stage CI of the mean of per-seed means: resample seeds, then prompts within each
    drawn seed (independently per draw). One group reduces to `bootstrap_ci`."""
    arrays = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if not arrays:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    n_seeds = len(arrays)
    picks = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    draws = np.empty((n_boot, n_seeds))
    for s, values in enumerate(arrays):
        chosen = picks == s
        draws[chosen] = _bootstrap_means(values, int(chosen.sum()), rng)
    return _interval(draws.mean(axis=1), confidence)


# ------------------------------------------------------------------ McNemar


@dataclass(frozen=True)
class McNemarResult:
    b: int  # outcome 1 under the baseline, 0 under the condition
    c: int  # outcome 0 under the baseline, 1 under the condition
    statistic: float  # chi2-cc: the corrected chi-square statistic; otherwise nan
    p_value: float
    method: str  # "exact-binomial" | "chi2-cc" | "no-discordant-pairs"


def mcnemar(b: int, c: int, exact_below: int = EXACT_BELOW) -> McNemarResult:
    """McNemar's test from the two discordant counts (see the module docstring)."""
    b, c = int(b), int(c)
    if b + c == 0:
        return McNemarResult(b, c, float("nan"), 1.0, "no-discordant-pairs")
    if b + c < exact_below:
        p = sps.binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
        return McNemarResult(b, c, float("nan"), float(p), "exact-binomial")
    statistic = (abs(b - c) - 1) ** 2 / (b + c)
    return McNemarResult(b, c, float(statistic), float(sps.chi2.sf(statistic, 1)), "chi2-cc")


def discordant_counts(baseline: Sequence[float], treated: Sequence[float]) -> tuple[int, int]:
    """(b, c) for paired 0/1 outcomes: b = baseline 1 & treated 0, c = baseline 0 & treated 1."""
    base = np.asarray(baseline, dtype=bool)
    treat = np.asarray(treated, dtype=bool)
    return int((base & ~treat).sum()), int((~base & treat).sum())


def paired_tests(
    outcomes: pd.DataFrame,
    judge: str = "paper-keywords",
    baseline: str = "none",
    conditions: Sequence[str] | None = None,
    exact_below: int = EXACT_BELOW,
) -> pd.DataFrame:
    """McNemar per model x benchmark x metric x condition x gamma against `baseline`.
    `conditions`: those to test (None: every condition except `baseline` and `base`).

    Pairs are the same (seed, prompt_id) under both conditions: with several seeds each seed's
    condition cell is paired with the same seed's baseline cell, pooled into one table.
    Every Table 3 metric is tested, each read from its own judge (tables.metric_judge):
    compliance and unsafe-or-complying from `judge`, harmful rate from the harm judge, accuracy
    from none ("").
    `q_value`: Benjamini-Hochberg adjusted p-values over all rows returned (many tests are run
    at once; read q, not p, when scanning the table for effects).
    """
    wanted = outcomes["metric"].map(lambda m: metric_judge(m, judge))
    sel = outcomes[outcomes["judge"] == wanted]
    keys = ["model", "seed", "benchmark", "metric", "prompt_id"]
    base = sel[sel["condition"] == baseline][keys + ["outcome"]]
    if conditions is None:
        others = sel[~sel["condition"].isin([baseline, "base"])]
    else:
        others = sel[sel["condition"].isin(list(conditions))]
    paired = others.merge(base, on=keys, suffixes=("", "_baseline"))
    rows = [
        _test_row(group, exact_below, key)
        for key, group in paired.groupby(
            ["model", "benchmark", "metric", "condition", "gamma"], sort=True
        )
    ]
    columns = [
        "model",
        "benchmark",
        "metric",
        "baseline",
        "condition",
        "gamma",
        "n_pairs",
        "baseline_rate",
        "condition_rate",
        "b",
        "c",
        "statistic",
        "p_value",
        "q_value",
        "method",
    ]
    out = pd.DataFrame(rows, columns=columns).assign(baseline=baseline)
    if len(out):
        out["q_value"] = sps.false_discovery_control(out["p_value"].to_numpy(), method="bh")
    return out


def _test_row(group: pd.DataFrame, exact_below: int, key: tuple) -> dict:
    b, c = discordant_counts(group["outcome_baseline"], group["outcome"])
    result = mcnemar(b, c, exact_below)
    return dict(
        zip(["model", "benchmark", "metric", "condition", "gamma"], key, strict=True),
        n_pairs=len(group),
        baseline_rate=group["outcome_baseline"].mean(),
        condition_rate=group["outcome"].mean(),
        b=b,
        c=c,
        statistic=result.statistic,
        p_value=result.p_value,
        q_value=float("nan"),
        method=result.method,
    )


def with_resolution(tests: pd.DataFrame) -> pd.DataFrame:
    """`paired_tests` rows plus what their own pairs can resolve (after a run, the dry run's
    power statement from the observed data): `difference` (condition minus baseline rate,
    (c - b) / n_pairs), `discordance` ((b + c) / n_pairs), `phi` (the correlation of the two
    outcomes on a prompt; NaN when one condition's outcome never varies), `resolvable` (the
    smallest difference n_pairs pairs at that discordance detect with power POWER at ALPHA,
    two-sided: tbr_ray.plan.power.resolvable_difference; NaN: none can be), and `resolved`
    (|difference| >= resolvable)."""
    n, b, c = (tests[k].to_numpy(dtype=float) for k in ("n_pairs", "b", "c"))
    ones = np.rint(tests["baseline_rate"].to_numpy(dtype=float) * n)  # baseline outcome 1
    both, neither = ones - b, n - ones - c
    margins = ones * (n - ones) * (both + c) * (b + neither)
    with np.errstate(divide="ignore", invalid="ignore"):
        phi = np.where(margins > 0, (both * neither - b * c) / np.sqrt(margins), np.nan)
    resolvable = [
        resolvable_difference(int(k), (x + y) / k) if k else None
        for k, x, y in zip(n, b, c, strict=True)
    ]
    out = tests.assign(
        difference=(c - b) / n,
        discordance=(b + c) / n,
        phi=phi,
        resolvable=[np.nan if r is None else r for r in resolvable],
    )
    return out.assign(resolved=out["difference"].abs() >= out["resolvable"])


# ------------------------------------------------------------------ summary with CIs


SUMMARY_COLUMNS = [
    "model",
    "condition",
    "gamma",
    "seed",
    "benchmark",
    "judge",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "n",
]


def summary_table(
    outcomes: pd.DataFrame,
    n_boot: int = DEFAULT_N_BOOT,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per cell x benchmark x judge x metric (seed = that cell's seed, CI over prompts),
    plus, where a model x condition x gamma has several seeds, a row with seed = <NA>: the mean
    of the per-seed values with the two-stage CI, and n = prompts summed over seeds."""
    rows = []
    for key, group in outcomes.groupby(RATE_KEYS, sort=True):
        values = group["outcome"].to_numpy(dtype=float)
        low, high = bootstrap_ci(values, n_boot, confidence, seed)
        rows.append((*key, values.mean(), low, high, len(values)))
    per_seed = pd.DataFrame(rows, columns=RATE_KEYS + ["value", "ci_low", "ci_high", "n"])
    pooled = _over_seeds(outcomes, n_boot, confidence, seed)
    out = pd.concat([per_seed, pooled], ignore_index=True) if len(pooled) else per_seed
    out["seed"] = out["seed"].astype("Int64")
    return out[SUMMARY_COLUMNS].reset_index(drop=True)


def _over_seeds(outcomes: pd.DataFrame, n_boot: int, confidence: float, seed: int) -> pd.DataFrame:
    keys = [k for k in RATE_KEYS if k != "seed"]
    rows = []
    for key, group in outcomes.groupby(keys, sort=True):
        per_seed = [g["outcome"].to_numpy(dtype=float) for _, g in group.groupby("seed")]
        if len(per_seed) < 2:
            continue
        low, high = hierarchical_bootstrap_ci(per_seed, n_boot, confidence, seed)
        value = float(np.mean([v.mean() for v in per_seed]))
        rows.append((*key, pd.NA, value, low, high, sum(len(v) for v in per_seed)))
    return pd.DataFrame(rows, columns=keys + ["seed", "value", "ci_low", "ci_high", "n"])


def headline_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The row to quote per model x condition x gamma x benchmark x judge x metric: the
    over-seeds row when several seeds exist, else the single seed's row."""
    keys = [k for k in CELL_KEYS if k != "seed"] + ["benchmark", "judge", "metric"]
    ranked = summary.assign(_single=summary["seed"].notna())
    ranked = ranked.sort_values("_single", kind="stable")
    return ranked.drop_duplicates(keys, keep="first").drop(columns="_single").reset_index(drop=True)
