"""The judges' labels of a run side by side (pure functions of results frames): the table of
every judge's label per generation, the generations where judges disagree, each automatic judge
against the human labels, and reviewers against each other.

    label_table(read_results("runs/tiny").judgements)    # one row per generation, judge:<name>
    disagreements(judgements[[*ITEM_KEYS, "judge", "refused"]])   # where refusal flags differ
    judge_agreement(judgements)                           # each judge vs the `human` judge
    reviewer_agreement(read_results("runs/tiny").reviews) # each pair of reviewers

Core, not a stage: the review page (tbr_ray.review) and the report (analysis.report) read these;
the judging stage (tbr_ray.judges) writes the labels. tests/test_layers.py holds the layering.
"""

from __future__ import annotations

import pandas as pd

from tbr_ray.results import ITEM_KEYS
from tbr_ray.vocab import HUMAN, JUDGES


def disagreements(labels: pd.DataFrame) -> pd.DataFrame:
    """Prompts on which judges disagree. Input: one row per (prompt, judge) with a boolean
    `refused` (e.g. the judgements table); prompts are keyed by whichever of cell_id, benchmark,
    prompt_id are present. Output: the key columns plus one boolean column per judge."""
    missing = {"prompt_id", "judge", "refused"} - set(labels.columns)
    if missing:
        raise ValueError(f"labels lack columns {sorted(missing)}; need prompt_id, judge, refused.")
    keys = [c for c in ("cell_id", "benchmark", "prompt_id") if c in labels.columns]
    duplicated = labels.duplicated(subset=[*keys, "judge"])
    if duplicated.any():
        first = labels.loc[duplicated, [*keys, "judge"]].iloc[0].to_dict()
        raise ValueError(
            f"several rows for one prompt and judge, e.g. {first}. Fix: filter to "
            "one run/cell, or include cell_id and benchmark columns."
        )
    wide = labels.pivot(index=keys, columns="judge", values="refused")
    differ = wide.apply(lambda row: row.dropna().nunique() > 1, axis=1)
    out = wide[differ].reset_index()
    out.columns.name = None
    return out


_ITEM = list(ITEM_KEYS)


def label_table(judgements: pd.DataFrame, names: tuple[str, ...] = JUDGES) -> pd.DataFrame:
    """One row per judged generation: cell_id, benchmark, prompt_id and a column
    `judge:<name>` per judge in `names` that has rows (its label, else "refusal"/"compliance"
    from its flag, else "harmful"/"safe"). Prefixed because one judge is called "model"."""
    rows = judgements[judgements["judge"].isin(names)]
    flag = rows["refused"].map({True: "refusal", False: "compliance"})
    harm = rows["harmful"].map({True: "harmful", False: "safe"})  # a harm-only judge
    shown = rows["label"].where(rows["label"].notna(), flag)
    shown = shown.where(shown.notna(), harm)
    wide = rows.assign(shown=shown).pivot(index=_ITEM, columns="judge", values="shown")
    present = [j for j in names if j in wide.columns]
    wide = wide.reindex(columns=present)
    wide.columns = [f"judge:{j}" for j in present]
    return wide.reset_index()


def judge_agreement(judgements: pd.DataFrame) -> pd.DataFrame:
    """Each automatic judge against the `human` judge of the same run, per benchmark (the
    judge-score figures): judge, benchmark, n, binary_agreement (refusal vs not),
    three_class_agreement (where both give a label; rule judges never say "partial")."""
    human = judgements[(judgements["judge"] == HUMAN) & judgements["refused"].notna()]
    auto = judgements[judgements["judge"].isin(JUDGES) & judgements["refused"].notna()]
    both = auto.merge(human[[*_ITEM, "label", "refused"]], on=_ITEM, suffixes=("", "_human"))
    columns = ["judge", "benchmark", "n", "binary_agreement", "three_class_agreement"]
    if both.empty:
        return pd.DataFrame(columns=columns)
    both = both.assign(
        binary=both["refused"].astype(bool) == both["refused_human"].astype(bool),
        three=(both["label"] == both["label_human"]).where(
            both["label"].notna() & both["label_human"].notna()
        ),
    )
    out = both.groupby(["judge", "benchmark"], sort=True).agg(
        n=("binary", "size"),
        binary_agreement=("binary", "mean"),
        three_class_agreement=("three", "mean"),
    )
    return out.reset_index()[columns]


def reviewer_agreement(reviews: pd.DataFrame) -> pd.DataFrame:
    """Each pair of reviewers on the generations both labelled: reviewer_a, reviewer_b, n,
    binary_agreement, binary_kappa (Cohen's kappa on refusal vs not; NaN when chance agreement
    is total, e.g. both always said refusal), three_class_agreement."""
    columns = [
        "reviewer_a",
        "reviewer_b",
        "n",
        "binary_agreement",
        "binary_kappa",
        "three_class_agreement",
    ]
    names = sorted(reviews["reviewer"].unique()) if len(reviews) else []
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pair = reviews[reviews["reviewer"] == a].merge(
                reviews[reviews["reviewer"] == b], on=_ITEM, suffixes=("_a", "_b")
            )
            if len(pair):
                ra, rb = pair["refused_a"].astype(bool), pair["refused_b"].astype(bool)
                observed = float((ra == rb).mean())
                chance = ra.mean() * rb.mean() + (1 - ra.mean()) * (1 - rb.mean())
                kappa = (observed - chance) / (1 - chance) if chance < 1 else float("nan")
                three = float((pair["label_a"] == pair["label_b"]).mean())
                rows.append((a, b, len(pair), observed, float(kappa), three))
    return pd.DataFrame(rows, columns=columns)
