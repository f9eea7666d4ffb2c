"""The paper's published numbers and a side-by-side comparison with reproduced ones.

    published = paper_table3()                 # long: model, benchmark, condition, value
    side_by_side(reproduced, published)        # reproduced with CI next to published
    published_pairs(["llama-2-7b"])            # Table 3 column -> (none, condition) values

`paper_table3.csv` transcribes PAPER.md section 6 (Table 3; 15 base models x 7 benchmarks x
none/internal/external, our registry names). `paper_table1.csv` transcribes section 7
(Table 1; chat models, prompt-direct vs prompt-cot) under the registry's chat-model names
(tbr_ray.models.CHAT_MODELS, e.g. llama-2-7b-chat); pass `model_aliases` when a run names
them otherwise (e.g. by a local path). Published values are rounded to two decimals.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.tables import HARM_METRICS, TABLE3_LAYOUT

DATA_DIR = Path(__file__).resolve().parent
TABLE3_CSV = DATA_DIR / "paper_table3.csv"
TABLE1_CSV = DATA_DIR / "paper_table1.csv"
# The paper prints two decimals: a published value within half a unit of the CI still agrees.
ROUNDING_TOLERANCE = 0.005
SIDE_BY_SIDE_COLUMNS = [
    "model",
    "benchmark",
    "metric",  # kept when the reproduced rows carry it (safety sets are compared two ways)
    "condition",
    "reproduced",
    "ci_low",
    "ci_high",
    "published",
    "difference",
    "outside_ci",
]


def paper_table3() -> pd.DataFrame:
    """Table 3: model, paper_model, benchmark, condition (none/internal/external), value."""
    return pd.read_csv(TABLE3_CSV)


def paper_table1() -> pd.DataFrame:
    """Table 1: model, paper_model, benchmark (xstest_safe/xstest_unsafe), condition
    (prompt-direct/prompt-cot), value."""
    return pd.read_csv(TABLE1_CSV)


def published_results() -> pd.DataFrame:
    """Tables 3 and 1 together, keyed by model, benchmark, condition."""
    return pd.concat([paper_table3(), paper_table1()], ignore_index=True)


def side_by_side(
    reproduced: pd.DataFrame,
    published: pd.DataFrame | None = None,
    model_aliases: dict[str, str] | None = None,
    tolerance: float = ROUNDING_TOLERANCE,
) -> pd.DataFrame:
    """Reproduced values (model, benchmark, condition, value, ci_low, ci_high) next to the
    published ones, for the keys both have.

    `outside_ci` is True when the published value lies outside [ci_low - tolerance,
    ci_high + tolerance] (tolerance: the paper's rounding). `model_aliases` maps a run's model
    names to the names in the published tables (e.g. a chat model's local folder name).
    """
    published = published_results() if published is None else published
    ours = reproduced.assign(model=reproduced["model"].replace(model_aliases or {}))
    ours = ours.rename(columns={"value": "reproduced"})
    theirs = published[["model", "benchmark", "condition", "value"]].rename(
        columns={"value": "published"}
    )
    merged = ours.merge(theirs, on=["model", "benchmark", "condition"], how="inner")
    merged["difference"] = merged["reproduced"] - merged["published"]
    below = merged["published"] < merged["ci_low"] - tolerance
    above = merged["published"] > merged["ci_high"] + tolerance
    merged["outside_ci"] = np.where(merged["ci_low"].isna(), False, below | above)
    return merged[[c for c in SIDE_BY_SIDE_COLUMNS if c in merged]].reset_index(drop=True)


def paper_means(published: pd.DataFrame | None = None) -> pd.DataFrame:
    """Mean published value per benchmark x condition (PAPER.md states these for Table 3)."""
    table = paper_table3() if published is None else published
    return table.pivot_table(index="benchmark", columns="condition", values="value", aggfunc="mean")


def paper_columns(benchmark: str) -> list[str]:
    """The Table 3 columns (TABLE3_LAYOUT's labels) that read the paper's number for a
    benchmark: on the two safety sets both readings of its CR (HARM_METRICS: harmful; unsafe or
    complying), else the benchmark's only column; [] for a benchmark Table 3 does not have."""
    mine = [(label, metric) for label, bench, metric in TABLE3_LAYOUT if bench == benchmark]
    harm = [label for label, metric in mine if metric in HARM_METRICS]
    return harm or [label for label, _ in mine]


def published_pairs(
    models: Sequence[str] = (), baseline: str = "none"
) -> dict[str, list[tuple[float, float]]]:
    """Table 3 column -> the paper's (baseline, condition) values, one pair per model x other
    condition (internal, external), for the given models where the paper has them, else for
    all 15: what the dry run's power section (tbr_ray.plan.power_plan) takes as the paper's
    rates and gaps."""
    table = paper_table3()
    mine = table[table["model"].isin(list(models))]
    table = mine if len(mine) else table
    wide = table.pivot_table(index=["model", "benchmark"], columns="condition", values="value")
    out: dict[str, list[tuple[float, float]]] = {}
    for (_, benchmark), row in wide.iterrows():
        for condition in (c for c in wide.columns if c != baseline):
            if pd.notna(row[baseline]) and pd.notna(row[condition]):
                for column in paper_columns(benchmark):
                    pair = (float(row[baseline]), float(row[condition]))
                    out.setdefault(column, []).append(pair)
    return out
