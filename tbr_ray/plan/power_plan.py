"""The dry run's power section (pure): for every Table 3 column of a config, the smallest
difference from `none` that its prompts and seeds resolve, and the seeds the paper's own gaps
would need.

    # the paper's Table 3 as analysis/ holds it, passed in by the command line (tbr_ray.cli):
    columns = planned_columns(cfg.eval.benchmarks, cfg.eval.harm_judge is not None)
    rows = power_rows(cfg, columns, published_pairs(cfg.grid.models))
    print(format_power(cfg, rows))
    tbr-ray ablate --config jobs/paper.yaml --dry-run --config-only --gpus 8 --gpu-memory 80

The comparison is Table 3's: internal or external against `none`, one model, pairs = the
column's prompts x the grid's seeds (each seed's cell paired with the same seed's `none` cell,
pooled as the report's paired tests pool them). The discordance (share of pairs whose outcomes
differ) is not known before a run: it is set from the column's rate (the paper's mean `none`
value over the grid's models; 0.5, the most discordant, where the paper has none) and
`power.outcome_correlation` (tbr_ray.plan.power.discordance). The arithmetic is
tbr_ray.plan.power's.
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tabulate import tabulate

from tbr_ray.config import RunConfig
from tbr_ray.plan.cost import eval_prompts
from tbr_ray.plan.power import ALPHA, POWER, discordance, pairs_needed, resolvable_shift
from tbr_ray.vocab import GAMMA_CONDITIONS

UNKNOWN_RATE = 0.5  # a column the paper publishes no value for: the most discordant rate
MOST_SEEDS = 999  # seeds beyond this print as ">999"


@dataclass(frozen=True)
class ColumnPower:
    """One Table 3 column of a plan: pairs per model and condition, the assumed `none` rate
    and discordance at equal rates, the smallest resolvable rise and fall from that rate (None:
    none within [0, 1]), and per published gap |condition - none| the seeds it needs (None:
    more than MOST_SEEDS)."""

    column: str
    benchmark: str
    prompts: int
    seeds: int
    rate: float
    published: bool  # rate from the paper (else UNKNOWN_RATE)
    discordance: float
    resolvable_up: float | None
    resolvable_down: float | None
    gaps: tuple[float, ...]
    seeds_needed: tuple[int | None, ...]

    @property
    def pairs(self) -> int:
        return self.prompts * self.seeds


def compared(cfg: RunConfig) -> list[str]:
    """The conditions Table 3 compares with `none` in this grid (none: no comparison)."""
    if "none" not in cfg.grid.conditions:
        return []
    return [c for c in cfg.grid.conditions if c in GAMMA_CONDITIONS]


def power_rows(
    cfg: RunConfig,
    columns: Sequence[tuple[str, str, str]],
    published: Mapping[str, Sequence[tuple[float, float]]],
) -> list[ColumnPower]:
    """One row per Table 3 column the config fills. `columns`: (column, benchmark, metric) of
    those (analysis.tables.planned_columns). `published`: column -> the paper's (none,
    condition) values per model x condition (analysis.paper.published_pairs)."""
    if not compared(cfg):
        return []
    rho, seeds = cfg.power.outcome_correlation, len(cfg.grid.seeds)
    rows = []
    for column, benchmark, _ in columns:
        pairs = tuple(published.get(column, ()))
        rate = sum(p for p, _ in pairs) / len(pairs) if pairs else UNKNOWN_RATE
        prompts = eval_prompts(cfg, benchmark)
        n = prompts * seeds
        needed = tuple(_seeds_needed(p0, p1, rho, prompts) for p0, p1 in pairs)
        rows.append(
            ColumnPower(
                column,
                benchmark,
                prompts,
                seeds,
                rate,
                bool(pairs),
                discordance(rate, rate, rho),
                resolvable_shift(n, rate, rho, up=True),
                resolvable_shift(n, rate, rho, up=False),
                tuple(abs(p1 - p0) for p0, p1 in pairs),
                needed,
            )
        )
    return rows


@functools.lru_cache(maxsize=4096)  # the paper's gaps repeat (two decimals)
def _seeds_needed(p0: float, p1: float, rho: float, prompts: int) -> int | None:
    """Seeds (of `prompts` pairs each) that resolve the rates p0 -> p1 with POWER."""
    psi = discordance(p0, p1, rho)
    delta = p1 - p0
    n = pairs_needed((psi - delta) / 2, (psi + delta) / 2, prompts, most=MOST_SEEDS * prompts)
    return None if n is None else n // prompts


def _median_gap(row: ColumnPower) -> tuple[str, str]:
    """(the median published gap, the seeds it needs): the lower median of |gap|, with the
    seeds that gap itself needs at its own rates."""
    if not row.gaps:
        return "-", "-"
    order = sorted(range(len(row.gaps)), key=row.gaps.__getitem__)
    i = order[(len(order) - 1) // 2]
    seeds = row.seeds_needed[i]
    return f"{row.gaps[i]:.3f}", f">{MOST_SEEDS}" if seeds is None else str(seeds)


def _shift(value: float | None, sign: str) -> str:
    return "none" if value is None else f"{sign}{value:.3f}"


def _record(row: ColumnPower) -> dict:
    gaps = row.gaps
    resolved = sum(s is not None and s <= row.seeds for s in row.seeds_needed)
    median_gap, its_seeds = _median_gap(row)
    return {
        "column": row.column,
        "prompts x seeds": f"{row.prompts} x {row.seeds}",
        "rate": f"{row.rate:.2f}" + ("" if row.published else "*"),
        "discordant": f"{row.discordance:.3f}",
        "resolvable": f"{_shift(row.resolvable_up, '+')} / {_shift(row.resolvable_down, '-')}",
        "paper gaps": len(gaps) or "-",
        "median gap": median_gap,
        "seeds it needs": its_seeds,
        "resolved here": f"{resolved}/{len(gaps)}" if gaps else "-",
    }


def format_power(cfg: RunConfig, rows: Sequence[ColumnPower]) -> str:
    """The power section of the dry run: a table, then what it assumes, in words."""
    if not rows:
        return (
            "power: no Table 3 comparison in this grid (it needs `none` and internal or "
            "external in grid.conditions, and a Table 3 benchmark in eval.benchmarks)."
        )
    conditions = " and ".join(compared(cfg))
    head = (
        f"power: {conditions} against `none`, per model; pairs = prompts x seeds, each prompt "
        f"answered under both conditions; the report's McNemar test, two-sided alpha {ALPHA}, "
        f"power {POWER:.2f}"
    )
    table = tabulate([_record(r) for r in rows], "keys", "simple", disable_numparse=True)
    notes = (
        "rate: the paper's mean `none` value of the column over these models (* none "
        f"published: {UNKNOWN_RATE}, the most discordant). discordant: the share of pairs "
        "whose outcomes differ, from the rate and an assumed correlation of "
        f"{cfg.power.outcome_correlation} between the two conditions' outcomes on one prompt "
        "(power.outcome_correlation; not yet measured at paper scale: each report prints its "
        "run's own). resolvable: the smallest rise / fall from the `none` rate that these pairs "
        "detect with that power (discordance growing with the gap; none: no gap within 0-1). "
        "paper gaps: |internal - none| and |external - none| in the paper's Table 3 for these "
        "models (for all 15 where the grid has none of them); seeds it needs: the seeds the "
        "median gap needs at its own rates; resolved here: the gaps this grid's seeds resolve."
    )
    return "\n".join([textwrap.fill(head, 100), table, textwrap.fill(notes, 100)])
